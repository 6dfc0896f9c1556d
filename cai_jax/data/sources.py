"""Readers for the datasets the CAI pipeline starts from.

* Red-team prompts: `Anthropic/hh-rlhf`, `data_dir="red-team-attempts"` (one
  transcript per record; the first human turn is the prompt), or a plain file
  of `{"prompt": ...}` records.
* Helpfulness SFT chats: `nvidia/sft_datablend_v1`-style NeMo chat records.
* Helpful-only preference pairs: the `Anthropic/hh-rlhf` comparison subsets.

Each source is either a local file (read through `read_records`, so every
error names file and line) or, when the string is not an existing path but
looks like `owner/name`, a Hugging Face hub dataset loaded with
`datasets.load_dataset` exactly as NeMo's tutorial downloads it. Readers
return `(data, stats)`: everything dropped is counted by reason in `stats`,
never dropped silently, so a stage's manifest shows what happened to its input.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any, Iterator, Sequence

from cai_jax.data.jsonl import DataError, data_error, is_hub_name, read_records, require

RED_TEAM_HUB = "Anthropic/hh-rlhf"
RED_TEAM_DATA_DIR = "red-team-attempts"
SFT_BLEND_HUB = "nvidia/sft_datablend_v1"
HH_HUB = "Anthropic/hh-rlhf"
HELPFUL_SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_SUBSETS = HELPFUL_SUBSETS + ("harmless-base",)

_ROLE_OF = {"human": "User", "assistant": "Assistant"}
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")


# ----------------------------------------------------------------------------
# Where records come from.


def _hub_records(name: str, *, data_dir: str | None, split: str) -> Iterator[tuple[int, dict]]:
  """Rows of a hub dataset as `(row_number, record)`, numbered from 1 like file lines."""
  import datasets  # pylint: disable=import-outside-toplevel  (heavy; only for hub sources)
  kwargs = {"data_dir": data_dir} if data_dir else {}
  try:
    dataset = datasets.load_dataset(name, split=split, **kwargs)
  except Exception as e:  # the hub raises many unrelated types; one clear message instead
    raise DataError(f"{_hub_label(name, data_dir, split)}: could not load the dataset from the "
                    f"Hugging Face hub ({type(e).__name__}: {e}); pass a local JSON Lines "
                    f"file instead when offline") from e
  for row, record in enumerate(dataset, start=1):
    yield row, dict(record)


def _hub_label(name: str, data_dir: str | None, split: str) -> str:
  """How errors name a hub dataset: `Anthropic/hh-rlhf[red-team-attempts/train]` row N."""
  return f"{name}[{data_dir + '/' if data_dir else ''}{split}]"


def _source_records(source: str | os.PathLike, *, data_dir: str | None = None,
                    split: str = "train") -> tuple[str, Iterator[tuple[int, dict]]]:
  """`(label for error messages, records)` for a local file or a hub dataset name."""
  source = os.fspath(source)
  if is_hub_name(source):
    return _hub_label(source, data_dir, split), _hub_records(source, data_dir=data_dir,
                                                             split=split)
  return source, read_records(source)


# ----------------------------------------------------------------------------
# hh-rlhf transcripts.


def _split_transcript(text: str) -> tuple[list[dict] | None, str | None]:
  """`(turns, None)` for a well-formed transcript, else `(None, reason)`.

  Well-formed: starts with a Human turn (after optional whitespace, and with
  or without the leading blank line), turns alternate Human/Assistant, and no
  turn is empty. Reasons are short snake_case words used as stats keys.
  """
  if not isinstance(text, str):
    return None, "not_text"
  stripped = text.lstrip()
  if stripped.startswith(("Human:", "Assistant:")):
    # Some copies lose the leading "\n\n"; the turn marker is still unambiguous.
    text = "\n\n" + stripped
  parts = _TURN_RE.split(text)
  # re.split with one group: [before, role, value, role, value, ...]
  before, rest = parts[0], parts[1:]
  if not rest:
    return None, "no_human_turn"
  if before.strip():
    return None, "text_before_first_turn"
  turns = [{"from": _ROLE_OF[rest[k].lower()], "value": rest[k + 1].strip()}
           for k in range(0, len(rest), 2)]
  if not any(t["from"] == "User" for t in turns):
    return None, "no_human_turn"
  for k, turn in enumerate(turns):
    if turn["from"] != ("User", "Assistant")[k % 2]:
      return None, "turns_do_not_alternate"
    if not turn["value"]:
      return None, "empty_turn"
  return turns, None


def parse_hh_transcript(text: str) -> list[dict] | None:
  """`"\\n\\nHuman: ...\\n\\nAssistant: ..."` -> `[{"from": "User", "value": ...}, ...]`.

  Values are stripped. Returns None for a malformed transcript: no Human turn,
  text before the first turn, turns that do not alternate starting with
  Human, or an empty turn. None rather than an exception because the real
  datasets hold a few such records and readers drop and count them.
  """
  turns, _ = _split_transcript(text)
  return turns


def _first_human_turn(text: str) -> tuple[str | None, str | None]:
  """The first Human turn's text, stripped, or `(None, reason)`.

  Deliberately looser than `parse_hh_transcript`: a red-team prompt only
  needs its first human turn, so a transcript whose later turns are odd
  (an empty final reply, say) still gives a prompt.
  """
  if not isinstance(text, str):
    return None, "not_text"
  stripped = text.lstrip()
  if stripped.startswith(("Human:", "Assistant:")):
    text = "\n\n" + stripped
  parts = _TURN_RE.split(text)
  if parts[0].strip():
    return None, "text_before_first_turn"
  for k in range(1, len(parts), 2):
    if parts[k] == "Human":
      prompt = parts[k + 1].strip()
      return (prompt, None) if prompt else (None, "empty_prompt")
  return None, "no_human_turn"


# ----------------------------------------------------------------------------
# Red-team prompts.


def read_red_team_prompts(source: str | os.PathLike, *, limit: int | None = None,
                          shuffle: bool = False, seed: int = 0,
                          data_dir: str | None = None,
                          split: str = "train", with_lines: bool = False):
  """Red-team prompts: the first human turn of each transcript, stripped.

  `source` is a local file of red-team records (`transcript` field, as
  `load_dataset('Anthropic/hh-rlhf', data_dir='red-team-attempts')` gives,
  possibly saved with `to_json`) or of plain `{"prompt": ...}` records (both
  kinds may be mixed), or a hub name such as `"Anthropic/hh-rlhf"` (loaded
  with `data_dir`, by default `"red-team-attempts"` for that dataset, and `split`).

  Transcripts without a human turn and empty prompts are dropped; repeated
  prompts are kept once, first occurrence first (the real data has many
  near-identical attempts and a duplicate adds no new training signal).
  Then, optionally, a shuffle seeded by `seed`, then the first `limit`:
  shuffling before limiting makes a small run a random sample rather than
  the file's first rows. The result depends only on the input and arguments.
  Returns `(prompts, stats)`, or with `with_lines` `(prompts, stats, where)`:
  `where[i]` is `"file:line"` of prompt i, for errors that name it.
  """
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0 or None, got {limit}")
  if data_dir is None and os.fspath(source) == RED_TEAM_HUB:
    data_dir = RED_TEAM_DATA_DIR
  label, records = _source_records(source, data_dir=data_dir, split=split)
  stats: dict[str, int] = {"records": 0, "no_human_turn": 0, "empty_prompt": 0,
                           "malformed": 0, "duplicates": 0}
  prompts: list[str] = []
  where: dict[str, str] = {}
  seen: set[str] = set()
  for line, record in records:
    stats["records"] += 1
    if "transcript" in record:
      text = require(record, "transcript", str, label, line)
      prompt, reason = _first_human_turn(text)
    elif "prompt" in record:
      prompt = require(record, "prompt", str, label, line).strip() or None
      reason = None if prompt else "empty_prompt"
    else:
      raise data_error(label, line, "field 'transcript' missing (a red-team record needs "
                       "'transcript'; a plain prompt record needs 'prompt')")
    if prompt is None:
      stats[reason if reason in stats else "malformed"] += 1
      continue
    if prompt in seen:
      stats["duplicates"] += 1
      continue
    seen.add(prompt)
    prompts.append(prompt)
    where[prompt] = f"{label}:{line}"
  stats["unique"] = len(prompts)
  if shuffle:
    random.Random(seed).shuffle(prompts)
  if limit is not None:
    prompts = prompts[:limit]
  stats["prompts"] = len(prompts)
  if with_lines:
    return prompts, stats, [where[p] for p in prompts]
  return prompts, stats


# ----------------------------------------------------------------------------
# SFT chat records.


def _chat_record(record: dict, label: str, line: int) -> tuple[dict | None, str | None]:
  """A validated, normalised NeMo chat record, or `(None, reason)` when it has no use for SFT.

  Structural errors (missing or mistyped fields, unknown roles) raise: they
  mean the file is not a chat dataset at all, and guessing would hide that.
  """
  conversations = require(record, "conversations", list, label, line)
  system = record.get("system", "")
  if system is None:
    system = ""
  if not isinstance(system, str):
    raise data_error(label, line, f"field 'system' must be a string, got "
                     f"{type(system).__name__}")
  turns = []
  for k, turn in enumerate(conversations):
    where = f"conversations[{k}]."
    role = require(turn, "from", str, label, line, context=where)
    value = require(turn, "value", str, label, line, context=where)
    canonical = {"user": "User", "assistant": "Assistant"}.get(role.strip().lower())
    if canonical is None:
      raise data_error(label, line, f"field '{where}from' is {role!r}; expected 'User' or "
                       f"'Assistant'")
    turns.append({"from": canonical, "value": value})
  if not any(t["from"] == "Assistant" for t in turns):
    return None, "no_assistant_turn"
  if any(t["from"] != ("User", "Assistant")[k % 2] for k, t in enumerate(turns)):
    return None, "turns_do_not_alternate"
  out = {
      "system": system,
      "mask": record.get("mask") or "User",
      "dataset": record.get("dataset") or "",
      "conversations": turns,
  }
  for field in ("mask", "dataset"):
    if not isinstance(out[field], str):
      raise data_error(label, line, f"field '{field}' must be a string, got "
                       f"{type(out[field]).__name__}")
  return out, None


def read_chat_records(source: str | os.PathLike, *, limit: int | None = None,
                      split: str = "train") -> tuple[list[dict], dict]:
  """NeMo chat records (`nvidia/sft_datablend_v1` style) for SFT.

  Each returned record is `{"system", "mask", "dataset", "conversations":
  [{"from": "User"|"Assistant", "value"}]}`: the fields NeMo's chat SFT
  dataset reads, with role names normalised and extra fields (`label`,
  `type`) left out. Records without an assistant turn (nothing to learn) or
  whose turns do not alternate User/Assistant from a User turn (the chat
  template cannot render them) are skipped and counted; `limit` caps the
  number kept. `source` is a local file or a hub name such as
  `"nvidia/sft_datablend_v1"`.
  """
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0 or None, got {limit}")
  label, rows = _source_records(source, split=split)
  stats: dict[str, int] = {"records": 0, "no_assistant_turn": 0, "turns_do_not_alternate": 0}
  records: list[dict] = []
  for line, record in rows:
    if limit is not None and len(records) >= limit:
      break
    stats["records"] += 1
    chat, reason = _chat_record(record, label, line)
    if chat is None:
      stats[reason] += 1
      continue
    records.append(chat)
  stats["kept"] = len(records)
  return records, stats


# ----------------------------------------------------------------------------
# hh-rlhf preference pairs.


def _pair(chosen: str, rejected: str) -> tuple[dict | None, str | None]:
  """`{"prompt", "chosen", "rejected"}` from two transcripts, or `(None, reason)`."""
  chosen_turns, why = _split_transcript(chosen)
  if chosen_turns is None:
    return None, f"malformed_chosen_{why}"
  rejected_turns, why = _split_transcript(rejected)
  if rejected_turns is None:
    return None, f"malformed_rejected_{why}"
  if chosen_turns[-1]["from"] != "Assistant" or rejected_turns[-1]["from"] != "Assistant":
    return None, "no_final_assistant_turn"
  prompt = chosen_turns[:-1]
  if rejected_turns[:-1] != prompt:
    return None, "prompt_mismatch"
  chosen_reply, rejected_reply = chosen_turns[-1]["value"], rejected_turns[-1]["value"]
  if chosen_reply == rejected_reply:
    # A tie carries no preference; as a training pair it only adds a constant log 2 loss.
    return None, "identical_replies"
  return {"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply}, None


def _local_subset_file(directory: str, subset: str, split: str) -> str:
  """`<dir>/<subset>/<split>.jsonl[.gz]` (a clone of the hub repo) or `<dir>/<subset>.jsonl`.

  A flat `<subset>.jsonl` has no splits, so it only answers for "train": serving
  it for "test" too would silently evaluate on the training pairs.
  """
  candidates = [os.path.join(directory, subset, f"{split}.jsonl{ext}") for ext in ("", ".gz")]
  if split == "train":
    candidates += [os.path.join(directory, f"{subset}.jsonl{ext}") for ext in ("", ".gz")]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise DataError(f"{directory}: no file for hh-rlhf subset '{subset}' (looked for "
                  f"{', '.join(os.path.relpath(c, directory) for c in candidates)})")


def read_hh_pairs(source_or_subsets: str | os.PathLike | Sequence[str], *,
                  split: str = "train",
                  subsets: Sequence[str] = HELPFUL_SUBSETS) -> tuple[list[dict], dict]:
  """`Anthropic/hh-rlhf` comparisons as `{"prompt": turns, "chosen": str, "rejected": str}`.

  `source_or_subsets` is one of:
  * a local JSON Lines file of `{"chosen", "rejected"}` transcripts;
  * a local directory holding `<subset>.jsonl` (as `data/hh_rlhf_helpful_sample/`)
    or `<subset>/<split>.jsonl[.gz]` (a clone of the hub repo), read for each
    name in `subsets` (default: the three helpful subsets NeMo blends);
  * the hub name `"Anthropic/hh-rlhf"` (reads `subsets`), or one subset name
    or a list of them, each loaded with
    `load_dataset("Anthropic/hh-rlhf", data_dir=subset, split=split)`.

  `prompt` is the conversation before the final assistant reply (NeMo turn
  dicts, ready for `ChatTemplate.render_prompt`); `chosen`/`rejected` are the
  two final replies. A pair is kept only when both transcripts parse, both
  end with an assistant turn, their prompt turns are identical, and the
  replies differ; every other pair is dropped and counted by reason in
  `stats["dropped"]`. `stats["subsets"]` gives records and kept pairs per
  source file or subset.
  """
  # (name in stats, label in errors, records)
  jobs: list[tuple[str, str, Iterator[tuple[int, dict]]]] = []

  def hub_subsets(names: Sequence[str]) -> None:
    for name in names:
      jobs.append((name, _hub_label(HH_HUB, name, split),
                   _hub_records(HH_HUB, data_dir=name, split=split)))

  if isinstance(source_or_subsets, (str, os.PathLike)):
    source = os.fspath(source_or_subsets)
    if os.path.isdir(source):
      for subset in subsets:
        path = _local_subset_file(source, subset, split)
        jobs.append((subset, path, read_records(path)))
    elif os.path.exists(source) or not (source == HH_HUB or source in HH_SUBSETS
                                        or is_hub_name(source)):
      jobs.append((source, source, read_records(source)))
    elif source == HH_HUB or source in HH_SUBSETS:
      hub_subsets(list(subsets) if source == HH_HUB else [source])
    else:  # another hub dataset with the same {"chosen", "rejected"} schema
      label = _hub_label(source, None, split)
      jobs.append((source, label, _hub_records(source, data_dir=None, split=split)))
  else:
    names = list(source_or_subsets)
    if not names:
      raise ValueError("read_hh_pairs: empty list of hh-rlhf subsets")
    hub_subsets(names)

  pairs: list[dict] = []
  dropped: dict[str, int] = {}
  per_source: dict[str, dict[str, int]] = {}
  total = 0
  for name, label, records in jobs:
    counts = per_source.setdefault(name, {"records": 0, "pairs": 0})
    for line, record in records:
      total += 1
      counts["records"] += 1
      chosen = require(record, "chosen", str, label, line)
      rejected = require(record, "rejected", str, label, line)
      pair, reason = _pair(chosen, rejected)
      if pair is None:
        dropped[reason] = dropped.get(reason, 0) + 1
        continue
      counts["pairs"] += 1
      pairs.append(pair)
  stats: dict[str, Any] = {"records": total, "pairs": len(pairs),
                           "dropped_total": sum(dropped.values()), "dropped": dropped,
                           "subsets": per_source}
  return pairs, stats
