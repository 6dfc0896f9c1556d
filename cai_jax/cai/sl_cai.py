"""SL-CAI: critique -> revision data from red-team prompts, blended with helpfulness data.

The supervised half of Constitutional AI. For each red-team prompt the model
answers, then for each of `rounds` rounds critiques its last answer against a
constitution principle drawn at random and revises it. The final revisions
become SFT data; NeMo-Aligner's `generate_sl_cai_dataset.py` does the same
with one round.

Every generation sees one conversation, rendered with the configured chat
template and continued after the assistant header:

    [few-shot examples, each: User prompt / Assistant response /
     User critique request / Assistant critique /
     User revision request / Assistant revision]
    User      red-team prompt                 -> generate the response
    Assistant response
    User      critique request (principle 1)  -> generate critique 1
    Assistant critique 1
    User      revision request (principle 1)  -> generate revision 1
    Assistant revision 1
    User      critique request (principle 2)  -> generate critique 2   (round 2 chains
    ...                                                                 the last revision)

Determinism is what makes a killed run resumable without changing its output:
a prompt's key is a hash of its text, and its principles and sampling seeds
are functions of `(seed, key, round)` alone, never of batch position or of
how many prompts an earlier, interrupted run got through.

Empty generations are never papered over: a prompt whose response, critique
or revision comes back empty stops there, is recorded with its status in the
raw file, counted in the summary and left out of the SFT data.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any, Mapping, Sequence

from cai_jax.cai import constitution as constitution_lib
from cai_jax.cai.backends import Backend, GenerationSettings, fit_prompt
from cai_jax.data import jsonl, sources
from cai_jax.data.keys import DERIVATION, derived_int, prompt_key
from cai_jax.tokenizer import ChatTemplate, get_template

STAGE = "sl_cai"
RAW_FILE = "sl_cai_raw.jsonl"
SFT_FILE = "sl_cai.jsonl"
BLEND_FILE = "sft_blend.jsonl"

STATUS_OK = "ok"
# A prompt's chain stops at its first empty text; the status names which step it was.
STATUS_EMPTY_RESPONSE = "empty_response"
STATUS_EMPTY_CRITIQUE = "empty_critique"
STATUS_EMPTY_REVISION = "empty_revision"
STATUS_TOO_LONG = "too_long"      # a step's prompt outgrew the model (config.overlong)
STATUSES = (STATUS_OK, STATUS_EMPTY_RESPONSE, STATUS_EMPTY_CRITIQUE, STATUS_EMPTY_REVISION,
            STATUS_TOO_LONG)


# ----------------------------------------------------------------------------
# Principles and seeds: functions of (seed, prompt key, round) only (`cai_jax.data.keys`).


def principle_index(seed: int, key: str, round_index: int, num_principles: int) -> int:
  """The principle used in `round_index` (0-based) of prompt `key`: uniform, reproducible."""
  if num_principles < 1:
    raise ValueError("no critique/revision principles to choose from")
  return derived_int("principle", seed, key, round_index) % num_principles


def choose_principles(seed: int, key: str, rounds: int,
                      principles: Sequence[constitution_lib.CritiqueRevision]
                      ) -> list[constitution_lib.CritiqueRevision]:
  """One principle per round, drawn independently (a principle may repeat, as in the paper)."""
  return [principles[principle_index(seed, key, r, len(principles))] for r in range(rounds)]


def step_seed(seed: int, key: str, step: int) -> int:
  """Sampling seed of generation `step` of a prompt (0 response, 2r+1 critique, 2r+2 revision)."""
  return derived_int("sample", seed, key, step) & 0x7FFFFFFF


# ----------------------------------------------------------------------------
# Conversations.


def _turn(role: str, text: str) -> dict:
  return {"from": role, "value": text}


def few_shot_turns(examples: Sequence[constitution_lib.FewShotExample]) -> list[dict]:
  """The worked examples as earlier chat turns, six per example."""
  turns: list[dict] = []
  for ex in examples:
    turns += [_turn("User", ex.prompt), _turn("Assistant", ex.response),
              _turn("User", ex.critique_request), _turn("Assistant", ex.critique),
              _turn("User", ex.revision_request), _turn("Assistant", ex.revision)]
  return turns


def clean_generation(text: str, end_strings: Sequence[str]) -> str:
  """A generated text cut before its first end string and stripped.

  Backends already cut at end strings, but a remote server may not honour
  every one of them; cutting again is harmless.
  """
  cut = len(text)
  for s in end_strings:
    if s and (pos := text.find(s)) >= 0:
      cut = min(cut, pos)
  return text[:cut].strip()


@dataclasses.dataclass
class _Chain:
  """One prompt's progress through the steps."""
  index: int
  key: str
  prompt: str
  principles: list[constitution_lib.CritiqueRevision]
  turns: list[dict]
  response: str = ""
  rounds: list[dict] = dataclasses.field(default_factory=list)
  status: str = STATUS_OK

  def record(self, num_rounds: int) -> dict:
    return {
        "key": self.key,
        "index": self.index,
        "prompt": self.prompt,
        "response": self.response,
        "rounds": self.rounds,
        "principles": [p.name for p in self.principles],
        "num_rounds": num_rounds,
        "rounds_completed": sum(1 for r in self.rounds if r.get("revision")),
        "status": self.status,
    }


def critique_and_revise(backend: Backend, prompts: Sequence[str], *,
                        principles: Sequence[constitution_lib.CritiqueRevision],
                        few_shot: Sequence[constitution_lib.FewShotExample],
                        template: ChatTemplate | str = "nemo", rounds: int = 1,
                        settings: GenerationSettings = GenerationSettings(),
                        seed: int = 0, system: str = "",
                        keys: Sequence[str] | None = None,
                        indices: Sequence[int] | None = None) -> list[dict]:
  """Response, then `rounds` x (critique, revision), batched over `prompts`.

  Each step is one `backend.complete` call over every prompt still going.
  The template's end-of-turn string is always an end string, so a reply
  stops where the template would close the turn. Returns one raw record per
  prompt, in order: `key, index, prompt, response, rounds` (per round:
  `principle, critique_request, critique, revision_request, revision`),
  `principles` (names, one per round), `num_rounds, rounds_completed, status`.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if not principles:
    raise ValueError("no critique/revision principles given")
  template = get_template(template) if isinstance(template, str) else template
  keys = [prompt_key(p) for p in prompts] if keys is None else list(keys)
  indices = list(range(len(prompts))) if indices is None else list(indices)
  if not len(keys) == len(indices) == len(prompts):
    raise ValueError(f"got {len(prompts)} prompts, {len(keys)} keys and {len(indices)} indices")
  end_strings = tuple(settings.end_strings)
  if template.end_of_turn not in end_strings:
    end_strings += (template.end_of_turn,)
  settings = dataclasses.replace(settings, end_strings=end_strings)
  prefix = few_shot_turns(few_shot)
  chains = [_Chain(i, k, p, choose_principles(seed, k, rounds, principles),
                   prefix + [_turn("User", p)])
            for p, k, i in zip(prompts, keys, indices)]

  def generate(active: list[_Chain], step: int) -> list[str]:
    rendered = [template.render_prompt(c.turns, system) for c in active]
    seeds = [step_seed(seed, c.key, step) for c in active]
    texts = backend.complete(rendered, settings, seeds)
    if len(texts) != len(active):
      raise RuntimeError(f"backend {getattr(backend, 'name', backend)!r} returned "
                         f"{len(texts)} texts for {len(active)} prompts")
    return [clean_generation(t, end_strings) for t in texts]

  fits = getattr(backend, "fits", None)

  def step(active: list[_Chain], index: int, field: str, empty: str) -> list[_Chain]:
    """Generates `field` (response, or the current round's critique/revision) for `active`.
    A chain whose prompt no longer fits the model (a local backend can tell) stops here."""
    if fits is not None:
      for chain in active:
        if not fits(template.render_prompt(chain.turns, system), settings):
          chain.status = STATUS_TOO_LONG
      active = [c for c in active if c.status == STATUS_OK]
    for chain, text in zip(active, generate(active, index) if active else []):
      if field == "response":
        chain.response = text
      else:
        chain.rounds[-1][field] = text
      if not text:
        chain.status = empty
    return [c for c in active if c.status == STATUS_OK]

  active = step(chains, 0, "response", STATUS_EMPTY_RESPONSE)
  for r in range(rounds):
    for c in active:
      p = c.principles[r]
      last = c.rounds[-1]["revision"] if c.rounds else c.response
      c.turns += [_turn("Assistant", last), _turn("User", p.critique)]
      c.rounds.append({"principle": p.name, "critique_request": p.critique, "critique": "",
                       "revision_request": p.revision, "revision": ""})
    active = step(active, 2 * r + 1, "critique", STATUS_EMPTY_CRITIQUE)
    for c in active:
      c.turns += [_turn("Assistant", c.rounds[-1]["critique"]),
                  _turn("User", c.principles[r].revision)]
    active = step(active, 2 * r + 2, "revision", STATUS_EMPTY_REVISION)
  return [c.record(rounds) for c in chains]


# ----------------------------------------------------------------------------
# SFT records and the blend.


def sft_record(prompt: str, reply: str, dataset: str = STAGE, system: str = "") -> dict:
  """A NeMo chat SFT record (DESIGN.md schema)."""
  return {"system": system, "mask": "User", "dataset": dataset,
          "conversations": [_turn("User", prompt), _turn("Assistant", reply)]}


def sft_records(raw: Sequence[Mapping[str, Any]], *, one_record_per_round: bool = False,
                dataset: str = STAGE) -> list[dict]:
  """SFT records from raw records: the final revision of each finished prompt.

  With `one_record_per_round`, one record per completed revision instead, as
  the paper trained on every revision. A prompt that stopped early (empty
  text) gives no final record, but its completed revisions do count per round.
  """
  out = []
  for r in raw:
    revisions = [x["revision"] for x in r["rounds"] if x.get("revision")]
    if one_record_per_round:
      out += [sft_record(r["prompt"], v, dataset) for v in revisions]
    elif r["status"] == STATUS_OK and revisions:
      out.append(sft_record(r["prompt"], revisions[-1], dataset))
  return out


def blend(sl_cai: Sequence[dict], helpfulness: Sequence[dict], *, ratio: float,
          seed: int) -> tuple[list[dict], int]:
  """SL-CAI records plus helpfulness records, shuffled; returns (records, helpful used).

  `ratio < 0` takes every helpfulness record (NeMo blends both sets whole);
  otherwise `round(ratio * len(sl_cai))` of them, sampled without
  replacement with `seed` (all of them when fewer are available).
  """
  if ratio < 0:
    chosen = list(helpfulness)
  else:
    want = min(int(round(ratio * len(sl_cai))), len(helpfulness))
    chosen = random.Random(f"{seed}:helpfulness").sample(list(helpfulness), want)
  records = list(sl_cai) + chosen
  random.Random(f"{seed}:blend").shuffle(records)
  return records, len(chosen)


# ----------------------------------------------------------------------------
# The stage.


def _opt_path(path: str) -> str | None:
  return path or None


def _limit(value: int) -> int | None:
  return None if value is None or value < 0 else int(value)


def generation_fingerprint(cfg, inputs: Mapping[str, str]) -> str:
  """What decides the raw records: a partial file with another fingerprint is not resumed.

  Includes input contents and every generation setting, but not where the
  server lives, timeouts, retries or batch sizes, so moving a server or
  tuning throughput keeps a run resumable.
  """
  b = cfg.backend
  relevant = {
      "inputs": {name: os.fspath(src) if jsonl.is_hub_name(os.fspath(src))
                 else jsonl.file_sha256(src) for name, src in inputs.items()},
      "red_team": [cfg.red_team_split, cfg.limit, cfg.shuffle],
      "num_few_shot": cfg.num_few_shot,
      "seed": cfg.seed, "rounds": cfg.rounds, "template": cfg.template, "system": cfg.system,
      "generation": cfg.generation.to_dict(),
      "model": [b.kind, b.model_dir, b.tokenizer, b.model if b.kind == "openai" else ""],
      "overlong": cfg.get("overlong", "drop"),
      # How seeds and principles derive from (seed, key): a raw file begun under SL-CAI's
      # earlier derivation ("\0"-joined parts) is discarded, not continued with other seeds.
      "derivation": DERIVATION,
  }
  return jsonl.config_fingerprint(relevant)


def _mean(values: Sequence[int]) -> float:
  return round(sum(values) / len(values), 1) if values else 0.0


def _summary(raw: Sequence[dict], sft: Sequence[dict], *, prompt_stats: dict,
             help_stats: dict | None, help_used: int, blend_count: int, resumed: int,
             generated: int, seconds: float, cfg) -> dict:
  status = {s: 0 for s in STATUSES}
  principles: dict[str, int] = {}
  for r in raw:
    status[r["status"]] += 1
    for x in r["rounds"]:  # rounds actually started, not those a stopped chain never reached
      principles[x["principle"]] = principles.get(x["principle"], 0) + 1
  finals = [r["rounds"][-1]["revision"] for r in raw if r["status"] == STATUS_OK]
  return {
      "stage": STAGE,
      "prompts": dict(prompt_stats),
      "rounds": cfg.rounds,
      "generated_now": generated,
      "resumed": resumed,
      "status": status,
      "dropped_empty": sum(v for k, v in status.items() if k != STATUS_OK),
      "sl_cai_records": len(sft),
      "helpfulness": dict(help_stats or {}, used=help_used),
      "blend_records": blend_count,
      "mean_chars": {
          "prompt": _mean([len(r["prompt"]) for r in raw]),
          "response": _mean([len(r["response"]) for r in raw if r["response"]]),
          "critique": _mean([len(x["critique"]) for r in raw for x in r["rounds"]
                             if x["critique"]]),
          "revision": _mean([len(x["revision"]) for r in raw for x in r["rounds"]
                             if x["revision"]]),
          "final_revision": _mean([len(v) for v in finals]),
      },
      "principles_used": dict(sorted(principles.items())),
      "seconds": round(seconds, 2),
      "prompts_per_s": round(generated / seconds, 3) if seconds > 0 else 0.0,
  }


def run_sl_cai(cfg, workdir: str | os.PathLike, *, backend: Backend | None = None,
               mesh=None) -> dict:
  """The whole stage: prompts -> critique/revision -> SFT file -> blend; returns the summary.

  Writes into `workdir`: `sl_cai_raw.jsonl` (every intermediate text and the
  principles used; appended to `sl_cai_raw.jsonl.partial` while running, so
  a killed run resumes with the same config), `sl_cai.jsonl` (SL-CAI SFT
  records), `sft_blend.jsonl` (blended with the helpfulness set and
  shuffled: the SFT stage's input) and, last, `manifest.json`. `backend`
  overrides `cfg.backend` (tests and notebooks pass their own); `mesh`
  overrides `cfg.mesh`, the devices a local model is sharded over.
  """
  from cai_jax.cai.backends import make_backend
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if cfg.rounds < 1:
    raise ValueError(f"config.rounds must be >= 1, got {cfg.rounds}")
  if cfg.batch_size < 1:
    raise ValueError(f"config.batch_size must be >= 1, got {cfg.batch_size}")
  template = get_template(cfg.template)
  settings = GenerationSettings.from_config(cfg.generation)

  # Everything that can be wrong with the inputs fails here, before any generation.
  principles = constitution_lib.load_critique_revisions(_opt_path(cfg.critique_revision_path))
  few_shot = constitution_lib.load_few_shot(_opt_path(cfg.few_shot_path))
  if cfg.num_few_shot >= 0:
    few_shot = few_shot[:cfg.num_few_shot]
  prompts, prompt_stats, where = sources.read_red_team_prompts(
      cfg.red_team_prompts, limit=_limit(cfg.limit), shuffle=cfg.shuffle, seed=cfg.seed,
      split=cfg.red_team_split, with_lines=True)
  helpfulness, help_stats = ([], None)
  if cfg.helpfulness_path:
    helpfulness, help_stats = sources.read_chat_records(cfg.helpfulness_path)
  keys = [prompt_key(p) for p in prompts]
  if len(set(keys)) != len(keys):  # pragma: no cover  (a 64-bit hash collision)
    raise ValueError("two distinct prompts share a key; please report this")

  inputs = {"red_team_prompts": cfg.red_team_prompts,
            "critique_revision": cfg.critique_revision_path
            or constitution_lib.DEFAULT_CRITIQUE_REVISION_PATH,
            "few_shot": cfg.few_shot_path or constitution_lib.DEFAULT_FEW_SHOT_PATH}
  generation_inputs = dict(inputs)
  if cfg.helpfulness_path:
    inputs["helpfulness"] = cfg.helpfulness_path

  raw_path = os.path.join(workdir, RAW_FILE)
  start = time.monotonic()
  generated = 0
  with jsonl.ResumableWriter(raw_path, "key", fingerprint=generation_fingerprint(
      cfg, generation_inputs), restart=cfg.restart, fsync_every=cfg.fsync_every) as writer:
    resumed = len(writer)
    discarded_stale = writer.discarded_stale
    todo = [(i, k, p) for i, (k, p) in enumerate(zip(keys, prompts)) if k not in writer]
    if todo and backend is None:
      if cfg.backend.kind == "local" and mesh is None:
        from cai_jax import parallel  # pylint: disable=import-outside-toplevel  (jax: local only)
        mesh = parallel.mesh_from_config(cfg.mesh)
      backend = make_backend(cfg.backend, mesh=mesh, template=cfg.template)
    # Over-long prompts (config.overlong), before any generation: the first step's
    # prompt is the few-shot prefix plus the red-team prompt.
    prefix = few_shot_turns(few_shot)
    render = lambda text: template.render_prompt(prefix + [_turn("User", text)], cfg.system)
    fitted = []
    for i, k, p in todo:
      fitted_prompt = fit_prompt(backend, render, p, settings, cfg.get("overlong", "drop"),
                                 where[i])
      if fitted_prompt is None:
        writer.write(_Chain(i, k, p, [], [], status=STATUS_TOO_LONG).record(cfg.rounds))
      else:
        fitted.append((i, k, fitted_prompt))
    todo = fitted
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt",
              desc="SL-CAI", disable=not cfg.progress, dynamic_ncols=True) as bar:
      for b in range(0, len(todo), cfg.batch_size):
        batch = todo[b:b + cfg.batch_size]
        records = critique_and_revise(
            backend, [p for _, _, p in batch], keys=[k for _, k, _ in batch],
            indices=[i for i, _, _ in batch], principles=principles, few_shot=few_shot,
            template=template, rounds=cfg.rounds, settings=settings, seed=cfg.seed,
            system=cfg.system)
        for record in records:
          writer.write(record)
        generated += len(records)
        bar.update(len(records))

    wanted = set(keys)
    raw = sorted((r for r in writer.records() if r["key"] in wanted), key=lambda r: r["index"])
    sft = sft_records(raw, one_record_per_round=cfg.one_record_per_round,
                      dataset=cfg.dataset_name)
    blended, help_used = blend(sft, helpfulness, ratio=cfg.helpfulness_ratio, seed=cfg.seed)
    # Derived files first, then the raw file: a kill before `finalize` leaves the
    # partial file, and the rerun rebuilds these from it without generating.
    jsonl.atomic_write_jsonl(os.path.join(workdir, SFT_FILE), sft)
    jsonl.atomic_write_jsonl(os.path.join(workdir, BLEND_FILE), blended)
    writer.finalize()

  summary = _summary(raw, sft, prompt_stats=prompt_stats, help_stats=help_stats,
                     help_used=help_used, blend_count=len(blended), resumed=resumed,
                     generated=generated, seconds=time.monotonic() - start, cfg=cfg)
  summary["discarded_stale_partial"] = discarded_stale
  summary["outputs"] = {"raw": raw_path, "sl_cai": os.path.join(workdir, SFT_FILE),
                        "blend": os.path.join(workdir, BLEND_FILE)}
  jsonl.write_manifest(workdir, stage=STAGE, config=cfg, inputs=inputs,
                       counts={"prompts": len(prompts), "raw_records": len(raw),
                               "sl_cai_records": len(sft), "blend_records": len(blended),
                               "dropped_empty": summary["dropped_empty"]},
                       seed=cfg.seed, extra={"summary": summary})
  return summary
