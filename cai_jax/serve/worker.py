"""The batching worker: one thread owns the accelerator and batches requests together.

Request handlers (asyncio, so thousands may wait cheaply) validate and
tokenise, queue a job with `BatchingWorker.submit` and await its future. The
worker merges queued jobs (rows from several requests, each with its own
settings and seed) into one `TextGenerator.complete` call of up to
`max_batch_rows` rows, then routes each job's rows back. The sampler takes
every setting per row, so merged requests share one compiled program and
decode together instead of queueing behind a lock as NeMo's server does.
Each row's seed is derived from its request alone (`row_seed`), so a
request's samples do not depend on what it was batched with. A failure
inside generation fails only its request; the thread carries on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Any, Sequence

import numpy as np

from cai_jax.engine import Completion, TextGenerator

log = logging.getLogger(__name__)

# Top-logprob counts are compiled into the sampler: requests are rounded up to these few
# sizes, which cover OpenAI's limits (5 on completions, 20 on chat; see openai_api.py).
TOP_LOGPROB_BUCKETS = (5, 20)

# Per-row settings of `TextGenerator.complete`, with the value a job gets when it omits one.
ROW_SETTINGS = {
    "max_new_tokens": 16, "greedy": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
    "repetition_penalty": 1.0, "min_new_tokens": 0, "end_strings": (), "add_bos": False,
    "seed": None, "stop_at_eos": True,    # seed None: fresh randomness per row
}


class BatchStats:
  """Counters the worker updates; `snapshot()` is safe to call from any thread."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests = 0
    self.rows = 0
    self.batches = 0
    self.max_rows_per_batch = 0
    self.max_requests_per_batch = 0
    self.failed_batches = 0

  def add_request(self) -> None:
    with self._lock:
      self.requests += 1

  def add_batch(self, requests: int, rows: int, failed: bool = False) -> None:
    with self._lock:
      self.batches += 1
      self.rows += rows
      self.max_rows_per_batch = max(self.max_rows_per_batch, rows)
      self.max_requests_per_batch = max(self.max_requests_per_batch, requests)
      self.failed_batches += int(failed)

  def snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(requests=self.requests, rows=self.rows, batches=self.batches,
                  max_rows_per_batch=self.max_rows_per_batch,
                  max_requests_per_batch=self.max_requests_per_batch,
                  failed_batches=self.failed_batches)


@dataclasses.dataclass
class _Job:
  prompts: list[str]
  settings: dict[str, list]      # every ROW_SETTINGS key, one value per prompt
  num_top_logprobs: int
  return_prompt_logprobs: bool
  future: concurrent.futures.Future


_STOP = object()


class BatchingWorker:
  """Owns all JAX calls: merges queued jobs into batched `complete` calls on one thread.

  A job is never split: one larger than `max_batch_rows` runs alone. After
  taking a job the worker waits up to `batch_window_ms` for more; jobs that
  arrive while a batch runs are merged into the next one. `min_batch_rows`
  pads every batch to at least that many rows (fewer compiled shapes).
  """

  def __init__(self, generator: TextGenerator, *, max_batch_rows: int = 32,
               batch_window_ms: float = 5.0, min_batch_rows: int = 1):
    if max_batch_rows < 1:
      raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
    self.generator = generator
    self.max_batch_rows = max_batch_rows
    self.batch_window = max(batch_window_ms, 0.0) / 1000.0
    self.min_batch_rows = max(min_batch_rows, 1)
    self.stats = BatchStats()
    self._queue: queue.Queue = queue.Queue()
    self._closed = False
    self._thread = threading.Thread(target=self._run, name="cai_jax-generate", daemon=True)
    self._thread.start()

  def submit(self, prompts: Sequence[str], settings: dict[str, Any], *,
             num_top_logprobs: int = 0,
             return_prompt_logprobs: bool = False) -> concurrent.futures.Future:
    """Queues prompts; the future resolves to their `Completion`s (in order)."""
    n = len(prompts)
    if n == 0:
      raise ValueError("a job needs at least one prompt")
    unknown = set(settings) - set(ROW_SETTINGS)
    if unknown:
      raise ValueError(f"unknown generation settings {sorted(unknown)}")
    rows: dict[str, list] = {}
    for key, default in ROW_SETTINGS.items():
      value = settings.get(key, default)
      if key == "end_strings":
        value = [list(value)] * n if not value or isinstance(value[0], str) else value
      if isinstance(value, (list, tuple)):
        if len(value) != n:
          raise ValueError(f"{key}: {len(value)} values for {n} prompts")
        rows[key] = list(value)
      else:
        rows[key] = [value] * n
    rows["seed"] = [row_seed(None, 0) if s is None else int(s) for s in rows["seed"]]
    future: concurrent.futures.Future = concurrent.futures.Future()
    if self._closed:
      future.set_exception(RuntimeError("the server is shutting down"))
      return future
    self.stats.add_request()
    self._queue.put(_Job(list(prompts), rows, int(num_top_logprobs),
                         bool(return_prompt_logprobs), future))
    return future

  def close(self, timeout: float | None = 30.0) -> None:
    """Finishes the batch in progress, fails queued jobs, stops the thread."""
    if self._closed:
      return
    self._closed = True
    self._queue.put(_STOP)
    self._thread.join(timeout)

  # --- the thread ---

  def _run(self) -> None:
    carry = None
    while True:
      first = carry if carry is not None else self._queue.get()
      carry = None
      if first is _STOP:
        break
      jobs, carry, stop = self._collect(first)
      jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
      if jobs:
        try:
          self._execute(jobs)
        except Exception:  # never let the thread die: waiting requests would hang
          log.exception("generation worker: unexpected error")
          for job in jobs:
            if not job.future.done():
              job.future.set_exception(RuntimeError("generation worker failed"))
      if stop:
        break
    self._fail_pending(carry)

  def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
    """The first job plus what else fits, waiting up to the batch window."""
    jobs, rows = [first], len(first.prompts)
    deadline = time.monotonic() + self.batch_window
    while rows < self.max_batch_rows:
      remaining = deadline - time.monotonic()
      try:
        nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if nxt is _STOP:
        return jobs, None, True
      if rows + len(nxt.prompts) > self.max_batch_rows:
        return jobs, nxt, False
      jobs.append(nxt)
      rows += len(nxt.prompts)
    return jobs, None, False

  def _fail_pending(self, carry) -> None:
    pending = [carry] if carry is not None and carry is not _STOP else []
    while True:
      try:
        job = self._queue.get_nowait()
      except queue.Empty:
        break
      if job is not _STOP:
        pending.append(job)
    for job in pending:
      if job.future.set_running_or_notify_cancel():
        job.future.set_exception(RuntimeError("the server is shutting down"))

  def _execute(self, jobs: list[_Job]) -> None:
    rows = sum(len(j.prompts) for j in jobs)
    try:
      results = self._generate(jobs)
    except Exception as e:
      self.stats.add_batch(len(jobs), rows, failed=True)
      if len(jobs) > 1:
        # Find the request that broke the batch; the others still get served.
        log.warning("batch of %d requests failed (%s: %s); running them one by one",
                    len(jobs), type(e).__name__, e)
        for job in jobs:
          self._execute([job])
        return
      if not isinstance(e, ValueError):
        log.exception("generation failed")
      jobs[0].future.set_exception(e)
      return
    self.stats.add_batch(len(jobs), rows)
    for job, result in zip(jobs, results):
      job.future.set_result(result)

  def _generate(self, jobs: list[_Job]) -> list[list[Completion]]:
    prompts = [p for j in jobs for p in j.prompts]
    merged = {key: [v for j in jobs for v in j.settings[key]] for key in ROW_SETTINGS}
    top = max(j.num_top_logprobs for j in jobs)
    if top:
      top = next((b for b in TOP_LOGPROB_BUCKETS if b >= top), top)
    completions = self.generator.complete(
        prompts, **merged, num_top_logprobs=top,
        return_prompt_logprobs=any(j.return_prompt_logprobs for j in jobs),
        min_batch_bucket=self.min_batch_rows)
    out, start = [], 0
    for j in jobs:
      out.append(completions[start:start + len(j.prompts)])
      start += len(j.prompts)
    return out


def row_seed(seed: int | None, row: int) -> int:
  """The sampler seed of a request's `row`: a mix of (seed, row), or fresh randomness.

  Rows of one request (OpenAI `n`, NeMo's several sentences) get distinct
  seeds, and the seed depends on nothing but the request.
  """
  if seed is None:
    return secrets.randbits(31)
  state = np.random.SeedSequence([seed & (2**64 - 1), row]).generate_state(1, np.uint32)
  return int(state[0] >> 1)


def row_seeds(seed: int | None, rows: int) -> list[int | None]:
  """`row_seed` of each row of a request; without a seed, None per row (the worker draws
  fresh randomness for each at submit time)."""
  return [None] * rows if seed is None else [row_seed(seed, r) for r in range(rows)]
