"""The sft and lora modes: one AdamW train step, cai_jax's vs a transformers + torch step
(lora: LoRA adapters on every projection of the frozen model, ours vs `peft`'s)."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.model import param_shardings, resolve_attention_impl
from cai_jax.model.config import LORA_TARGETS
from launch.benchmark.hardware import peak_flops
from launch.benchmark.report import row
from launch.benchmark.timing import log, median, time_calls
from launch.benchmark.torch_ref import Setup, import_torch
from launch.benchmark.workload import Shapes, random_tokens

SFT_OPTIM = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)
LORA_ALPHA = 32.0


def measure(setup: Setup, shapes: Shapes, reps: int, ceilings: dict, lora_rank: int = 0) -> dict:
  """A full train step: masked LM loss (answer-only: the last part of each row), grads,
  global-norm clipping, AdamW update. The torch side is what HF's Trainer runs:
  `loss.backward()`, `clip_grad_norm_`, fused AdamW (under bf16 autocast in the GPU
  mode). One step at (sft_batch, sft_seq), then each of `shapes.sft_extra`.

  With `lora_rank` (the lora mode) both sides train rank-r adapters (alpha 32) on every
  projection of the frozen model: ours fresh from `lora.init_adapters`, the step taking the
  frozen base as an argument (as `common.load_trained`'s stages run it), theirs with
  `peft.get_peft_model`, AdamW over the adapters alone. Its FLOPs per token count the forward and the input gradients
  (2x the forward): the frozen weights get no weight gradients."""
  runs = [(shapes.sft_batch, shapes.sft_seq)] + list(shapes.sft_extra)
  out = {"optimizer": {**SFT_OPTIM, "torch": "AdamW(fused=True)"},
         "attention_impl": resolve_attention_impl(setup.config), "runs": [], "rows": []}
  if lora_rank:
    out["lora"] = {"rank": lora_rank, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)}
  for i, (B, T) in enumerate(runs):
    res = _measure_once(setup, B, T, reps, ceilings, "" if i == 0 else f" B{B}xT{T}",
                        lora_rank)
    out["rows"] += res.pop("rows")
    out["runs"].append(res)
  return out


def _measure_once(setup: Setup, B: int, T: int, reps: int, ceilings: dict, suffix: str,
                  lora_rank: int) -> dict:
  import ml_collections

  from cai_jax import parallel
  from cai_jax.model import lora
  from cai_jax.train.lm import make_lm_loss
  from cai_jax.train.optim import make_optimizer
  from cai_jax.train.state import create_state, make_train_step
  mode = "lora" if lora_rank else "sft"
  cfg = setup.config.replace(lora_rank=lora_rank, lora_alpha=LORA_ALPHA,
                             lora_targets=LORA_TARGETS)
  tokens = random_tokens(2, (B, T), cfg.vocab_size)
  loss_mask = np.zeros((B, T), np.int32)
  loss_mask[:, T // 2:] = 1
  host_batch = {"tokens": tokens, "segment_ids": np.ones((B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                "loss_mask": loss_mask}

  mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
  optim_cfg = ml_collections.ConfigDict({**SFT_OPTIM, "schedule": "constant", "warmup_steps": 0})
  tx, schedule = make_optimizer(optim_cfg, total_steps=reps + 1)
  p_sh = param_shardings(cfg.without_lora(), mesh)
  batch_sh = {k: parallel.batch_sharding(mesh, 2) for k in host_batch}

  def run_ours():
    params = jax.tree_util.tree_map(jnp.copy, setup.params)  # create_state donates its input
    frozen, frozen_sh = {}, {}
    trained, trained_sh = params, p_sh
    if lora_rank:   # fresh adapters trained, the model's weights frozen
      frozen, frozen_sh = params, p_sh
      trained, trained_sh = lora.init_adapters(cfg, mesh, jax.random.PRNGKey(0))
    with parallel.use_mesh(mesh):
      state, st_sh = create_state(trained, tx, trained_sh, mesh)
      step = make_train_step(make_lm_loss(cfg), tx, schedule, accum_steps=1, shardings=st_sh,
                             batch_shardings=batch_sh, mesh=mesh, frozen=frozen,
                             frozen_shardings=frozen_sh)
      batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host_batch.items()}
      holder = {"state": state}

      def ours():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

      log(f"{mode}: cai_jax train step {B}x{T}")
      seconds = time_calls(ours, reps)
      setup.profile(f"{mode}_B{B}xT{T}", ours)
      return seconds

  def run_torch():
    torch, _ = import_torch()
    model = setup.torch_lm(train=True)
    if lora_rank:
      import peft
      model = peft.get_peft_model(model, peft.LoraConfig(
          r=lora_rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
          target_modules=list(LORA_TARGETS)))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=SFT_OPTIM["lr"],
                            betas=(SFT_OPTIM["b1"], SFT_OPTIM["b2"]), eps=SFT_OPTIM["eps"],
                            weight_decay=SFT_OPTIM["weight_decay"], fused=True)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=setup.torch_device)
    labels = ids.masked_fill(torch.as_tensor(loss_mask == 0, device=setup.torch_device), -100)

    def ref():
      with setup.autocast():
        loss = model(input_ids=ids, labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trained, SFT_OPTIM["grad_clip"])
      opt.step()
      opt.zero_grad(set_to_none=True)
      setup.sync()

    log(f"{mode}: torch train step {B}x{T}")
    seconds = time_calls(ref, reps)
    del model, opt
    if setup.torch_device.startswith("cuda"):
      torch.cuda.empty_cache()  # hand the memory back before JAX grows into it
    return seconds

  # On a GPU torch goes first and returns its cached memory: JAX's allocator keeps what
  # it grew into, which can leave torch too little for a 1B model's eager step.
  if setup.torch_device.startswith("cuda"):
    ref_s = run_torch()
    ours_s = run_ours()
  else:
    ours_s = run_ours()
    gc.collect()
    ref_s = run_torch()

  n_tok = B * T
  flops_tok = (2 if lora_rank else 3) * cfg.flops_per_token(T)
  peak = peak_flops(ceilings)
  device = setup.device
  ours_tps, ref_tps = n_tok / median(ours_s), n_tok / median(ref_s)
  return {"batch": B, "seq_len": T, "train_flops_per_token": flops_tok, "peak_flops": peak,
          "seconds": {"cai_jax": ours_s, "torch": ref_s},
          "rows": [
              row(mode, "train tokens/s" + suffix, "tok/s", ours_tps, ref_tps,
                  floor=peak / flops_tok, device=device),
              row(mode, "MFU %" + suffix, "%", 100 * ours_tps * flops_tok / peak,
                  100 * ref_tps * flops_tok / peak, device=device),
          ]}
