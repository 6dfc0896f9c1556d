"""Metrics to `metrics.jsonl` and TensorBoard (tensorboardX), from the lead process only."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np


class MetricsWriter:
  """Appends `{"step": s, "split": ..., **metrics}` lines and TensorBoard scalars.

  Only process 0 writes, so multi-host jobs produce one file. Non-scalar and
  non-finite values are kept in the jsonl (as strings for NaN/Inf) so a failing
  run still leaves an honest record.
  """

  def __init__(self, workdir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, split: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time()}
    for k, v in metrics.items():
      v = np.asarray(jax.device_get(v))
      if v.ndim == 0:
        f = float(v)
        record[k] = f if math.isfinite(f) else str(f)
        if self._tb is not None and math.isfinite(f):
          self._tb.add_scalar(f"{split}/{k}", f, int(step))
      else:
        record[k] = v.tolist()
    with open(self.path, "a") as fh:
      fh.write(json.dumps(record) + "\n")

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str, split: str | None = None) -> list[dict]:
  """Reads a metrics.jsonl back (for plots, reports and tests)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as fh:
    for line in fh:
      line = line.strip()
      if line:
        rec = json.loads(line)
        if split is None or rec.get("split") == split:
          out.append(rec)
  return out
