"""Pre-flight: every problem of a pipeline or stage config, reported before any stage runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cai_jax import preflight, sampling
from cai_jax.tokenizer import train_sentencepiece
from configs import pipeline as pipeline_config
from configs import ppo as ppo_config
from configs import sft as sft_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pipeline(**fields):
  cfg = pipeline_config.get_config("tiny")
  cfg.update_from_flattened_dict(fields)
  return cfg


def _problems(cfg, stages=pipeline_config.STAGES):
  return preflight.pipeline_problems(cfg, list(stages), pipeline_config.STAGES)


def test_stop_limit_is_the_samplers():
  assert preflight.MAX_STOP_TOKENS == sampling.MAX_STOP_LENGTH


def test_the_shipped_presets_pass(mistral_v1_path):
  assert _problems(_pipeline()) == []
  # The tiny pipeline with Mistral's own tokenizer: its markers are 7-token sequences.
  assert _problems(_pipeline(tokenizer=mistral_v1_path)) == []


def test_template_pairing_across_stages_is_reported():
  problems = _problems(_pipeline(**{"ppo.template": "mistral_inst"}))
  assert len(problems) == 1
  assert "chat templates differ" in problems[0] and "ppo.template='mistral_inst'" in problems[0]
  problems = _problems(_pipeline(**{"rm.template": "chatml"}))
  assert any(p.startswith("rm.template: unknown chat template 'chatml'") for p in problems)


def test_a_tokenizer_that_cannot_stop_on_the_marker_is_reported(tmp_path):
  # No chat pieces, and "<", "_", "1", ">" never seen in training: "<extra_id_1>" is then
  # spelled with byte tokens, more than a stop sequence holds, so generation could never
  # stop on it.
  path = train_sentencepiece(["the quick brown fox jumps over a lazy dog\n" * 50],
                             str(tmp_path / "bytes"), vocab_size=300, user_defined_symbols=())
  problems = _problems(_pipeline(tokenizer=path))
  stop_problems = [p for p in problems if "more than the 8 a stop sequence may have" in p]
  assert {p.split("=")[0] for p in stop_problems} >= {"ppo.template", "rl_cai.template",
                                                      "evaluate.template"}
  assert all("'<extra_id_1>'" in p and str(path) in p for p in stop_problems)
  # Adding the markers to the tokenizer as pieces is the way out.
  assert _problems(_pipeline(tokenizer=path, add_chat_tokens=True)) == []


def test_vocab_mismatch_and_missing_files_are_all_reported_at_once(mistral_v1_path,
                                                                    rl_cai_model_dir, tmp_path):
  cfg = _pipeline(tokenizer=mistral_v1_path, base_model=rl_cai_model_dir,
                  **{"sl_cai.red_team_prompts": str(tmp_path / "missing.jsonl"),
                     "evaluate.helpful_prompts": "data/nope.jsonl"})
  problems = _problems(cfg, ["sft", "bogus"])
  joined = "\n".join(problems)
  assert "stages: unknown stage(s) 'bogus'" in joined
  assert f"base_model: the model has 512 token embeddings but tokenizer ({mistral_v1_path}) " \
         f"has 32000 tokens" in joined
  assert f"sl_cai.red_team_prompts={str(tmp_path / 'missing.jsonl')!r}: no such file" in joined
  assert "evaluate.helpful_prompts='data/nope.jsonl': no such file" in joined
  # A hub dataset name is not a missing file.
  assert not _problems(_pipeline(**{"hh.source": "Anthropic/hh-rlhf"}))
  with pytest.raises(preflight.PreflightError, match=r"4 problem\(s\) found before running"):
    preflight.require(problems, "pipeline config")


def test_stage_checks_name_the_field(mistral_v1_path, rl_cai_model_dir, sp_model_path, tmp_path):
  cfg = sft_config.get_config("tiny")
  cfg.tokenizer = mistral_v1_path
  cfg.init_from = rl_cai_model_dir
  cfg.train_file = str(tmp_path / "none.jsonl")
  problems = preflight.stage_problems("sft", cfg)
  assert any(p.startswith("config.train_file=") and "no such file" in p for p in problems)
  assert any(p.startswith("config.init_from: the model has 512") for p in problems)
  cfg = ppo_config.get_config("tiny")
  cfg.tokenizer = sp_model_path
  cfg.actor_init = str(tmp_path / "no_model")
  cfg.train_prompts = "data/red_team_attempts_sample.jsonl"
  problems = preflight.stage_problems("ppo", cfg)
  assert any(p.startswith("config.actor_init=") and "not a readable model directory" in p
             for p in problems)
  assert any(p.startswith("config.rm_init: a reward model directory is required")
             for p in problems)


def _cli(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_pipeline_cli_fails_in_seconds_before_any_stage(tmp_path, mistral_v1_path):
  start = time.time()
  out = _cli("launch.pipeline", f"--workdir={tmp_path}", f"--config.tokenizer={mistral_v1_path}",
             "--config.ppo.template=mistral_inst", "--config.sl_cai.red_team_prompts=missing.jsonl")
  assert out.returncode == 1
  assert "2 problem(s) found before running anything" in out.stderr, out.stderr[-2000:]
  assert "ppo.template='mistral_inst'" in out.stderr
  assert "sl_cai.red_team_prompts='missing.jsonl': no such file" in out.stderr
  assert "Traceback" not in out.stderr
  assert os.listdir(tmp_path) == []           # nothing ran, nothing written
  assert time.time() - start < 120


def test_stage_cli_fails_before_work(tmp_path, sp_model_path):
  out = _cli("launch.train_rm", f"--workdir={tmp_path / 'rm'}", f"--config.tokenizer={sp_model_path}",
             "--config.train_file=nope.jsonl", "--config.template=nemo2")
  assert out.returncode == 1
  assert "config.train_file='nope.jsonl': no such file" in out.stderr, out.stderr[-2000:]
  assert "config.template: unknown chat template 'nemo2'" in out.stderr
  assert not (tmp_path / "rm").exists()
