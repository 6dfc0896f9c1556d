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
  attention causal attention alone at the model's heads, B/2 x T of the model mode:
            `jax.nn.dot_product_attention` (xla; cudnn on a GPU) vs the einsum path.
  generate  greedy decode tok/s and time-to-first-token (`sampling.generate` vs
            transformers `generate` with its KV cache), exactly `gen_new` tokens.
  sft       one AdamW train step on a masked LM loss (`make_train_step` vs a
            transformers + torch step with fused AdamW, as HF's Trainer uses).
  ppo       seconds per PPO iteration split into rollout / scoring / update
            (`PPOTrainer` vs TRL 1.9.2's `trl.experimental.ppo.PPOTrainer`).

Two device modes (`run(device=...)`, `--device`):
  cpu  the defaults above: fp32, preset `small`, references on the CPU, shared weights.
  gpu  bf16 compute (fp32 master weights for training, bf16 weights for decoding);
       `mistral_1b` for model/sft (B8 x T2048 and B4 x T4096), `mistral_7b` for
       decode at b1/b32/b128 (128-token prompts, 256 new), `small` for a PPO
       iteration of 64 prompts x (64 + 128). The torch side runs on the same GPU
       (bf16 autocast over fp32 weights for training, bf16 weights for decoding,
       sdpa attention, fused AdamW), its models built directly on the device with
       the same shapes and their own random weights (drawing, saving and loading a
       7B checkpoint on the host would cost more than the benchmark). TRL has no
       GPU run here: PPO reports our phase split and compares the rollout with
       `sampling.generate` on the same model and batch.

Ceilings are measured in the same run (`measure_ceilings`): the matmul peak (fp32
2048^3 on CPU, bf16 8192^3 on GPU) and memory bandwidth, printed beside the
datasheet figures where the device has some. Floors and MFU come from them: on
CPU from the measured peak and read bandwidth; on GPU MFU is against the
datasheet (the usual convention) and the decode roofline is (weight + KV-cache
bytes) / datasheet bandwidth.

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
from cai_jax.model import init_params, param_shardings, resolve_attention_impl

MODES = ("model", "attention", "generate", "sft", "ppo")

DEVICES = ("cpu", "gpu")
# Datasheet figures by device kind (dense bf16 FLOP/s, HBM bytes/s): leads, printed
# beside what this run measures. H100 and H200 SXM share the H100's compute.
DATASHEETS = {"h200": (989e12, 4.8e12), "h100": (989e12, 3.35e12), "a100": (312e12, 2.039e12),
              "l40s": (362e12, 0.864e12)}
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
    ("ppo", "rollout tok/s"): (1 / 1.5, "within 1.5x of generate"),
}
# The GPU targets (issue #15): speed-ups over the reference, and fractions of the floor
# (MFU against the datasheet; decode against the HBM roofline).
GPU_TARGETS = {
    ("sft", "train tokens/s"): (1.4, ">=1.4x"),
    ("sft", "train tokens/s B4xT4096"): (1.4, ">=1.4x"),
    ("ppo", "rollout tok/s"): (1 / 1.5, "within 1.5x of generate"),
}
GPU_FLOOR_TARGETS = {
    ("sft", "train tokens/s"): (0.45, ">=45% MFU"),
    ("sft", "train tokens/s B4xT4096"): (0.45, ">=45% MFU"),
    ("generate", "decode tok/s b1"): (0.70, ">=70% of roofline"),
    ("generate", "decode tok/s b32"): (0.60, ">=60% of roofline"),
    ("generate", "decode tok/s b128"): (0.60, ">=60% of roofline"),
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
  sft_extra: tuple[tuple[int, int], ...] = ()   # more (batch, seq) SFT steps
  ppo_batch: int = 8
  ppo_prompt: int = 64
  ppo_new: int = 128


# The GPU mode's sizes and presets (issue #15's table).
GPU_SHAPES = Shapes(model_batch=8, model_seq=2048, gen_batches=(1, 32, 128), gen_prompt=128,
                    gen_new=256, sft_batch=8, sft_seq=2048, sft_extra=((4, 4096),),
                    ppo_batch=64, ppo_prompt=64, ppo_new=128)
GPU_PRESETS = {"model": "mistral_1b", "attention": "mistral_1b", "sft": "mistral_1b",
               "generate": "mistral_7b", "ppo": "small"}


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


def _row(mode: str, metric: str, unit: str, ours: float, ref: float | None, *,
         higher_is_better: bool = True, floor: float | None = None, gpu: bool = False,
         reference_name: str | None = None) -> dict:
  """One table row; `speedup` > 1 means cai_jax is faster, whatever the unit (None
  without a reference). `of_floor`: ours as a fraction of what the hardware allows."""
  speedup = None
  if ref is not None:
    if higher_is_better:
      speedup = ours / ref if ref > 0 else math.inf
    else:
      speedup = ref / ours if ours > 0 else math.inf
  of_floor = None
  if floor:
    of_floor = ours / floor if higher_is_better else floor / ours
  checks = []
  target = (GPU_TARGETS if gpu else TARGETS).get((mode, metric))
  if target and speedup is not None:
    checks.append((target[1], speedup >= target[0]))
  floor_target = GPU_FLOOR_TARGETS.get((mode, metric)) if gpu else None
  if floor_target and of_floor is not None:
    checks.append((floor_target[1], of_floor >= floor_target[0]))
  return {"mode": mode, "metric": metric, "unit": unit, "cai_jax": ours, "reference": ref,
          "speedup": speedup, "higher_is_better": higher_is_better, "floor": floor,
          "of_floor": of_floor, "reference_name": reference_name,
          "target": ", ".join(t for t, _ in checks) or None,
          "target_met": all(ok for _, ok in checks) if checks else None}


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
  """One mode's model: cai_jax's config and params and how the torch side gets its own.

  CPU mode: an HF directory both sides load (same weights). GPU mode: `hf_dir` is None
  and the torch model is built on `torch_device` with the same shapes (its own weights).
  """
  preset: str
  workdir: str
  hf_dir: str | None
  config: Any              # cai_jax MistralConfig (the mode's dtypes)
  params: Any              # jax arrays on the first device
  seed: int = 0
  device: str = "cpu"      # the benchmark's mode: "cpu" or "gpu"
  torch_device: str = "cpu"
  profile_dir: str | None = None   # where `profile` writes jax.profiler traces
  _rm_dirs: tuple[str, str] | None = None

  def profile(self, name: str, fn: Callable[[], Any]) -> None:
    """With a `profile_dir`: one more call of cai_jax's `fn`, after the timed ones, under
    `jax.profiler.trace` (a TensorBoard / Perfetto trace in profile_dir/name)."""
    if self.profile_dir:
      log(f"profiling {name} -> {os.path.join(self.profile_dir, name)}")
      with jax.profiler.trace(os.path.join(self.profile_dir, name)):
        fn()

  def torch_lm(self, train: bool = False, bf16_weights: bool = False):
    torch, transformers = _import_torch()
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    if self.hf_dir is not None:
      model = transformers.MistralForCausalLM.from_pretrained(
          self.hf_dir, dtype=dtype, attn_implementation="sdpa").to(self.torch_device)
    else:
      kwargs = {k: v for k, v in self.config.to_hf_dict().items()
                if k not in ("architectures", "model_type", "torch_dtype")}
      torch.manual_seed(self.seed)
      previous = torch.get_default_dtype()
      torch.set_default_dtype(dtype)
      try:
        with torch.device(self.torch_device):
          model = transformers.MistralForCausalLM(
              transformers.MistralConfig(**kwargs, attn_implementation="sdpa"))
      finally:
        torch.set_default_dtype(previous)
    return model.train(train)

  def autocast(self):
    """bf16 autocast for the torch side of the GPU mode (over fp32 weights)."""
    if self.device != "gpu":
      return contextlib.nullcontext()
    import torch
    return torch.autocast(self.torch_device.split(":")[0], dtype=torch.bfloat16)

  def sync(self) -> None:
    """Waits for the torch side's queued GPU work (a timer must not stop before it)."""
    if self.torch_device.startswith("cuda"):
      import torch
      torch.cuda.synchronize()

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


def prepare(preset: str, workdir: str, seed: int = 0, *, device: str = "cpu",
            torch_device: str = "cpu", dtype: str = "float32",
            param_dtype: str = "float32", shared_weights: bool = True) -> Setup:
  """The model of one mode. With `shared_weights`: draws the random HF Mistral of
  `preset`, saves it and loads it into cai_jax (both sides hold the same weights).
  Without: cai_jax's params are initialised on the device (no host round trip) and
  the torch side builds its own (`Setup.torch_lm`)."""
  torch, transformers = _import_torch()
  from cai_jax import checkpoint, parallel
  from cai_jax.model import MistralConfig
  from configs.models import get_config as model_preset
  cfg = MistralConfig.from_config(model_preset(preset))
  if not shared_weights:
    cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype)
    mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
    params, _ = init_params(cfg, mesh, jax.random.PRNGKey(seed))
    jax.block_until_ready(params)
    log(f"model {preset}: {cfg.num_params('lm') / 1e6:.1f}M params ({param_dtype}), "
        "initialised on the device")
    return Setup(preset=preset, workdir=workdir, hf_dir=None, config=cfg, params=params,
                 seed=seed, device=device, torch_device=torch_device)
  hf_kwargs = {k: v for k, v in cfg.to_hf_dict().items()
               if k not in ("architectures", "model_type", "torch_dtype")}
  torch.manual_seed(seed)
  model = transformers.MistralForCausalLM(transformers.MistralConfig(**hf_kwargs))
  randomize_hf_weights(model, seed)
  hf_dir = os.path.join(workdir, "lm_hf")
  model.save_pretrained(hf_dir)
  del model
  config, params = checkpoint.load_hf(hf_dir)
  config = config.replace(dtype=dtype)
  params = jax.device_put(params, jax.devices()[0])
  log(f"model {preset}: {config.num_params('lm') / 1e6:.1f}M params, saved to {hf_dir}")
  return Setup(preset=preset, workdir=workdir, hf_dir=hf_dir, config=config, params=params,
               seed=seed, device=device, torch_device=torch_device)


def _tokens(seed: int, shape, vocab: int, low: int = 3) -> np.ndarray:
  """Random ids avoiding 0..2 (pad / bos / eos), so no reference treats one as padding."""
  return np.random.default_rng(seed).integers(low, vocab, shape, dtype=np.int64).astype(np.int32)


# --- the machine: what it is and what it can do -----------------------------------

def cpu_info() -> dict:
  """The CPU's model name and vector ISA (from /proc/cpuinfo where there is one)."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break  # the first processor's block is enough
  except OSError:
    pass
  isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
         else "no AVX2" if flags else "unknown")
  if "amx_tile" in flags:
    isa += " + AMX"
  return {"model": model, "isa": isa, "cpus": len(os.sched_getaffinity(0))}


def _best_seconds(fn: Callable[[], Any], reps: int = 5) -> float:
  return min(time_calls(fn, reps, warmup=2))


def measure_ceilings() -> dict:
  """The first device's matmul peak and memory bandwidth, measured now, with the
  datasheet figures for its kind where known. Sizes: GPU bf16 8192^3 and 2 GiB
  arrays; CPU fp32 2048^3 and 256 MB (BENCHMARKS.md's measurements)."""
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  n, dtype = (8192, jnp.bfloat16) if on_gpu else (2048, jnp.float32)
  elems = (2**30 if on_gpu else 2**26)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  t_mm = _best_seconds(lambda: matmul(a, b).block_until_ready())
  x = jax.random.normal(jax.random.PRNGKey(2), (elems,), dtype)
  read = jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32))
  copy = jax.jit(lambda v: v * 2)
  t_read = _best_seconds(lambda: read(x).block_until_ready())
  t_copy = _best_seconds(lambda: copy(x).block_until_ready())
  nbytes = x.size * x.dtype.itemsize
  kind = dev.device_kind.lower()
  sheet = next((v for k, v in DATASHEETS.items() if k in kind), (None, None)) if on_gpu \
      else (None, None)
  del a, b, x
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "matmul": f"{jnp.dtype(dtype).name} {n}^3",
          "matmul_flops": 2 * n**3 / t_mm, "read_bytes_per_s": nbytes / t_read,
          "copy_bytes_per_s": 2 * nbytes / t_copy,
          "datasheet_flops": sheet[0], "datasheet_bytes_per_s": sheet[1]}


def peak_flops(ceilings: dict) -> float:
  """The MFU denominator: the datasheet on a GPU (the usual convention), else the
  matmul peak this run measured."""
  return ceilings["datasheet_flops"] or ceilings["matmul_flops"]


def memory_bandwidth(ceilings: dict) -> float:
  """Bytes/s for rooflines: the datasheet on a GPU, else the measured read rate."""
  return ceilings["datasheet_bytes_per_s"] or ceilings["read_bytes_per_s"]


def _matmul_params(cfg) -> int:
  """Parameters a token's forward multiplies by (the embedding is a gather)."""
  return cfg.num_params("lm") - (0 if cfg.tie_word_embeddings else
                                 cfg.vocab_size * cfg.hidden_size)


def decode_step_floor(cfg, batch: int, context: float, ceilings: dict) -> float:
  """Seconds a decode step cannot beat: every weight and the KV cache so far read once
  (`context` columns), or the step's matmul FLOPs at peak, whichever is longer."""
  weight_bytes = cfg.num_params("lm") * cfg.weight_dtype.itemsize
  kv_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
              * cfg.compute_dtype.itemsize * batch * min(context, cfg.sliding_window or context))
  flops = 2 * _matmul_params(cfg) * batch
  return max((weight_bytes + kv_bytes) / memory_bandwidth(ceilings), flops / peak_flops(ceilings))


# --- model: forward and forward+backward -----------------------------------------

def bench_model(setup: Setup, shapes: Shapes, reps: int, ceilings: dict) -> dict:
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
  setup.profile("model_forward_backward", lambda: jax.block_until_ready(grads(params, batch)))

  torch, _ = _import_torch()
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
  gpu = setup.device == "gpu"
  r["rows"] = [
      _row("model", "forward tokens/s", "tok/s", n_tok / tf, n_tok / rf,
           floor=peak / cfg.flops_per_token(T), gpu=gpu),
      _row("model", "forward GFLOP/s", "GFLOP/s", fwd_flops / tf / 1e9, fwd_flops / rf / 1e9,
           floor=peak / 1e9, gpu=gpu),
      _row("model", "fwd+bwd tokens/s", "tok/s", n_tok / tb, n_tok / rb,
           floor=peak / (3 * cfg.flops_per_token(T)), gpu=gpu),
      _row("model", "fwd+bwd GFLOP/s", "GFLOP/s", 3 * fwd_flops / tb / 1e9,
           3 * fwd_flops / rb / 1e9, floor=peak / 1e9, gpu=gpu),
  ]
  return r


def bench_attention(setup: Setup, shapes: Shapes, reps: int, ceilings: dict) -> dict:
  """Causal attention alone at the model's head layout (B, T, H, K, hd) with B, T half
  and all of the model mode's batch and sequence, forward and forward+backward: the
  einsum path against `jax.nn.dot_product_attention`'s XLA and (on a GPU) cuDNN
  implementations. Rows: ms, the einsum path as the reference."""
  from cai_jax.model.mistral import _attend, attend_fused
  cfg = setup.config
  batch, seq = max(shapes.model_batch // 2, 1), shapes.model_seq
  H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  dtype = cfg.compute_dtype
  ks = jax.random.split(jax.random.PRNGKey(7), 3)
  q = jax.random.normal(ks[0], (batch, seq, H, hd), dtype)
  k = jax.random.normal(ks[1], (batch, seq, K, hd), dtype)
  v = jax.random.normal(ks[2], (batch, seq, K, hd), dtype)
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))

  def einsum(q, k, v):  # the model's query-blocked path is per layer; here one block
    return _attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), causal, dtype)

  impls = {"einsum": einsum,
           "xla": lambda q, k, v: attend_fused(q, k, v, None, None, "xla")}
  if jax.devices()[0].platform == "gpu":
    impls["cudnn"] = lambda q, k, v: attend_fused(q, k, v, None, None, "cudnn")
  out, seconds = {}, {}
  for name, f in impls.items():
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
    log(f"attention: {name} {batch}x{seq}")
    seconds[name] = {"forward": time_calls(lambda: fwd(q, k, v).block_until_ready(), reps),
                     "forward_backward": time_calls(
                         lambda: jax.block_until_ready(grad(q, k, v)), reps)}
    out[name] = float(jnp.max(jnp.abs(fwd(q, k, v).astype(jnp.float32)
                                      - einsum(q, k, v).astype(jnp.float32))))
  rows = []
  for name in impls:
    if name == "einsum":
      continue
    for phase in ("forward", "forward_backward"):
      rows.append(_row("attention", f"{name} {phase.replace('_', '+')} ms", "ms",
                       1e3 * median(seconds[name][phase]),
                       1e3 * median(seconds["einsum"][phase]), higher_is_better=False,
                       reference_name="einsum path"))
  return {"shape": [batch, seq, H, K, hd], "dtype": dtype.name, "seconds": seconds,
          "max_abs_diff_vs_einsum": out, "rows": rows}


# --- generate: greedy decode ------------------------------------------------------

def bench_generate(setup: Setup, shapes: Shapes, reps: int, ceilings: dict) -> dict:
  """Greedy decode of exactly `gen_new` tokens after `gen_prompt`-token prompts.

  TTFT is the time of a 1-token generation (prefill + first token); decode
  tok/s = B * (N - 1) / (t_N - t_1), which leaves the prefill out of the rate.
  The floor is `decode_step_floor` at the mean context P + N/2 (GPU: the HBM roofline).
  On a GPU, transformers' eager decode of a 7B model takes ~20 s per call: it is
  warmed up on 2 tokens and timed once (`reps` calls on CPU).
  """
  from cai_jax import sampling
  cfg, params = setup.config, setup.params
  P, N = shapes.gen_prompt, shapes.gen_new
  gpu = setup.device == "gpu"
  torch, _ = _import_torch()
  results, rows = {}, []
  prompts_by_batch = {B: _tokens(10 + B, (B, P), cfg.vocab_size) for B in shapes.gen_batches}
  ours_tokens = {}

  for B, prompts in prompts_by_batch.items():
    plist = prompts.tolist()

    def ours(n, plist=plist):  # n=1 runs the same N-step program, stopping after one token
      return sampling.generate(cfg, params, plist, max_new_tokens=n, greedy=True, min_steps=N)

    log(f"generate: cai_jax b{B}")
    t1 = time_calls(lambda: ours(1), reps)
    tn = time_calls(lambda: ours(N), reps)
    setup.profile(f"generate_b{B}", lambda: ours(N))
    out = ours(N)
    if any(len(t) != N for t in out.tokens):
      raise RuntimeError(f"cai_jax generated {[len(t) for t in out.tokens]} tokens, not {N}")
    ours_tokens[B] = np.asarray(out.tokens)
    results[B] = {"cai_jax_t1": t1, "cai_jax_tN": tn}

  model = setup.torch_lm(train=False, bf16_weights=gpu)
  torch_reps = 1 if gpu else reps
  for B, prompts in prompts_by_batch.items():
    ids = torch.as_tensor(prompts, dtype=torch.long, device=setup.torch_device)
    mask = torch.ones_like(ids)

    def ref(n, ids=ids, mask=mask):
      with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
      setup.sync()
      return out

    log(f"generate: transformers b{B}")
    ref(2)
    t1 = time_calls(lambda: ref(1), torch_reps, warmup=0)
    tn = time_calls(lambda: ref(N), torch_reps, warmup=0)
    out = ref(N)[:, P:].cpu().numpy() if not gpu else None
    if out is not None and out.shape[1] != N:
      raise RuntimeError(f"transformers generated {out.shape[1]} tokens, not {N}")
    res = results[B]
    res.update(torch_t1=t1, torch_tN=tn)
    if out is not None:  # same weights on both sides only in the CPU mode
      res["greedy_token_agreement"] = float(np.mean(out == ours_tokens[B]))
    ours_t1, ours_tn = median(res["cai_jax_t1"]), median(res["cai_jax_tN"])
    ref_t1, ref_tn = median(t1), median(tn)
    floor_s = decode_step_floor(cfg, B, P + N / 2, ceilings)
    ours_step = max(ours_tn - ours_t1, 1e-9) / (N - 1)
    res.update(ms_per_step=1e3 * ours_step, floor_ms_per_step=1e3 * floor_s,
               fraction_of_floor=floor_s / ours_step)
    rows.append(_row("generate", f"decode tok/s b{B}", "tok/s",
                     B * (N - 1) / max(ours_tn - ours_t1, 1e-9),
                     B * (N - 1) / max(ref_tn - ref_t1, 1e-9), floor=B / floor_s, gpu=gpu))
    rows.append(_row("generate", f"TTFT ms b{B}", "ms", 1e3 * ours_t1, 1e3 * ref_t1,
                     higher_is_better=False, gpu=gpu))
  del model
  return {"prompt_len": P, "new_tokens": N, "decode_loop": "unroll" if cfg.unrolls_decode()
          else "scan", "weights": cfg.param_dtype,
          "seconds": {f"b{B}": v for B, v in results.items()}, "rows": rows}


# --- sft: one AdamW train step ----------------------------------------------------

SFT_OPTIM = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)


def bench_sft(setup: Setup, shapes: Shapes, reps: int, ceilings: dict) -> dict:
  """A full train step: masked LM loss (answer-only: the last part of each row), grads,
  global-norm clipping, AdamW update. The torch side is what HF's Trainer runs:
  `loss.backward()`, `clip_grad_norm_`, fused AdamW (under bf16 autocast in the GPU
  mode). One step at (sft_batch, sft_seq), then each of `shapes.sft_extra`."""
  runs = [(shapes.sft_batch, shapes.sft_seq)] + list(shapes.sft_extra)
  out = {"optimizer": {**SFT_OPTIM, "torch": "AdamW(fused=True)"},
         "attention_impl": resolve_attention_impl(setup.config), "runs": [], "rows": []}
  for i, (B, T) in enumerate(runs):
    res = _bench_sft_once(setup, B, T, reps, ceilings, "" if i == 0 else f" B{B}xT{T}")
    out["rows"] += res.pop("rows")
    out["runs"].append(res)
  return out


def _bench_sft_once(setup: Setup, B: int, T: int, reps: int, ceilings: dict,
                    suffix: str) -> dict:
  import ml_collections

  from cai_jax import parallel
  from cai_jax.train.lm import make_lm_loss
  from cai_jax.train.optim import make_optimizer
  from cai_jax.train.state import create_state, make_train_step
  cfg = setup.config
  tokens = _tokens(2, (B, T), cfg.vocab_size)
  loss_mask = np.zeros((B, T), np.int32)
  loss_mask[:, T // 2:] = 1
  host_batch = {"tokens": tokens, "segment_ids": np.ones((B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                "loss_mask": loss_mask}

  mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
  optim_cfg = ml_collections.ConfigDict({**SFT_OPTIM, "schedule": "constant", "warmup_steps": 0})
  tx, schedule = make_optimizer(optim_cfg, total_steps=reps + 1)
  p_sh = param_shardings(cfg, mesh)
  batch_sh = {k: parallel.batch_sharding(mesh, 2) for k in host_batch}

  def run_ours():
    params = jax.tree_util.tree_map(jnp.copy, setup.params)  # create_state donates its input
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
      seconds = time_calls(ours, reps)
      setup.profile(f"sft_B{B}xT{T}", ours)
      return seconds

  def run_torch():
    torch, _ = _import_torch()
    model = setup.torch_lm(train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_OPTIM["lr"],
                            betas=(SFT_OPTIM["b1"], SFT_OPTIM["b2"]), eps=SFT_OPTIM["eps"],
                            weight_decay=SFT_OPTIM["weight_decay"], fused=True)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=setup.torch_device)
    labels = ids.masked_fill(torch.as_tensor(loss_mask == 0, device=setup.torch_device), -100)

    def ref():
      with setup.autocast():
        loss = model(input_ids=ids, labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), SFT_OPTIM["grad_clip"])
      opt.step()
      opt.zero_grad(set_to_none=True)
      setup.sync()

    log(f"sft: torch train step {B}x{T}")
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
  flops_tok = 3 * cfg.flops_per_token(T)
  peak = peak_flops(ceilings)
  gpu = setup.device == "gpu"
  ours_tps, ref_tps = n_tok / median(ours_s), n_tok / median(ref_s)
  return {"batch": B, "seq_len": T, "train_flops_per_token": flops_tok, "peak_flops": peak,
          "seconds": {"cai_jax": ours_s, "torch": ref_s},
          "rows": [
              _row("sft", "train tokens/s" + suffix, "tok/s", ours_tps, ref_tps,
                   floor=peak / flops_tok, gpu=gpu),
              _row("sft", "MFU %" + suffix, "%", 100 * ours_tps * flops_tok / peak,
                   100 * ref_tps * flops_tok / peak, gpu=gpu),
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
  if setup.device == "gpu":  # as configs/ppo.py's mistral_7b: bf16 compute, fp32 masters
    cfg.dtype, cfg.param_dtype, cfg.frozen_dtype = "bfloat16", "float32", "bfloat16"
  mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
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
    if it == iterations - 1 and it > 0 and setup.profile_dir:  # the last, compiled iteration
      result = []
      setup.profile("ppo_iteration", lambda: result.append(
          trainer.iteration(batch, PPO_HP["kl_coef"], **counter)))
      metrics, exp = result[0]
    else:
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


def ppo_floors(cfg, shapes: Shapes, ceilings: dict) -> dict:
  """Seconds a PPO iteration's phases cannot beat at the measured ceilings: rollout =
  prefill FLOPs + N decode steps (`decode_step_floor`); score = forwards of policy,
  reference, value and reward models over the B x (P + N) tokens; update = forward +
  backward (3x forward FLOPs) of the actor and the critic, one epoch."""
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  peak = peak_flops(ceilings)
  lm, scalar = cfg.flops_per_token(P + N), cfg.flops_per_token(P + N, head="scalar")
  tokens = B * (P + N)
  rollout = B * P * cfg.flops_per_token(P) / peak + N * decode_step_floor(
      cfg, B, P + N / 2, ceilings)
  score = tokens * 2 * (lm + scalar) / peak
  update = tokens * 3 * (lm + scalar) / peak
  return {"rollout s": rollout, "score s": score, "update s": update,
          "iteration s": rollout + score + update}


def _generate_like_rollout(setup: Setup, shapes: Shapes, reps: int) -> list[float]:
  """Seconds of `sampling.generate` on the PPO batch: the same model, B, P and N, sampled
  at the rollout's temperature with no stop, so its tok/s is what the rollout should reach."""
  from cai_jax import sampling
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  prompts = _tokens(99, (B, P), setup.config.vocab_size).tolist()
  log(f"ppo: cai_jax generate {B}x({P}+{N}) for the rollout's yardstick")
  return time_calls(lambda: sampling.generate(
      setup.config, setup.params, prompts, max_new_tokens=N, temperature=PPO_HP["temperature"],
      seed=1), reps)


def bench_ppo(setup: Setup, shapes: Shapes, reps: int, threads: int, ceilings: dict) -> dict:
  """Seconds per PPO iteration (rollout, score, update) after one warm-up iteration,
  against TRL's on CPU; the rollout's tok/s against `sampling.generate`'s."""
  iterations = reps + 1
  gpu = setup.device == "gpu"
  ours = _ours_ppo(setup, shapes, iterations)
  gc.collect()
  generate_s = _generate_like_rollout(setup, shapes, reps)
  trl_iters, trl_info = None, None
  if not gpu:
    with warnings.catch_warnings():
      # transformers' deprecation renames, and TRL's variance over a single minibatch.
      warnings.simplefilter("ignore", FutureWarning)
      warnings.filterwarnings("ignore", message=r"var\(\): degrees of freedom")
      trl_iters, trl_info = _trl_ppo(setup, shapes, iterations, threads)
  floors = ppo_floors(setup.config, shapes, ceilings)
  rows = []
  for phases, metric in ((("rollout",), "rollout s"), (("score",), "score s"),
                         (("update",), "update s"),
                         (("rollout", "score", "update"), "iteration s")):
    o = median([sum(it[p] for p in phases) for it in ours[1:]])
    r = None if trl_iters is None else median([sum(it[p] for p in phases)
                                               for it in trl_iters[1:]])
    rows.append(_row("ppo", metric, "s", o, r, higher_is_better=False, floor=floors[metric],
                     gpu=gpu))
  new_tokens = shapes.ppo_batch * shapes.ppo_new
  rows.append(_row("ppo", "rollout tok/s", "tok/s",
                   new_tokens / median([it["rollout"] for it in ours[1:]]),
                   new_tokens / median(generate_s), gpu=gpu,
                   reference_name="cai_jax generate"))
  return {"prompts": shapes.ppo_batch, "prompt_len": shapes.ppo_prompt,
          "new_tokens": shapes.ppo_new, "epochs": 1, "minibatches": 1, "hyperparameters": PPO_HP,
          "dtype": setup.config.dtype, "floors": floors,
          "iterations": {"cai_jax": ours, "trl": trl_iters}, "trl": trl_info,
          "generate_seconds": generate_s,
          "note": ("first iteration (compile / warm-up) excluded; TRL's 'score' also holds its "
                   "old log-probs from the generate scores, which cai_jax computes in the "
                   "rollout; no TRL run in the GPU mode"),
          "rows": rows}


# --- the whole run ----------------------------------------------------------------

def settings(reps: int, threads: int, device: str, torch_device: str, presets: dict,
             ceilings: dict) -> dict:
  """Versions, threads, machine, ceilings: what a reader needs to compare two runs."""
  torch, transformers = _import_torch()
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("jaxlib", "flax", "optax", "torch", "transformers", "trl", "accelerate"):
    try:
      versions[name] = __import__(name).__version__
    except Exception:  # a reference that is not installed is reported, not fatal
      versions[name] = None
  dev = jax.devices()[0]
  gpu_name = None
  if torch_device.startswith("cuda"):
    gpu_name = torch.cuda.get_device_name(0)
  return {
      "device": device, "presets": presets, "reps": reps,
      "dtype": "bfloat16 compute" if device == "gpu" else "float32",
      "versions": versions,
      "threads": {"requested": threads, "torch_num_threads": torch.get_num_threads(),
                  "cpus_available": len(os.sched_getaffinity(0)), "os_cpu_count": os.cpu_count()},
      "jax_device": {"platform": dev.platform, "kind": dev.device_kind,
                     "count": jax.device_count()},
      "torch_device": torch_device, "torch_gpu": gpu_name, "torch_attention": "sdpa",
      "machine": {"system": platform.system(), "cpu": cpu_info()},
      "ceilings": ceilings, "peak_flops": peak_flops(ceilings),
      "timing": "median of reps after one warm-up call; cai_jax runs before torch in each mode",
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def resolve_device(device: str) -> str:
  """"auto" -> "gpu" on a GPU backend, else "cpu"."""
  if device == "auto":
    return "gpu" if jax.default_backend() == "gpu" else "cpu"
  if device not in DEVICES:
    raise ValueError(f"device must be 'auto' or one of {DEVICES}, got {device!r}")
  return device


def run(what: str | list[str] = "all", preset: str | None = None, reps: int = 3,
        threads: int | None = None, shapes: Shapes | None = None, workdir: str | None = None,
        seed: int = 0, device: str = "auto", model_overrides: dict | None = None,
        profile_dir: str | None = None) -> dict:
  """Runs the chosen modes; returns the report (settings, per-mode results, table rows).

  `device`: "cpu", "gpu" (the GPU mode: bf16, its presets and shapes, torch on CUDA when
  there is one; on a CPU it runs the same code path) or "auto". `preset` / `shapes`
  default to the device mode's (`small` and `Shapes()` on CPU; `GPU_PRESETS` and
  `GPU_SHAPES` on GPU); a `preset` given applies to every mode. `model_overrides`:
  MistralConfig fields for cai_jax's side, e.g. {"attention_impl": "einsum"}.
  `profile_dir`: also trace one call of cai_jax's side of each mode with jax.profiler
  (SFT step, forward+backward, each decode batch, the last PPO iteration).
  """
  modes = [what] if isinstance(what, str) else list(what)
  if modes == ["all"]:
    modes = list(MODES)
  bad = [m for m in modes if m not in MODES]
  if bad:
    raise ValueError(f"unknown benchmark mode(s) {bad}; choose from {MODES} or 'all'")
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps}")
  device = resolve_device(device)
  gpu = device == "gpu"
  if gpu and jax.default_backend() != "gpu":
    log(f"GPU mode on a {jax.default_backend()} backend: the code path runs, its figures are "
        "not GPU figures")
  torch, _ = _import_torch()
  torch_device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
  threads = threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  shapes = shapes or (GPU_SHAPES if gpu else Shapes())
  presets = {m: preset or (GPU_PRESETS[m] if gpu else "small") for m in modes}
  log("measuring the device's matmul peak and memory bandwidth")
  ceilings = measure_ceilings()
  report: dict = {"results": {}, "rows": [],
                  "settings": settings(reps, threads, device, torch_device, presets, ceilings)}
  report["settings"]["shapes"] = dataclasses.asdict(shapes)
  report["settings"]["model_overrides"] = dict(model_overrides or {})
  with contextlib.ExitStack() as stack:
    if workdir is None:
      workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cai_jax_bench_"))
    if not gpu and set(presets.values()) == {"small"}:
      report["settings"]["benchmarks_md_reference_figures"] = SMALL_REFERENCE_FIGURES
    setup = None
    for mode in modes:
      t0 = time.perf_counter()
      if setup is None or gpu or setup.preset != presets[mode]:  # GPU: dtypes differ by mode
        setup = None
        gc.collect()
        setup = _setup_for(mode, presets[mode], workdir, seed, device, torch_device)
        if model_overrides:
          setup.config = setup.config.replace(**model_overrides)
        setup.profile_dir = profile_dir
      report["settings"].setdefault("models", {})[mode] = {
          "preset": setup.preset, "num_params": setup.config.num_params("lm"),
          "config": dataclasses.asdict(setup.config)}
      if mode == "model":
        res = bench_model(setup, shapes, reps, ceilings)
      elif mode == "attention":
        res = bench_attention(setup, shapes, reps, ceilings)
      elif mode == "generate":
        res = bench_generate(setup, shapes, reps, ceilings)
      elif mode == "sft":
        res = bench_sft(setup, shapes, reps, ceilings)
      else:
        res = bench_ppo(setup, shapes, reps, threads, ceilings)
      res["wall_seconds"] = time.perf_counter() - t0
      report["results"][mode] = res
      report["rows"].extend(res["rows"])
      log(f"{mode}: done in {res['wall_seconds']:.0f}s")
      gc.collect()
  return report


def _setup_for(mode: str, preset: str, workdir: str, seed: int, device: str,
               torch_device: str) -> Setup:
  """The model a mode runs on. CPU: one shared-weight fp32 model for every mode. GPU:
  decode on bf16 weights; training on fp32 master weights with bf16 compute; PPO needs
  the shared-weight HF directories its trainer loads."""
  kw = dict(device=device, torch_device=torch_device)
  if device != "gpu":
    return prepare(preset, workdir, seed, **kw)
  if mode == "ppo":
    return prepare(preset, os.path.join(workdir, mode), seed, dtype="bfloat16", **kw)
  param_dtype = "bfloat16" if mode == "generate" else "float32"
  return prepare(preset, workdir, seed, dtype="bfloat16", param_dtype=param_dtype,
                 shared_weights=False, **kw)


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


def _si(x: float | None, unit: str) -> str:
  if not x:
    return "-"
  for scale, prefix in ((1e12, "T"), (1e9, "G")):
    if x >= scale:
      return f"{x / scale:,.1f} {prefix}{unit}"
  return f"{x:,.0f} {unit}"


def markdown_table(report: dict) -> str:
  """The results as a markdown table (speed-up > 1: cai_jax faster), headed by the
  machine: CPU model and ISA, device, measured ceilings beside the datasheet's."""
  s = report["settings"]
  v, c, cpu = s["versions"], s["ceilings"], s["machine"]["cpu"]
  presets = ", ".join(f"{m} `{p}`" for m, p in s["presets"].items())
  device = (f"{s['jax_device']['kind']} ({s['jax_device']['platform']})"
            if s["jax_device"]["platform"] != "cpu" else "CPU")
  head = [
      f"cai_jax vs references, {s['device']} mode ({s['dtype']}): {presets}; median of "
      f"{s['reps']}; jax {v['jax']} on {device}, torch {v['torch']} on {s['torch_device']}"
      f"{' (' + s['torch_gpu'] + ')' if s.get('torch_gpu') else ''}, transformers "
      f"{v['transformers']}, trl {v['trl']}",
      f"CPU: {cpu['model']}, {cpu['isa']}, {cpu['cpus']} CPUs available, "
      f"{s['threads']['torch_num_threads']} torch threads",
      f"measured: {c['matmul']} matmul {_si(c['matmul_flops'], 'FLOP/s')}, read "
      f"{_si(c['read_bytes_per_s'], 'B/s')}, copy {_si(c['copy_bytes_per_s'], 'B/s')}"
      + (f"; datasheet {_si(c['datasheet_flops'], 'FLOP/s')}, "
         f"{_si(c['datasheet_bytes_per_s'], 'B/s')}" if c["datasheet_flops"] else ""),
  ]
  lines = ["  \n".join(head), "",
           "| mode | metric | cai_jax | reference | speed-up | floor | of floor | target |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
  refs = {"model": "torch", "attention": "einsum path", "generate": "transformers",
          "sft": "transformers+torch", "ppo": "TRL"}
  for r in report["rows"]:
    target = r["target"] or ""
    if r["target_met"] is not None:
      target += " met" if r["target_met"] else " not met"
    speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    of_floor = "-" if r["of_floor"] is None else f"{100 * r['of_floor']:.0f}%"
    ref_name = (r.get("reference_name") or refs[r["mode"]]) if r["reference"] is not None \
        else "no reference"
    lines.append(f"| {r['mode']} ({ref_name}) | {r['metric']} | "
                 f"{_fmt(r['cai_jax'], r['unit'])} | {_fmt(r['reference'], r['unit'])} | "
                 f"{speedup} | {_fmt(r['floor'], r['unit'])} | {of_floor} | {target} |")
  lines.append("")
  lines.append(f"floor: what the hardware allows: FLOPs at {_si(s['peak_flops'], 'FLOP/s')} "
               "(the MFU denominator), decode bytes (weights + KV cache at the mean context) "
               "at the roofline bandwidth; `of floor` is MFU for training rows.")
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
