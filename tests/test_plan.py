"""`launch.plan`: memory numbers for Mistral-7B against a hand computation."""

import subprocess
import sys

from cai_jax import plan
from cai_jax.model import MistralConfig
from configs.models import get_config as model_preset

GIB = 2**30


def test_mistral_7b_param_count_is_exact():
  cfg = MistralConfig.from_config(model_preset("mistral_7b"))
  # Hand count of Mistral-7B-v0.1: embeddings + 32 x (attention + MLP + 2 norms) + norm + head.
  d, f, v, layers = 4096, 14336, 32000, 32
  attn = d * 4096 + 2 * d * 1024 + 4096 * d          # q, k, v (8 KV heads x 128), o
  mlp = 3 * d * f
  expected = v * d + layers * (attn + mlp + 2 * d) + d + d * v
  assert expected == 7_241_732_096
  assert cfg.num_params("lm") == expected
  assert cfg.num_params("scalar") == expected - d * v + d


def test_sft_bytes_match_hand_computation():
  cfg = MistralConfig.from_config(model_preset("mistral_7b"), param_dtype="float32",
                                   dtype="bfloat16")
  mesh = plan.Mesh(data=1, fsdp=8, tensor=1)
  out = plan.train_stage(cfg, mesh, micro_batch=1, seq=4096, remat=True)
  n = 7_241_732_096
  assert out["params"] == n * 4 / 8            # fp32 master weights, split over 8
  assert out["grads"] == n * 4 / 8
  assert out["optimizer"] == n * 8 / 8         # AdamW mu + nu in fp32
  # 7.24e9 * 16 bytes / 8 devices = 13.49 GiB of state per device.
  assert abs((out["params"] + out["grads"] + out["optimizer"]) / GIB - 13.487) < 0.01


def test_ppo_counts_four_models():
  cfg = MistralConfig.from_config(model_preset("mistral_7b"), param_dtype="float32",
                                   dtype="bfloat16")
  mesh = plan.Mesh(data=1, fsdp=8, tensor=1)
  out = plan.ppo_stage(cfg, cfg, mesh, rollout_batch=512, prompt_len=512, new_tokens=512,
                       minibatch=64, remat=True, frozen_dtype="bfloat16")
  n_lm, n_rm = cfg.num_params("lm"), cfg.num_params("scalar")
  assert out["actor_params+grads+optimizer"] == n_lm * 16 / 8
  assert out["critic_params+grads+optimizer"] == n_rm * 16 / 8
  assert out["reference_params"] == n_lm * 2 / 8
  assert out["reward_model_params"] == n_rm * 2 / 8
  # KV cache per device: 2 (k, v) x 32 layers x (512 / 8) rows x 1024 positions x 8 KV heads
  # x 128 x 2 bytes (bf16) = 8 GiB.
  assert out["rollout_kv_cache"] == 2 * 32 * 64 * 1024 * 8 * 128 * 2 == 8 * GIB


def test_critic_free_estimators_count_three_models():
  cfg = MistralConfig.from_config(model_preset("mistral_7b"), param_dtype="float32",
                                   dtype="bfloat16")
  mesh = plan.Mesh(data=1, fsdp=8, tensor=1)
  kw = dict(rollout_batch=512, prompt_len=512, new_tokens=512, minibatch=64, remat=True,
            frozen_dtype="bfloat16")
  gae = plan.ppo_stage(cfg, cfg, mesh, **kw)
  grpo = plan.ppo_stage(cfg, cfg, mesh, **kw, with_critic=False)
  assert "critic_params+grads+optimizer" not in grpo
  saved = sum(gae.values()) - sum(grpo.values())
  critic_activations = gae["update_activations"] - grpo["update_activations"]
  assert critic_activations > 0
  assert saved == gae["critic_params+grads+optimizer"] + critic_activations


def test_plan_cli_prints_every_stage(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "launch.plan", "--config=configs/pipeline.py:mistral_7b",
       "--mesh=1,8,1", "--device_memory_gb=80", f"--json={tmp_path / 'plan.json'}"],
      capture_output=True, text=True, check=True, timeout=120)
  for stage in ("sft", "reward model", "ppo"):
    assert f"**{stage}**" in out.stdout
  assert "7,241,732,096 params" in out.stdout
