"""A training stage's run identity: what it trains, on what, so a rerun never mixes two runs.

A stage workdir holds one run. `claim_workdir` records the run's identity
(`run_identity.json`: the resolved config and the SHA-256 of every input) the
first time and compares it on every later start:

- the same identity resumes from the newest checkpoint (or, if the run is
  complete, re-exports exactly what it trained);
- another identity is refused before any work, naming the fields that differ,
  unless `force=True` (the CLIs' `--force`), which deletes that run's outputs
  and starts the new run afresh. A manifest therefore never describes weights
  that a different config produced. (`force` with the same identity resumes.)

Fields that only say how long to train or how often to log, evaluate and save
(`RESUMABLE_FIELDS`) are not part of the identity: a finished run of N steps
may be extended to 2N, a run may resume on another mesh, and a run stopped by
the divergence guard may resume with a looser bound.
"""

from __future__ import annotations

import copy
import os
import shutil
from typing import Any, Mapping

from cai_jax.data import jsonl

IDENTITY_FILE = "run_identity.json"
RESUMABLE_FIELDS = frozenset({
    "max_steps", "num_epochs", "iterations", "log_every", "eval_every", "save_every",
    "keep_checkpoints", "sample_every", "num_samples_logged", "export_hf", "mesh",
    "max_eval_prompts", "guard",
    # How much of the RL stage's batch runs at once: memory, not results.
    "ppo.rollout_micro_batch_size", "ppo.forward_micro_batch_size", "ppo.micro_batch_size",
})


class RunIdentityError(ValueError):
  """The workdir holds another run; the message names the differing fields."""


def run_identity(config: Any, inputs: Mapping[str, str]) -> dict:
  """The identity of a run: its config (less `RESUMABLE_FIELDS`) and its inputs' hashes."""
  return {
      "config": _identity_fields(jsonl.plain_config(config)),
      "inputs": {name: jsonl.input_entry(src)["sha256"] or os.fspath(src)
                 for name, src in sorted(inputs.items()) if src},
  }


def _identity_fields(plain: dict) -> dict:
  """A plain config without `RESUMABLE_FIELDS` (a dotted name drops a nested field)."""
  out = copy.deepcopy(plain)
  for name in RESUMABLE_FIELDS:
    *parents, leaf = name.split(".")
    node = out
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(leaf, None)
  return out


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


# What a training stage writes in its workdir: all that `force` may delete.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "model", "hf", "report.json",
               "manifest.json", "samples.jsonl", "reference_logps.npz", IDENTITY_FILE)


def _stale_temporaries(workdir: str) -> list[str]:
  """Half-written files a killed atomic write of this stage left (`NAME.*.tmp`, `NAME.tmp`)
  in the workdir and its exported model directories; orbax cleans checkpoints/ itself."""
  found = []
  for sub in ("", "model", "hf"):
    folder = os.path.join(workdir, sub)
    if os.path.isdir(folder):
      found += [os.path.join(folder, f) for f in os.listdir(folder)
                if f.endswith(".tmp") and os.path.isfile(os.path.join(folder, f))]
  return found


def _has_work(workdir: str) -> bool:
  """Whether a run already produced something here (a checkpoint or a finished result)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return (os.path.exists(os.path.join(workdir, "manifest.json"))
          or (os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))))


def _check_deletable(workdir: str, inputs: Mapping[str, str]) -> None:
  """`force` deletes a run's outputs; never a directory that holds more than a run."""
  here = os.path.realpath(workdir)
  for danger in ("/", os.path.expanduser("~"), os.getcwd()):
    if here == os.path.realpath(danger) or os.path.realpath(danger).startswith(here + os.sep):
      raise RunIdentityError(f"--force refuses to clear {workdir}: it is (or contains) "
                             f"{danger}; give the stage its own --workdir")
  for name, src in inputs.items():
    if src and os.path.realpath(os.fspath(src)).startswith(here + os.sep):
      raise RunIdentityError(f"--force refuses to clear {workdir}: the input {name}={src} "
                             f"lives in it")


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def claim_workdir(workdir: str, config: Any, inputs: Mapping[str, str], *, force: bool = False,
                  lead: bool = True) -> str:
  """Checks (or records) the run identity of `workdir`; returns "new", "resume" or "forced".

  A workdir where a run has produced something (a checkpoint, a manifest) and whose
  identity differs is refused with `RunIdentityError`, unless `force`: then that
  run's outputs (`RUN_OUTPUTS`, nothing else) are deleted first. A workdir with
  nothing of value yet (a start that died before its first checkpoint) simply
  takes the new identity. Checkpoints of unknown identity (no record, no
  manifest) are refused too. Only the `lead` process writes or deletes; every
  process checks and then waits for the others. Also removes the `*.tmp` files a
  killed atomic write left behind.
  """
  path = os.path.join(workdir, IDENTITY_FILE)
  current = run_identity(config, inputs)
  recorded = None
  if os.path.exists(path):
    recorded = jsonl.read_json(path)
  else:
    # A workdir from before identities were recorded: its manifest holds the config.
    manifest = jsonl.read_manifest(workdir)
    if manifest and isinstance(manifest.get("config"), dict):
      recorded = {"config": _identity_fields(manifest["config"]),
                  "inputs": current["inputs"]}
  work = _has_work(workdir)
  if recorded is None:
    diff = ["the checkpoints here have no recorded config"] if work else []
  else:
    diff = differences(recorded, current) if work else []
  if not diff:
    status = "resume" if work else "new"
  elif force:
    _check_deletable(workdir, inputs)
    if lead:
      for name in RUN_OUTPUTS:
        full = os.path.join(workdir, name)
        if os.path.isdir(full) and not os.path.islink(full):
          shutil.rmtree(full)
        elif os.path.lexists(full):
          os.remove(full)
    status = "forced"
  else:
    shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
    raise RunIdentityError(
        f"{workdir} holds another run ({shown}). Rerun with the same config and inputs to "
        f"resume it, use another --workdir, or pass --force to delete it and start afresh "
        f"(launch.pipeline: --force=STAGE).")
  if lead:
    for tmp in _stale_temporaries(workdir):
      os.remove(tmp)
    if status != "resume" or not os.path.exists(path):
      jsonl.atomic_write_json(path, current)
  _barrier("claim_workdir")
  return status
