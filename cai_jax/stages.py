"""Whether a pipeline stage has to run again, and the record of what it returned.

Each stage of `launch.pipeline` works in a directory of its own. There it
writes its outputs, then its manifest (`jsonl.write_manifest`: config, inputs
with content hashes, `complete: true`), and the pipeline then records the
stage's return value in `stage_result.json`. Before each stage, `decide` says
what to do with the directory:

* `SKIP`: the stage completed with the same config on inputs whose contents are
  unchanged, and no stage before it ran in this invocation: its recorded result
  stands.
* `RESTART`: it completed before but under another config, on other inputs or
  before an upstream stage ran again, or it is forced: its directory is emptied
  and it runs afresh (checkpoints made with other settings are never resumed).
* `RESUME`: it never completed: it runs in the directory as it is and resumes
  from its own partial output or checkpoints (each stage refuses, or discards,
  partial output made with other settings).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

from cai_jax.data import jsonl

RESULT_FILE = "stage_result.json"

SKIP = "skip"
RESUME = "resume"
RESTART = "restart"


def read_result(stage_dir: str) -> dict | None:
  """The result recorded in `stage_dir`, or None where none was recorded."""
  path = os.path.join(stage_dir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  return jsonl.read_json(path)


def write_result(stage_dir: str, result: Mapping[str, Any] | None, seconds: float) -> dict:
  """Records a stage's return value (as JSON data, with its run time) and returns the record."""
  record = json.loads(json.dumps(dict(result or {}), default=str))
  record["seconds"] = seconds
  jsonl.atomic_write_json(os.path.join(stage_dir, RESULT_FILE), record)
  return record


def is_complete(stage_dir: str, stage_cfg: Any) -> bool:
  """True when `stage_dir` holds a recorded result and a complete manifest of `stage_cfg`
  whose inputs (read from the paths the manifest names) still have the same contents."""
  if not os.path.exists(os.path.join(stage_dir, RESULT_FILE)):
    return False
  manifest = jsonl.read_manifest(stage_dir)
  if not manifest or manifest.get("complete") is not True:
    return False
  recorded = manifest.get("inputs") or {}
  if not isinstance(recorded, dict) or not all(
      isinstance(entry, dict) and isinstance(entry.get("path"), str)
      for entry in recorded.values()):
    return False
  inputs = {name: entry["path"] for name, entry in recorded.items()}
  return jsonl.manifest_matches(stage_dir, config=stage_cfg, inputs=inputs)


def decide(stage_dir: str, stage_cfg: Any, *, forced: bool, upstream_ran: bool) -> str:
  """`SKIP`, `RESTART` or `RESUME` for a stage about to run (see the module docstring)."""
  if not forced and not upstream_ran and is_complete(stage_dir, stage_cfg):
    return SKIP
  if forced or jsonl.read_manifest(stage_dir):
    return RESTART
  return RESUME


def prepare(stage_dir: str, decision: str) -> None:
  """Readies `stage_dir` for a run `decide` asked for: emptied on `RESTART`, kept on `RESUME`."""
  if decision not in (RESUME, RESTART):
    raise ValueError(f"a stage runs on {RESUME!r} or {RESTART!r}, not on {decision!r}")
  if decision == RESTART:
    shutil.rmtree(stage_dir, ignore_errors=True)
  os.makedirs(stage_dir, exist_ok=True)
