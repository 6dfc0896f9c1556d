"""Process set-up shared by the entrypoints: multi-host init, logging, summaries."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys

from absl import logging


def _bad_override(e: Exception, where: str) -> str:
  # ml_collections nests the KeyError's repr in the AttributeError: unquote it.
  detail = re.sub(r"\\?'", "", str(e)).replace("\\n", " ").replace("\n", " ").strip("\" ")
  if isinstance(e, (AttributeError, KeyError)):
    detail = f"unknown config field {detail}"
  given = [a for a in sys.argv[1:] if a.startswith("--config")]
  return (f"{os.path.basename(sys.argv[0])}: bad --config: {detail} "
          f"(given: {' '.join(given) or 'none'}; field names are those of {where})")


def define_config(default: str, help_text: str):
  """`--config` (an ml_collections config file and `--config.x=y` overrides), with a clean
  error for a bad override or preset: absl applies them while this module is imported (the
  default file) or while flags are parsed (`parse_flags`), and a mistyped field would
  otherwise end in a traceback saying only `AttributeError: "'typo'"`."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(_bad_override(e, default.split(":")[0]))


def parse_flags(argv):
  """`app.run(main, flags_parser=runtime.parse_flags)`: absl's parser, with bad config
  overrides and presets reported in one line."""
  from absl import app
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    config = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "--config")
    sys.exit(_bad_override(e, config.split(":")[0]))


def define_force():
  """`--force` of the training stages (see `cai_jax.train.identity.claim_workdir`)."""
  from absl import flags
  return flags.DEFINE_bool("force", False, "If --workdir holds a run of another config or "
                           "inputs, delete its outputs and start afresh (else it is refused).")


def setup() -> None:
  """Joins a multi-host job when launched as one.

  `jax.distributed.initialize()` discovers the coordinator itself under Slurm
  (one task per host) and on Cloud TPU pods; elsewhere set
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or
  CAI_JAX_DISTRIBUTED=1 to force it.
  """
  import jax
  if (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("CAI_JAX_DISTRIBUTED") == "1"
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
    jax.distributed.initialize()
  logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)


def preflight(stage: str, cfg) -> None:
  """Exits with every problem of the stage's config listed, before any work (see
  `cai_jax.preflight`)."""
  from cai_jax import preflight as checks
  problems = checks.stage_problems(stage, cfg)
  if problems:
    sys.exit(f"{stage}: {checks.PreflightError('config', problems)}")


@contextlib.contextmanager
def user_errors(name: str):
  """Errors a user can fix (bad config, data, paths, a refused workdir, a diverged run) end
  the program with one clear line; `--verbosity=1` shows the traceback instead."""
  try:
    yield
  except (ValueError, OSError, FloatingPointError) as e:
    if logging.get_verbosity() >= 1:
      raise
    sys.exit(f"{name}: error: {e}\n(rerun with --verbosity=1 for the traceback)")


def headline(report: dict) -> str:
  """One-line summary of a stage report for the console."""
  keys = ("final_train", "final_eval")
  parts = [f"stage={report.get('stage')}"]
  for k in keys:
    v = report.get(k) or {}
    parts += [f"{k}.{m}={v[m]:.4g}" for m in ("loss", "val_loss", "accuracy", "val_accuracy",
                                               "score_mean", "kl_per_sequence", "eval_score_mean")
              if isinstance(v.get(m), (int, float))]
  outs = report.get("outputs") or {}
  if outs:
    parts.append("outputs=" + json.dumps(outs))
  return " ".join(parts)
