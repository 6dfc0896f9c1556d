"""Process set-up shared by the entrypoints: multi-host init, logging, summaries."""

from __future__ import annotations

import json
import os
import sys

from absl import logging


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
