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


# --- LoRA -------------------------------------------------------------------------------

# Mistral-7B, rank 16 on all seven projections, per layer: r (in + out) for q and o (4096 +
# 4096), k and v (4096 + 1024), gate, up and down (4096 + 14336); x 32 layers.
LORA_7B_R16 = 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)


def _mistral_7b(**changes):
  return MistralConfig.from_config(model_preset("mistral_7b"), param_dtype="float32",
                                   dtype="bfloat16", **changes)


def test_lora_params_match_the_model():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from cai_jax.model import lora
  from cai_jax.model.mistral import Mistral

  # q (H hd = 32) and kv (K hd = 16) widths differ from D = 48, so every shape is checked.
  base = MistralConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  for rank, targets in ((4, base.lora_targets), (3, ("k_proj", "o_proj", "down_proj"))):
    cfg = base.replace(lora_rank=rank, lora_targets=targets)
    for head in ("lm", "scalar"):
      boxed = jax.eval_shape(lambda c=cfg, h=head: Mistral(c, head=h).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
      adapters, _ = lora.split(nn.unbox(boxed)["params"])
      assert plan.lora_params(cfg) == lora.count(adapters) > 0
  assert plan.lora_params(base) == 0
  assert plan.lora_params(_mistral_7b(lora_rank=16)) == LORA_7B_R16 == 41_943_040


def test_lora_train_stage_counts_frozen_base_and_adapters():
  mesh = plan.Mesh(data=1, fsdp=8, tensor=1)
  kw = dict(micro_batch=1, seq=4096, remat=True)
  full = plan.train_stage(_mistral_7b(), mesh, **kw)
  sft = plan.train_stage(_mistral_7b(lora_rank=16), mesh, **kw, base_dtype="bfloat16")
  n, d = 7_241_732_096, 4096
  assert set(sft) == {"frozen_base", "adapters+grads+optimizer", "activations"}
  assert sft["frozen_base"] == n * 2 / 8
  assert sft["adapters+grads+optimizer"] == LORA_7B_R16 * 16 / 8   # fp32 param, grad, mu, nu
  assert sft["activations"] == full["activations"]   # backward still runs through every layer
  # Without base_dtype the base stays in the param dtype; the RM also trains its head (D).
  rm = plan.train_stage(_mistral_7b(lora_rank=16), mesh, **kw, head="scalar")
  assert rm["frozen_base"] == (n - d * 32000) * 4 / 8
  assert rm["adapters+head+grads+optimizer"] == (LORA_7B_R16 + d) * 16 / 8


def test_lora_ppo_has_no_reference_and_one_reward_model_body():
  mesh = plan.Mesh(data=1, fsdp=8, tensor=1)
  kw = dict(rollout_batch=512, prompt_len=512, new_tokens=512, minibatch=64, remat=True,
            frozen_dtype="bfloat16")
  cfg = _mistral_7b(lora_rank=16)
  full = plan.ppo_stage(_mistral_7b(), _mistral_7b(), mesh, **kw)
  gae = plan.ppo_stage(cfg, cfg, mesh, **kw)
  n_lm, n_rm, d = cfg.num_params("lm"), cfg.num_params("scalar"), cfg.hidden_size
  assert gae == {
      "actor_frozen_base (also the reference)": n_lm * 2 / 8,   # frozen_dtype bfloat16
      "actor_adapters+grads+optimizer": LORA_7B_R16 * 16 / 8,
      "reward_model_params (shared by the critic)": n_rm * 2 / 8,
      "critic_adapters+head+grads+optimizer": (LORA_7B_R16 + d) * 16 / 8,
      "rollout_kv_cache": full["rollout_kv_cache"],
      "update_activations": full["update_activations"],
  }
  # lora.base_dtype wins over frozen_dtype for the actor's base; the RM stays in frozen_dtype.
  fp32_base = plan.ppo_stage(cfg, cfg, mesh, **kw, base_dtype="float32")
  assert fp32_base["actor_frozen_base (also the reference)"] == n_lm * 4 / 8
  assert fp32_base["reward_model_params (shared by the critic)"] == n_rm * 2 / 8
  grpo = plan.ppo_stage(cfg, cfg, mesh, **kw, with_critic=False)
  assert set(grpo) == {"actor_frozen_base (also the reference)", "actor_adapters+grads+optimizer",
                       "reward_model_params", "rollout_kv_cache", "update_activations"}
  assert grpo["reward_model_params"] == n_rm * 2 / 8


def _pipeline_7b(**ppo):
  from configs.pipeline import get_config as pipeline_config
  cfg = pipeline_config("mistral_7b")
  for k, v in ppo.items():
    if k in ("advantage", "samples_per_prompt", "num_minibatches"):
      cfg.ppo.ppo[k] = v
    elif k == "lora_rank":
      cfg.ppo.lora.rank = v
    else:
      cfg.ppo[k] = v
  return cfg


def _plan_ppo(cfg, name="ppo"):
  from launch.plan import plan_pipeline
  return plan_pipeline(cfg, plan.Mesh(1, 1, 1))[name]


def test_mistral_7b_ppo_on_one_80gb_gpu():
  """One device: full fine-tuning never fits (~214 GiB of actor and critic state alone).
  LoRA shrinks the models to ~28 GiB, but the preset's batches do not fit either: all 512
  rollouts decode at once (64 GiB of KV cache; the rollout is not chunked) and a minibatch
  of 64 x 1024 tokens keeps ~85 GiB of actor + critic activations. With 128 rollouts per
  iteration (minibatches of 16) LoRA PPO fits; so does GRPO with 32 prompts x 4 samples."""
  full = _plan_ppo(_pipeline_7b())
  lora = _plan_ppo(_pipeline_7b(lora_rank=16))
  assert not plan.fits(full, 80) and not plan.fits(lora, 80)
  batch_parts = ("rollout_kv_cache", "update_activations")
  state = {k: v for k, v in lora.items() if k not in batch_parts}
  assert sum(state.values()) < 30 * GIB
  assert lora["rollout_kv_cache"] == 64 * GIB
  assert not plan.fits({k: v for k, v in full.items() if k not in batch_parts}, 80)

  small = dict(rollout_batch_size=128)
  assert plan.fits(_plan_ppo(_pipeline_7b(lora_rank=16, **small)), 80)
  assert not plan.fits(_plan_ppo(_pipeline_7b(**small)), 80)
  grpo = dict(advantage="grpo", samples_per_prompt=4, rollout_batch_size=32)
  assert plan.fits(_plan_ppo(_pipeline_7b(lora_rank=16, **grpo), "grpo"), 80)
  assert not plan.fits(_plan_ppo(_pipeline_7b(**grpo), "grpo"), 80)


def test_pipeline_lora_block_applies_to_stages_without_their_own():
  from configs.common import lora_config
  from launch.plan import plan_pipeline
  cfg = _pipeline_7b()
  cfg.lora = lora_config(rank=8)
  cfg.lora.base_dtype = "bfloat16"
  cfg.sft.lora.rank = 32                 # a stage's own block wins
  stages = plan_pipeline(cfg, plan.Mesh(1, 1, 1))
  r8 = plan.lora_params(_mistral_7b(lora_rank=8))
  assert stages["sft"]["adapters+grads+optimizer"] == 4 * r8 * 16          # rank 32, fp32 base
  assert stages["sft"]["frozen_base"] == 7_241_732_096 * 4
  assert stages["reward model"]["adapters+head+grads+optimizer"] == (r8 + 4096) * 16
  assert stages["reward model"]["frozen_base"] == (7_110_664_192 - 4096) * 2
  assert stages["ppo"]["actor_adapters+grads+optimizer"] == r8 * 16


def test_plan_cli_shows_lora(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "launch.plan", "--config=configs/pipeline.py:mistral_7b",
       "--mesh=1,1,1", "--device_memory_gb=80", "--config.ppo.lora.rank=16"],
      capture_output=True, text=True, check=True, timeout=120)
  assert "| sft | (full fine-tuning, float32 params) | |" in out.stdout
  assert "41,943,040 adapter params, bfloat16 frozen base" in out.stdout
  assert "| ppo | critic_adapters+head+grads+optimizer | 0.63 |" in out.stdout
