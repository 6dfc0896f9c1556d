"""SFT and reward-model batches: tokenisation, packing/padding, deterministic batching.

Pure NumPy on the host: the train step receives fixed-shape int32 arrays and
shards them itself, so nothing here depends on devices and everything here is
reproducible from `(data, seed)`.

Loss convention (SFT): `loss_mask[t] = 1` means token `t` is a training target,
predicted from tokens `< t` of the same segment. The train step compares
`logits[:, :-1]` with `tokens[:, 1:]` and weights by `loss_mask[:, 1:]`. The
first token of a segment has nothing of its own segment before it, so packing
and padding always set its mask to 0 (otherwise, in a packed row, it would be
"predicted" from the previous example). Padding has `segment_ids = 0` and
`loss_mask = 0`; packed examples have segment ids 1, 2, ... and positions that
restart at 0, which is what the model needs to keep packed examples from
attending to each other and to place RoPE as if each were alone.

Comparison (reward-model) rows stack a pair's chosen and rejected sequences as
`tokens[2, T]` so both go through one forward pass (the train step reshapes
`[B, 2, T]` to `[2B, T]`), with `lengths[2]` locating the last real token,
where the scalar head's reward is read.
"""

from __future__ import annotations

import bisect
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from cai_jax.data.jsonl import DataError, data_error, read_records, require

_OVERLONG = ("truncate", "drop")


def _check_overlong(overlong: str) -> None:
  if overlong not in _OVERLONG:
    raise ValueError(f"overlong must be one of {_OVERLONG}, got {overlong!r}")


# ----------------------------------------------------------------------------
# SFT.


def tokenize_conversations(records: Sequence[Mapping[str, Any]], tokenizer, template, *,
                           max_seq_len: int, overlong: str = "truncate") -> tuple[list[dict], dict]:
  """Chat records -> `{"ids": int32[n], "loss_mask": int32[n]}` examples, n <= max_seq_len.

  `records` are NeMo chat records (`conversations` plus optional `system`,
  as `read_chat_records` returns) or bare lists of turns. Ids and mask come
  from `template.render_ids` (the ids of the rendered text, bos only where the
  template writes `<s>`): 1 on assistant replies and their end-of-turn marker.
  Overlong examples are cut to their first `max_seq_len` tokens
  (`overlong="truncate"`, counted) or dropped (`"drop"`, counted). An example
  with no loss token left (its replies all beyond the cut) teaches nothing
  and is dropped and counted.
  """
  _check_overlong(overlong)
  if max_seq_len < 2:
    raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
  stats = {"records": 0, "examples": 0, "truncated": 0, "dropped_overlong": 0,
           "dropped_no_loss": 0, "tokens": 0, "loss_tokens": 0}
  examples: list[dict] = []
  for index, record in enumerate(records):
    stats["records"] += 1
    if isinstance(record, Mapping):
      if "conversations" not in record:
        raise DataError(f"chat record {index}: field 'conversations' missing")
      conversation, system = record["conversations"], record.get("system") or ""
    else:
      conversation, system = record, ""
    try:
      ids, mask = template.render_ids(tokenizer, conversation, system)
    except ValueError as e:
      raise DataError(f"chat record {index}: {e}") from None
    if len(ids) > max_seq_len:
      if overlong == "drop":
        stats["dropped_overlong"] += 1
        continue
      ids, mask = ids[:max_seq_len], mask[:max_seq_len]
      stats["truncated"] += 1
    # Token 0 can never be a target (nothing precedes it), see the module docstring.
    if not any(mask[1:]):
      stats["dropped_no_loss"] += 1
      continue
    example = {"ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}
    stats["examples"] += 1
    stats["tokens"] += len(ids)
    stats["loss_tokens"] += int(example["loss_mask"][1:].sum())
    examples.append(example)
  return examples, stats


def _empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  return {"tokens": np.full(seq_len, pad_id, np.int32),
          "loss_mask": np.zeros(seq_len, np.int32),
          "segment_ids": np.zeros(seq_len, np.int32),
          "positions": np.zeros(seq_len, np.int32)}


def _place(row: dict[str, np.ndarray], example: Mapping[str, np.ndarray], start: int,
           segment: int) -> int:
  """Writes one example into `row` at `start` as segment `segment`; returns the end."""
  n = len(example["ids"])
  end = start + n
  row["tokens"][start:end] = example["ids"]
  row["loss_mask"][start:end] = example["loss_mask"]
  row["loss_mask"][start] = 0
  row["segment_ids"][start:end] = segment
  row["positions"][start:end] = np.arange(n, dtype=np.int32)
  return end


def _check_lengths(examples: Sequence[Mapping[str, np.ndarray]], seq_len: int) -> None:
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  for index, example in enumerate(examples):
    n = len(example["ids"])
    if n == 0:
      raise ValueError(f"example {index} is empty")
    if n > seq_len:
      raise ValueError(f"example {index} has {n} tokens > seq_len {seq_len}; tokenize with "
                       f"max_seq_len <= seq_len")
    if len(example["loss_mask"]) != n:
      raise ValueError(f"example {index}: ids and loss_mask lengths differ")


def pack_examples(examples: Sequence[Mapping[str, np.ndarray]], seq_len: int, *,
                  pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """Packs examples into rows of `seq_len` tokens (best-fit decreasing, deterministic).

  Each row is `{"tokens", "loss_mask", "segment_ids", "positions"}`, int32
  `[seq_len]`. Examples are taken longest first (ties in input order) and each
  goes into the fullest row it still fits, else a new row: a greedy bin
  packing that wastes little padding. Within a row, examples keep the order
  they were placed in. The same input always gives the same rows.
  """
  _check_lengths(examples, seq_len)
  order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["ids"]), i))
  rows: list[dict[str, np.ndarray]] = []
  fill: list[int] = []       # tokens used per row
  segments: list[int] = []   # examples placed per row
  free: list[tuple[int, int]] = []  # sorted (free tokens, row index)
  for i in order:
    n = len(examples[i]["ids"])
    k = bisect.bisect_left(free, (n, -1))
    if k < len(free):
      _, r = free.pop(k)
    else:
      rows.append(_empty_row(seq_len, pad_id))
      fill.append(0)
      segments.append(0)
      r = len(rows) - 1
    segments[r] += 1
    fill[r] = _place(rows[r], examples[i], fill[r], segments[r])
    if fill[r] < seq_len:
      bisect.insort(free, (seq_len - fill[r], r))
  return rows


def pad_examples(examples: Sequence[Mapping[str, np.ndarray]], seq_len: int, *,
                 pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """One example per row, right-padded: the same row format as `pack_examples`."""
  _check_lengths(examples, seq_len)
  rows = []
  for example in examples:
    row = _empty_row(seq_len, pad_id)
    _place(row, example, 0, 1)
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------
# Deterministic, resumable batches.


def _stack_rows(rows: Sequence[Mapping[str, Any]] | Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
  if isinstance(rows, Mapping):
    arrays = {k: np.asarray(v) for k, v in rows.items()}
  else:
    if not rows:
      raise ValueError("BatchIterator needs at least one row")
    keys = list(rows[0])
    for index, row in enumerate(rows):
      if list(row) != keys:
        raise ValueError(f"row {index} has fields {sorted(row)}, row 0 has {sorted(keys)}")
    try:
      arrays = {k: np.stack([np.asarray(row[k]) for row in rows]) for k in keys}
    except ValueError as e:
      raise ValueError(f"rows have different shapes ({e}); pad or pack them to one "
                       f"seq_len first") from None
  sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"every field needs the same leading (row) dimension, got {sizes}")
  return arrays


class BatchIterator:
  """Infinite, deterministic, resumable batches over rows, sliced for this process.

  Epoch `e` visits the rows in the order of a permutation drawn from
  `(seed, e)` alone (identity when `shuffle=False`), so any batch can be
  recomputed from `(epoch, step_in_epoch)`: `state()` is all a checkpoint
  needs, and after `restore(state)` the next batch is exactly the one an
  uninterrupted iterator would have produced. Each epoch has a fresh order.

  A global batch is `global_batch_size` rows; this process gets its
  contiguous slice `[process_index * B, (process_index + 1) * B)` with
  `B = global_batch_size // process_count`, so the slices of all processes,
  concatenated in process order, are the global batch (what
  `jax.make_array_from_process_local_data` expects). Batches are dicts of
  NumPy arrays `[B, ...]` with the rows' fields.

  With `drop_remainder=True` an epoch has `num_rows // global_batch_size`
  steps and the leftover rows (different ones each epoch) wait for the next.
  With `drop_remainder=False` the last batch of an epoch is filled up with
  all-zero rows and every batch carries `valid` (int32 `[B]`, 0 on filler
  rows), keeping shapes fixed for jit while evaluation counts each row once.
  """

  def __init__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, np.ndarray],
               global_batch_size: int, *, seed: int, shuffle: bool = True,
               drop_remainder: bool = True, process_index: int = 0, process_count: int = 1):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                       f"{process_index}, process_count={process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                       f"of the process count {process_count}")
    self._arrays = _stack_rows(rows)
    self.num_rows = next(iter(self._arrays.values())).shape[0]
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.process_index = process_index
    self.process_count = process_count
    if drop_remainder:
      self.steps_per_epoch = self.num_rows // global_batch_size
    else:
      self.steps_per_epoch = math.ceil(self.num_rows / global_batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"only {self.num_rows} rows for global_batch_size {global_batch_size}: "
                       f"lower the batch size or add data")
    self._epoch = 0
    self._step = 0
    self._order_cache: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if self._order_cache is None or self._order_cache[0] != epoch:
      if self.shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        order = rng.permutation(self.num_rows)
      else:
        order = np.arange(self.num_rows)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def batch_at(self, epoch: int, step_in_epoch: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch at `(epoch, step_in_epoch)`."""
    if not 0 <= step_in_epoch < self.steps_per_epoch:
      raise ValueError(f"step_in_epoch {step_in_epoch} out of range [0, {self.steps_per_epoch})")
    start = step_in_epoch * self.global_batch_size
    chosen = self._order(epoch)[start:start + self.global_batch_size]
    local = np.full(self.local_batch_size, -1, np.int64)
    lo = self.process_index * self.local_batch_size
    part = chosen[lo:lo + self.local_batch_size]
    local[:len(part)] = part
    valid = local >= 0
    batch = {}
    for key, array in self._arrays.items():
      out = array[np.where(valid, local, 0)]
      if not valid.all():
        out[~valid] = 0
      batch[key] = out
    if not self.drop_remainder:
      batch["valid"] = valid.astype(np.int32)
    return batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self._epoch, self._step)
    self._step += 1
    if self._step == self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  @property
  def epoch(self) -> int:
    return self._epoch

  def state(self) -> dict[str, int]:
    """Where the next batch comes from; save it with the checkpoint."""
    return {"epoch": self._epoch, "step_in_epoch": self._step}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a `state()`; the data, seed and batch size must be the same as then."""
    try:
      epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"iterator state must be {{'epoch': int, 'step_in_epoch': int}}, "
                       f"got {state!r}") from None
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"iterator state {state!r} is out of range ({self.steps_per_epoch} steps "
                       f"per epoch); was it saved with other data or batch size?")
    self._epoch, self._step = epoch, step


# ----------------------------------------------------------------------------
# Reward-model comparisons.


def _p_chosen(record: Mapping[str, Any], path: str, line: int) -> float:
  if "p_chosen" not in record:
    return 1.0
  value = require(record, "p_chosen", (int, float), path, line)
  if not (math.isfinite(value) and 0.0 <= value <= 1.0):
    raise data_error(path, line, f"field 'p_chosen' must be a probability in [0, 1], "
                     f"got {value}")
  return float(value)


def read_comparisons(path: str | os.PathLike) -> tuple[list[dict], dict]:
  """A NeMo comparison file -> `[{"chosen": text, "rejected": text, "p_chosen": float}]`.

  The file alternates `{"text": chosen_full}` and `{"text": rejected_full}`
  lines (NeMo's reward-model format; each text is the whole rendered
  conversation). The chosen line may carry `p_chosen`, the probability that
  chosen is preferred (soft labels from an AI judge; default 1.0); it is
  ignored on rejected lines, where NeMo tools put nothing.
  """
  path = os.fspath(path)
  records = list(read_records(path))
  if len(records) % 2:
    line = records[-1][0]
    raise data_error(path, line, f"odd number of records ({len(records)}): a comparison file "
                     f"alternates chosen and rejected lines, and the chosen record at this "
                     f"line has no rejected record after it")
  pairs = []
  for k in range(0, len(records), 2):
    (chosen_line, chosen), (rejected_line, rejected) = records[k], records[k + 1]
    pairs.append({
        "chosen": require(chosen, "text", str, path, chosen_line),
        "rejected": require(rejected, "text", str, path, rejected_line),
        "p_chosen": _p_chosen(chosen, path, chosen_line),
    })
  soft = sum(p["p_chosen"] != 1.0 for p in pairs)
  return pairs, {"records": len(records), "pairs": len(pairs), "soft_labels": soft}


def truncate_keep_end(ids: list[int], max_seq_len: int, end: Sequence[int]) -> list[int]:
  """`max_seq_len` tokens: the first ones and, if `ids` ends with it, the whole end-of-turn
  sequence `end` (the reward is read at its last token); else the last token."""
  keep = len(end) if len(end) < max_seq_len and list(ids[len(ids) - len(end):]) == list(end) else 1
  return list(ids[:max_seq_len - keep]) + list(ids[len(ids) - keep:])


def tokenize_pairs(pairs: Sequence[Mapping[str, Any]], tokenizer, template, *, max_seq_len: int,
                   overlong: str = "drop") -> tuple[list[dict], dict]:
  """Comparison pairs -> `{"chosen_ids", "rejected_ids": int32[n], "p_chosen": float}`.

  Texts already end with the template's end-of-turn marker and are encoded by
  `template.encode`, as every stage encodes chat text. The reward is read at
  the last token, so truncation (`overlong="truncate"`) keeps the end-of-turn
  marker (all its tokens) and cuts what comes before it (the end of the
  response); a pair whose two sides become identical by the cut has nothing
  left to compare and is dropped. With `overlong="drop"` a pair with either
  side too long is dropped.
  """
  _check_overlong(overlong)
  if max_seq_len < 2:
    raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
  stats = {"pairs": 0, "examples": 0, "truncated": 0, "dropped_overlong": 0,
           "dropped_identical_after_truncation": 0}
  end = template.end_of_turn_ids(tokenizer)
  examples = []
  for index, pair in enumerate(pairs):
    stats["pairs"] += 1
    for field in ("chosen", "rejected"):
      if not isinstance(pair.get(field), str):
        raise DataError(f"comparison pair {index}: field '{field}' must be a string")
      if not pair[field]:
        raise DataError(f"comparison pair {index}: field '{field}' is empty; a comparison "
                        f"text is a whole rendered conversation")
    chosen = template.encode(tokenizer, pair["chosen"])
    rejected = template.encode(tokenizer, pair["rejected"])
    if len(chosen) > max_seq_len or len(rejected) > max_seq_len:
      if overlong == "drop":
        stats["dropped_overlong"] += 1
        continue
      chosen = truncate_keep_end(chosen, max_seq_len, end) if len(chosen) > max_seq_len else chosen
      rejected = (truncate_keep_end(rejected, max_seq_len, end) if len(rejected) > max_seq_len
                  else rejected)
      stats["truncated"] += 1
      if chosen == rejected:
        stats["dropped_identical_after_truncation"] += 1
        continue
    examples.append({"chosen_ids": np.asarray(chosen, np.int32),
                     "rejected_ids": np.asarray(rejected, np.int32),
                     "p_chosen": float(pair.get("p_chosen", 1.0))})
    stats["examples"] += 1
  return examples, stats


def pad_pairs(examples: Sequence[Mapping[str, Any]], seq_len: int, *,
              pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """Rows `{"tokens": int32[2, T], "lengths": int32[2], "p_chosen": float32}`, chosen first."""
  rows = []
  for index, example in enumerate(examples):
    tokens = np.full((2, seq_len), pad_id, np.int32)
    lengths = np.zeros(2, np.int32)
    for side, field in enumerate(("chosen_ids", "rejected_ids")):
      ids = np.asarray(example[field], np.int32)
      if not 0 < len(ids) <= seq_len:
        raise ValueError(f"comparison example {index}: {field} has {len(ids)} tokens, need "
                         f"1..{seq_len}; tokenize with max_seq_len <= seq_len")
      tokens[side, :len(ids)] = ids
      lengths[side] = len(ids)
    rows.append({"tokens": tokens, "lengths": lengths,
                 "p_chosen": np.float32(example.get("p_chosen", 1.0))})
  return rows
