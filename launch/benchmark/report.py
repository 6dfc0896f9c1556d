"""The report: one row per measured metric (speed-up, floor, target), the markdown table
on stdout and the JSON file."""

from __future__ import annotations

import json
import math

import numpy as np

from cai_jax.data.jsonl import atomic_write_json
from launch.benchmark import figures


def row(mode: str, metric: str, unit: str, ours: float, ref: float | None, *, device: str,
        higher_is_better: bool = True, floor: float | None = None,
        reference_name: str | None = None) -> dict:
  """One table row; `speedup` > 1 means cai_jax is faster, whatever the unit (None
  without a reference). `of_floor`: ours as a fraction of what the hardware allows.
  `device`: the benchmark's mode ("cpu" or "gpu"), whose targets (targets.json) apply."""
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
  target = figures.target(device, "speedup", mode, metric)
  if target and speedup is not None:
    checks.append((target[1], speedup >= target[0]))
  floor_target = figures.target(device, "of_floor", mode, metric)
  if floor_target and of_floor is not None:
    checks.append((floor_target[1], of_floor >= floor_target[0]))
  return {"mode": mode, "metric": metric, "unit": unit, "cai_jax": ours, "reference": ref,
          "speedup": speedup, "higher_is_better": higher_is_better, "floor": floor,
          "of_floor": of_floor, "reference_name": reference_name,
          "target": ", ".join(t for t, _ in checks) or None,
          "target_met": all(ok for _, ok in checks) if checks else None}


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
          "sft": "transformers+torch", "ppo": "TRL", "grpo": "TRL", "dpo": "TRL",
          "lora": "transformers+peft"}
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


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def write_json(report: dict, path: str) -> None:
  """Writes the report atomically (a killed run leaves no half-written file); numpy
  values become numbers and lists, anything else JSON lacks its `str`."""
  atomic_write_json(path, json.loads(json.dumps(report, default=_json_default)))
