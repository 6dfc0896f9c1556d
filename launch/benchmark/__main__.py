"""cai_jax vs its PyTorch references, measured in one process on the same random weights.

    python -m launch.benchmark --what=all [--device=auto] [--preset=...] [--reps=3] [--out=b.json]
                               [--threads=N]

`--what`: model (forward, forward+backward vs torch), attention (the attention
implementations alone against the einsum path), generate (greedy decode and
TTFT vs transformers `generate`), sft (AdamW train step vs transformers+torch),
ppo (seconds per PPO iteration by phase vs TRL 1.9.2), grpo (seconds per GRPO
iteration by phase vs TRL's GRPOTrainer), dpo (seconds per DPO train step vs TRL's
DPOTrainer), lora (the sft step with rank-16 LoRA adapters vs transformers+peft), or all. Prints a
markdown table (cai_jax, reference, speed-up, floor, target) on stdout, progress
on stderr, and writes every timing plus versions and thread settings as JSON
with `--out`. What each mode measures: `launch/benchmark/__init__.py` and the mode's
module (`model.py`, `attention.py`, `generate.py`, `sft.py`, `ppo.py`, `grpo.py`,
`dpo.py`); the presets, sizes
and targets of each device mode: `launch/benchmark/targets.json`.

`--device=gpu` (the default on a GPU backend) is the GPU mode: bf16, `mistral_1b`
for model/sft/lora, `mistral_7b` for decode at b1/b32/b128, `small` for PPO, GRPO and DPO, the torch
side on the same GPU; `--preset` then overrides every mode's model. The table's
header names the CPU (model, AVX-512 or not) and the device, with the matmul peak
and memory bandwidth measured in the same run, from which floors and MFU come.

`--threads=N` below the CPUs this process may use pins the process to N of them
before jax or torch start, so both frameworks get the same N cores (XLA sizes its
thread pool from the CPU affinity; torch is also told `set_num_threads(N)`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from launch.benchmark import MODES, figures

_WHAT = flags.DEFINE_enum("what", "all", [*MODES, "all"], "Which benchmark to run.")
_DEVICE = flags.DEFINE_enum("device", "auto", ["auto", *figures.DEVICES],
                            "cpu or gpu mode (sizes, dtypes, references); auto: gpu on a GPU "
                            "backend.")
_PRESET = flags.DEFINE_string("preset", None, "Model preset from configs/models.py for every "
                              "mode (default: small on cpu; per mode on gpu).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions (PPO, GRPO: iterations after the "
                             "warm-up one); the median is reported.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Write the full report as JSON to this file.")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Also write a jax.profiler trace of one call "
                                "of cai_jax's side of each mode here (view in TensorBoard's "
                                "profile plugin or Perfetto).")
_OVERRIDE = flags.DEFINE_list("model_override", [], "MistralConfig fields for cai_jax's side, "
                              "e.g. attention_impl=einsum,remat_policy=none.")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads for both frameworks "
                                "(default: every CPU this process may use).", lower_bound=1)


def _pin_threads(threads: int | None) -> int:
  """Restricts the process to `threads` CPUs; must run before jax/torch are imported."""
  available = sorted(os.sched_getaffinity(0))
  if threads is None:
    return len(available)
  if threads > len(available):
    raise app.UsageError(f"--threads={threads}: only {len(available)} CPUs are available "
                         f"to this process")
  if threads < len(available):
    os.sched_setaffinity(0, available[:threads])
  return threads


# Model fields a benchmark may override: how cai_jax computes, never the shapes (the
# params are built before the overrides apply).
_OVERRIDABLE = {"attention_impl": str, "decode_loop": str, "remat": bool, "remat_policy": str,
                "attention_query_block": int}


def _overrides(items: list[str]) -> dict:
  """`key=value` strings -> MistralConfig fields, checked by building a config with them."""
  from cai_jax.model import MistralConfig
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or key not in _OVERRIDABLE:
      raise app.UsageError(f"--model_override={item}: expected FIELD=VALUE with FIELD one of "
                           f"{sorted(_OVERRIDABLE)}")
    kind = _OVERRIDABLE[key]
    try:
      if kind is bool:
        if value.lower() not in ("true", "false"):
          raise ValueError(f"{key} is true or false")
        out[key] = value.lower() == "true"
      else:
        out[key] = kind(value)
    except ValueError as e:
      raise app.UsageError(f"--model_override={item}: {e}") from None
  try:
    MistralConfig(**out)
  except ValueError as e:
    raise app.UsageError(f"--model_override: {e}") from None
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = _pin_threads(_THREADS.value)
  # The torch reference shares the GPU with JAX: JAX takes memory as it needs it
  # instead of preallocating 75% of the device.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if "jax" in sys.modules or "torch" in sys.modules:
    print("benchmark: warning: jax/torch were imported before the thread pinning",
          file=sys.stderr)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from configs.models import PRESETS
  from launch.benchmark import report as report_lib
  from launch.benchmark import suite
  from launch.benchmark.timing import log
  if _PRESET.value is not None and _PRESET.value not in PRESETS:
    raise app.UsageError(f"--preset={_PRESET.value}: choose from {sorted(PRESETS)}")
  report = suite.run(_WHAT.value, preset=_PRESET.value, reps=_REPS.value, threads=threads,
                     device=_DEVICE.value, model_overrides=_overrides(_OVERRIDE.value),
                     profile_dir=_PROFILE.value)
  print(report_lib.markdown_table(report))
  if _OUT.value:
    report_lib.write_json(report, _OUT.value)
    log(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
