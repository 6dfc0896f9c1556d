"""The machine: what it is, what it can do (ceilings measured in the run), and the floors
(the least time a step can take) that follow from those ceilings."""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp

from launch.benchmark import figures
from launch.benchmark.timing import best_seconds


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


def measure_ceilings() -> dict:
  """The first device's matmul peak and memory bandwidth, measured now, with the
  datasheet figures for its kind where known (targets.json). Sizes: GPU bf16 8192^3 and
  2 GiB arrays; CPU fp32 2048^3 and 256 MB (BENCHMARKS.md's measurements)."""
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  n, dtype = (8192, jnp.bfloat16) if on_gpu else (2048, jnp.float32)
  elems = (2**30 if on_gpu else 2**26)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  t_mm = best_seconds(lambda: matmul(a, b).block_until_ready())
  x = jax.random.normal(jax.random.PRNGKey(2), (elems,), dtype)
  read = jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32))
  copy = jax.jit(lambda v: v * 2)
  t_read = best_seconds(lambda: read(x).block_until_ready())
  t_copy = best_seconds(lambda: copy(x).block_until_ready())
  nbytes = x.size * x.dtype.itemsize
  sheet = figures.datasheet(dev.device_kind) if on_gpu else (None, None)
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
