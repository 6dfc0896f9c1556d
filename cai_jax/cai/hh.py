"""hh-rlhf helpfulness comparisons in our chat template (replaces NeMo's step 1.4).

NeMo-Aligner's `process_anthropic_hh_using_chat_prompt.py` renders each
`Anthropic/hh-rlhf` pair into the NeMo chat format and writes the PPO prompt
and reward-model comparison files that step 4 blends with the AI-feedback
pairs. This module writes the same files, under the same names, and differs
where NeMo goes wrong:

* One renderer for every source. NeMo formats hh-rlhf with its own string
  templates (ending `reply\\n<extra_id_1>`) while its RL-CAI script strips the
  text and ends `reply<extra_id_1>`: a reward model trained on the blend can
  tell the sources apart by one newline, and the sources carry different
  labels (helpfulness vs harmlessness). Here every text is
  `ChatTemplate.render_text` of the conversation, for hh-rlhf and CAI alike.
* Nothing is dropped silently. Malformed transcripts, prompt mismatches and
  ties are counted by reason (`sources.read_hh_pairs`) and reported.
* Local data without a test split gets a seeded split over *prompts*, so no
  prompt appears on both sides (NeMo only supports the hub's splits).
* Files appear atomically, each prompt appears once in a prompts file (it is
  a PPO prompt set, not a per-pair list), and `manifest.json` records config,
  input hashes and counts.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Mapping, Sequence

from cai_jax import tokenizer as tokenizer_lib
from cai_jax.data import jsonl, sources

SPLITS = ("train", "test")


def output_names(prefix: str, split: str) -> dict[str, str]:
  """NeMo's file names: `{prefix}_{split}_{prompts,comparisons}_with_chat_prompt.jsonl`."""
  lead = f"{prefix}_" if prefix else ""
  return {kind: f"{lead}{split}_{kind}_with_chat_prompt.jsonl"
          for kind in ("prompts", "comparisons")}


def render_pair(prompt_turns: Sequence[Mapping[str, str]], chosen: str, rejected: str,
                template: tokenizer_lib.ChatTemplate, system: str = "") -> dict[str, str]:
  """`{"prompt", "chosen", "rejected"}` texts of one comparison, all from one template.

  `prompt` ends with the assistant header (a PPO prompt); `chosen` and
  `rejected` are the whole conversation ending with the reply and the
  template's end of turn (`reply\\n<extra_id_1>` for NeMo's), which is where
  the reward model reads its score. The replies are stripped so that no
  source-specific whitespace survives into the text.
  """
  turns = [dict(t) for t in prompt_turns]

  def full(reply: str) -> str:
    return template.render_text(turns + [{"from": "Assistant", "value": reply.strip()}], system)

  return {"prompt": template.render_prompt(turns, system), "chosen": full(chosen),
          "rejected": full(rejected)}


def comparison_lines(pairs: Iterable[Mapping[str, Any]]) -> Iterable[dict]:
  """Alternating `{"text": chosen}` / `{"text": rejected}` records (plus `p_chosen` if set)."""
  for pair in pairs:
    chosen = {"text": pair["chosen"]}
    if pair.get("p_chosen") is not None:
      chosen["p_chosen"] = float(pair["p_chosen"])
    yield chosen
    yield {"text": pair["rejected"]}


def unique_prompts(pairs: Iterable[Mapping[str, Any]]) -> list[dict]:
  """`{"text": prompt}` records, each prompt once, in first-seen order."""
  seen: set[str] = set()
  out = []
  for pair in pairs:
    if pair["prompt"] not in seen:
      seen.add(pair["prompt"])
      out.append({"text": pair["prompt"]})
  return out


def split_by_prompt(items: Sequence[Any], prompt_of, test_fraction: float,
                    seed: int) -> dict[str, list[Any]]:
  """A seeded train/test split in which all items of one prompt land on the same side.

  Prompts are ordered by a hash of `(seed, prompt)`, so the split depends on
  neither the input order nor the other prompts' presence, and the first
  `round(n * test_fraction)` (at least one, when the fraction is positive and
  there are two or more prompts) go to test.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  prompts = list(dict.fromkeys(prompt_of(x) for x in items))
  order = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).hexdigest())
  n_test = round(len(order) * test_fraction)
  if test_fraction > 0 and len(order) >= 2:
    n_test = min(max(n_test, 1), len(order) - 1)
  test = set(order[:n_test])
  out: dict[str, list[Any]] = {"train": [], "test": []}
  for x in items:
    out["test" if prompt_of(x) in test else "train"].append(x)
  return out


def _has_test_split(source: str, subsets: Sequence[str]) -> bool:
  """True for a hub source, or a local clone of the hub repo (`<subset>/test.jsonl[.gz]`)."""
  if not os.path.exists(source):
    return True   # a hub name: the hub has train and test splits
  if not os.path.isdir(source):
    return False
  return all(any(os.path.isfile(os.path.join(source, s, f"test.jsonl{ext}"))
                 for ext in ("", ".gz")) for s in subsets)


def _read(source: str, subsets: Sequence[str], split: str) -> tuple[list[dict], dict]:
  if not os.path.exists(source) and source in sources.HH_SUBSETS:
    return sources.read_hh_pairs([source], split=split)
  if not os.path.exists(source) and source == sources.HH_HUB:
    return sources.read_hh_pairs(list(subsets), split=split)
  return sources.read_hh_pairs(source, split=split, subsets=subsets)


def parse_subsets(subsets: str | Sequence[str]) -> list[str]:
  """`"helpful-base,helpful-online"` or a list -> validated subset names."""
  names = [s.strip() for s in subsets.split(",")] if isinstance(subsets, str) else list(subsets)
  names = [s for s in names if s]
  if not names:
    raise ValueError("subsets is empty; name at least one of " + ", ".join(sources.HH_SUBSETS))
  unknown = [s for s in names if s not in sources.HH_SUBSETS]
  if unknown:
    raise ValueError(f"subsets: unknown hh-rlhf subset(s) {unknown}; valid: "
                     f"{', '.join(sources.HH_SUBSETS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"subsets: {names} names a subset twice")
  return names


def process_hh(cfg, out_dir: str) -> dict:
  """Reads hh-rlhf, renders every pair, writes the split prompt/comparison files + manifest.

  `cfg` fields: `source` (a local dir/file or `Anthropic/hh-rlhf`), `subsets`,
  `prefix`, `template`, `system`, `test_fraction` and `seed` (used only when
  the source has no test split), `limit` (pairs per split, 0 = all). Returns
  the report also stored in the manifest.
  """
  template = tokenizer_lib.get_template(cfg.template)
  subsets = parse_subsets(cfg.subsets)
  source = os.fspath(cfg.source)
  os.makedirs(out_dir, exist_ok=True)

  read_stats: dict[str, Any] = {}
  if _has_test_split(source, subsets):
    by_split = {}
    for split in SPLITS:
      by_split[split], read_stats[split] = _read(source, subsets, split)
    split_method = "source"
  else:
    pairs, read_stats["all"] = _read(source, subsets, "train")
    by_split = split_by_prompt(pairs, lambda p: _turns_key(p["prompt"]), cfg.test_fraction,
                               cfg.seed)
    split_method = f"seeded by prompt (test_fraction={cfg.test_fraction}, seed={cfg.seed})"

  outputs: dict[str, dict[str, str]] = {}
  counts: dict[str, Any] = {"read": read_stats, "split_method": split_method}
  for split in SPLITS:
    pairs = by_split[split]
    if cfg.limit:
      pairs = pairs[:cfg.limit]
    if not pairs:
      raise jsonl.DataError(f"{source}: no usable pairs for the {split} split (see the drop "
                            f"counts: {read_stats}); check the source and subsets")
    rendered = [render_pair(p["prompt"], p["chosen"], p["rejected"], template, cfg.system)
                for p in pairs]
    names = output_names(cfg.prefix, split)
    paths = {kind: os.path.join(out_dir, name) for kind, name in names.items()}
    n_prompts = jsonl.atomic_write_jsonl(paths["prompts"], unique_prompts(rendered))
    n_lines = jsonl.atomic_write_jsonl(paths["comparisons"], comparison_lines(rendered))
    outputs[split] = paths
    counts[split] = {"pairs": len(rendered), "prompts": n_prompts, "comparison_lines": n_lines}
  inputs = {"hh_rlhf": source} if os.path.exists(source) or jsonl.is_hub_name(source) else {}
  jsonl.write_manifest(out_dir, stage="process_hh", config=cfg, inputs=inputs, counts=counts,
                       seed=cfg.seed, extra={"outputs": outputs, "template": template.name})
  return {"stage": "process_hh", "counts": counts, "outputs": outputs}


def _turns_key(turns: Sequence[Mapping[str, str]]) -> str:
  return "\x1e".join(f"{t['from']}\x1f{t['value']}" for t in turns)
