"""The one training loop every stage runs on: SFT, the reward model and PPO.

    state -> [restore] -> for step: batch -> step(state, batch) -> checks -> log / eval / save

A stage hands it a state pytree and a step function `(state, batch) -> (state,
metrics)`: SFT's and the RM's jitted train step over a TrainState, or a PPO iteration
(rollout, score and update, three compiled programs) over the actor's and critic's
TrainStates. The RNG key is part of the state; host-side state a step keeps (PPO's KL
coefficient) is checkpointed beside it, as the data iterator's position is.

What it guarantees:
- Exact resume: the checkpoint holds the whole state (params, optimizer, step, RNG,
  and whatever else the stage keeps there) and the data iterator position; a run
  killed after step N and resumed reproduces the uninterrupted run bit for bit on CPU.
- No host round-trip on the hot path: step i's metrics are fetched after step
  i+1 has been dispatched, so the device never waits for Python (`overlap`).
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
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from cai_jax.data.jsonl import atomic_write_bytes
from cai_jax.metrics import MetricsWriter
from cai_jax.train.checkpointing import Checkpointer, CheckpointRestoreError
from cai_jax.train.state import abstract_state


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

  def restore(self, state: dict | None) -> None:
    """Continues from a checkpointed `state()` (None: keep the current one)."""
    if state is not None:
      self.history = {k: list(v) for k, v in (state.get("history") or {}).items()}
      self.base_norms = dict(state.get("base_norms") or {})

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
  """What the loop needs to know about a stage besides its step function."""
  total_steps: int
  log_every: int = 10
  eval_every: int = 0           # 0: only at the end
  save_every: int = 0           # 0: only at the end
  flops_per_token: float = 0.0  # forward+backward FLOPs per token, for the MFU estimate
  peak_flops: float = 0.0       # per device
  desc: str = "train"           # progress bar label; first word of a divergence error
  # What a step is called in messages and in the checkpoint's data ("iteration" for PPO).
  unit: str = "step"
  eval_at_start: bool = True    # evaluate the initial state (step 0) on a fresh start
  # Metrics that must be finite, checked before anything of the step is logged or saved.
  finite_metrics: tuple[str, ...] = ("loss", "grad_norm", "param_norm")
  # Shown on the progress bar: train metrics, then (after each evaluation) eval metrics.
  postfix: tuple[str, ...] = ("loss",)
  eval_postfix: tuple[str, ...] = ("val_loss",)
  # Fetch step i's metrics after step i+1 is dispatched (the device never waits for
  # Python). Off for steps that synchronise anyway (PPO reads its rewards mid-step).
  overlap: bool = True
  advice: str = ("Lower the learning rate, check the data for empty or corrupt examples, "
                 "or enable gradient clipping.")


class NonFiniteError(FloatingPointError):
  """Raised by a step that finds non-finite values mid-way (e.g. PPO's rewards, before its
  update). The loop turns it into a `TrainingDivergedError` naming the checkpoint kept."""


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


Step = Callable[[Any, Any], tuple[Any, dict]]


def run_training(*, state: Any, shardings: Any, step: Step, batches: Any,
                 put_batch: Callable[[dict], Any], settings: LoopSettings,
                 checkpointer: Checkpointer | None, writer: MetricsWriter,
                 count_tokens: Callable[[dict], int] | None = None,
                 evaluate: Callable[[Any], dict] | None = None,
                 guard: DivergenceGuard | None = None,
                 after_step: Callable[[int, Any, dict], None] | None = None,
                 step_logs: Sequence[tuple[str, str]] = (),
                 host_state: Mapping[str, Any] | None = None) -> tuple[Any, dict]:
  """Runs (or resumes) `step` to `settings.total_steps`. Returns (state, summary).

  `state` is any pytree of arrays (SFT's TrainState; PPO's actor and critic) placed on
  `shardings`; it holds everything the run needs to continue,
  RNG key included, and is checkpointed whole. `step(state, device_batch) -> (state,
  metrics)` is one update (a jitted train step, or a PPO iteration of three compiled
  programs). `batches` is an iterator with `state()` / `restore(dict)` (e.g.
  `cai_jax.data.batching.BatchIterator`), checkpointed beside the state; `put_batch`
  turns its host batch into device arrays; `count_tokens(host_batch)` (optional) gives
  tokens/s and MFU; `evaluate(state)` returns validation metrics; `guard` bounds the
  metrics beyond "finite" (its history is checkpointed too); `after_step(step, state,
  host_metrics)` runs once a step passed the checks, with the newest state (PPO logs
  samples there);
  `step_logs` are other (jsonl path, step field) logs of the stage, cut back on resume
  as metrics.jsonl is. `host_state` maps names to host-side objects the step reads and
  moves, with `state()` (JSON) / `restore(saved)` like `batches` (PPO's KL
  controller): each is saved in the checkpoint under its name and restored on resume.

  summary: resumed_from, initial_eval, steps, final_train, final_eval.
  """
  start = 0
  initial_eval: dict = {}
  guard = guard or DivergenceGuard(None, spike_metrics=())
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state, data_state, start = checkpointer.restore(abstract_state(state, shardings))
    batches.restore(data_state["batches"])
    # PPO checkpoints written before the shared loop call the step-0 evaluation first_eval.
    initial_eval = dict(data_state.get("initial_eval") or data_state.get("first_eval") or {})
    guard.restore(data_state.get("guard"))
    for name, obj in (host_state or {}).items():
      if name not in data_state:
        raise CheckpointRestoreError(
            f"{checkpointer.directory}/{start}: the checkpoint has no {name!r} (this stage keeps "
            f"it there); it was written by another stage or version. Use another workdir, or "
            f"--force to start afresh")
      obj.restore(data_state[name])
    logging.info("%s resumed from %s %d", settings.desc, settings.unit, start)
    kept = start
  else:
    kept = -1       # records of a run killed before its first checkpoint
  truncate_metrics(writer.path, kept)
  for path, field in step_logs:
    truncate_metrics(path, kept, field=field)
  summary: dict = {"resumed_from": start}
  total = settings.total_steps
  evaluate_now = lambda s: {k: float(v) for k, v in evaluate(s).items()}
  if start >= total:
    # Killed after the last checkpoint (e.g. during export): report what the
    # uninterrupted run reported.
    summary.update(initial_eval=initial_eval, steps=total,
                   final_train=last_logged(writer.path, "train",
                                           drop=("tokens_per_sec", "mfu")),
                   final_eval=evaluate_now(state) if evaluate is not None else {})
    return state, summary
  if start == 0 and evaluate is not None and settings.eval_at_start:
    # The step-0 baseline is what "validation loss fell" is measured against; it
    # is kept in every checkpoint so a resumed run still reports it.
    initial_eval = evaluate_now(state)
    writer.write(0, initial_eval, split="eval")
  summary["initial_eval"] = initial_eval

  def diverged(step_no, problem):
    last = checkpointer.latest_step() if checkpointer else None
    return TrainingDivergedError(
        f"{settings.desc} {settings.unit} {step_no}: {problem}. Stopped before saving: the "
        f"last good checkpoint is {f'{settings.unit} {last}' if last is not None else 'none'} "
        f"(the newest that passed the guard) in {checkpointer.directory if checkpointer else '-'}"
        f"; nothing newer was written. {settings.advice}")

  checked: dict = {}

  def fetch_and_check(step_no, metrics):
    """Each step's metrics go through the checks once (the guard's history is stateful)."""
    if step_no in checked:
      return checked[step_no]
    host = jax.device_get(metrics)
    bad = [k for k in settings.finite_metrics
           if k in host and not math.isfinite(float(host[k]))]
    problem = (f"non-finite {', '.join(f'{k}={float(host[k])}' for k in bad)}"
               if bad else guard.check(step_no, host))
    if problem:
      raise diverged(step_no, problem)
    checked.clear()
    checked[step_no] = host
    return host

  def save(step_no, eval_metrics=None):
    if checkpointer is not None:
      data = {"batches": batches.state(), settings.unit: step_no, "initial_eval": initial_eval,
              "guard": guard.state()}
      data.update({name: obj.state() for name, obj in (host_state or {}).items()})
      checkpointer.save(step_no, state, data, eval_metrics)

  window = {"tokens": 0, "since": time.perf_counter()}   # throughput since the last log

  def finish(step_no, metrics):
    """Checks, logs (every log_every) and hands a step's metrics to `after_step`."""
    host = fetch_and_check(step_no, metrics)
    if step_no % settings.log_every == 0 or step_no == total:
      _log(writer, step_no, host, window, settings, bar, count_tokens is not None)
      window.update(tokens=0, since=time.perf_counter())
    if after_step is not None:
      after_step(step_no, state, host)
    return host

  pending = None          # (step number, device metrics) of the step not yet finished
  last_eval: dict = {}
  host: dict = {}
  bar = tqdm(total=total, initial=start, desc=settings.desc, dynamic_ncols=True,
             disable=jax.process_index() != 0)
  try:
    for step_no in range(start + 1, total + 1):
      host_batch = next(batches)
      if count_tokens is not None:
        window["tokens"] += count_tokens(host_batch)
      try:
        state, metrics = step(state, put_batch(host_batch))
      except NonFiniteError as e:
        raise diverged(step_no, str(e)) from None
      if pending is not None:
        host = finish(*pending)
      pending = (step_no, metrics)
      if not settings.overlap:
        host = finish(*pending)
        pending = None
      bar.update(1)

      is_last = step_no == total
      do_eval = evaluate is not None and (
          is_last or (settings.eval_every and step_no % settings.eval_every == 0))
      do_save = is_last or (settings.save_every and step_no % settings.save_every == 0)
      if do_eval or do_save:
        fetch_and_check(step_no, metrics)  # never save or evaluate a diverged state
      if do_eval:
        last_eval = evaluate_now(state)
        writer.write(step_no, last_eval, split="eval")
        bar.set_postfix({k: f"{last_eval[k]:.4f}" for k in settings.eval_postfix
                         if k in last_eval})
      if do_save:
        save(step_no, last_eval if do_eval else None)
    if pending is not None:
      host = finish(*pending)
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


def truncate_metrics(path: str, last_step: int, *, field: str = "step") -> None:
  """Drops the records of a jsonl log whose `field` is after `last_step` (lead process
  only, atomically), and any line a kill cut short.

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
      if int(json.loads(line)[field]) > last_step:
        continue
    except (ValueError, KeyError, TypeError):
      continue  # a line half-written when the process was killed
    kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    atomic_write_bytes(path, "".join(kept).encode())


def _log(writer, step_no, host, window, settings, bar, with_throughput):
  out = {k: float(np.asarray(v)) for k, v in host.items()}
  if with_throughput:
    out["tokens_per_sec"] = window["tokens"] / max(time.perf_counter() - window["since"], 1e-9)
    if settings.flops_per_token and settings.peak_flops:
      out["mfu"] = out["tokens_per_sec"] * settings.flops_per_token / (
          settings.peak_flops * jax.device_count())
  writer.write(step_no, out, split="train")
  postfix = {k: f"{out[k]:.4f}" for k in settings.postfix if k in out}
  if "tokens_per_sec" in out:
    postfix["tok_s"] = f"{out['tokens_per_sec']:.0f}"
  bar.set_postfix(postfix)
