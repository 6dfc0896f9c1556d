"""Pre-flight checks: every problem of a stage's (or the whole pipeline's) config, found
before any compute.

A 7B pipeline that fails at PPO start-up, hours after SL-CAI, SFT and the reward
model ran, is the failure this module exists to prevent. Each check only reads:
config fields, `config.json` files, tokenizer files and the existence of input
files. The checks return a list of problems (one sentence each, naming the
config field); `require` raises `PreflightError` listing all of them at once.

What is checked, per stage and for the pipeline as a whole:
- chat template names, and that the template can be used with the tokenizer
  (its `<s>`/`</s>` exist, its end-of-turn marker can be spelled and, where a
  sampler must stop on it, fits in a stop sequence);
- every stage that trains on, prompts, or scores chat text of the same models
  uses the same template (otherwise training and inference tokenize differently);
- tokenizer files load; model directories hold a readable `config.json`; a
  model's vocabulary holds every id of the tokenizer;
- input files exist (a name like `Anthropic/hh-rlhf` is a hub dataset, loaded
  by `datasets` when the stage runs);
- the pipeline's `stages` are known stage names.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from cai_jax import tokenizer as tokenizer_lib
from cai_jax.data.jsonl import is_hub_name

# The sampler's longest stop sequence (`cai_jax.sampling.MAX_STOP_LENGTH`), kept
# here so that this module does not import jax; a test checks that they agree.
MAX_STOP_TOKENS = 8


class PreflightError(ValueError):
  """A config that cannot run; the message lists every problem found."""

  def __init__(self, what: str, problems: list[str]):
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{what}: {len(self.problems)} problem(s) found before running anything:\n"
                     f"{lines}")


def require(problems: list[str], what: str) -> None:
  """Raises `PreflightError` if there is any problem."""
  if problems:
    raise PreflightError(what, problems)


class Checker:
  """Collects problems; caches tokenizers and model configs read along the way."""

  def __init__(self):
    self.problems: list[str] = []
    self._tokenizers: dict[str, Any] = {}
    self._vocab: dict[str, int | None] = {}

  def add(self, problem: str) -> None:
    if problem not in self.problems:
      self.problems.append(problem)

  # --- things on disk -----------------------------------------------------------

  def tokenizer(self, path: str, field: str):
    """The tokenizer at `path` (a .model file or a dir with tokenizer.model), or None."""
    if not path:
      self.add(f"{field}: a SentencePiece tokenizer.model path is required")
      return None
    if path not in self._tokenizers:
      try:
        self._tokenizers[path] = tokenizer_lib.Tokenizer.from_file(path)
      except (OSError, ValueError) as e:
        self._tokenizers[path] = None
        self.add(f"{field}={path!r}: {e}")
    return self._tokenizers[path]

  def model_vocab(self, path: str, field: str) -> int | None:
    """The vocab size in a model directory's config.json, or None (with a problem) if unreadable."""
    if not path:
      return None
    if path not in self._vocab:
      from cai_jax import checkpoint
      try:
        config, _ = checkpoint.read_model_config(path)
        self._vocab[path] = int(config.vocab_size)
      except (OSError, ValueError) as e:
        self._vocab[path] = None
        self.add(f"{field}={path!r}: not a readable model directory ({e})")
    return self._vocab[path]

  def input_file(self, path: str, field: str, *, hub_ok: bool = False,
                 required: bool = True) -> None:
    if not path:
      if required:
        self.add(f"{field}: an input path is required")
      return
    if os.path.exists(path):
      return
    if hub_ok and is_hub_name(path):
      return  # a Hugging Face dataset name, loaded when the stage runs
    self.add(f"{field}={path!r}: no such file or directory")

  # --- templates ----------------------------------------------------------------

  def template(self, name: str, field: str):
    try:
      return tokenizer_lib.get_template(name)
    except ValueError as e:
      self.add(f"{field}: {e}")
      return None

  def pairing(self, template_name: str, template_field: str, tok, tokenizer_field: str, *,
              stops: bool) -> None:
    """The template can be used with the tokenizer (and, with `stops`, stopped on)."""
    template = self.template(template_name, template_field)
    if template is None or tok is None:
      return
    for problem in template.check(tok, MAX_STOP_TOKENS if stops else None):
      self.add(f"{template_field}={template_name!r} with {tokenizer_field}: {problem}")

  def vocab_fits(self, vocab: int | None, model_field: str, tok, tokenizer_field: str) -> None:
    if vocab is not None and tok is not None and tok.vocab_size > vocab:
      self.add(f"{model_field}: the model has {vocab} token embeddings but {tokenizer_field} "
               f"({tok.source}) has {tok.vocab_size} tokens; use the model's own tokenizer "
               f"(or, for a model trained from scratch, set its vocab_size to "
               f"{tok.vocab_size})")

  def same_templates(self, fields: dict[str, str]) -> None:
    """Stages that train, prompt or score the same models must share one template."""
    names = {v for v in fields.values() if v}
    if len(names) > 1:
      listed = ", ".join(f"{k}={v!r}" for k, v in fields.items())
      self.add(f"chat templates differ ({listed}): the models would be prompted with other ids "
               f"than they were trained on; use one template for all of them")


# --- values ---------------------------------------------------------------------
# Each rule: (dotted field, kind, argument). Kinds: "real" (a finite number within
# [lo, hi], `None` = unbounded), "int" (an integer within [lo, hi]), "enum" (one of),
# "bool". A field a config does not have is skipped, so one table serves presets
# that differ.

def _real(lo=None, hi=None, *, open_lo=False):
  return ("real", (lo, hi, open_lo))


def _int(lo=None, hi=None):
  return ("int", (lo, hi))


def _enum(*values):
  return ("enum", values)


def _prefixed(prefix: str, rules: dict) -> dict:
  return {f"{prefix}.{k}": v for k, v in rules.items()}


_OPTIM = {"lr": _real(0.0, None, open_lo=True), "min_lr": _real(0.0), "warmup_steps": _int(0),
          "schedule": _enum("cosine", "constant"), "weight_decay": _real(0.0),
          "b1": _real(0.0, 1.0), "b2": _real(0.0, 1.0), "eps": _real(0.0, None, open_lo=True),
          "grad_clip": _real(0.0)}
_GENERATION = {"max_new_tokens": _int(1), "greedy": ("bool", None),
               "temperature": _real(0.0), "top_k": _int(-1), "top_p": _real(0.0, 1.0,
                                                                              open_lo=True),
               "repetition_penalty": _real(0.0, None, open_lo=True), "min_new_tokens": _int(0)}
_GUARD = {"loss_spike": _real(0.0), "loss_spike_min_delta": _real(0.0),
          "spike_window": _int(1), "min_history": _int(1),
          "max_param_norm_growth": _real(0.0), "max_kl_per_sequence": _real(0.0),
          "min_entropy": _real(0.0), "max_entropy_fraction": _real(0.0, 1.0)}
_LORA = {"rank": _int(0), "alpha": _real(0.0, None, open_lo=True), "dropout": _real(0.0, 0.9),
         "base_dtype": _enum("", "float32", "bfloat16", "float16")}
_TRAINING = {"max_seq_len": _int(2), "global_batch_size": _int(1), "micro_batch_size": _int(0),
             "num_epochs": _int(0), "max_steps": _int(0), "log_every": _int(1),
             "eval_every": _int(0), "save_every": _int(0), "keep_checkpoints": _int(1),
             "seed": _int(0), "overlong": _enum("truncate", "drop"),
             **_prefixed("guard", _GUARD), **_prefixed("lora", _LORA)}


VALUE_RULES: dict[str, dict] = {
    "sft": {**_TRAINING, **_prefixed("optim", _OPTIM), "val_fraction": _real(0.0, 0.5),
            "packing": ("bool", None)},
    "rm": {**_TRAINING, **_prefixed("optim", _OPTIM), "margin": _real(0.0),
           "center_coef": _real(0.0)},
    "dpo": {**_TRAINING, **_prefixed("optim", _OPTIM),
            **_prefixed("dpo", {"beta": _real(0.0, None, open_lo=True),
                                "loss_type": _enum("sigmoid", "ipo"),
                                "label_smoothing": _real(0.0, 0.5), "ref_batch_size": _int(0)})},
    "ppo": {"max_prompt_len": _int(1), "rollout_batch_size": _int(1), "iterations": _int(1),
            "max_eval_prompts": _int(0), "eval_every": _int(0), "save_every": _int(0),
            "sample_every": _int(0), "keep_checkpoints": _int(1), "seed": _int(0),
            **_prefixed("actor_optim", _OPTIM), **_prefixed("critic_optim", _OPTIM),
            **_prefixed("guard", _GUARD), **_prefixed("lora", _LORA),
            **_prefixed("ppo", {
                "max_new_tokens": _int(1), "temperature": _real(0.0, None, open_lo=True),
                "top_k": _int(0, 0), "top_p": _real(1.0, 1.0), "ppo_epochs": _int(1),
                "num_minibatches": _int(1), "clip_eps": _real(0.0, None, open_lo=True),
                "value_clip": _real(0.0), "vf_coef": _real(0.0), "entropy_coef": _real(0.0),
                "gamma": _real(0.0, 1.0), "lam": _real(0.0, 1.0),
                "kl_estimator": _enum("k1", "abs", "k2", "k3"), "init_kl_coef": _real(0.0),
                "target_kl": _real(0.0, None, open_lo=True), "kl_horizon": _int(1),
                "no_stop_penalty": _real(0.0),
                "advantage": _enum("gae", "grpo", "rloo", "reinforce_pp"),
                "samples_per_prompt": _int(1), "grpo_std_normalize": ("bool", None),
                "kl_in": _enum("reward", "loss"),
                "loss_agg": _enum("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
                "unfinished": _enum("keep", "mask"), "rollout_micro_batch_size": _int(0),
                "forward_micro_batch_size": _int(0), "micro_batch_size": _int(0)})},
    "sl_cai": {"rounds": _int(1), "batch_size": _int(1), "limit": _int(-1),
               "overlong": _enum("drop", "truncate", "error"),
               "num_few_shot": _int(-1), "helpfulness_ratio": _real(-1.0),
               "fsync_every": _int(1), **_prefixed("generation", _GENERATION)},
    "rl_cai": {"limit": _int(0), "test_fraction": _real(0.0, 1.0), "num_responses": _int(2),
               "min_confidence": _real(0.0, 0.5), "prompts_per_step": _int(1),
               "pairing": _enum("adjacent", "all", "best_vs_worst"),
               "overlong": _enum("drop", "truncate", "error"),
               **_prefixed("generation", _GENERATION)},
    "hh": {"test_fraction": _real(0.0, 1.0), "limit": _int(0)},
    "evaluate": {"limit": _int(0), "batch_size": _int(1), "num_examples": _int(0),
                 **_prefixed("generation", _GENERATION)},
}


def _lookup(cfg, dotted: str):
  node = cfg
  for key in dotted.split("."):
    if node is None or not hasattr(node, "get") or key not in node:
      return _MISSING
    node = node[key]
  return node


_MISSING = object()


def value_problems(stage: str, cfg, prefix: str = "config") -> list[str]:
  """Numbers that are not finite or out of range, unknown choices, wrong types."""
  import math
  problems = []
  for field, (kind, arg) in VALUE_RULES.get(stage, {}).items():
    value = _lookup(cfg, field)
    if value is _MISSING:
      continue
    where = f"{prefix}.{field}={value!r}"
    if kind == "bool":
      if not isinstance(value, bool):
        problems.append(f"{where}: must be True or False")
    elif kind == "enum":
      if value not in arg:
        problems.append(f"{where}: must be one of {', '.join(map(repr, arg))}")
    elif kind == "int":
      lo, hi = arg
      if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}: must be an integer")
      elif (lo is not None and value < lo) or (hi is not None and value > hi):
        problems.append(f"{where}: must be {_range(lo, hi)}")
    else:
      lo, hi, open_lo = arg
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where}: must be a number")
      elif not math.isfinite(value):
        problems.append(f"{where}: must be a finite number")
      elif ((lo is not None and (value < lo or (open_lo and value == lo)))
            or (hi is not None and value > hi)):
        problems.append(f"{where}: must be {_range(lo, hi, open_lo)}")
  # Relations between fields.
  if stage == "ppo" and _lookup(cfg, "ppo.advantage") in ("grpo", "rloo"):
    g = _lookup(cfg, "ppo.samples_per_prompt")
    if isinstance(g, int) and g < 2:
      problems.append(f"{prefix}.ppo.samples_per_prompt={g!r}: {_lookup(cfg, 'ppo.advantage')} "
                      "compares each prompt's responses with each other: needs at least 2")
  if (stage in ("sft", "rm", "dpo") and _lookup(cfg, "num_epochs") == 0
      and not _lookup(cfg, "max_steps")):
    problems.append(f"{prefix}.num_epochs=0 and {prefix}.max_steps=0: nothing would be trained")
  targets = _lookup(cfg, "lora.targets")
  if targets is not _MISSING:
    from cai_jax.model.config import LORA_TARGETS
    names = [t for t in str(targets).replace(" ", "").split(",") if t]
    bad = [t for t in names if t not in LORA_TARGETS]
    if bad or not names:
      problems.append(f"{prefix}.lora.targets={targets!r}: name projections from "
                      f"{','.join(LORA_TARGETS)}")
  if _lookup(cfg, "lora.init_adapter") and not _lookup(cfg, "lora.rank"):
    problems.append(f"{prefix}.lora.init_adapter is set but {prefix}.lora.rank is 0: set the "
                    "adapter's rank (its adapter_config.json's r)")
  for optim in ("optim", "actor_optim", "critic_optim"):
    lr, min_lr = _lookup(cfg, f"{optim}.lr"), _lookup(cfg, f"{optim}.min_lr")
    if (_lookup(cfg, f"{optim}.schedule") == "cosine" and isinstance(lr, (int, float))
        and isinstance(min_lr, (int, float)) and 0 < lr < min_lr):
      problems.append(f"{prefix}.{optim}.min_lr={min_lr!r} is above {prefix}.{optim}.lr={lr!r}")
  gen_min, gen_max = (_lookup(cfg, "generation.min_new_tokens"),
                      _lookup(cfg, "generation.max_new_tokens"))
  if isinstance(gen_min, int) and isinstance(gen_max, int) and gen_min > gen_max:
    problems.append(f"{prefix}.generation.min_new_tokens={gen_min} is above "
                    f"{prefix}.generation.max_new_tokens={gen_max}")
  return problems


def _range(lo, hi, open_lo=False) -> str:
  if lo is not None and hi is not None:
    return f"in {'(' if open_lo else '['}{lo}, {hi}]"
  if lo is not None:
    return f"{'>' if open_lo else '>='} {lo}"
  return f"<= {hi}"


# --- one stage ------------------------------------------------------------------

def _model_vocab(c: Checker, cfg, init_field: str, prefix: str) -> int | None:
  init = cfg.get(init_field, "")
  if init:
    return c.model_vocab(init, f"{prefix}.{init_field}")
  model = cfg.get("model", None)
  return int(model.vocab_size) if model is not None and "vocab_size" in model else None


def _trainer(c: Checker, cfg, prefix: str, files: tuple[str, ...], inits: tuple[str, ...],
             stops: bool) -> None:
  tok = c.tokenizer(cfg.get("tokenizer", ""), f"{prefix}.tokenizer")
  c.pairing(cfg.get("template", "nemo"), f"{prefix}.template", tok, f"{prefix}.tokenizer",
            stops=stops)
  for k, field in enumerate(files):
    c.input_file(cfg.get(field, ""), f"{prefix}.{field}", required=k == 0)
  for field in inits:
    c.vocab_fits(_model_vocab(c, cfg, field, prefix), f"{prefix}.{field or 'model'}", tok,
                 f"{prefix}.tokenizer")


def _backend(c: Checker, backend, template: str, prefix: str, *, stops: bool = True) -> None:
  """A generation backend (or local judge): its model, tokenizer and their pairing."""
  kind = backend.get("kind", "local")
  if kind != "local":
    if not backend.get("url", ""):
      c.add(f"{prefix}.url: a server URL is required for kind={kind!r}")
    return
  model_dir = backend.get("model_dir", "")
  if not model_dir:
    c.add(f"{prefix}.model_dir: a model directory is required for kind='local'")
    return
  vocab = c.model_vocab(model_dir, f"{prefix}.model_dir")
  tok_path = backend.get("tokenizer", "") or os.path.join(model_dir, "tokenizer.model")
  tok = c.tokenizer(tok_path, f"{prefix}.tokenizer")
  c.pairing(template, f"{prefix}.template", tok, f"{prefix}.tokenizer", stops=stops)
  c.vocab_fits(vocab, f"{prefix}.model_dir", tok, f"{prefix}.tokenizer")


def _lora(c: Checker, cfg, p: str, head: str) -> None:
  """A PEFT adapter to start from must exist and match the stage's lora block."""
  lora_cfg = cfg.get("lora", None)
  if lora_cfg is None or not lora_cfg.get("init_adapter", "") or not lora_cfg.get("rank", 0):
    return
  from cai_jax import peft
  from cai_jax.model import MistralConfig
  try:
    config = MistralConfig(lora_rank=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha),
                           lora_targets=lora_cfg.targets)
    peft.read_config(lora_cfg.init_adapter, config, head)
  except ValueError as e:
    c.add(f"{p}.lora.init_adapter: {e}")


def _sft(c, cfg, p):
  _trainer(c, cfg, p, ("train_file", "val_file"), ("init_from",), stops=False)
  _lora(c, cfg, p, "lm")


def _rm(c, cfg, p):
  _trainer(c, cfg, p, ("train_file", "test_file"), ("init_from",), stops=False)
  _lora(c, cfg, p, "scalar")


def _dpo(c, cfg, p):
  _trainer(c, cfg, p, ("train_file", "test_file"), ("init_from",), stops=False)
  _lora(c, cfg, p, "lm")


def _ppo(c, cfg, p):
  _trainer(c, cfg, p, ("train_prompts", "val_prompts"), ("actor_init",), stops=True)
  for field in ("rm_init", "critic_init"):
    if cfg.get(field, ""):
      c.vocab_fits(c.model_vocab(cfg[field], f"{p}.{field}"), f"{p}.{field}",
                   c.tokenizer(cfg.get("tokenizer", ""), f"{p}.tokenizer"), f"{p}.tokenizer")
  if not cfg.get("rm_init", ""):
    c.add(f"{p}.rm_init: a reward model directory is required (launch.train_rm's model/)")
  _lora(c, cfg, p, "lm")


def _sl_cai(c, cfg, p):
  c.template(cfg.get("template", "nemo"), f"{p}.template")
  c.input_file(cfg.get("red_team_prompts", ""), f"{p}.red_team_prompts", hub_ok=True)
  c.input_file(cfg.get("helpfulness_path", ""), f"{p}.helpfulness_path", hub_ok=True,
               required=False)
  for field in ("critique_revision_path", "few_shot_path"):
    c.input_file(cfg.get(field, ""), f"{p}.{field}", required=False)
  _backend(c, cfg.backend, cfg.get("template", "nemo"), f"{p}.backend")


def _rl_cai(c, cfg, p):
  template = cfg.get("template", "nemo")
  c.template(template, f"{p}.template")
  c.input_file(cfg.get("red_team", ""), f"{p}.red_team", hub_ok=True)
  for field in ("principles", "few_shot_path", "blend_with"):
    c.input_file(cfg.get(field, ""), f"{p}.{field}", required=False)
  _backend(c, cfg.policy, template, f"{p}.policy")
  _judge(c, cfg.judge, cfg.policy, f"{p}.judge")
  judge = cfg.judge
  if (judge.get("kind", "local") == "local" and cfg.policy.get("kind", "local") == "local"
      and judge.get("model_dir", "") in ("", cfg.policy.get("model_dir", ""))):
    # The judge then shares the policy's engine, which encodes with the stage's template.
    c.same_templates({f"{p}.template": template, f"{p}.judge.template": judge.get("template")})


def _judge(c, judge, policy, p):
  if judge.get("kind", "local") != "local":
    if not judge.get("url", ""):
      c.add(f"{p}.url: a judge endpoint is required for kind={judge.kind!r}")
    return
  local = dict(judge.items())
  if not local.get("model_dir", "") and policy is not None:
    # An empty judge.model_dir means the policy's model (see rl_cai).
    local["model_dir"] = policy.get("model_dir", "")
    local["tokenizer"] = local.get("tokenizer", "") or policy.get("tokenizer", "")
  _backend(c, local, local.get("template", "nemo"), p, stops=False)


def _hh(c, cfg, p):
  c.template(cfg.get("template", "nemo"), f"{p}.template")
  c.input_file(cfg.get("source", ""), f"{p}.source", hub_ok=True)


def _evaluate(c, cfg, p):
  c.template(cfg.get("template", "nemo"), f"{p}.template")
  c.input_file(cfg.get("red_team_prompts", ""), f"{p}.red_team_prompts", hub_ok=True)
  c.input_file(cfg.get("helpful_prompts", ""), f"{p}.helpful_prompts", hub_ok=True)


STAGE_CHECKS: dict[str, Callable] = {
    "sft": _sft, "rm": _rm, "dpo": _dpo, "ppo": _ppo, "sl_cai": _sl_cai, "rl_cai": _rl_cai,
    "hh": _hh, "evaluate": _evaluate,
}


def stage_problems(stage: str, cfg, prefix: str = "config") -> list[str]:
  """Every problem of one stage's config (`configs/<stage>.py`), before it runs."""
  c = Checker()
  for problem in value_problems(stage, cfg, prefix):
    c.add(problem)
  STAGE_CHECKS[stage](c, cfg, prefix)
  return c.problems


# --- the pipeline ---------------------------------------------------------------

def pipeline_problems(cfg, stages: list[str], all_stages: tuple[str, ...]) -> list[str]:
  """Every problem of a pipeline config (`configs/pipeline.py`) found before any stage runs.

  Paths that earlier stages will write (the SFT model, the comparison files) are
  not checked here; everything the user gives is: the tokenizer, the base and
  instruct models, the input data of every stage, templates and vocabularies.
  """
  c = Checker()
  policy = cfg.get("policy_stage", "ppo")
  if policy not in ("ppo", "dpo"):
    c.add(f"policy_stage={policy!r}: must be 'ppo' or 'dpo'")
    policy = "ppo"
  for stage in ("sl_cai", "sft", "hh", "rl_cai", "rm", policy, "evaluate"):
    for problem in value_problems(stage, cfg[stage], stage):
      c.add(problem)
  if not cfg.base_model:
    for problem in value_problems("sft", cfg.base, "base"):
      c.add(problem)
  unknown = [s for s in stages if s not in all_stages]
  if unknown:
    c.add(f"stages: unknown stage(s) {', '.join(map(repr, unknown))}; valid names: "
          f"{', '.join(all_stages)}")
  tiny = not cfg.base_model
  if cfg.tokenizer:
    tok = c.tokenizer(cfg.tokenizer, "tokenizer")
  else:
    tok = None
    if tiny:
      c.input_file(cfg.tokenizer_corpus, "tokenizer_corpus")
    else:
      tok = c.tokenizer(os.path.join(cfg.instruct_model or cfg.base_model, "tokenizer.model"),
                        "tokenizer (from instruct_model/base_model)")
  for field in ("base_model", "instruct_model"):
    if cfg.get(field, ""):
      c.vocab_fits(c.model_vocab(cfg[field], field), field, tok, "tokenizer")
  if tiny and cfg.instruct_model:
    c.add("instruct_model: only used with base_model (the mistral_7b preset); the tiny "
          "pipeline trains its own helpful model")

  # One template for everything the pipeline trains, prompts and scores; the tiny base
  # model is trained (and then prompted by SL-CAI) with its own.
  templates = {f"{s}.template": cfg[s].template for s in ("sft", "hh", "rl_cai", "rm", policy,
                                                          "evaluate")}
  for s in ("rl_cai", "evaluate"):
    if cfg[s].judge.kind == "local":
      templates[f"{s}.judge.template"] = cfg[s].judge.template
  for field, name in templates.items():
    c.template(name, field)
  c.same_templates(templates)
  if tiny:
    c.same_templates({"base.template": cfg.base.template, "sl_cai.template": cfg.sl_cai.template})
  # With add_chat_tokens the markers become single pieces: no stop-length limit applies.
  stopping = () if cfg.get("add_chat_tokens", False) else (
      "ppo.template", "rl_cai.template", "evaluate.template", "sl_cai.template")
  for field, name in {**templates, "sl_cai.template": cfg.sl_cai.template}.items():
    c.pairing(name, field, tok, "tokenizer", stops=field in stopping)

  # User-given inputs of each stage (the wired ones are checked when the stage starts).
  c.input_file(cfg.sl_cai.red_team_prompts, "sl_cai.red_team_prompts", hub_ok=True)
  c.input_file(cfg.sl_cai.helpfulness_path, "sl_cai.helpfulness_path", hub_ok=True,
               required=False)
  if tiny:
    c.input_file(cfg.base.train_file, "base.train_file")
  c.input_file(cfg.hh.source, "hh.source", hub_ok=True)
  c.input_file(cfg.rl_cai.red_team, "rl_cai.red_team", hub_ok=True)
  c.input_file(cfg.evaluate.red_team_prompts, "evaluate.red_team_prompts", hub_ok=True)
  c.input_file(cfg.evaluate.helpful_prompts, "evaluate.helpful_prompts", hub_ok=True)
  for s in ("rl_cai", "evaluate"):
    judge = cfg[s].judge
    if judge.kind != "local" and not (judge.url or cfg.judge_url):
      c.add(f"{s}.judge.url (or judge_url): a judge endpoint is required for "
            f"judge.kind={judge.kind!r}")
  return c.problems
