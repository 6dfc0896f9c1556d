"""The model mode: forward and forward+backward of one batch, cai_jax vs torch."""

from __future__ import annotations

import jax
import numpy as np

from cai_jax.compile_options import gradient_program_options
from cai_jax.model import resolve_attention_impl
from launch.benchmark.hardware import peak_flops
from launch.benchmark.report import row
from launch.benchmark.timing import log, median, time_calls
from launch.benchmark.torch_ref import Setup, import_torch
from launch.benchmark.workload import Shapes, random_tokens


def measure(setup: Setup, shapes: Shapes, reps: int, ceilings: dict) -> dict:
  """Forward (logits) and forward+backward (mean next-token CE, all grads) of one batch."""
  from cai_jax.model import Mistral
  from cai_jax.train.lm import make_lm_loss
  cfg, params = setup.config, setup.params
  B, T = shapes.model_batch, shapes.model_seq
  tokens = random_tokens(1, (B, T), cfg.vocab_size)
  ones = np.ones((B, T), np.int32)
  batch = jax.device_put({"tokens": tokens, "segment_ids": ones, "loss_mask": ones,
                          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))})
  tokens_dev = batch["tokens"]

  forward = jax.jit(lambda p, t: Mistral(cfg).apply({"params": p}, t))
  lm_loss = make_lm_loss(cfg)

  def mean_loss(p, b):
    num, den, _ = lm_loss(p, b, None)
    return num / den

  grads = jax.jit(jax.grad(mean_loss), compiler_options=gradient_program_options())
  log(f"model: cai_jax forward {B}x{T}")
  ours_fwd = time_calls(lambda: jax.block_until_ready(forward(params, tokens_dev)), reps)
  log(f"model: cai_jax forward+backward {B}x{T}")
  ours_bwd = time_calls(lambda: jax.block_until_ready(grads(params, batch)), reps)
  setup.profile("model_forward_backward", lambda: jax.block_until_ready(grads(params, batch)))

  torch, _ = import_torch()
  model = setup.torch_lm(train=False)
  t_tokens = torch.as_tensor(tokens, dtype=torch.long, device=setup.torch_device)

  def torch_forward():
    with torch.no_grad(), setup.autocast():
      model(input_ids=t_tokens).logits
    setup.sync()

  def torch_forward_backward():
    model.zero_grad(set_to_none=True)
    with setup.autocast():
      loss = model(input_ids=t_tokens, labels=t_tokens).loss
    loss.backward()
    setup.sync()

  log(f"model: torch forward {B}x{T}")
  ref_fwd = time_calls(torch_forward, reps)
  model.train()
  log(f"model: torch forward+backward {B}x{T}")
  ref_bwd = time_calls(torch_forward_backward, reps)
  del model

  n_tok = B * T
  fwd_flops = cfg.flops_per_token(T) * n_tok
  r = {"batch": B, "seq_len": T, "forward_flops_per_token": cfg.flops_per_token(T),
       "attention_impl": resolve_attention_impl(cfg),
       "seconds": {"cai_jax_forward": ours_fwd, "torch_forward": ref_fwd,
                   "cai_jax_forward_backward": ours_bwd, "torch_forward_backward": ref_bwd}}
  tf, rf, tb, rb = map(median, (ours_fwd, ref_fwd, ours_bwd, ref_bwd))
  peak = peak_flops(ceilings)
  device = setup.device
  r["rows"] = [
      row("model", "forward tokens/s", "tok/s", n_tok / tf, n_tok / rf,
          floor=peak / cfg.flops_per_token(T), device=device),
      row("model", "forward GFLOP/s", "GFLOP/s", fwd_flops / tf / 1e9, fwd_flops / rf / 1e9,
          floor=peak / 1e9, device=device),
      row("model", "fwd+bwd tokens/s", "tok/s", n_tok / tb, n_tok / rb,
          floor=peak / (3 * cfg.flops_per_token(T)), device=device),
      row("model", "fwd+bwd GFLOP/s", "GFLOP/s", 3 * fwd_flops / tb / 1e9,
          3 * fwd_flops / rb / 1e9, floor=peak / 1e9, device=device),
  ]
  return r
