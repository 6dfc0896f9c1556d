"""The whole Constitutional AI pipeline in one command.

    python -m launch.pipeline --workdir=DIR                               # tiny, CPU, minutes
    python -m launch.pipeline --workdir=DIR --config=configs/pipeline.py:mistral_7b \
        --config.base_model=HF_MISTRAL_7B --config.instruct_model=HF_MISTRAL_7B_INSTRUCT

Stages (each in DIR/<stage>, each reading the previous stages' outputs):
tokenizer -> base (tiny only) -> sl_cai -> sft -> hh -> rl_cai -> rm -> ppo or dpo
(`policy_stage`) -> evaluate.
This file only chains them: it wires each stage's inputs to the earlier
stages' outputs and runs them in order. `cai_jax.stages` decides whether a
stage is skipped (its manifest says it completed with the same config and
unchanged inputs, and its upstream stages were skipped too), restarted or
resumed, so a rerun after a crash continues where it stopped. Every stage also
resumes by itself from its own partial output or checkpoints.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
from absl import app, flags

from configs.pipeline import apply_lora
from launch import runtime

_CONFIG = runtime.define_config("configs/pipeline.py:tiny", "Pipeline config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for every stage.", required=True)
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (default: config.stages).")
_FORCE = flags.DEFINE_list("force", [], "Rerun these stages even if complete.")


def _set(cfg, path: str, value, *, only_if_empty: bool = True):
  """Sets a dotted field of a ConfigDict (unlocked), unless the user already set it."""
  node = cfg
  keys = path.split(".")
  for k in keys[:-1]:
    node = node[k]
  with node.unlocked():
    if not (only_if_empty and node.get(keys[-1])):
      node[keys[-1]] = value


class Pipeline:
  """Wires the stages together; every stage's logic lives in cai_jax."""

  def __init__(self, cfg, workdir: str, stages: list[str], force: list[str]):
    self.cfg = cfg
    self.workdir = os.path.abspath(workdir)
    self.stages = stages
    self.force = set(force)
    self.results: dict[str, dict] = {}
    self.upstream_ran = False
    self.tiny = not cfg.base_model

  def dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)

  def model(self, stage: str) -> str:
    return os.path.join(self.dir(stage), "model")

  def run_stage(self, name: str, stage_cfg, fn):
    from cai_jax import stages as stage_lib
    stage_dir = self.dir(name)
    if name not in self.stages:
      result = stage_lib.read_result(stage_dir)
      if result is not None:
        self.results[name] = result
      return
    decision = stage_lib.decide(stage_dir, stage_cfg, forced=name in self.force,
                                upstream_ran=self.upstream_ran)
    if decision == stage_lib.SKIP:
      self.results[name] = stage_lib.read_result(stage_dir)
      print(f"[pipeline] {name}: complete, skipped ({stage_dir})", flush=True)
      return
    stage_lib.prepare(stage_dir, decision)
    print(f"[pipeline] {name}: running -> {stage_dir}", flush=True)
    start = time.time()
    with runtime.stage_log(os.path.join(stage_dir, runtime.log_name())):
      result = fn(stage_cfg, stage_dir)
    self.results[name] = stage_lib.write_result(stage_dir, result, time.time() - start)
    self.upstream_ran = True
    metrics = runtime.headline(result, outputs=False, stage=False)
    print(f"[pipeline] {name}: done in {self.results[name]['seconds']:.0f}s"
          + (f": {metrics}" if metrics else ""), flush=True)

  # --- stages -------------------------------------------------------------------

  def preflight(self) -> None:
    """Every problem of the config, before any stage runs (see `cai_jax.preflight`)."""
    from cai_jax import preflight
    from configs.pipeline import STAGES
    preflight.require(preflight.pipeline_problems(self.cfg, self.stages, STAGES),
                      "pipeline config")

  def run(self):
    cfg = self.cfg
    apply_lora(cfg)
    self.preflight()
    if not cfg.tokenizer and cfg.base_model:
      # A real checkpoint brings its own tokenizer (HF keeps it as tokenizer.model).
      _set(cfg, "tokenizer", os.path.join(cfg.instruct_model or cfg.base_model, "tokenizer.model"))
    tok = cfg.tokenizer or os.path.join(self.dir("tokenizer"), "tokenizer.model")
    if not cfg.tokenizer:
      from cai_jax.tokenizer_stages import train_tokenizer
      self.run_stage("tokenizer", _tokenizer_cfg(cfg), train_tokenizer)
    base = cfg.base_model or self.model("base")
    instruct = cfg.instruct_model or base
    instruct_tok = tok                  # the instruct model keeps the tokenizer it came with
    if cfg.add_chat_tokens:
      from cai_jax.tokenizer import get_template
      chat_cfg = ml_collections.ConfigDict({
          "tokenizer": tok, "base_model": cfg.base_model,
          "pieces": list(get_template(cfg.sft.template).markers)})
      from cai_jax.tokenizer_stages import add_chat_tokens
      self.run_stage("chat_tokens", chat_cfg, add_chat_tokens)
      tok = os.path.join(self.dir("chat_tokens"), "tokenizer.model")
      if cfg.base_model:
        base = self.model("chat_tokens")
    if self.tiny:
      # The tiny model's vocabulary follows the tokenizer (a user's, e.g. Mistral's own,
      # possibly with the chat markers added).
      instruct_tok = tok
      from cai_jax.tokenizer import Tokenizer
      _set(cfg.base, "model.vocab_size", Tokenizer.from_file(tok).vocab_size, only_if_empty=False)
      _set(cfg.base, "tokenizer", tok)
      _set(cfg.base, "mesh", cfg.mesh, only_if_empty=False)
      from cai_jax.train.sft import run_sft
      self.run_stage("base", cfg.base, run_sft)

    from cai_jax.cai.sl_cai import run_sl_cai
    _set(cfg.sl_cai, "backend.model_dir", instruct)
    _set(cfg.sl_cai, "backend.tokenizer", instruct_tok)
    self.run_stage("sl_cai", cfg.sl_cai, run_sl_cai)

    from cai_jax.train.sft import run_sft
    _set(cfg.sft, "tokenizer", tok)
    _set(cfg.sft, "init_from", base)
    _set(cfg.sft, "train_file", os.path.join(self.dir("sl_cai"), "sft_blend.jsonl"))
    _set(cfg.sft, "mesh", cfg.mesh, only_if_empty=False)
    self.run_stage("sft", cfg.sft, run_sft)

    from cai_jax.cai.hh import process_hh
    self.run_stage("hh", cfg.hh, process_hh)

    from cai_jax.cai.rl_cai import run_rl_cai
    _set(cfg.rl_cai, "policy.model_dir", self.model("sft"))
    _set(cfg.rl_cai, "policy.tokenizer", tok)
    if cfg.rl_cai.judge.kind == "local":
      _set(cfg.rl_cai, "judge.model_dir", self.model("sft"))
      _set(cfg.rl_cai, "judge.tokenizer", tok)
    elif cfg.judge_url:
      _set(cfg.rl_cai, "judge.url", cfg.judge_url)
    _set(cfg.rl_cai, "blend_with", self.dir("hh"))
    self.run_stage("rl_cai", cfg.rl_cai, run_rl_cai)
    if not any(s in self.stages for s in ("rm", "ppo", "dpo", "evaluate")):
      return self.results
    files = self._preference_files()

    from cai_jax.train.reward import run_rm
    _set(cfg.rm, "tokenizer", tok)
    _set(cfg.rm, "init_from", self.model("sft"))
    _set(cfg.rm, "train_file", files["train"]["comparisons"])
    _set(cfg.rm, "test_file", files["test"]["comparisons"])
    _set(cfg.rm, "mesh", cfg.mesh, only_if_empty=False)
    self.run_stage("rm", cfg.rm, run_rm)

    policy = cfg.policy_stage
    if policy == "ppo":
      from cai_jax.train.ppo import run_ppo
      _set(cfg.ppo, "tokenizer", tok)
      _set(cfg.ppo, "actor_init", self.model("sft"))
      _set(cfg.ppo, "rm_init", self.model("rm"))
      _set(cfg.ppo, "train_prompts", files["train"]["prompts"])
      _set(cfg.ppo, "val_prompts", files["test"]["prompts"])
      _set(cfg.ppo, "mesh", cfg.mesh, only_if_empty=False)
      self.run_stage("ppo", cfg.ppo, run_ppo)
    else:
      from cai_jax.train.dpo import run_dpo
      _set(cfg.dpo, "tokenizer", tok)
      _set(cfg.dpo, "init_from", self.model("sft"))
      _set(cfg.dpo, "train_file", files["train"]["comparisons"])
      _set(cfg.dpo, "test_file", files["test"]["comparisons"])
      _set(cfg.dpo, "mesh", cfg.mesh, only_if_empty=False)
      self.run_stage("dpo", cfg.dpo, run_dpo)

    models = {"base": instruct if not self.tiny else base, "sft": self.model("sft"),
              policy: self.model(policy)}
    ev = cfg.evaluate
    if ev.judge.kind == "local":
      _set(ev, "judge.model_dir", self.model("sft"))
      _set(ev, "judge.tokenizer", tok)
    elif cfg.judge_url:
      _set(ev, "judge.url", cfg.judge_url)
    stage_dirs = {s: self.dir(s) for s in ("base", "sft", "rm", policy)}

    def evaluate(stage_cfg, out_dir):
      from cai_jax.cai.evaluate import run_evaluate
      return run_evaluate(stage_cfg, out_dir, models=models, tokenizer_path=tok,
                          rm_dir=self.model("rm"), stage_dirs=stage_dirs)

    self.run_stage("evaluate", ev, evaluate)
    return self.results

  def _preference_files(self) -> dict:
    outputs = (self.results.get("rl_cai") or {}).get("outputs") or {}
    files = outputs.get("blend") or outputs
    if not files or "train" not in files:
      raise FileNotFoundError(f"rl_cai outputs not found in {self.dir('rl_cai')}; run that stage")
    return files


def _tokenizer_cfg(cfg):
  return ml_collections.ConfigDict({"corpus": cfg.tokenizer_corpus,
                                    "vocab_size": cfg.tokenizer_vocab_size})


def headline(results: dict, workdir: str) -> str:
  lines = ["", "=" * 72, f"cai_jax pipeline finished: {workdir}", ""]
  for name, r in results.items():
    outs = r.get("outputs") or {}
    where = outs.get("model") or outs.get("blend") or outs.get("tokenizer") or ""
    if isinstance(where, dict):
      where = json.dumps(where)[:100]
    lines.append(f"  {name:10s} {r.get('seconds', 0):6.0f}s  {where}")
  sft, rm, ppo, dpo, ev = (results.get(k) or {} for k in ("sft", "rm", "ppo", "dpo", "evaluate"))
  lines.append("")
  if sft:
    val_loss = sft.get("final_eval", {}).get("val_loss", float("nan"))
    lines.append(f"  SFT      val loss {val_loss:.3f}")
  if rm:
    lines.append(f"  RM       test accuracy {rm.get('test_accuracy') or float('nan'):.3f}")
  if dpo:
    lines.append(f"  DPO      test preference accuracy {dpo.get('test_accuracy') or float('nan'):.3f}")
  if ppo:
    first, last = ppo.get("first_eval") or {}, ppo.get("final_eval") or {}
    lines.append(f"  PPO      held-out reward {first.get('eval_score_mean', float('nan')):.3f} -> "
                 f"{last.get('eval_score_mean', float('nan')):.3f}")
  if ev:
    for comp, per in (ev.get("win_rates") or {}).items():
      parts = ", ".join(f"{s} {v['win_rate']:.2f}" for s, v in per.items()
                        if v.get("win_rate") is not None)
      lines.append(f"  judge    {comp}: {parts}")
    lines.append(f"  report   {os.path.join(workdir, 'evaluate', 'summary.md')}")
  lines.append("=" * 72)
  return "\n".join(lines)


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value)
  cfg = _CONFIG.value
  stages = _STAGES.value or [s for s in cfg.stages.split(",") if s]
  pipeline = Pipeline(cfg, _WORKDIR.value, stages, _FORCE.value)
  with runtime.user_errors("pipeline"):
    results = pipeline.run()
  print(headline(results, pipeline.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
