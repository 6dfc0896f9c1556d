"""RL-CAI: AI-feedback preference pairs on red-team prompts (replaces NeMo's step 4).

For every red-team prompt: N responses from the policy (the SL-CAI model),
pairs of them judged by a feedback model under a randomly drawn constitution
principle, in both orders (`cai_jax.cai.judge`), and the resulting soft-labelled
preference pairs written as reward-model comparisons, split into train/test
and optionally blended with the hh-rlhf helpfulness comparisons of
`process_hh`.

What NeMo-Aligner's `generate_rl_cai_dataset.py` gets wrong, and this does not:
* It drops the last partial batch of prompts (`if len(batch) < batch_size:
  break`); every prompt is used here.
* It asks once, in one order, so the judge's position bias goes straight into
  the labels; each pair is judged in both orders here and the two combined.
* It swallows every judge failure (`except Exception: preference = None`) and,
  when the judge names the same response twice, picks a *random* pair as
  chosen/rejected. Here unparseable and contradictory verdicts are dropped and
  counted, and transport errors stop the run (which resumes where it stopped).
* It strips each rendered CAI text, so its comparisons end `reply<extra_id_1>`
  while its hh-rlhf comparisons end `reply\\n<extra_id_1>`: a reward model can
  tell the sources — and so the kind of label — apart from the last newline.
  Every text here comes from `ChatTemplate.render_text`, and the blend checks
  that the hh-rlhf files were rendered the same way.
* Its samples are unseeded and the run is all-or-nothing. Here per-sample seeds
  derive from (seed, prompt, sample index), results go to a resumable jsonl as
  they are made, and outputs are published atomically with a manifest.

Outputs in the workdir:
* `raw_judgments.jsonl` — per prompt: candidates (text, temperature, seed),
  every pair with its principle, both raw verdicts, probabilities, flags.
* `{prefix}_{train,test}_prompts_with_chat_prompt.jsonl` — `{"text": prompt}`,
  each prompt once (PPO prompts; test = held-out red-team prompts).
* `{prefix}_{train,test}_comparisons_with_chat_prompt.jsonl` — alternating
  chosen/rejected `{"text"}` lines; the chosen line carries `p_chosen`.
* with `blend_with`: `{blend_prefix}_{train,test}_{prompts,comparisons}_with_chat_prompt.jsonl`.
* `report.json` (the summary) and `manifest.json`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
import random
import time
from typing import Any, Mapping, Sequence

from cai_jax import tokenizer as tokenizer_lib
from cai_jax.cai import constitution, hh
from cai_jax.cai import judge as judge_lib
from cai_jax.cai.backends import GenerationSettings, LocalBackend, fit_prompt, make_backend
from cai_jax.data import jsonl, sources
from cai_jax.data.keys import derived_int, prompt_key

RAW_NAME = "raw_judgments.jsonl"
REPORT_NAME = "report.json"
PAIRINGS = ("adjacent", "all", "best_vs_worst")
DROP_REASONS = ("identical", "empty_response", "unparseable", "contradictory", "low_confidence",
                "too_long", "no_preference")
HISTOGRAM_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Settings that change only how the raw judgments are turned into files (or how
# fast they are made): a partial run made with other values is still resumed.
OUTPUT_ONLY_KEYS = ("limit", "test_fraction", "min_confidence", "prefix", "blend_with",
                    "blend_prefix", "restart", "prompts_per_step", "preset")
SPEED_ONLY_KEYS = {"policy": ("batch_size", "timeout", "retries"),
                   "judge": ("batch_size", "concurrency", "timeout", "retries")}


# ----------------------------------------------------------------------------
# Determinism.


def sample_seed(seed: int, key: str, index: int) -> int:
  """The sampling seed of response `index` of a prompt: (seed, prompt, index) alone decide it."""
  return derived_int("sample", seed, key, index) & 0x7FFFFFFF


def draw_principle(principles: Sequence[Any], seed: int, key: str, i: int, j: int):
  """The principle for pair (i, j) of a prompt, drawn with a seed of its own."""
  return random.Random(derived_int("principle", seed, key, i, j)).choice(list(principles))


def temperature_of(temperatures: Sequence[float], index: int) -> float:
  return float(temperatures[index % len(temperatures)])


def candidate_pairs(n: int, pairing: str) -> list[tuple[int, int]]:
  """Index pairs to judge: adjacent (0-1, 2-3, ...), or all pairs (also for best_vs_worst)."""
  if pairing == "adjacent":
    return [(i, i + 1) for i in range(0, n - 1, 2)]
  if pairing in ("all", "best_vs_worst"):
    return list(itertools.combinations(range(n), 2))
  raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")


def best_vs_worst(n: int, pairs: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
  """(best, worst) candidate by average win probability over the validly judged pairs."""
  wins = [0.0] * n
  games = [0] * n
  for pair in pairs:
    if pair.get("dropped") or pair.get("p_r1") is None:
      continue
    i, j, p = pair["i"], pair["j"], float(pair["p_r1"])
    wins[i] += p
    wins[j] += 1.0 - p
    games[i] += 1
    games[j] += 1
  rated = [(wins[k] / games[k], k) for k in range(n) if games[k]]
  if len(rated) < 2:
    return None
  best = max(rated, key=lambda t: (t[0], -t[1]))
  worst = min(rated, key=lambda t: (t[0], t[1]))
  if best[0] == worst[0]:
    return None
  return best[1], worst[1]


# ----------------------------------------------------------------------------
# One step: generate, pair, judge.


@dataclasses.dataclass
class Item:
  index: int        # position in the prompt list (the output order)
  key: str
  prompt: str       # the red-team prompt (the human turn)
  rendered: str     # the chat prompt the policy continues


def generate_candidates(backend, items: Sequence[Item], cfg) -> list[list[dict]]:
  """`num_responses` responses per prompt: one backend call per temperature, seeded per sample."""
  base = GenerationSettings.from_config(cfg.generation)
  out: list[list[dict]] = [[] for _ in items]
  for k in range(cfg.num_responses):
    t = temperature_of(cfg.temperatures, k)
    settings = dataclasses.replace(base, temperature=t)
    seeds = [sample_seed(cfg.seed, it.key, k) for it in items]
    texts = backend.complete([it.rendered for it in items], settings, seeds)
    if len(texts) != len(items):
      raise RuntimeError(f"policy backend {backend.name} returned {len(texts)} completions for "
                         f"{len(items)} prompts")
    for row, (text, s) in enumerate(zip(texts, seeds)):
      # The template adds the reply's newline and end of turn when rendering.
      out[row].append({"text": text.strip(), "temperature": t, "seed": s})
  return out


def judge_step(judge, items: Sequence[Item], candidates: Sequence[Sequence[dict]],
               principles: Sequence[Any], cfg) -> list[dict]:
  """Raw records for a step's prompts: candidates, pairs, judgments (one judge call)."""
  records = []
  queries: list[judge_lib.PairQuery] = []
  slots: list[dict] = []
  for it, cands in zip(items, candidates):
    pairs = []
    for i, j in candidate_pairs(len(cands), cfg.pairing):
      a, b = cands[i]["text"], cands[j]["text"]
      principle = draw_principle(principles, cfg.seed, it.key, i, j)
      pair: dict[str, Any] = {"i": i, "j": j, "principle": principle.name, "use": True}
      if not a or not b:
        pair.update(dropped="empty_response", p_r1=None)
      elif a == b:
        pair.update(dropped="identical", p_r1=None)
      else:
        queries.append(judge_lib.PairQuery(it.prompt, a, b, principle))
        slots.append(pair)
      pairs.append(pair)
    records.append({"key": it.key, "index": it.index, "prompt": it.prompt,
                    "candidates": list(cands), "pairs": pairs})
  for pair, judged in zip(slots, judge_lib.judge_pairs(judge, queries)):
    pair.update(judged)
  if cfg.pairing == "best_vs_worst":
    for record in records:
      pairs = record["pairs"]
      chosen = best_vs_worst(len(record["candidates"]), pairs)
      record["best_vs_worst"] = list(chosen) if chosen else None
      for pair in pairs:
        pair["use"] = chosen is not None and {pair["i"], pair["j"]} == set(chosen)
      if chosen is None:
        # Nothing to prefer: record why, once, on a pseudo-pair of the prompt.
        record["no_preference"] = True
  return records


# ----------------------------------------------------------------------------
# Raw records -> preference pairs and files.


def _histogram(values: Sequence[float]) -> dict[str, int]:
  edges = HISTOGRAM_EDGES
  counts = {f"[{edges[k]:.1f},{edges[k + 1]:.1f}{']' if k == len(edges) - 2 else ')'}": 0
            for k in range(len(edges) - 1)}
  labels = list(counts)
  for v in values:
    k = min(int((v - 0.5) * 10 + 1e-9), len(labels) - 1)
    counts[labels[max(k, 0)]] += 1
  return counts


def preference_pairs(records: Sequence[Mapping[str, Any]], template: tokenizer_lib.ChatTemplate,
                     split_of: Mapping[str, str], *, system: str = "",
                     min_confidence: float = 0.0) -> tuple[dict[str, list[dict]], dict]:
  """Rendered pairs per split (`prompt`, `chosen`, `rejected`, `p_chosen`) and the summary.

  Records are taken in prompt order, so a resumed run writes the same files
  as an uninterrupted one. chosen/rejected follow the combined probability,
  with `p_chosen = max(p, 1 - p)`.
  """
  out: dict[str, list[dict]] = {s: [] for s in hh.SPLITS}
  dropped = {r: 0 for r in DROP_REASONS}
  judged = bias = soft = 0
  used = 0
  kept_p: list[float] = []
  for record in sorted(records, key=lambda r: r["index"]):
    if record.get("no_preference"):
      dropped["no_preference"] += 1
    for pair in record["pairs"]:
      if pair.get("position_bias") is not None:
        judged += 1
        bias += bool(pair["position_bias"])
      if not pair.get("use", True):
        continue
      used += 1
      if pair.get("dropped"):
        dropped[pair["dropped"]] = dropped.get(pair["dropped"], 0) + 1
        continue
      p = float(pair["p_r1"])
      if p == 0.5 or abs(p - 0.5) < min_confidence:
        dropped["low_confidence"] += 1
        continue
      cands = record["candidates"]
      win, lose = (pair["i"], pair["j"]) if p > 0.5 else (pair["j"], pair["i"])
      turns = [{"from": "User", "value": record["prompt"]}]
      rendered = hh.render_pair(turns, cands[win]["text"], cands[lose]["text"], template, system)
      rendered["p_chosen"] = max(p, 1.0 - p)
      out[split_of[record["key"]]].append(rendered)
      kept_p.append(rendered["p_chosen"])
      soft += all(o.get("soft") for o in pair.get("orders", []))
  kept = sum(len(v) for v in out.values())
  summary = {
      "prompts": len(records),
      "candidates": sum(len(r["candidates"]) for r in records),
      "pairs_considered": used,
      "pairs_judged": judged,
      "pairs_kept": kept,
      "pairs_kept_by_split": {s: len(v) for s, v in out.items()},
      "dropped": dropped,
      "dropped_total": sum(dropped.values()),
      "position_bias_rate": (bias / judged) if judged else None,
      "position_bias_pairs": bias,
      "soft_label_fraction": (soft / kept) if kept else None,
      "p_chosen_mean": (sum(kept_p) / kept) if kept else None,
      "p_chosen_histogram": _histogram(kept_p),
  }
  return out, summary


def _comparison_pairs(path: str) -> list[tuple[tuple[int, dict], tuple[int, dict]]]:
  records = list(jsonl.read_records(path))
  if len(records) % 2:
    raise jsonl.data_error(path, records[-1][0], f"odd number of records ({len(records)}): a "
                           f"comparison file alternates chosen and rejected lines")
  return [(records[k], records[k + 1]) for k in range(0, len(records), 2)]


def check_rendering(text: str, template: tokenizer_lib.ChatTemplate, system: str, path: str,
                    line: int, *, prompt: bool = False) -> None:
  """Raises a DataError unless `text` starts and ends the way `template` renders.

  The guard against per-source surface cues: a blended file whose sources
  end differently (NeMo's `reply<extra_id_1>` vs `reply\\n<extra_id_1>`) or
  start differently lets a reward model learn the source instead of the
  preference.
  """
  start = template.begin + template.system_format.format(system=system)
  end = (template.assistant_header if prompt
         else template.reply_format.format(message="") + template.end_of_turn)
  if not text.startswith(start):
    raise jsonl.data_error(path, line, f"field 'text' does not start with the {template.name} "
                           f"template's {start!r}; re-render this file with the same template "
                           f"(python -m launch.process_hh)")
  if not text.endswith(end) or (not prompt and end and text.endswith("\n" + end)
                                and template.reply_format.endswith("\n")):
    raise jsonl.data_error(path, line, f"field 'text' does not end with exactly {end!r} as the "
                           f"{template.name} template renders it; re-render this file with the "
                           f"same template (python -m launch.process_hh)")


def _prompt_of(text: str, template: tokenizer_lib.ChatTemplate) -> str:
  """The conversation before the final reply (up to the last assistant header)."""
  cut = text.rfind(template.assistant_header) if template.assistant_header else -1
  return text[:cut + len(template.assistant_header)] if cut >= 0 else text


def blend_sources(blend_dir: str) -> dict[str, dict[str, str]]:
  """`{split: {"prompts": path, "comparisons": path}}` of a process_hh output directory."""
  if not os.path.isdir(blend_dir):
    raise jsonl.DataError(f"{blend_dir}: blend_with must be a process_hh output directory")
  manifest = jsonl.read_manifest(blend_dir) or {}
  recorded = (manifest.get("extra") or {}).get("outputs") or {}
  out: dict[str, dict[str, str]] = {}
  for split in hh.SPLITS:
    out[split] = {}
    for kind in ("prompts", "comparisons"):
      path = (recorded.get(split) or {}).get(kind)
      if path and os.path.isfile(os.path.join(blend_dir, os.path.basename(path))):
        out[split][kind] = os.path.join(blend_dir, os.path.basename(path))
        continue
      found = sorted(glob.glob(os.path.join(blend_dir, f"*{split}_{kind}_with_chat_prompt.jsonl")))
      if len(found) != 1:
        raise jsonl.DataError(
            f"{blend_dir}: expected one *{split}_{kind}_with_chat_prompt.jsonl file, found "
            f"{len(found)} ({', '.join(os.path.basename(f) for f in found) or 'none'})")
      out[split][kind] = found[0]
  return out


def read_blend_sources(blend_dir: str, template: tokenizer_lib.ChatTemplate,
                       system: str) -> dict[str, dict[str, list]]:
  """The hh-rlhf prompts and comparison pairs of a process_hh directory, checked.

  Every text must be rendered the way `template` renders (`check_rendering`)
  and every pair must share its prompt; read before any generation, so a bad
  blend source fails the stage in seconds, not after hours of judging.
  """
  files = blend_sources(blend_dir)
  out: dict[str, dict[str, list]] = {}
  for split in hh.SPLITS:
    src = files[split]
    prompts = []
    for line, record in jsonl.read_records(src["prompts"]):
      text = jsonl.require(record, "text", str, src["prompts"], line)
      check_rendering(text, template, system, src["prompts"], line, prompt=True)
      prompts.append({"text": text})
    pairs = []
    for (cl, chosen), (rl, rejected) in _comparison_pairs(src["comparisons"]):
      for line, record in ((cl, chosen), (rl, rejected)):
        text = jsonl.require(record, "text", str, src["comparisons"], line)
        check_rendering(text, template, system, src["comparisons"], line)
      if _prompt_of(chosen["text"], template) != _prompt_of(rejected["text"], template):
        raise jsonl.data_error(src["comparisons"], rl, f"the rejected text does not share the "
                               f"prompt of the chosen text on line {cl}")
      pairs.append((dict(chosen), dict(rejected)))
    out[split] = {"prompts": prompts, "comparisons": pairs, "files": src}
  return out


def blend(cai: Mapping[str, Mapping[str, list]], other: Mapping[str, Mapping[str, list]],
          out_dir: str, prefix: str, seed: int) -> tuple[dict, dict]:
  """Concatenates and shuffles (seeded) the CAI and hh-rlhf prompts and comparisons per split.

  `cai[split]` and `other[split]` hold `prompts` (records) and `comparisons`
  (pairs of records); pairs stay together through the shuffle.
  """
  outputs: dict[str, dict[str, str]] = {}
  counts: dict[str, dict[str, int]] = {}
  for split in hh.SPLITS:
    pairs = list(other[split]["comparisons"]) + list(cai[split]["comparisons"])
    prompts = list(other[split]["prompts"]) + list(cai[split]["prompts"])
    rng = random.Random(derived_int("blend", seed, split))
    rng.shuffle(pairs)
    rng.shuffle(prompts)
    names = hh.output_names(prefix, split)
    paths = {kind: os.path.join(out_dir, name) for kind, name in names.items()}
    jsonl.atomic_write_jsonl(paths["prompts"], prompts)
    jsonl.atomic_write_jsonl(paths["comparisons"], (r for pair in pairs for r in pair))
    outputs[split] = paths
    counts[split] = {"pairs": len(pairs), "hh_pairs": len(other[split]["comparisons"]),
                     "cai_pairs": len(cai[split]["comparisons"]), "prompts": len(prompts)}
  return outputs, counts


# ----------------------------------------------------------------------------
# The stage.


def _resume_fingerprint(cfg) -> str:
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  for k in OUTPUT_ONLY_KEYS:
    d.pop(k, None)
  for section, keys in SPEED_ONLY_KEYS.items():
    for k in keys:
      (d.get(section) or {}).pop(k, None)
  return jsonl.config_fingerprint(d)


def _validate(cfg) -> None:
  if cfg.num_responses < 2:
    raise ValueError(f"num_responses must be >= 2 to form pairs, got {cfg.num_responses}")
  if not cfg.temperatures:
    raise ValueError("temperatures is empty; give at least one sampling temperature")
  if cfg.pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {cfg.pairing!r}")
  if not 0.0 <= cfg.min_confidence < 0.5:
    raise ValueError(f"min_confidence must be in [0, 0.5), got {cfg.min_confidence}")
  if cfg.prompts_per_step < 1:
    raise ValueError(f"prompts_per_step must be >= 1, got {cfg.prompts_per_step}")


def _make_judge(cfg, backend, examples):
  """The judge; a local judge with no model dir of its own reuses a local policy's model."""
  jc = cfg.judge
  if jc.kind == "local" and (not jc.model_dir or jc.model_dir == cfg.policy.model_dir):
    if isinstance(backend, LocalBackend):
      return judge_lib.make_judge(jc, examples, generator=backend.generator)
    if not jc.model_dir:
      raise ValueError("judge.model_dir: the policy is remote, so a local judge needs its own "
                       "model directory")
  return judge_lib.make_judge(jc, examples)


def run_rl_cai(cfg, workdir: str, *, progress: bool = False, backend=None, judge=None) -> dict:
  """Generates, judges and writes the RL-CAI preference data; returns the report.

  Resumable: judged prompts are appended to `raw_judgments.jsonl.partial`
  as each step finishes; a rerun with the same settings skips them. A
  finished workdir whose manifest matches the config and inputs is not
  redone. `backend` / `judge` override the ones the config would build (tests).
  """
  _validate(cfg)
  os.makedirs(workdir, exist_ok=True)
  template = tokenizer_lib.get_template(cfg.template)
  inputs = {"red_team": cfg.red_team}
  if cfg.blend_with:
    inputs["blend_with"] = cfg.blend_with
  if not cfg.restart and jsonl.manifest_matches(workdir, config=cfg, inputs=inputs):
    report_path = os.path.join(workdir, REPORT_NAME)
    if os.path.isfile(report_path):
      with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
      report["skipped"] = "already complete (manifest matches config and inputs)"
      return report

  blend_data = read_blend_sources(cfg.blend_with, template, cfg.system) if cfg.blend_with else None
  principles = constitution.load_comparison_principles(cfg.principles or None)
  examples = constitution.load_judge_few_shot(cfg.few_shot_path or None)
  prompts, read_stats, where = sources.read_red_team_prompts(
      cfg.red_team, limit=cfg.limit or None, shuffle=True, seed=cfg.seed, with_lines=True)
  if not prompts:
    raise jsonl.DataError(f"{cfg.red_team}: no red-team prompts left to use ({read_stats})")
  render = lambda text: template.render_prompt([{"from": "User", "value": text}], cfg.system)
  items = [Item(k, prompt_key(p), p, render(p)) for k, p in enumerate(prompts)]
  split_of = {}
  for split, keys in hh.split_by_prompt([it.key for it in items], lambda k: k,
                                        cfg.test_fraction, cfg.seed).items():
    split_of.update({k: split for k in keys})

  started = time.time()
  raw = os.path.join(workdir, RAW_NAME)
  fingerprint = _resume_fingerprint(cfg)
  # A published raw file of the same generation settings is taken back and resumed (a run
  # killed before its manifest, or one that only changes how outputs are derived).
  writer = jsonl.ResumableWriter(raw, "key", fingerprint=fingerprint, restart=cfg.restart,
                                 fsync_every=1)
  with writer:
    resumed, discarded = len(writer), writer.discarded_stale
    todo = [it for it in items if it.key not in writer]
    if todo:
      backend = backend or make_backend(cfg.policy, template=cfg.template)
      # Over-long prompts (config.overlong), before any generation; a dropped one is
      # recorded, so that a resumed run neither retries it nor loads a model for it.
      settings = GenerationSettings.from_config(cfg.generation)
      fitted = []
      for it in todo:
        text = fit_prompt(backend, render, it.prompt, settings, cfg.overlong, where[it.index])
        if text is None:
          writer.write({"key": it.key, "index": it.index, "prompt": it.prompt,
                        "dropped": "too_long"})
        else:
          fitted.append(it if text == it.prompt else
                        dataclasses.replace(it, prompt=text, rendered=render(text)))
      todo = fitted
    # Prompts as generated from: truncated ones as recorded (by this run or the one
    # resumed); dropped ones leave every output.
    now = {it.key: it for it in todo}
    done = {r["key"]: r for r in writer.records()}
    too_long = {k for k, r in done.items() if r.get("dropped") == "too_long"}
    items = [now.get(it.key) or (
        it if it.key not in done or done[it.key]["prompt"] == it.prompt else
        dataclasses.replace(it, prompt=done[it.key]["prompt"],
                            rendered=render(done[it.key]["prompt"])))
             for it in items if it.key not in too_long]
    if todo:
      judge = judge or _make_judge(cfg, backend, examples)
      from tqdm import tqdm
      with tqdm(total=len(items), initial=len(items) - len(todo), desc="rl_cai prompts",
                unit="prompt", disable=not progress) as bar:
        for start in range(0, len(todo), cfg.prompts_per_step):
          step = todo[start:start + cfg.prompts_per_step]
          candidates = generate_candidates(backend, step, cfg)
          for record in judge_step(judge, step, candidates, principles, cfg):
            writer.write(record)
          bar.update(len(step))
    wanted = {it.key for it in items}
    records = [r for r in writer.records() if r["key"] in wanted]
    dropped_overlong = len(too_long)
    raw_path = writer.finalize()

  pairs, summary = preference_pairs(records, template, split_of, system=cfg.system,
                                    min_confidence=cfg.min_confidence)
  outputs: dict[str, Any] = {"raw": raw_path}
  cai_files: dict[str, dict[str, list]] = {}
  for split in hh.SPLITS:
    split_prompts = [{"text": it.rendered} for it in items if split_of[it.key] == split]
    lines = list(hh.comparison_lines(pairs[split]))
    names = hh.output_names(cfg.prefix, split)
    paths = {kind: os.path.join(workdir, name) for kind, name in names.items()}
    jsonl.atomic_write_jsonl(paths["prompts"], split_prompts)
    jsonl.atomic_write_jsonl(paths["comparisons"], lines)
    outputs[split] = paths
    cai_files[split] = {"prompts": split_prompts,
                        "comparisons": [(lines[k], lines[k + 1]) for k in range(0, len(lines), 2)]}
  if blend_data is not None:
    outputs["blend"], summary["blend"] = blend(cai_files, blend_data, workdir, cfg.blend_prefix,
                                               cfg.seed)
  summary["prompts_by_split"] = {s: sum(1 for it in items if split_of[it.key] == s)
                                 for s in hh.SPLITS}
  summary["resumed_prompts"] = resumed
  summary["dropped_overlong_prompts"] = dropped_overlong
  summary["discarded_stale_partial"] = discarded
  summary["red_team"] = read_stats
  report = {"stage": "rl_cai", "summary": summary, "outputs": outputs,
            "seconds": round(time.time() - started, 3)}
  jsonl.atomic_write_json(os.path.join(workdir, REPORT_NAME), report)
  jsonl.write_manifest(workdir, stage="rl_cai", config=cfg, inputs=inputs, counts=summary,
                       seed=cfg.seed, extra={"outputs": outputs, "raw_fingerprint": fingerprint})
  return report


def format_summary(report: Mapping[str, Any]) -> str:
  """The end-of-run summary as lines for a console."""
  s = report["summary"]
  lines = [f"prompts: {s['prompts']} ({s['prompts_by_split']}), candidates: {s['candidates']}",
           f"pairs kept: {s['pairs_kept']} of {s['pairs_considered']} "
           f"(by split {s['pairs_kept_by_split']})",
           "dropped: " + ", ".join(f"{k} {v}" for k, v in s["dropped"].items()),
           f"position-bias rate: {s['position_bias_rate']} "
           f"({s['position_bias_pairs']} of {s['pairs_judged']} judged pairs)",
           f"p_chosen: mean {s['p_chosen_mean']}, histogram {s['p_chosen_histogram']}"]
  if "blend" in s:
    lines.append(f"blend: {s['blend']}")
  for split in hh.SPLITS:
    lines.append(f"{split}: {report['outputs'][split]['comparisons']}")
  return "\n".join(lines)
