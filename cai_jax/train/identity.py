"""A training stage's run identity: what it trains, on what, so a rerun never mixes two runs.

A stage workdir holds one run. `claim_workdir` records the run's identity
(`run_identity.json`: the resolved config and the SHA-256 of every input) the
first time and compares it on every later start:

- the same identity resumes from the newest checkpoint (or, if the run is
  complete, re-exports exactly what it trained);
- another identity is refused before any work, naming the fields that differ,
  unless `force=True` (the CLIs' `--force`), which clears the workdir and starts
  the new run afresh. A manifest therefore never describes weights that a
  different config produced.

Fields that only say how long to train or how often to log, evaluate and save
(`RESUMABLE_FIELDS`) are not part of the identity: a finished run of N steps
may be extended to 2N, a run may resume on another mesh, and a run stopped by
the divergence guard may resume with a looser bound.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

from cai_jax.data import jsonl

IDENTITY_FILE = "run_identity.json"
RESUMABLE_FIELDS = frozenset({
    "max_steps", "num_epochs", "iterations", "log_every", "eval_every", "save_every",
    "keep_checkpoints", "sample_every", "num_samples_logged", "export_hf", "mesh",
    "max_eval_prompts", "guard",
})


class RunIdentityError(ValueError):
  """The workdir holds another run; the message names the differing fields."""


def run_identity(config: Any, inputs: Mapping[str, str]) -> dict:
  """The identity of a run: its config (less `RESUMABLE_FIELDS`) and its inputs' hashes."""
  plain = jsonl.plain_config(config)
  return {
      "config": {k: v for k, v in plain.items() if k not in RESUMABLE_FIELDS},
      "inputs": {name: jsonl.input_entry(src)["sha256"] or os.fspath(src)
                 for name, src in sorted(inputs.items()) if src},
  }


def _flatten(tree: Any, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def differences(recorded: dict, current: dict) -> list[str]:
  """`field: old -> new` for every leaf that differs (inputs by content hash)."""
  old, new = _flatten(recorded), _flatten(current)
  out = []
  for key in sorted(set(old) | set(new)):
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      name = key.replace("config.", "", 1) if key.startswith("config.") else key
      if key.startswith("inputs."):
        out.append(f"{name}: its content changed")
      else:
        out.append(f"{name}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
  return out


def _stale_temporaries(workdir: str) -> list[str]:
  """Half-written files of an atomic write killed mid-way (`*.tmp`), outside checkpoints/."""
  found = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d != "checkpoints"]   # orbax cleans its own
    found += [os.path.join(root, f) for f in files if f.endswith(".tmp")]
  return found


def claim_workdir(workdir: str, config: Any, inputs: Mapping[str, str], *, force: bool = False,
                  lead: bool = True) -> str:
  """Checks (or records) the run identity of `workdir`; returns "new", "resume" or "forced".

  Raises `RunIdentityError` when the workdir holds a run with another identity
  and `force` is off. Only the `lead` process writes or deletes; every process
  checks. Also removes `*.tmp` files a killed atomic write left behind.
  """
  path = os.path.join(workdir, IDENTITY_FILE)
  current = run_identity(config, inputs)
  if force:
    if lead and os.path.isdir(workdir):
      for name in os.listdir(workdir):
        full = os.path.join(workdir, name)
        shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
    status = "forced"
  else:
    recorded = None
    if os.path.exists(path):
      recorded = jsonl.read_json(path)
    else:
      # A workdir from before identities were recorded: its manifest holds the config.
      manifest = jsonl.read_manifest(workdir)
      if manifest and isinstance(manifest.get("config"), dict):
        recorded = {"config": {k: v for k, v in manifest["config"].items()
                               if k not in RESUMABLE_FIELDS},
                    "inputs": current["inputs"]}
    if recorded is not None:
      diff = differences(recorded, current)
      if diff:
        shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
        raise RunIdentityError(
            f"{workdir} holds another run ({shown}). Rerun with the same config and inputs to "
            f"resume it, use another --workdir, or pass --force to delete it and start afresh "
            f"(launch.pipeline: --force=STAGE).")
      status = "resume"
    else:
      status = "new"
  if lead:
    for tmp in _stale_temporaries(workdir):
      os.remove(tmp)
    if status != "resume" or not os.path.exists(path):
      jsonl.atomic_write_json(path, current)
  return status
