"""The one training loop every stage uses (SFT, reward model; PPO reuses its parts).

    state -> [restore] -> for step: batch -> jitted step -> guard -> log / eval / save

What it guarantees:
- Exact resume: the checkpoint holds the whole TrainState (params, optimizer,
  step, RNG) and the data iterator position; a run killed after step N and
  resumed reproduces the uninterrupted run bit for bit on CPU.
- No host round-trip on the hot path: step i's metrics are fetched after step
  i+1 has been dispatched, so the device never waits for Python.
- A NaN/Inf loss, gradient or updated parameter stops the run with a clear
  error before anything is saved, so the newest checkpoint is the last good one.
- Honest metrics: a resumed run first drops the metrics.jsonl records of steps
  after the checkpoint it resumes from (the killed run logged them, and the
  resumed run logs them again), and a fresh start drops every record a run
  killed before its first checkpoint left, so the file is the uninterrupted
  trajectory. A run killed after its last checkpoint (during export) reports
  on rerun what the uninterrupted run reported: the last logged train metrics
  and a final evaluation of the restored weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from cai_jax.metrics import MetricsWriter
from cai_jax.train.checkpointing import Checkpointer
from cai_jax.train.state import TrainState, abstract_state


class TrainingDivergedError(FloatingPointError):
  pass


class DivergenceGuard:
  """Sanity bounds on a trainer's metrics, beyond "finite" (`configs/common.guard_config`).

  `check(step, metrics)` returns a sentence naming the metric that left its
  bounds (or None). Bounds, each off at 0:
  - `loss_spike`: a spike metric (SFT/RM `loss`, PPO `value_loss`) above this
    multiple of the median of its last `spike_window` values (once
    `min_history` are known) and above it by more than `loss_spike_min_delta`
    (a loss near 0 may jump tenfold on an ordinary hard batch);
  - `max_param_norm_growth`: a param norm (`param_norm`, PPO's
    `actor_param_norm`/`critic_param_norm`) above this multiple of its first value;
  - PPO: `max_kl_per_sequence` (nats per response), `min_entropy` (nats per
    token: a collapsed policy), `max_entropy_fraction` (of ln(vocab): a policy
    gone uniform).
  Its state (recent values, first norms) is saved with every checkpoint, so a
  resumed run guards exactly as the uninterrupted one.
  """

  def __init__(self, cfg, *, spike_metrics: tuple[str, ...], vocab_size: int = 0,
               state: dict | None = None):
    get = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)
    self.loss_spike = float(get("loss_spike", 0.0))
    self.spike_min_delta = float(get("loss_spike_min_delta", 0.0))
    self.window = int(get("spike_window", 50))
    self.min_history = int(get("min_history", 10))
    self.norm_growth = float(get("max_param_norm_growth", 0.0))
    self.max_kl = float(get("max_kl_per_sequence", 0.0))
    self.min_entropy = float(get("min_entropy", 0.0))
    self.max_entropy = float(get("max_entropy_fraction", 0.0)) * math.log(max(vocab_size, 1))
    self.spike_metrics = spike_metrics
    state = state or {}
    self.history = {k: list(v) for k, v in (state.get("history") or {}).items()}
    self.base_norms = dict(state.get("base_norms") or {})

  def state(self) -> dict:
    return {"history": self.history, "base_norms": self.base_norms}

  def set_base_norm(self, name: str, value: float) -> None:
    self.base_norms.setdefault(name, float(value))

  def check(self, step: int, metrics: dict) -> str | None:
    value = lambda k: float(np.asarray(metrics[k])) if k in metrics else None
    for k in self.spike_metrics:
      v, past = value(k), self.history.setdefault(k, [])
      if v is None:
        continue
      if self.loss_spike and len(past) >= self.min_history:
        median = float(np.median(past))
        if median > 0 and v > self.loss_spike * median and v - median > self.spike_min_delta:
          return (f"{k}={v:.4g} at step {step} is {v / median:.1f}x its running median "
                  f"{median:.4g} (guard.loss_spike={self.loss_spike:g})")
      past.append(v)
      del past[:-self.window]
    for k in ("param_norm", "actor_param_norm", "critic_param_norm"):
      v = value(k)
      if v is None:
        continue
      base = self.base_norms.setdefault(k, v)
      if self.norm_growth and base > 0 and v > self.norm_growth * base:
        return (f"{k}={v:.4g} at step {step} grew {v / base:.1f}x from {base:.4g} "
                f"(guard.max_param_norm_growth={self.norm_growth:g})")
    kl, ent = value("kl_per_sequence"), value("entropy")
    if self.max_kl and kl is not None and kl > self.max_kl:
      return (f"kl_per_sequence={kl:.4g} nats at step {step} is above "
              f"guard.max_kl_per_sequence={self.max_kl:g}")
    if self.min_entropy and ent is not None and ent < self.min_entropy:
      return (f"entropy={ent:.4g} nats/token at step {step} collapsed below "
              f"guard.min_entropy={self.min_entropy:g}")
    if self.max_entropy and ent is not None and ent > self.max_entropy:
      return (f"entropy={ent:.4g} nats/token at step {step} is above {self.max_entropy:.4g} "
              f"(guard.max_entropy_fraction of ln(vocab)): the policy is near uniform")
    return None


@dataclasses.dataclass
class LoopSettings:
  total_steps: int
  log_every: int = 10
  eval_every: int = 0          # 0: only at the end
  save_every: int = 0          # 0: only at the end
  flops_per_token: float = 0.0  # forward+backward FLOPs per token, for the MFU estimate
  peak_flops: float = 0.0       # per device
  desc: str = "train"
  eval_at_start: bool = True    # evaluate the initial params (step 0) on a fresh start


def check_workdir_writable(workdir: str) -> None:
  """Fails fast, naming the directory, instead of after minutes of compiling and training."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: on a shared filesystem every host probes the same workdir.
    probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable ({e}); "
                          "pass a --workdir you can write to") from None


def default_peak_flops() -> float:
  """Peak dense FLOP/s per device, for MFU estimates (bf16 on accelerators)."""
  kind = jax.devices()[0].device_kind.lower()
  table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5e": 197e12, "v5p": 459e12,
           "v4": 275e12, "v6": 918e12}
  for key, flops in table.items():
    if key in kind:
      return flops
  # This project's 2-core CPU reference machine (BENCHMARKS.md): ~349 GFLOP/s fp32 matmul.
  return 349e9 / max(jax.device_count(), 1)


def run_training(*, state: TrainState, shardings: TrainState, train_step: Callable,
                 batches: Any, put_batch: Callable[[dict], Any],
                 count_tokens: Callable[[dict], int], settings: LoopSettings,
                 checkpointer: Checkpointer | None, writer: MetricsWriter,
                 evaluate: Callable[[Any], dict] | None = None,
                 guard_config: Any = None) -> tuple[TrainState, dict]:
  """Runs (or resumes) training to `settings.total_steps`. Returns (state, summary).

  `batches` is an iterator with `state()` / `restore(dict)` (e.g.
  `cai_jax.data.batching.BatchIterator`); `put_batch` turns a host batch into
  global device arrays; `evaluate(params)` returns validation metrics;
  `guard_config` sets the `DivergenceGuard` bounds on loss and param norm.
  """
  start = 0
  initial_eval: dict = {}
  guard_state = None
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state, data_state, start = checkpointer.restore(abstract_state(state, shardings))
    batches.restore(data_state["batches"])
    initial_eval = dict(data_state.get("initial_eval") or {})
    guard_state = data_state.get("guard")
    logging.info("resumed from step %d", start)
    truncate_metrics(writer.path, start)
  else:
    truncate_metrics(writer.path, -1)   # records of a run killed before its first checkpoint
  summary: dict = {"resumed_from": start}
  total = settings.total_steps
  if start >= total:
    # Killed after the last checkpoint (e.g. during export): report what the
    # uninterrupted run reported.
    summary.update(initial_eval=initial_eval, steps=total,
                   final_train=last_logged(writer.path, "train",
                                           drop=("tokens_per_sec", "mfu")),
                   final_eval=({k: float(v) for k, v in evaluate(state.params).items()}
                               if evaluate is not None else {}))
    return state, summary
  if start == 0 and evaluate is not None and settings.eval_at_start:
    # The step-0 baseline is what "validation loss fell" is measured against; it
    # is kept in every checkpoint so a resumed run still reports it.
    initial_eval = {k: float(v) for k, v in evaluate(state.params).items()}
    writer.write(0, initial_eval, split="eval")
  summary["initial_eval"] = initial_eval
  guard = DivergenceGuard(guard_config, spike_metrics=("loss",), state=guard_state)
  checked: set = set()

  def fetch_and_check(step_no, metrics):
    """Each step's metrics go through the checks once (the guard's history is stateful)."""
    host = jax.device_get(metrics)
    if step_no in checked:
      return host
    checked.add(step_no)
    bad = [k for k in ("loss", "grad_norm", "param_norm")
           if k in host and not math.isfinite(float(host[k]))]
    problem = (f"non-finite {', '.join(bad)} ({', '.join(f'{k}={float(host[k])}' for k in bad)})"
               if bad else guard.check(step_no, host))
    if problem:
      last = checkpointer.latest_step() if checkpointer else None
      raise TrainingDivergedError(
          f"step {step_no}: {problem}; stopping before saving anything. Last good checkpoint: "
          f"{'step ' + str(last) if last is not None else 'none'} (the newest that passed the "
          f"guard) in {checkpointer.directory if checkpointer else '-'}. Lower the learning rate, "
          "check the data for empty or corrupt examples, or enable gradient clipping.")
    return host

  def save(step_no, eval_metrics=None):
    if checkpointer is not None:
      checkpointer.save(step_no, state, {"batches": batches.state(), "step": step_no,
                                         "initial_eval": initial_eval, "guard": guard.state()},
                        eval_metrics)

  pending = None          # (step number, device metrics) of the step not yet checked
  window_tokens, window_start = 0, time.perf_counter()
  last_eval: dict = {}
  bar = tqdm(total=total, initial=start, desc=settings.desc, dynamic_ncols=True,
             disable=jax.process_index() != 0)
  try:
    for step_no in range(start + 1, total + 1):
      host_batch = next(batches)
      window_tokens += count_tokens(host_batch)
      state, metrics = train_step(state, put_batch(host_batch))
      if pending is not None:
        prev_no, prev = pending
        host = fetch_and_check(prev_no, prev)
        if prev_no % settings.log_every == 0:
          _log(writer, prev_no, host, window_tokens, window_start, settings, bar)
          window_tokens, window_start = 0, time.perf_counter()
      pending = (step_no, metrics)
      bar.update(1)

      is_last = step_no == total
      do_eval = evaluate is not None and (
          is_last or (settings.eval_every and step_no % settings.eval_every == 0))
      do_save = is_last or (settings.save_every and step_no % settings.save_every == 0)
      if do_eval or do_save:
        fetch_and_check(step_no, metrics)  # never save or evaluate a diverged state
      if do_eval:
        last_eval = {k: float(v) for k, v in evaluate(state.params).items()}
        writer.write(step_no, last_eval, split="eval")
        bar.set_postfix(val_loss=f"{last_eval.get('val_loss', float('nan')):.4f}")
      if do_save:
        save(step_no, last_eval if do_eval else None)
    prev_no, prev = pending
    host = fetch_and_check(prev_no, prev)
    if prev_no % settings.log_every == 0 or prev_no == total:
      _log(writer, prev_no, host, window_tokens, window_start, settings, bar)
    summary.update(final_train={k: float(np.asarray(v)) for k, v in host.items()},
                   final_eval=last_eval, steps=total)
  finally:
    bar.close()
    writer.flush()
    if checkpointer is not None:
      checkpointer.wait()
  return state, summary


def last_logged(path: str, split: str, drop: tuple[str, ...] = ()) -> dict:
  """The metrics of the last `split` record of a metrics.jsonl ({} if none), without
  the bookkeeping fields (and `drop`)."""
  from cai_jax.metrics import read_metrics
  records = read_metrics(path, split=split)
  if not records:
    return {}
  skip = {"step", "split", "time", *drop}
  return {k: v for k, v in records[-1].items() if k not in skip}


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops metrics.jsonl records of steps after `last_step` (lead process only, atomically).

  Those steps were logged by a run that was killed before checkpointing them;
  the resumed run recomputes and logs them again.
  """
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) > last_step:
        continue
    except (ValueError, KeyError, TypeError):
      continue  # a line half-written when the process was killed
    kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _log(writer, step_no, host, tokens, since, settings, bar):
  elapsed = max(time.perf_counter() - since, 1e-9)
  out = {k: float(np.asarray(v)) for k, v in host.items()}
  out["tokens_per_sec"] = tokens / elapsed
  if settings.flops_per_token and settings.peak_flops:
    out["mfu"] = out["tokens_per_sec"] * settings.flops_per_token / (
        settings.peak_flops * jax.device_count())
  writer.write(step_no, out, split="train")
  bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{out['tokens_per_sec']:.0f}")
