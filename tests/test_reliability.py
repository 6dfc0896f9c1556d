"""What a demanding user breaks: reruns with another config, nonsense values, divergence,
kills during export or before the first checkpoint, leftovers of killed atomic writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

import ppo_worker
import train_worker
from cai_jax import preflight
from cai_jax.metrics import read_metrics
from cai_jax.train import identity, ppo
from cai_jax.train.loop import TrainingDivergedError
from cai_jax.train.sft import run_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(train_compile_cache):
  return train_compile_cache


def _mesh1():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))


def _sft_cfg(sp_model_path, **overrides):
  return train_worker.sft_config(sp_model_path, **{"max_steps": 2, "save_every": 2,
                                                   "optim.schedule": "constant", **overrides})


# --- run identity -------------------------------------------------------------------

def test_rerun_with_another_config_is_refused_and_force_restarts(sp_model_path, tmp_path):
  workdir = str(tmp_path)
  first = run_sft(_sft_cfg(sp_model_path), workdir, mesh=_mesh1())
  before = json.load(open(tmp_path / "manifest.json"))
  changed = _sft_cfg(sp_model_path, **{"optim.lr": 3e-3 / 2, "seed": 7})
  with pytest.raises(identity.RunIdentityError) as err:
    run_sft(changed, workdir, mesh=_mesh1())
  msg = str(err.value)
  assert "optim.lr: 0.003 -> 0.0015" in msg and "seed: 0 -> 7" in msg and "--force" in msg
  # Nothing was touched: same manifest, same weights.
  assert json.load(open(tmp_path / "manifest.json")) == before
  # The same config resumes (nothing left to train); --force restarts afresh.
  again = run_sft(_sft_cfg(sp_model_path), workdir, mesh=_mesh1())
  assert again["resumed_from"] == 2 and again["final_train"] == first["final_train"]
  forced = run_sft(changed, workdir, mesh=_mesh1(), force=True)
  assert forced["resumed_from"] == 0
  manifest = json.load(open(tmp_path / "manifest.json"))
  assert manifest["config"]["optim"]["lr"] == 0.0015 and manifest["config"]["seed"] == 7
  # Length and cadence are not identity: the run extends from its checkpoint.
  longer = run_sft(_sft_cfg(sp_model_path, **{"optim.lr": 0.0015, "seed": 7, "max_steps": 4,
                                             "log_every": 2}), workdir, mesh=_mesh1())
  assert longer["resumed_from"] == 2


def test_an_edited_input_file_is_another_run(sp_model_path, tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text(open(train_worker.SFT_DATA).read())
  cfg = _sft_cfg(sp_model_path, train_file=str(data))
  work = tmp_path / "w"
  assert identity.claim_workdir(str(work), cfg, {"train_file": str(data)}) == "new"
  # A start that died before its first checkpoint pins nothing: another config takes over.
  other = _sft_cfg(sp_model_path, train_file=str(data), seed=3)
  assert identity.claim_workdir(str(work), other, {"train_file": str(data)}) == "new"
  os.makedirs(work / "checkpoints" / "2")               # now the run has saved something
  (work / "notes.txt").write_text("mine")
  with open(data, "a") as f:
    f.write(open(train_worker.SFT_DATA).readline())
  with pytest.raises(identity.RunIdentityError, match="train_file: its content changed"):
    identity.claim_workdir(str(work), other, {"train_file": str(data)})
  # --force deletes the run's outputs, and nothing else; never a directory holding an input.
  assert identity.claim_workdir(str(work), other, {"train_file": str(data)},
                                force=True) == "forced"
  assert sorted(os.listdir(work)) == ["notes.txt", "run_identity.json"]
  os.makedirs(tmp_path / "checkpoints" / "1")            # a run in the directory of the input
  with pytest.raises(identity.RunIdentityError, match="the input train_file=.* lives in it"):
    identity.claim_workdir(str(tmp_path), cfg, {"train_file": str(data)}, force=True)
  assert data.exists()


# --- nonsense values ----------------------------------------------------------------

@pytest.mark.parametrize("stage, field, value, expected", [
    ("sl_cai", "generation.temperature", float("nan"), "must be a finite number"),
    ("rl_cai", "generation.top_p", 1.5, "must be in (0.0, 1.0]"),
    ("sft", "optim.lr", -1.0, "must be > 0.0"),
    ("sft", "num_epochs", -1, "must be >= 0"),
    ("sft", "micro_batch_size", -3, "must be >= 0"),
    ("rm", "overlong", "cut", "must be one of 'truncate', 'drop'"),
    ("ppo", "iterations", -5, "must be >= 1"),
    ("ppo", "ppo.gamma", 1.5, "must be in [0.0, 1.0]"),
    ("ppo", "ppo.kl_estimator", "k9", "must be one of"),
    ("ppo", "ppo.micro_batch_size", -1, "must be >= 0"),
    ("sft", "lora.rank", -4, "must be >= 0"),
    ("dpo", "lora.alpha", 0.0, "must be > 0.0"),
    ("ppo", "lora.base_dtype", "int8", "must be one of"),
])
def test_nonsense_values_are_refused_naming_the_field(stage, field, value, expected):
  import importlib
  module = importlib.import_module(f"configs.{'process_hh' if stage == 'hh' else stage}")
  cfg = module.get_config("tiny")
  cfg.update_from_flattened_dict({field: value})
  problems = preflight.value_problems(stage, cfg)
  assert any(p.startswith(f"config.{field}=") and expected in p for p in problems), problems


def test_rl_memory_knobs_are_not_part_of_the_run_identity():
  """The RL stage's micro-batch sizes change how much runs at once, not the results: a run
  may resume with others (on another GPU); an algorithmic field is another run."""
  from configs.ppo import get_config
  cfg = get_config("mistral_7b")
  recorded = identity.run_identity(cfg, {})
  cfg.ppo.update(rollout_micro_batch_size=8, forward_micro_batch_size=8, micro_batch_size=2)
  assert identity.run_identity(cfg, {}) == recorded
  cfg.ppo.clip_eps = 0.3
  assert identity.differences(recorded, identity.run_identity(cfg, {})) == [
      "ppo.clip_eps: 0.2 -> 0.3"]


def test_trainers_refuse_nonsense_before_any_work(sp_model_path, tmp_path):
  cfg = _sft_cfg(sp_model_path, num_epochs=0, max_steps=0)
  with pytest.raises(preflight.PreflightError, match="nothing would be trained"):
    run_sft(cfg, str(tmp_path / "sft"), mesh=_mesh1())
  assert not (tmp_path / "sft").exists()


def test_a_config_typo_is_one_clear_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "launch.train_sft", f"--workdir={tmp_path}",
                        "--config.optim.lrr=1"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0
  assert "unknown config field lrr" in out.stderr and 'Did you mean "lr"' in out.stderr
  assert "Traceback" not in out.stderr


# --- divergence guard ---------------------------------------------------------------

@pytest.mark.slow
def test_ppo_at_a_huge_learning_rate_stops_and_keeps_the_checkpoint_before(
    sp_model_path, tmp_path):
  train, _ = ppo_worker.write_prompt_files(str(tmp_path / "prompts"), sp_model_path)
  # One update per iteration; the warm-up makes iteration 1's rate 0, iteration 2's 500.
  cfg = ppo_worker.make_config(sp_model_path, train, iterations=4, save_every=1,
                               keep_checkpoints=5, **{
                                   "ppo.ppo_epochs": 1, "ppo.num_minibatches": 1,
                                   "actor_optim.lr": 1e3, "actor_optim.min_lr": 1e3,
                                   "actor_optim.warmup_steps": 2})
  workdir = str(tmp_path / "w")
  with pytest.raises(TrainingDivergedError) as err:
    ppo.run_ppo(cfg, workdir, reward_fn=ppo_worker.target_fraction_reward(cfg.max_prompt_len))
  msg = str(err.value)
  assert "PPO iteration 2:" in msg and "actor_param_norm" in msg, msg
  assert "last good checkpoint is iteration 1" in msg
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [1]
  assert not os.path.exists(os.path.join(workdir, "model"))
  assert [m["step"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")] == [1]


def test_sft_loss_spike_stops_the_run():
  from cai_jax.train.loop import DivergenceGuard
  from configs.common import guard_config
  guard = DivergenceGuard(guard_config(), spike_metrics=("loss",))
  for step, loss in enumerate([5.0, 4.0, 3.5, 3.0, 3.2, 2.9, 2.8, 3.1, 2.7, 2.6], 1):
    assert guard.check(step, {"loss": loss, "param_norm": 100.0 + step}) is None
  assert "loss=198 at step 11 is" in guard.check(11, {"loss": 198.0, "param_norm": 111.0})
  restored = DivergenceGuard(guard_config(), spike_metrics=("loss",),
                             state=json.loads(json.dumps(guard.state())))
  assert "param_norm=8.7e+06 at step 12 grew" in restored.check(12, {"loss": 2.5,
                                                                     "param_norm": 8.7e6})


# --- kills: during export, before the first checkpoint, mid atomic write ------------

def _kill_during_export(workdir):
  """What a kill after the last checkpoint leaves: checkpoints, metrics, part of the export."""
  for name in ("report.json", "manifest.json", "hf"):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      import shutil
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  open(os.path.join(workdir, "report.json.abc123.tmp"), "w").write('{"half": ')


def test_sft_killed_during_export_reports_as_the_uninterrupted_run(sp_model_path, tmp_path):
  cfg = _sft_cfg(sp_model_path, val_fraction=0.1)
  full = run_sft(cfg, str(tmp_path), mesh=_mesh1())
  _kill_during_export(str(tmp_path))
  again = run_sft(cfg, str(tmp_path), mesh=_mesh1())
  for key in ("final_train", "final_eval", "initial_eval", "steps"):
    assert again[key] == full[key], key
  assert full["final_eval"]["val_loss"] > 0
  assert not list(tmp_path.glob("*.tmp"))
  modes = {p: stat.S_IMODE(os.stat(tmp_path / p).st_mode)
           for p in ("report.json", "manifest.json", "metrics.jsonl", "run_identity.json")}
  assert len(set(modes.values())) == 1, modes


def test_ppo_killed_during_export_reports_as_the_uninterrupted_run(sp_model_path, tmp_path):
  train, val = ppo_worker.write_prompt_files(str(tmp_path / "prompts"), sp_model_path)
  cfg = ppo_worker.make_config(sp_model_path, train, val, iterations=2, save_every=1)
  workdir = str(tmp_path / "w")
  fn = ppo_worker.target_fraction_reward(cfg.max_prompt_len)
  full = ppo.run_ppo(cfg, workdir, reward_fn=fn)
  _kill_during_export(workdir)
  again = ppo.run_ppo(cfg, workdir, reward_fn=fn)
  assert again["resumed_from"] == 2
  for key in ("first_eval", "final_eval", "kl_coef"):
    assert again[key] == full[key], key
  timing = ("rollout_seconds", "score_seconds", "update_seconds", "rollout_tokens_per_sec")
  strip = lambda d: {k: v for k, v in d.items() if k not in timing}
  assert strip(again["final_train"]) == pytest.approx(strip(full["final_train"]))


def test_no_duplicate_metrics_after_a_kill_before_the_first_checkpoint(sp_model_path, tmp_path):
  # A run killed before its first checkpoint leaves logged steps and no checkpoint.
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in (0, 1, 2, 3):
      f.write(json.dumps({"step": step, "split": "train", "loss": 9.0}) + "\n")
  run_sft(_sft_cfg(sp_model_path, save_every=0), str(tmp_path), mesh=_mesh1())
  steps = [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")]
  assert steps == [1, 2] and all(r.get("loss") != 9.0 for r in read_metrics(
      str(tmp_path / "metrics.jsonl")))
