"""Side-by-side benchmarks: cai_jax against its PyTorch references, in one process.

`python -m launch.benchmark` is the entry point; this module holds the
measurements so a test can run each of them on a tiny model. Every mode runs
cai_jax and the reference on the same config, batch, lengths and the *same
random weights*: a `transformers.MistralForCausalLM` is drawn at roughly unit
activation scale (HF's 0.02 init gives near-flat logits, which would make
greedy decoding degenerate), saved with `save_pretrained`, and loaded into
cai_jax with `checkpoint.load_hf`. Absolute times drift between runs and
machines, so only the ratio measured in one run means much (BENCHMARKS.md).

Modes (`Shapes` holds the sizes; the defaults are BENCHMARKS.md's):
  model     forward and forward+backward of a batch, tokens/s and achieved FLOP/s
            (jitted `Mistral.apply` vs torch no_grad forward / `loss.backward()`).
  generate  greedy decode tok/s and time-to-first-token (`sampling.generate` vs
            transformers `generate` with its KV cache), exactly `gen_new` tokens.
  sft       one AdamW train step on a masked LM loss (`make_train_step` vs a
            transformers + torch step with fused AdamW, as HF's Trainer uses).
  ppo       seconds per PPO iteration split into rollout / scoring / update
            (`PPOTrainer` vs TRL 1.9.2's `trl.experimental.ppo.PPOTrainer`).

Timing rules: every measured call blocks until its result is ready; the first
call (compile / warm-up) is excluded; the median of `reps` calls is reported.
All cai_jax runs of a mode come before the torch runs, so the two thread pools
do not spin against each other. torch, transformers and trl are imported
inside functions only: they are test/benchmark dependencies, never the library's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.compile_options import gradient_program_options

MODES = ("model", "generate", "sft", "ppo")

# This 2-core CPU's fp32 matmul peak (BENCHMARKS.md), the denominator of MFU on CPU.
CPU_PEAK_FLOPS = 349e9

# BENCHMARKS.md's floors for the `small` preset on its reference machine: what the
# hardware allows at peak (FLOPs / peak, bytes / bandwidth). They apply to no other preset.
SMALL_FLOORS = {
    ("generate", "decode tok/s b8"): 1240.0,
    ("generate", "decode tok/s b32"): 3000.0,
    ("sft", "train tokens/s"): 1130.0,
    ("ppo", "rollout s"): 0.8,
    ("ppo", "score s"): 1.2,
    ("ppo", "update s"): 2.6,
    ("ppo", "iteration s"): 4.6,
}
# Reference figures BENCHMARKS.md recorded (not measured in this run; for the JSON only).
SMALL_REFERENCE_FIGURES = {
    "generate decode tok/s b8 (transformers)": 460.0,
    "sft train tokens/s (transformers+torch)": 504.0,
    "ppo iteration s (TRL)": 10.4,
    "ppo rollout s (TRL)": 3.2,
    "ppo score s (TRL)": 1.7,
    "ppo update s (TRL)": 5.0,
}
# Speed-up targets (cai_jax over the reference) from the issues and BENCHMARKS.md.
TARGETS = {
    ("model", "fwd+bwd tokens/s"): (1.5, ">=1.5x"),
    ("generate", "decode tok/s b8"): (2.0, ">=2x"),
    ("generate", "decode tok/s b32"): (2.0, ">=2x"),
    ("sft", "train tokens/s"): (1.3, ">=1.3x (stretch 1.5x)"),
    ("ppo", "iteration s"): (1.8, ">=1.8x"),
}


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Batch sizes and lengths of every mode; the defaults are BENCHMARKS.md's."""
  model_batch: int = 8
  model_seq: int = 256
  gen_batches: tuple[int, ...] = (1, 8, 32)
  gen_prompt: int = 64
  gen_new: int = 128
  sft_batch: int = 8
  sft_seq: int = 256
  ppo_batch: int = 8
  ppo_prompt: int = 64
  ppo_new: int = 128


def log(msg: str) -> None:
  """Progress goes to stderr so stdout carries only the table."""
  print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
  """Seconds of `reps` calls of `fn` (which must block until done), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def median(xs) -> float:
  return float(statistics.median(xs))


def _row(mode: str, metric: str, unit: str, ours: float, ref: float, *,
         higher_is_better: bool = True, floor: float | None = None) -> dict:
  """One table row; `speedup` > 1 means cai_jax is faster, whatever the unit."""
  if higher_is_better:
    speedup = ours / ref if ref > 0 else math.inf
  else:
    speedup = ref / ours if ours > 0 else math.inf
  target = TARGETS.get((mode, metric))
  return {"mode": mode, "metric": metric, "unit": unit, "cai_jax": ours, "reference": ref,
          "speedup": speedup, "higher_is_better": higher_is_better, "floor": floor,
          "target": target[1] if target else None,
          "target_met": (speedup >= target[0]) if target else None}


# --- the shared random checkpoint ------------------------------------------------

def _import_torch():
  """torch + transformers, quiet and offline (a benchmark never downloads anything)."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  return torch, transformers


def randomize_hf_weights(model, seed: int) -> None:
  """Redraws every weight at ~unit activation scale with norms away from 1.

  HF's 0.02 init makes logits nearly flat, so greedy decoding would repeat one
  token and prove little; the tests use the same weights (tests/hf_utils.py).
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


@dataclasses.dataclass
class Setup:
  """The shared model: an HF directory both sides load, and cai_jax's view of it."""
  preset: str
  workdir: str
  hf_dir: str
  config: Any              # cai_jax MistralConfig (float32)
  params: Any              # jax arrays on the first device
  seed: int = 0
  _rm_dirs: tuple[str, str] | None = None

  def torch_lm(self, train: bool = False):
    torch, transformers = _import_torch()
    model = transformers.MistralForCausalLM.from_pretrained(
        self.hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.train(train)

  def reward_model_dirs(self) -> tuple[str, str]:
    """(HF dir, cai_jax orbax dir) of the scalar-head model: the LM's body plus one
    random score head, so TRL's reward/value model and ours hold the same weights."""
    if self._rm_dirs is None:
      from cai_jax import checkpoint
      body = {k: v for k, v in self.params.items() if k != "lm_head"}
      D = self.config.hidden_size
      score = np.random.default_rng(self.seed + 1).standard_normal((D, 1)) / math.sqrt(D)
      params = {**body, "score": {"kernel": jnp.asarray(score, jnp.float32)}}
      hf = os.path.join(self.workdir, "rm_hf")
      ours = os.path.join(self.workdir, "rm_cai_jax")
      checkpoint.save_hf(hf, self.config, params, head="scalar")
      checkpoint.save_model(ours, self.config, params, head="scalar")
      self._rm_dirs = (hf, ours)
    return self._rm_dirs


def prepare(preset: str, workdir: str, seed: int = 0) -> Setup:
  """Draws the random HF Mistral of `preset`, saves it, loads it into cai_jax."""
  torch, transformers = _import_torch()
  from cai_jax import checkpoint
  from configs.models import model_config
  cfg = model_config(preset)
  hf_kwargs = {k: v for k, v in cfg.to_hf_dict().items()
               if k not in ("architectures", "model_type", "torch_dtype")}
  torch.manual_seed(seed)
  model = transformers.MistralForCausalLM(transformers.MistralConfig(**hf_kwargs))
  randomize_hf_weights(model, seed)
  hf_dir = os.path.join(workdir, "lm_hf")
  model.save_pretrained(hf_dir)
  del model
  config, params = checkpoint.load_hf(hf_dir)
  params = jax.device_put(params, jax.devices()[0])
  log(f"model {preset}: {config.num_params('lm') / 1e6:.1f}M params, saved to {hf_dir}")
  return Setup(preset=preset, workdir=workdir, hf_dir=hf_dir, config=config, params=params,
               seed=seed)


def _tokens(seed: int, shape, vocab: int, low: int = 3) -> np.ndarray:
  """Random ids avoiding 0..2 (pad / bos / eos), so no reference treats one as padding."""
  return np.random.default_rng(seed).integers(low, vocab, shape, dtype=np.int64).astype(np.int32)


# --- model: forward and forward+backward -----------------------------------------

def bench_model(setup: Setup, shapes: Shapes, reps: int) -> dict:
  """Forward (logits) and forward+backward (mean next-token CE, all grads) of one batch."""
  from cai_jax.model import Mistral
  from cai_jax.train.lm import make_lm_loss
  cfg, params = setup.config, setup.params
  B, T = shapes.model_batch, shapes.model_seq
  tokens = _tokens(1, (B, T), cfg.vocab_size)
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

  torch, _ = _import_torch()
  model = setup.torch_lm(train=False)
  t_tokens = torch.as_tensor(tokens, dtype=torch.long)

  def torch_forward():
    with torch.no_grad():
      model(input_ids=t_tokens).logits

  def torch_forward_backward():
    model.zero_grad(set_to_none=True)
    model(input_ids=t_tokens, labels=t_tokens).loss.backward()

  log(f"model: torch forward {B}x{T}")
  ref_fwd = time_calls(torch_forward, reps)
  model.train()
  log(f"model: torch forward+backward {B}x{T}")
  ref_bwd = time_calls(torch_forward_backward, reps)
  del model

  n_tok = B * T
  fwd_flops = cfg.flops_per_token(T) * n_tok
  r = {"batch": B, "seq_len": T, "forward_flops_per_token": cfg.flops_per_token(T),
       "seconds": {"cai_jax_forward": ours_fwd, "torch_forward": ref_fwd,
                   "cai_jax_forward_backward": ours_bwd, "torch_forward_backward": ref_bwd}}
  tf, rf, tb, rb = map(median, (ours_fwd, ref_fwd, ours_bwd, ref_bwd))
  peak = peak_flops()
  r["rows"] = [
      _row("model", "forward tokens/s", "tok/s", n_tok / tf, n_tok / rf,
           floor=peak / cfg.flops_per_token(T)),
      _row("model", "forward GFLOP/s", "GFLOP/s", fwd_flops / tf / 1e9, fwd_flops / rf / 1e9,
           floor=peak / 1e9),
      _row("model", "fwd+bwd tokens/s", "tok/s", n_tok / tb, n_tok / rb,
           floor=peak / (3 * cfg.flops_per_token(T))),
      _row("model", "fwd+bwd GFLOP/s", "GFLOP/s", 3 * fwd_flops / tb / 1e9,
           3 * fwd_flops / rb / 1e9, floor=peak / 1e9),
  ]
  return r


# --- generate: greedy decode ------------------------------------------------------

def bench_generate(setup: Setup, shapes: Shapes, reps: int) -> dict:
  """Greedy decode of exactly `gen_new` tokens after `gen_prompt`-token prompts.

  TTFT is the time of a 1-token generation (prefill + first token); decode
  tok/s = B * (N - 1) / (t_N - t_1), which leaves the prefill out of the rate.
  """
  from cai_jax import sampling
  cfg, params = setup.config, setup.params
  P, N = shapes.gen_prompt, shapes.gen_new
  torch, _ = _import_torch()
  results, rows = {}, []
  prompts_by_batch = {B: _tokens(10 + B, (B, P), cfg.vocab_size) for B in shapes.gen_batches}
  ours_tokens = {}

  for B, prompts in prompts_by_batch.items():
    plist = prompts.tolist()

    def ours(n, plist=plist):
      return sampling.generate(cfg, params, plist, max_new_tokens=n, greedy=True)

    log(f"generate: cai_jax b{B}")
    t1 = time_calls(lambda: ours(1), reps)
    tn = time_calls(lambda: ours(N), reps)
    out = ours(N)
    if any(len(t) != N for t in out.tokens):
      raise RuntimeError(f"cai_jax generated {[len(t) for t in out.tokens]} tokens, not {N}")
    ours_tokens[B] = np.asarray(out.tokens)
    results[B] = {"cai_jax_t1": t1, "cai_jax_tN": tn}

  model = setup.torch_lm(train=False)
  for B, prompts in prompts_by_batch.items():
    ids = torch.as_tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def ref(n, ids=ids, mask=mask):
      return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                            max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)

    log(f"generate: transformers b{B}")
    t1 = time_calls(lambda: ref(1), reps)
    tn = time_calls(lambda: ref(N), reps)
    out = ref(N)[:, P:].numpy()
    if out.shape[1] != N:
      raise RuntimeError(f"transformers generated {out.shape[1]} tokens, not {N}")
    results[B].update(torch_t1=t1, torch_tN=tn,
                      greedy_token_agreement=float(np.mean(out == ours_tokens[B])))
    res = results[B]
    ours_t1, ours_tn = median(res["cai_jax_t1"]), median(res["cai_jax_tN"])
    ref_t1, ref_tn = median(t1), median(tn)
    rows.append(_row("generate", f"decode tok/s b{B}", "tok/s",
                     B * (N - 1) / max(ours_tn - ours_t1, 1e-9),
                     B * (N - 1) / max(ref_tn - ref_t1, 1e-9)))
    rows.append(_row("generate", f"TTFT ms b{B}", "ms", 1e3 * ours_t1, 1e3 * ref_t1,
                     higher_is_better=False))
  del model
  return {"prompt_len": P, "new_tokens": N,
          "seconds": {f"b{B}": v for B, v in results.items()}, "rows": rows}


# --- sft: one AdamW train step ----------------------------------------------------

SFT_OPTIM = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)


def bench_sft(setup: Setup, shapes: Shapes, reps: int) -> dict:
  """A full train step: masked LM loss (answer-only: second half of each row), grads,
  global-norm clipping, AdamW update. The torch side is what HF's Trainer runs:
  `loss.backward()`, `clip_grad_norm_`, fused AdamW."""
  import ml_collections

  from cai_jax import parallel
  from cai_jax.train.lm import make_lm_loss
  from cai_jax.train.optim import make_optimizer
  from cai_jax.train.state import create_state, make_train_step
  cfg = setup.config
  B, T = shapes.sft_batch, shapes.sft_seq
  tokens = _tokens(2, (B, T), cfg.vocab_size)
  loss_mask = np.zeros((B, T), np.int32)
  loss_mask[:, T // 2:] = 1
  host_batch = {"tokens": tokens, "segment_ids": np.ones((B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                "loss_mask": loss_mask}

  mesh = parallel.create_mesh([1, 1, 1], devices=jax.devices()[:1])
  optim_cfg = ml_collections.ConfigDict({**SFT_OPTIM, "schedule": "constant", "warmup_steps": 0})
  tx, schedule = make_optimizer(optim_cfg, total_steps=reps + 1)
  p_sh = parallel.param_shardings(cfg, mesh)
  params = jax.tree_util.tree_map(jnp.copy, setup.params)  # create_state donates its input
  batch_sh = {k: parallel.batch_sharding(mesh, 2) for k in host_batch}
  with parallel.use_mesh(mesh):
    state, st_sh = create_state(params, tx, p_sh, mesh)
    step = make_train_step(make_lm_loss(cfg), tx, schedule, accum_steps=1, shardings=st_sh,
                           batch_shardings=batch_sh, mesh=mesh)
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host_batch.items()}
    holder = {"state": state}

    def ours():
      holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics)

    log(f"sft: cai_jax train step {B}x{T}")
    ours_s = time_calls(ours, reps)
  del holder, state

  torch, _ = _import_torch()
  model = setup.torch_lm(train=True)
  opt = torch.optim.AdamW(model.parameters(), lr=SFT_OPTIM["lr"],
                          betas=(SFT_OPTIM["b1"], SFT_OPTIM["b2"]), eps=SFT_OPTIM["eps"],
                          weight_decay=SFT_OPTIM["weight_decay"], fused=True)
  ids = torch.as_tensor(tokens, dtype=torch.long)
  labels = ids.masked_fill(torch.as_tensor(loss_mask == 0), -100)

  def ref():
    model(input_ids=ids, labels=labels).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), SFT_OPTIM["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)

  log(f"sft: torch train step {B}x{T}")
  ref_s = time_calls(ref, reps)
  del model, opt

  n_tok = B * T
  flops_tok = 3 * cfg.flops_per_token(T)
  peak = peak_flops()
  ours_tps, ref_tps = n_tok / median(ours_s), n_tok / median(ref_s)
  return {"batch": B, "seq_len": T, "optimizer": {**SFT_OPTIM, "torch": "AdamW(fused=True)"},
          "train_flops_per_token": flops_tok, "peak_flops": peak,
          "seconds": {"cai_jax": ours_s, "torch": ref_s},
          "rows": [
              _row("sft", "train tokens/s", "tok/s", ours_tps, ref_tps, floor=peak / flops_tok),
              _row("sft", "MFU %", "%", 100 * ours_tps * flops_tok / peak,
                   100 * ref_tps * flops_tok / peak),
          ]}


# --- ppo: one iteration, three phases ---------------------------------------------

PPO_HP = dict(temperature=1.0, kl_coef=0.05, kl_estimator="k1", vf_coef=0.1, clip_eps=0.2,
              value_clip=0.2, gamma=1.0, lam=0.95, lr=3e-6)


class _IdTokenizer:
  """Just enough of `cai_jax.tokenizer.Tokenizer` for `PPOTrainer` on raw token ids."""

  def __init__(self, vocab_size: int, pad_id: int, eot_id: int):
    self.vocab_size = vocab_size
    self.pad_id = pad_id
    self.source = "<benchmark ids>"
    self.special_token_ids = {"<extra_id_1>": eot_id}


def _ours_ppo(setup: Setup, shapes: Shapes, iterations: int) -> list[dict]:
  from cai_jax import parallel
  from cai_jax.train.ppo import PPOTrainer
  from configs.ppo import get_config
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  _, rm_dir = setup.reward_model_dirs()
  cfg = get_config("tiny")
  cfg.actor_init = setup.hf_dir
  cfg.rm_init = rm_dir
  cfg.max_prompt_len = P
  cfg.rollout_batch_size = B
  cfg.iterations = iterations
  cfg.seed = setup.seed
  cfg.ppo.update(max_new_tokens=N, temperature=PPO_HP["temperature"], ppo_epochs=1,
                 num_minibatches=1, clip_eps=PPO_HP["clip_eps"], value_clip=PPO_HP["value_clip"],
                 vf_coef=PPO_HP["vf_coef"], gamma=PPO_HP["gamma"], lam=PPO_HP["lam"],
                 kl_estimator=PPO_HP["kl_estimator"], init_kl_coef=PPO_HP["kl_coef"])
  for optim in (cfg.actor_optim, cfg.critic_optim):
    optim.update(lr=PPO_HP["lr"], min_lr=PPO_HP["lr"], schedule="constant", b2=0.999,
                 grad_clip=0.0)  # TRL's loop steps its optimizer without clipping
  mesh = parallel.create_mesh([1, 1, 1], devices=jax.devices()[:1])
  V = setup.config.vocab_size
  log("ppo: building cai_jax PPOTrainer (actor, reference, critic, reward model)")
  # The end-of-turn id is one past the vocabulary, so no row can stop: every
  # response is exactly N tokens, as TRL's with no stop token (checked below).
  trainer = PPOTrainer(cfg, mesh=mesh, tokenizer=_IdTokenizer(V, 0, V))
  params = inspect.signature(trainer.iteration).parameters
  out = []
  for it in range(iterations):
    batch = {"ids": _tokens(100 + it, (B, P), V), "length": np.full((B,), P, np.int32)}
    log(f"ppo: cai_jax iteration {it + 1}/{iterations}" + (" (compile)" if it == 0 else ""))
    # The iteration's counter argument has been called `seed` and `iteration`.
    counter = {k: it + 1 for k in ("iteration", "seed") if k in params}
    metrics, exp = trainer.iteration(batch, PPO_HP["kl_coef"], **counter)
    lengths = np.asarray(jax.device_get(exp.rollout.lengths))
    if np.any(lengths != N):
      raise RuntimeError(f"cai_jax PPO rollout lengths {lengths.tolist()}, expected all {N}")
    out.append({"rollout": metrics["rollout_seconds"], "score": metrics["score_seconds"],
                "update": metrics["update_seconds"]})
  del trainer
  return out


def _trl_tokenizer(vocab_size: int, eos_id: int):
  """A word-level fast tokenizer over ids: TRL needs a `PreTrainedTokenizerBase` for its
  pad/eos ids, not text. "t0".."t{V-1}" are the model's ids; the pad token is id V,
  one the model cannot emit, so no sampled token is ever taken for padding (TRL masks
  every pad-valued position) and every response is full-length, as cai_jax's."""
  _, transformers = _import_torch()
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {f"t{i}": i for i in range(vocab_size)}
  vocab["<pad>"] = vocab_size
  tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token=f"t{eos_id}", unk_token="t1")


def _trl_ppo(setup: Setup, shapes: Shapes, iterations: int,
             threads: int) -> tuple[list[dict], dict]:
  """Runs TRL's `train()` for `iterations` iterations, timing its phases by wrapping
  the module-level `batch_generation` (rollout) and `forward` (its first call on the
  policy+value wrapper starts the update) and a step-end callback (update end).
  "score" is the gap between rollout and update: old log-probs from the generate
  scores, reference, value and reward forwards, rewards, GAE and whitening."""
  torch, transformers = _import_torch()
  import datasets
  import trl.experimental.ppo.ppo_trainer as ppo_mod
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  V = setup.config.vocab_size
  rm_hf, _ = setup.reward_model_dirs()
  tokenizer = _trl_tokenizer(V, eos_id=setup.config.eos_token_id)
  policy = setup.torch_lm()
  ref = setup.torch_lm()

  def scalar_model():
    m = transformers.AutoModelForSequenceClassification.from_pretrained(
        rm_hf, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    m.config.pad_token_id = 0  # for its own forward's pooling; TRL's get_reward masks by itself
    return m

  prompts = np.concatenate([_tokens(100 + it, (B, P), V) for it in range(iterations)])
  dataset = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
  outdir = tempfile.mkdtemp(prefix="trl_ppo_", dir=setup.workdir)
  args = PPOConfig(
      output_dir=outdir, per_device_train_batch_size=B, gradient_accumulation_steps=1,
      num_mini_batches=1, num_ppo_epochs=1, total_episodes=B * iterations,
      local_rollout_forward_batch_size=B, response_length=N, stop_token=None,
      stop_token_id=None, missing_eos_penalty=None, temperature=PPO_HP["temperature"],
      kl_coef=PPO_HP["kl_coef"], kl_estimator=PPO_HP["kl_estimator"],
      vf_coef=PPO_HP["vf_coef"], cliprange=PPO_HP["clip_eps"],
      cliprange_value=PPO_HP["value_clip"], gamma=PPO_HP["gamma"], lam=PPO_HP["lam"],
      learning_rate=PPO_HP["lr"], lr_scheduler_type="constant", bf16=False, fp16=False,
      use_cpu=True, gradient_checkpointing=False, num_sample_generations=0,
      report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
      disable_tqdm=True, dataloader_num_workers=0, seed=setup.seed)

  def collate(rows):
    return {"input_ids": torch.as_tensor([r["input_ids"] for r in rows], dtype=torch.long)}

  marks: list[dict] = []

  class StepTimer(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
      marks[-1]["end"] = time.perf_counter()

  log("ppo: building TRL PPOTrainer")
  trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                       reward_model=scalar_model(), train_dataset=dataset,
                       value_model=scalar_model(), data_collator=collate,
                       callbacks=[StepTimer()])
  torch.set_num_threads(threads)  # accelerate may have touched it
  orig_generation, orig_forward = ppo_mod.batch_generation, ppo_mod.forward

  def timed_generation(model, queries, *a, **k):
    log(f"ppo: TRL iteration {len(marks) + 1}/{iterations}" + (" (warm-up)" if not marks else ""))
    t0 = time.perf_counter()
    query_responses, logits = orig_generation(model, queries, *a, **k)
    responses = query_responses[:, queries.shape[1]:]
    marks.append({"start": t0, "rollout_end": time.perf_counter(),
                  "response_len": int(responses.shape[1])})
    return query_responses, logits

  def timed_forward(model, *a, **k):
    if model is not trainer.ref_model and marks and "update_start" not in marks[-1]:
      marks[-1]["update_start"] = time.perf_counter()
    return orig_forward(model, *a, **k)

  ppo_mod.batch_generation, ppo_mod.forward = timed_generation, timed_forward
  try:
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its metrics dicts
      trainer.train()
  finally:
    ppo_mod.batch_generation, ppo_mod.forward = orig_generation, orig_forward
  if len(marks) != iterations or any(m["response_len"] != N for m in marks):
    raise RuntimeError(f"TRL ran {len(marks)} iterations with response lengths "
                       f"{[m['response_len'] for m in marks]}; expected {iterations} x {N}")
  out = [{"rollout": m["rollout_end"] - m["start"], "score": m["update_start"] - m["rollout_end"],
          "update": m["end"] - m["update_start"]} for m in marks]
  info = {"optim": str(getattr(args.optim, "value", args.optim)),
          "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
          "stop_token_id": trainer.stop_token_id,
          "policy_generation_eos": trainer.policy_model.generation_config.eos_token_id}
  del trainer, policy, ref
  return out, info


def bench_ppo(setup: Setup, shapes: Shapes, reps: int, threads: int) -> dict:
  """Seconds per PPO iteration (rollout, score, update) after one warm-up iteration."""
  iterations = reps + 1
  ours = _ours_ppo(setup, shapes, iterations)
  gc.collect()
  with warnings.catch_warnings():
    # transformers' deprecation renames, and TRL's variance over a single minibatch.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.filterwarnings("ignore", message=r"var\(\): degrees of freedom")
    trl_iters, trl_info = _trl_ppo(setup, shapes, iterations, threads)
  rows = []
  small = setup.preset == "small"
  for phases, metric in ((("rollout",), "rollout s"), (("score",), "score s"),
                         (("update",), "update s"),
                         (("rollout", "score", "update"), "iteration s")):
    o = median([sum(it[p] for p in phases) for it in ours[1:]])
    r = median([sum(it[p] for p in phases) for it in trl_iters[1:]])
    rows.append(_row("ppo", metric, "s", o, r, higher_is_better=False,
                     floor=SMALL_FLOORS.get(("ppo", metric)) if small else None))
  return {"prompts": shapes.ppo_batch, "prompt_len": shapes.ppo_prompt,
          "new_tokens": shapes.ppo_new, "epochs": 1, "minibatches": 1, "hyperparameters": PPO_HP,
          "iterations": {"cai_jax": ours, "trl": trl_iters}, "trl": trl_info,
          "note": ("first iteration (compile / warm-up) excluded; TRL's 'score' also holds its "
                   "old log-probs from the generate scores, which cai_jax computes in the rollout"),
          "rows": rows}


# --- the whole run ----------------------------------------------------------------

def peak_flops() -> float:
  if jax.devices()[0].platform == "cpu":
    return CPU_PEAK_FLOPS
  from cai_jax.train.loop import default_peak_flops
  return default_peak_flops()


def settings(preset: str, reps: int, threads: int, config) -> dict:
  """Versions, threads and devices: what a reader needs to compare two runs."""
  torch, transformers = _import_torch()
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("jaxlib", "flax", "optax", "torch", "transformers", "trl", "accelerate"):
    try:
      versions[name] = __import__(name).__version__
    except Exception:  # a reference that is not installed is reported, not fatal
      versions[name] = None
  dev = jax.devices()[0]
  return {
      "preset": preset, "reps": reps, "dtype": "float32",
      "model": dataclasses.asdict(config), "num_params": config.num_params("lm"),
      "versions": versions,
      "threads": {"requested": threads, "torch_num_threads": torch.get_num_threads(),
                  "cpus_available": len(os.sched_getaffinity(0)), "os_cpu_count": os.cpu_count()},
      "jax_device": {"platform": dev.platform, "kind": dev.device_kind,
                     "count": jax.device_count()},
      "torch_device": "cpu", "torch_attention": "sdpa",
      "machine": {"system": platform.system(),
                  "processor": platform.processor() or platform.machine()},
      "peak_flops": peak_flops(),
      "timing": "median of reps after one warm-up call; cai_jax runs before torch in each mode",
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def run(what: str | list[str] = "all", preset: str = "small", reps: int = 3,
        threads: int | None = None, shapes: Shapes = Shapes(), workdir: str | None = None,
        seed: int = 0) -> dict:
  """Runs the chosen modes; returns the report (settings, per-mode results, table rows)."""
  modes = [what] if isinstance(what, str) else list(what)
  if modes == ["all"]:
    modes = list(MODES)
  bad = [m for m in modes if m not in MODES]
  if bad:
    raise ValueError(f"unknown benchmark mode(s) {bad}; choose from {MODES} or 'all'")
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps}")
  torch, _ = _import_torch()
  threads = threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  report: dict = {"results": {}, "rows": []}
  with contextlib.ExitStack() as stack:
    if workdir is None:
      workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cai_jax_bench_"))
    setup = prepare(preset, workdir, seed)
    report["settings"] = settings(preset, reps, threads, setup.config)
    report["settings"]["shapes"] = dataclasses.asdict(shapes)
    if preset == "small":
      report["settings"]["benchmarks_md_reference_figures"] = SMALL_REFERENCE_FIGURES
    for mode in modes:
      t0 = time.perf_counter()
      if mode == "model":
        res = bench_model(setup, shapes, reps)
      elif mode == "generate":
        res = bench_generate(setup, shapes, reps)
      elif mode == "sft":
        res = bench_sft(setup, shapes, reps)
      else:
        res = bench_ppo(setup, shapes, reps, threads)
      if preset == "small":
        for row in res["rows"]:
          row["floor"] = SMALL_FLOORS.get((row["mode"], row["metric"]), row["floor"])
      res["wall_seconds"] = time.perf_counter() - t0
      report["results"][mode] = res
      report["rows"].extend(res["rows"])
      log(f"{mode}: done in {res['wall_seconds']:.0f}s")
      gc.collect()
  return report


def _fmt(x: float | None, unit: str = "") -> str:
  if x is None:
    return "-"
  if not math.isfinite(x):
    return str(x)
  if unit in ("s",):
    return f"{x:.3f}"
  if unit in ("ms", "%") or abs(x) < 100:
    return f"{x:.1f}"
  return f"{x:,.0f}"


def markdown_table(report: dict) -> str:
  """The results as a markdown table (speed-up > 1: cai_jax faster)."""
  s = report["settings"]
  v = s["versions"]
  head = (f"cai_jax vs references, preset `{s['preset']}` ({s['num_params'] / 1e6:.1f}M params, "
          f"{s['dtype']}), median of {s['reps']}, {s['threads']['torch_num_threads']} threads, "
          f"jax {v['jax']} ({s['jax_device']['platform']}), torch {v['torch']}, "
          f"transformers {v['transformers']}, trl {v['trl']}")
  lines = [head, "",
           "| mode | metric | cai_jax | reference | speed-up | floor | target |",
           "|---|---|---:|---:|---:|---:|---|"]
  refs = {"model": "torch", "generate": "transformers", "sft": "transformers+torch",
          "ppo": "TRL"}
  for r in report["rows"]:
    target = r["target"] or ""
    if r["target_met"] is not None:
      target += " met" if r["target_met"] else " not met"
    lines.append(f"| {r['mode']} ({refs[r['mode']]}) | {r['metric']} | "
                 f"{_fmt(r['cai_jax'], r['unit'])} | {_fmt(r['reference'], r['unit'])} | "
                 f"{r['speedup']:.2f}x | {_fmt(r['floor'], r['unit'])} | {target} |")
  lines.append("")
  lines.append("floor: what the hardware allows (BENCHMARKS.md's figures for `small`; otherwise "
               f"FLOPs at {s['peak_flops'] / 1e9:.0f} GFLOP/s peak, where FLOPs are counted).")
  return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
  """Writes the report atomically (a killed run leaves no half-written file)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
