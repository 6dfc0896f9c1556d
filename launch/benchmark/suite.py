"""A benchmark run: the chosen modes one after another, each on its model, and the record
of the settings (versions, threads, machine, ceilings) a reader needs to compare two runs."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import tempfile
import time

import jax

from launch.benchmark import MODES, attention, dpo, figures, generate, grpo, model, ppo, sft
from launch.benchmark.hardware import cpu_info, measure_ceilings, peak_flops
from launch.benchmark.timing import log
from launch.benchmark.torch_ref import Setup, import_torch, prepare
from launch.benchmark.workload import Shapes


def settings(reps: int, threads: int, device: str, torch_device: str, presets: dict,
             ceilings: dict) -> dict:
  """Versions, threads, machine, ceilings: what a reader needs to compare two runs."""
  torch, transformers = import_torch()
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
  if device not in figures.DEVICES:
    raise ValueError(f"device must be 'auto' or one of {figures.DEVICES}, got {device!r}")
  return device


def run(what: str | list[str] = "all", preset: str | None = None, reps: int = 3,
        threads: int | None = None, shapes: Shapes | None = None, workdir: str | None = None,
        seed: int = 0, device: str = "auto", model_overrides: dict | None = None,
        profile_dir: str | None = None) -> dict:
  """Runs the chosen modes; returns the report (settings, per-mode results, table rows).

  `device`: "cpu", "gpu" (the GPU mode: bf16, its presets and shapes, torch on CUDA when
  there is one; on a CPU it runs the same code path) or "auto". `preset` / `shapes`
  default to the device mode's (targets.json: `small` and BENCHMARKS.md's sizes on CPU,
  issue #15's on GPU); a `preset` given applies to every mode. `model_overrides`:
  MistralConfig fields for cai_jax's side, e.g. {"attention_impl": "einsum"}.
  `profile_dir`: also trace one call of cai_jax's side of each mode with jax.profiler
  (SFT and DPO steps, forward+backward, each decode batch, the last PPO / GRPO iteration).
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
  torch, _ = import_torch()
  torch_device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
  threads = threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  shapes = shapes or Shapes.for_device(device)
  device_presets = figures.presets(device)
  presets = {m: preset or device_presets[m] for m in modes}
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
      report["settings"]["benchmarks_md_reference_figures"] = figures.reference_figures()
    setup = None
    for mode in modes:
      t0 = time.perf_counter()
      if setup is None or gpu or setup.preset != presets[mode]:  # GPU: dtypes differ by mode
        setup = None
        gc.collect()
        setup = _setup_for(mode, presets[mode], workdir, seed, device, torch_device,
                           model_overrides)
        setup.profile_dir = profile_dir
      report["settings"].setdefault("models", {})[mode] = {
          "preset": setup.preset, "num_params": setup.config.num_params("lm"),
          "config": dataclasses.asdict(setup.config)}
      if mode == "model":
        res = model.measure(setup, shapes, reps, ceilings)
      elif mode == "attention":
        res = attention.measure(setup, shapes, reps, ceilings)
      elif mode == "generate":
        res = generate.measure(setup, shapes, reps, ceilings)
      elif mode in ("sft", "lora"):
        res = sft.measure(setup, shapes, reps, ceilings,
                          lora_rank=shapes.lora_rank if mode == "lora" else 0)
      elif mode == "ppo":
        res = ppo.measure(setup, shapes, reps, ceilings, threads=threads)
      elif mode == "grpo":
        res = grpo.measure(setup, shapes, reps, ceilings, threads=threads)
      else:
        res = dpo.measure(setup, shapes, reps, ceilings, threads=threads)
      res["wall_seconds"] = time.perf_counter() - t0
      report["results"][mode] = res
      report["rows"].extend(res["rows"])
      log(f"{mode}: done in {res['wall_seconds']:.0f}s")
      gc.collect()
  return report


def _setup_for(mode: str, preset: str, workdir: str, seed: int, device: str,
               torch_device: str, model_overrides: dict | None) -> Setup:
  """The model a mode runs on. CPU: one shared-weight fp32 model for every mode. GPU:
  decode on bf16 weights; training (SFT, DPO) on fp32 master weights with bf16 compute;
  PPO and GRPO need the shared-weight HF directories their iteration loads."""
  kw = dict(device=device, torch_device=torch_device, overrides=model_overrides)
  if device != "gpu":
    return prepare(preset, workdir, seed, **kw)
  if mode in ("ppo", "grpo"):
    return prepare(preset, os.path.join(workdir, mode), seed, dtype="bfloat16", **kw)
  param_dtype = "bfloat16" if mode == "generate" else "float32"
  return prepare(preset, workdir, seed, dtype="bfloat16", param_dtype=param_dtype,
                 shared_weights=False, **kw)
