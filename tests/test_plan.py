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


def test_ppo_phases_counted_per_micro_batch_and_only_the_largest_in_the_total():
  """Each phase's temporaries for the rows its knob puts through at once (per replica), and
  the total is the models plus the largest phase: rollout, score and update are separate
  programs run one after another."""
  cfg = _mistral_7b()
  mesh = plan.Mesh(data=1, fsdp=8, tensor=1)
  kw = dict(rollout_batch=512, prompt_len=512, new_tokens=512, minibatch=64, remat=True,
            frozen_dtype="bfloat16")
  whole = plan.ppo_stage(cfg, cfg, mesh, **kw)
  split = plan.ppo_stage(cfg, cfg, mesh, **kw, rollout_micro_batch=16, forward_micro_batch=4,
                         micro_batch=2)
  # 64 responses per replica decoded 16 at a time; minibatches of 8 per replica in 2s.
  assert split["rollout_kv_cache"] == whole["rollout_kv_cache"] / 4 == 2 * GIB
  assert split["update_activations"] == (plan.activation_bytes(cfg, 2, 1024, True, "lm")
                                         + plan.activation_bytes(cfg, 2, 1024, True, "scalar"))
  assert split["update_activations"] * 4 == whole["update_activations"]
  # Score: one layer's activations (no backward) + the residual stream, and 3 fp32 copies of
  # the logits on the 512 response positions (the evaluation's exact KL of two models).
  layer = 4 * 1024 * (34 * 4096 + 5 * 32 * 1024) * 2 / 2
  stream = 2 * 4 * 1024 * 4096 * 2
  logits = 3 * 4 * 512 * 32000 * 4
  assert split["score_forward_activations"] == layer + stream + logits
  assert whole["score_forward_activations"] == 16 * split["score_forward_activations"]
  # The rollout's prefill: the same forward over the 16 rows' 512 prompt tokens, one fp32
  # logit row each.
  prefill = (16 * 512 * (34 * 4096 + 5 * 32 * 512) * 2 / 2 + 2 * 16 * 512 * 4096 * 2
             + 16 * 32000 * 4)
  assert split["rollout_prefill_activations"] == prefill
  phases = ("rollout_kv_cache", "rollout_prefill_activations", "score_forward_activations",
            "update_activations")
  resident = sum(v for k, v in split.items() if plan.phase_of(k) is None)
  assert resident == sum(split.values()) - sum(split[k] for k in phases)
  rollout = split["rollout_kv_cache"] + split["rollout_prefill_activations"]
  assert plan.phase_totals(split) == {"rollout": rollout,
                                      "score": split["score_forward_activations"],
                                      "update": split["update_activations"]}
  # Split, the rollout (2 GiB of KV cache + 1.8 of prefill) outgrows the update (2.6 GiB) and
  # the score (2.0 GiB); whole, the score's forwards over 64 rows (31 GiB) are the largest.
  assert plan.total(split) == resident + rollout
  assert rollout > max(split["update_activations"], split["score_forward_activations"])
  assert plan.total(whole) == resident + whole["score_forward_activations"]
  # Other stages have no phases: their total is the sum.
  sft = plan.train_stage(cfg, mesh, micro_batch=1, seq=4096, remat=True)
  assert plan.total(sft) == sum(sft.values())


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
      "rollout_prefill_activations": full["rollout_prefill_activations"],
      "score_forward_activations": full["score_forward_activations"],
      "update_activations": full["update_activations"],
  }
  # lora.base_dtype wins over frozen_dtype for the actor's base; the RM stays in frozen_dtype.
  fp32_base = plan.ppo_stage(cfg, cfg, mesh, **kw, base_dtype="float32")
  assert fp32_base["actor_frozen_base (also the reference)"] == n_lm * 4 / 8
  assert fp32_base["reward_model_params (shared by the critic)"] == n_rm * 2 / 8
  grpo = plan.ppo_stage(cfg, cfg, mesh, **kw, with_critic=False)
  assert set(grpo) == {"actor_frozen_base (also the reference)", "actor_adapters+grads+optimizer",
                       "reward_model_params", "rollout_kv_cache", "rollout_prefill_activations",
                       "score_forward_activations", "update_activations"}
  assert grpo["reward_model_params"] == n_rm * 2 / 8


def _pipeline_7b(**ppo):
  from configs.pipeline import get_config as pipeline_config
  cfg = pipeline_config("mistral_7b")
  for k, v in ppo.items():
    if k in ("advantage", "samples_per_prompt", "num_minibatches", "rollout_micro_batch_size",
             "forward_micro_batch_size", "micro_batch_size"):
      cfg.ppo.ppo[k] = v
    elif k == "lora_rank":
      cfg.ppo.lora.rank = v
    else:
      cfg.ppo[k] = v
  return cfg


def _plan_ppo(cfg, name="ppo", mesh=(1, 1, 1)):
  from launch.plan import plan_pipeline
  return plan_pipeline(cfg, plan.Mesh(*mesh))[name]


def test_mistral_7b_ppo_on_one_80gb_gpu():
  """One device, the preset's batches (512 rollouts, minibatches of 64, 512 + 512 tokens):
  with LoRA rank 16 PPO fits, by the plan's own arithmetic: ~28 GiB of models (the actor's
  frozen base, which is also the reference, and the reward model's body, which the critic
  shares) plus the largest phase at the preset's micro-batch sizes. Full fine-tuning never
  fits (~214 GiB of actor and critic state alone). GRPO (no critic) fits too."""
  lora = _plan_ppo(_pipeline_7b(lora_rank=16))
  assert plan.fits(lora, 80)
  models = {k: v for k, v in lora.items() if plan.phase_of(k) is None}
  assert 27 * GIB < sum(models.values()) < 29 * GIB
  # Rollout 64 responses at a time: 2 (k, v) x 32 layers x 64 x 1024 x 8 heads x 128 x 2 B.
  assert lora["rollout_kv_cache"] == 2 * 32 * 64 * 1024 * 8 * 128 * 2 == 8 * GIB
  assert max(plan.phase_totals(lora).values()) == lora["score_forward_activations"] < 16 * GIB
  assert plan.total(lora) < 45 * GIB < 72 * GIB          # 80 GiB less the 10% headroom

  full = _plan_ppo(_pipeline_7b())
  assert not plan.fits(full, 80)
  assert full["actor_params+grads+optimizer"] + full["critic_params+grads+optimizer"] > 200 * GIB

  grpo = _plan_ppo(_pipeline_7b(lora_rank=16, advantage="grpo", samples_per_prompt=4,
                                rollout_batch_size=128), "grpo")
  assert plan.fits(grpo, 80) and "critic_adapters+head+grads+optimizer" not in grpo
  assert not plan.fits(_plan_ppo(_pipeline_7b(advantage="grpo", samples_per_prompt=4,
                                              rollout_batch_size=128), "grpo"), 80)

  # The micro-batches make the difference: all at once, the rollout alone holds 64 GiB of KV
  # cache and the update ~85 GiB of activations.
  at_once = _plan_ppo(_pipeline_7b(lora_rank=16, rollout_micro_batch_size=0,
                                   forward_micro_batch_size=0, micro_batch_size=0))
  assert not plan.fits(at_once, 80)
  assert at_once["rollout_kv_cache"] == 64 * GIB and at_once["update_activations"] > 80 * GIB


def test_mistral_7b_ppo_micro_batches_divide_on_one_to_eight_replicas():
  """The preset's knobs count responses per data-parallel replica: each divides the
  replica's share on 1, 2, 4 and 8 GPUs (on 8 they split less or not at all), as the run
  requires (`ppo.micro_steps`)."""
  from configs.ppo import get_config
  from cai_jax.train.ppo import micro_steps
  cfg = get_config("mistral_7b")
  hp, rows = cfg.ppo, cfg.rollout_batch_size
  minibatch = rows // hp.num_minibatches
  assert (rows, minibatch, cfg.ppo.max_new_tokens, cfg.max_prompt_len) == (512, 64, 512, 512)
  steps = {dp: (micro_steps(hp, "rollout_micro_batch_size", rows, dp, "rows"),
                micro_steps(hp, "forward_micro_batch_size", rows, dp, "rows"),
                micro_steps(hp, "micro_batch_size", minibatch, dp, "a minibatch"))
           for dp in (1, 2, 4, 8)}
  assert steps == {1: (8, 16, 8), 2: (4, 8, 4), 4: (2, 4, 2), 8: (1, 2, 1)}
  # On 8 GPUs (mesh 1,8,1) the plan of the preset's full fine-tuning fits, as it did.
  assert plan.fits(_plan_ppo(_pipeline_7b(), mesh=(1, 8, 1)), 80)


def test_pipeline_lora_block_applies_to_stages_without_their_own():
  from configs.common import lora_config
  from launch.plan import plan_pipeline
  cfg = _pipeline_7b()
  cfg.lora = lora_config(rank=8)
  cfg.lora.base_dtype = "bfloat16"
  cfg.sft.lora.rank = 32                 # a stage's own block wins
  stages = plan_pipeline(cfg, plan.Mesh(1, 1, 1))
  r8 = plan.lora_params(_mistral_7b(lora_rank=8))
  assert stages["sft"]["adapters+grads+optimizer"] == 4 * r8 * 16          # rank 32
  assert stages["sft"]["frozen_base"] == 7_241_732_096 * 2    # the 7B preset's bf16 base
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
  assert ("| **ppo** | **total** (models + the largest phase, score; fits in 80 GiB, 10% "
          "headroom) |") in out.stdout
