"""How the benchmark times a call, and where its progress goes."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable


def log(msg: str) -> None:
  """Progress goes to stderr so stdout carries only the table."""
  print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
  """Seconds of `reps` calls of `fn` (which must block until done), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def best_seconds(fn: Callable[[], Any], reps: int = 5) -> float:
  return min(time_calls(fn, reps, warmup=2))


def median(xs) -> float:
  return float(statistics.median(xs))
