"""The benchmark's reference figures and targets, read from `targets.json` beside this file.

Datasheet peaks, BENCHMARKS.md's recorded figures, and per device mode ("cpu", "gpu") the
model presets, sizes, speed-up targets and floor targets. Numbers live in the data file so
a new GPU or a revised target is an edit there, not in code.
"""

from __future__ import annotations

import functools
import json
import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.json")
DEVICES = ("cpu", "gpu")


@functools.cache
def load(path: str = PATH) -> dict:
  with open(path) as f:
    return json.load(f)


def _get(*keys: str):
  node = load()
  for i, key in enumerate(keys):
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"{PATH}: no entry {'.'.join(keys[:i + 1])!r}; the benchmark needs it")
    node = node[key]
  return node


def _device(device: str) -> str:
  if device not in DEVICES:
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
  return device


def datasheet(device_kind: str) -> tuple[float | None, float | None]:
  """(dense bf16 FLOP/s, HBM bytes/s) of the first datasheet whose key is part of
  `device_kind` (case-insensitive), or (None, None)."""
  kind = device_kind.lower()
  for key, sheet in _get("datasheets").items():
    if key in kind:
      return sheet["flops"], sheet["bytes_per_s"]
  return None, None


def reference_figures() -> dict:
  """What BENCHMARKS.md recorded on the small preset (copied into a CPU run's JSON)."""
  return dict(_get("benchmarks_md_reference_figures"))


def presets(device: str) -> dict[str, str]:
  """Model preset (configs/models.py) by mode, for a device mode."""
  return dict(_get(_device(device), "presets"))


def shape_sizes(device: str) -> dict:
  """A device mode's `workload.Shapes` fields; JSON lists become tuples."""
  sizes = dict(_get(_device(device), "shapes"))
  sizes["gen_batches"] = tuple(sizes["gen_batches"])
  sizes["sft_extra"] = tuple(tuple(pair) for pair in sizes["sft_extra"])
  return sizes


def target(device: str, kind: str, mode: str, metric: str) -> tuple[float, str] | None:
  """(at least, label) of a row's target, or None. `kind`: "speedup" (cai_jax over the
  reference) or "of_floor" (fraction of the hardware floor)."""
  entry = _get(_device(device), kind).get(mode, {}).get(metric)
  return None if entry is None else (entry["at_least"], entry["label"])
