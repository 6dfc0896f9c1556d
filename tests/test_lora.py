"""LoRA: the adapters in the model (`cai_jax.model.lora`) and in every trained stage
(`common.load_trained`: SFT, the reward model, DPO, the RL stage).

Model tests use a tiny float32 config with unit-scale weights where a comparison must be
able to fail (0.02-scale random weights make every logit nearly equal). Stage tests start
from random tiny models saved as the stages save theirs and check what a LoRA run may and
may not change.
"""

from __future__ import annotations

import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import ppo_worker
import train_worker
from cai_jax import checkpoint, parallel, peft
from cai_jax.data import jsonl
from cai_jax.model import Mistral, MistralConfig, init_params, lora, model_logical_specs
from cai_jax.train import common, ppo
from cai_jax.tokenizer import NEMO
from cai_jax.train.checkpointing import CheckpointRestoreError

@pytest.fixture(scope="module", autouse=True)
def compilation_cache(train_compile_cache):
  """The training tests' persistent compilation cache (tests/conftest.py): the stage runs
  here repeat the same programs (a resume's three runs, the sharded run's reference)."""
  return train_compile_cache


CFG = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, lora_rank=4,
                    lora_alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 11)), jnp.int32)


def flat(tree) -> dict:
  return traverse_util.flatten_dict(dict(jax.device_get(tree)))


def unit_params(config: MistralConfig, head: str = "lm", seed: int = 0):
  """Params of `Mistral(config, head)` with every leaf random at unit scale (B included,
  so the adapters change the output)."""
  params = nn.unbox(Mistral(config, head=head).init(jax.random.PRNGKey(seed), TOKENS))["params"]
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  scale = lambda x: 1.0 / np.sqrt(x.shape[-1]) if x.ndim > 1 else 1.0
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, x.shape, x.dtype) * scale(x) for k, x in zip(keys, leaves)])


# ---- the model ---------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_fresh_adapters_give_the_base_models_output(head):
  params = nn.unbox(Mistral(CFG, head=head).init(jax.random.PRNGKey(3), TOKENS))["params"]
  adapters, base = lora.split(params)
  assert set(flat(adapters)) == {("layers", block, name, leaf)
                                 for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj",
                                                                     "o_proj")),
                                                      ("mlp", ("gate_proj", "up_proj",
                                                               "down_proj")))
                                 for name in names for leaf in ("lora_a", "lora_b")}
  for path, x in flat(adapters).items():          # A random, B zero, both float32
    assert x.dtype == np.float32
    assert (np.all(x == 0) if path[-1] == "lora_b" else np.std(x) > 0), path
  base = jax.tree_util.tree_map(lambda x: x * 50.0, base)   # logits far apart
  got = Mistral(CFG, head=head).apply({"params": lora.combine(adapters, base)}, TOKENS)
  want = Mistral(CFG.without_lora(), head=head).apply({"params": base}, TOKENS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merged_kernel_is_the_base_plus_scale_times_b_a():
  params = unit_params(CFG)
  config, merged = lora.merge(CFG, params)
  assert config.lora_rank == 0
  want, got = flat(params), flat(merged)
  assert not any(k[-1] in lora.ADAPTER_LEAVES for k in got)
  scale = CFG.lora_alpha / CFG.lora_rank
  for module, (a, b) in lora.adapter_pairs(params).items():
    kernel = want[module + ("kernel",)]
    for layer in range(CFG.num_hidden_layers):
      a2 = np.asarray(a[layer], np.float64).reshape(-1, CFG.lora_rank)
      b2 = np.asarray(b[layer], np.float64).reshape(CFG.lora_rank, -1)
      expect = kernel[layer].astype(np.float64) + scale * (a2 @ b2).reshape(kernel.shape[1:])
      np.testing.assert_allclose(got[module + ("kernel",)][layer], expect, atol=1e-6,
                                 err_msg=str(module))
  for path, x in want.items():                    # everything else is untouched
    if path[-1] not in lora.ADAPTER_LEAVES and path[:-1] not in lora.adapter_pairs(params):
      np.testing.assert_array_equal(got[path], x)


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_adapted_model_equals_its_merge(head):
  params = unit_params(CFG, head)
  adapted = Mistral(CFG, head=head).apply({"params": params}, TOKENS)
  config, merged = lora.merge(CFG, params)
  base = lora.split(params)[1]
  plain = Mistral(config, head=head).apply({"params": base}, TOKENS)
  np.testing.assert_allclose(np.asarray(adapted),
                             np.asarray(Mistral(config, head=head).apply({"params": merged},
                                                                         TOKENS)), atol=1e-5)
  assert np.max(np.abs(np.asarray(adapted) - np.asarray(plain))) > 0.1   # adapters matter


def test_only_the_named_targets_are_adapted_and_shard_like_their_kernels():
  config = CFG.replace(lora_targets="q_proj,down_proj")
  specs, abstract = model_logical_specs(config)
  adapters = flat(lora.split(abstract)[0])
  assert {k[2] for k in adapters} == {"q_proj", "down_proj"}
  specs = flat(specs)
  kernel = specs[("layers", "self_attn", "q_proj", "kernel")]
  assert tuple(specs[("layers", "self_attn", "q_proj", "lora_a")]) == (*kernel[:2], "lora_rank")
  assert tuple(specs[("layers", "self_attn", "q_proj", "lora_b")]) == ("layers", "lora_rank",
                                                                       *kernel[2:])
  kernel = specs[("layers", "mlp", "down_proj", "kernel")]
  assert tuple(specs[("layers", "mlp", "down_proj", "lora_a")]) == (*kernel[:2], "lora_rank")
  with pytest.raises(ValueError, match="not projections of Mistral"):
    CFG.replace(lora_targets="q_proj,lm_head")


def test_adapters_are_created_sharded_on_a_mesh():
  mesh = parallel.create_mesh((1, 2, 4))
  adapters, shardings = lora.init_adapters(CFG, mesh, jax.random.PRNGKey(0))
  a = adapters["layers"]["self_attn"]["q_proj"]["lora_a"]          # [L, D, r]: D over fsdp
  assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  b = adapters["layers"]["mlp"]["up_proj"]["lora_b"]               # [L, r, F]: F over tensor
  assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  chex.assert_trees_all_equal_structs(adapters, lora.split(unit_params(CFG))[0])


def test_dropout_applies_only_in_a_training_forward():
  config = CFG.replace(lora_dropout=0.5)
  params = unit_params(config)
  plain = Mistral(config).apply({"params": params}, TOKENS)
  again = Mistral(config).apply({"params": params}, TOKENS)
  dropped = Mistral(config).apply({"params": params}, TOKENS,
                                  rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))
  assert np.max(np.abs(np.asarray(dropped) - np.asarray(plain))) > 1e-3


def test_split_and_combine_are_inverse_and_refuse_overlaps():
  params = unit_params(CFG, "scalar")
  trained, frozen = lora.split(params, lora.trainable_leaves(("score",)))
  assert "score" in trained and "score" not in frozen
  chex.assert_trees_all_equal(lora.combine(trained, frozen), params)
  with pytest.raises(ValueError, match="more than one tree"):
    lora.combine(trained, trained)


# ---- the supervised stages -------------------------------------------------------------

ONE_DEVICE = {"mesh.fsdp": 1}

def save_random_model(directory: str, head: str, seed: int, tokenizer_path: str) -> str:
  from configs.models import get_config as model_preset
  config = MistralConfig.from_config(model_preset("tiny"))
  params, _ = init_params(config, parallel.mesh_from_config(parallel.ONE_DEVICE),
                          jax.random.PRNGKey(seed), head=head)
  checkpoint.save_model(directory, config, params, head=head)
  shutil.copyfile(tokenizer_path, os.path.join(directory, "tokenizer.model"))
  return directory


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory, sp_model_path):
  root = tmp_path_factory.mktemp("lora_bases")
  return {"lm": save_random_model(str(root / "lm"), "lm", 5, sp_model_path),
          "scalar": save_random_model(str(root / "rm"), "scalar", 6, sp_model_path)}


def checkpoint_leaves(workdir: str, model: tuple = ()) -> set[tuple]:
  """The param leaves the newest checkpoint holds for `model` (() for a supervised stage's
  TrainState, ("actor",) / ("critic",) for PPO's)."""
  ckpts = os.path.join(workdir, "checkpoints")
  step = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  meta = ocp.StandardCheckpointer().metadata(os.path.join(ckpts, str(step), "state"))
  tree = meta.item_metadata.tree if hasattr(meta.item_metadata, "tree") else meta.item_metadata
  prefix = model + ("params",)
  return {k[len(prefix):] for k in traverse_util.flatten_dict(dict(tree))
          if k[:len(prefix)] == prefix}


def assert_lora_export(workdir: str, base_dir: str, head: str, trained_heads=()):
  """The exported model is the base plus scale * B A of the exported adapter on adapted
  kernels; every other leaf is the base's, bit for bit, except `trained_heads`, which
  changed. The adapter directory is the one the run trained."""
  base_cfg, base, _ = checkpoint.load_model(base_dir)
  _, merged, _ = checkpoint.load_model(os.path.join(workdir, "model"))
  config = base_cfg.replace(lora_rank=4, lora_alpha=32.0)
  adapters = peft.load_adapter(os.path.join(workdir, "adapter"), config, head=head)
  pairs = lora.adapter_pairs(adapters)
  base, merged = flat(base), flat(merged)
  assert set(base) == set(merged)
  for path, x in base.items():
    if path[:-1] in pairs:
      a, b = pairs[path[:-1]]
      assert np.max(np.abs(b)) > 0, path            # B moved away from zero
      expect = x + config.lora_scale * np.asarray(lora.delta(a, b, x.shape))
      np.testing.assert_allclose(merged[path], expect, atol=1e-6, err_msg=str(path))
    elif path[0] in trained_heads:
      assert not np.array_equal(merged[path], x), path
      np.testing.assert_array_equal(merged[path], adapters[path[0]][path[1]])
    else:
      np.testing.assert_array_equal(merged[path], x, err_msg=str(path))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, sp_model_path, base_dirs):
  from cai_jax.train.sft import run_sft
  workdir = str(tmp_path_factory.mktemp("lora_sft"))
  before = jsonl.file_sha256(base_dirs["lm"])
  cfg = train_worker.sft_config(sp_model_path, init_from=base_dirs["lm"], max_steps=3,
                                save_every=3, **ONE_DEVICE, **{"lora.rank": 4, "optim.lr": 1e-2})
  report = run_sft(cfg, workdir)
  return cfg, workdir, report, before


def test_lora_sft_trains_only_the_adapters_and_keeps_the_base(sft_run, base_dirs):
  cfg, workdir, report, before = sft_run
  assert jsonl.file_sha256(base_dirs["lm"]) == before          # the base directory untouched
  leaves = checkpoint_leaves(workdir)                           # checkpoints: adapters only
  assert leaves and all(k[-1] in lora.ADAPTER_LEAVES for k in leaves), leaves
  data = json.load(open(os.path.join(workdir, "checkpoints", "3", "data", "metadata")))
  assert data["lora_base"]["path"] == os.path.abspath(base_dirs["lm"])
  assert report["outputs"]["adapter"] == os.path.join(workdir, "adapter")
  assert_lora_export(workdir, base_dirs["lm"], "lm")
  losses = train_worker.train_losses(workdir)
  assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_lora_sft_on_a_sharded_mesh_matches_one_device(tmp_path, sft_run, sp_model_path,
                                                       base_dirs):
  """Adapters follow their kernels' axes (the rank side replicated) on an fsdp x tensor mesh,
  and train to the one-device run's losses."""
  from cai_jax.train.sft import run_sft
  cfg = train_worker.sft_config(sp_model_path, init_from=base_dirs["lm"], max_steps=3,
                                save_every=3, **{"mesh.fsdp": 4, "mesh.tensor": 2, "micro_batch_size": 2,
                                                 "lora.rank": 4, "optim.lr": 1e-2})
  run_sft(cfg, str(tmp_path / "sharded"))
  np.testing.assert_allclose(train_worker.train_losses(str(tmp_path / "sharded")),
                             train_worker.train_losses(sft_run[1]), rtol=1e-4)


def test_lora_resume_refuses_another_base(tmp_path, sft_run, base_dirs):
  """The checkpoint's pointer to its base (path, config.json hash, files fingerprint) must
  match the base a resume loads: the same directory written again is another base."""
  _, workdir, _, _ = sft_run
  saved = json.load(open(os.path.join(workdir, "checkpoints", "3", "data", "metadata")))
  assert saved["lora_base"] == common.base_pointer(base_dirs["lm"])
  common.BasePointer(common.base_pointer(base_dirs["lm"])).restore(saved["lora_base"])
  copy = str(tmp_path / "base")
  shutil.copytree(base_dirs["lm"], copy)
  rewritten = common.BasePointer(common.base_pointer(copy))
  rewritten.restore(common.base_pointer(copy))
  weights = next(os.path.join(r, n) for r, _, ns in os.walk(copy) for n in ns
                 if n != "config.json")
  os.utime(weights, ns=(0, 0))                                  # the same bytes, written again
  with pytest.raises(CheckpointRestoreError, match="trained on the base"):
    common.BasePointer(common.base_pointer(copy)).restore(rewritten.state())


def test_merge_into_a_bfloat16_base_keeps_the_adapters_update():
  """A bf16 base's merge is float32: rounding W + scale B A back to bf16 would erase updates
  far below W's bf16 spacing, which the adapted model still computes."""
  params = unit_params(CFG)
  adapters, base = lora.split(params)
  base = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), base)
  adapters = jax.tree_util.tree_map(lambda x: x * 1e-2, adapters)    # small: ~1e-4 of W
  params = lora.combine(adapters, base)
  config, merged = lora.merge(CFG, params)
  assert config.param_dtype == "float32"
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(merged))
  adapted = Mistral(CFG).apply({"params": params}, TOKENS)
  plain = Mistral(CFG.without_lora()).apply({"params": base}, TOKENS)
  got = Mistral(config).apply({"params": merged}, TOKENS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(adapted), atol=1e-5)
  assert np.max(np.abs(np.asarray(adapted) - np.asarray(plain))) > 1e-4


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_peft_export_loads_on_the_save_hf_base(tmp_path, head):
  """transformers + peft, on the base `checkpoint.save_hf` wrote and our exported adapter,
  compute our adapted model's outputs."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft_lib = pytest.importorskip("peft")
  params = unit_params(CFG, head)
  if head == "scalar":    # the trained head is part of the adapter (modules_to_save)
    params["score"]["kernel"] = params["score"]["kernel"] * 3.0
  adapters, base = lora.split(params, lora.trainable_leaves(("score",)))
  checkpoint.save_hf(str(tmp_path / "base"), CFG.without_lora(), lora.combine(
      base, {"score": {"kernel": np.zeros_like(params["score"]["kernel"])}} if head == "scalar"
      else {}), head=head)
  peft.save_adapter(str(tmp_path / "adapter"), CFG, adapters, head=head)
  auto = (transformers.AutoModelForSequenceClassification if head == "scalar"
          else transformers.AutoModelForCausalLM)
  model = peft_lib.PeftModel.from_pretrained(
      auto.from_pretrained(str(tmp_path / "base"), dtype=torch.float32),
      str(tmp_path / "adapter")).eval()
  ours = np.asarray(Mistral(CFG, head=head).apply({"params": params}, TOKENS))
  with torch.no_grad():
    if head == "lm":
      theirs = model(input_ids=torch.as_tensor(np.asarray(TOKENS), dtype=torch.long)).logits
      np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)
    else:   # per-position scores: the classifier's head over every position's hidden state
      for row in range(TOKENS.shape[0]):
        ids = torch.as_tensor(np.asarray(TOKENS[row:row + 1]), dtype=torch.long)
        theirs = model(input_ids=ids).logits[0, 0].item()
        np.testing.assert_allclose(theirs, ours[row, -1], atol=1e-4)


def test_imported_peft_adapter_is_the_start_and_exports_bit_identically(tmp_path, sft_run,
                                                                        sp_model_path,
                                                                        base_dirs):
  _, workdir, _, _ = sft_run
  source = os.path.join(workdir, "adapter")
  cfg = train_worker.sft_config(sp_model_path, init_from=base_dirs["lm"], **ONE_DEVICE,
                                **{"lora.rank": 4, "lora.init_adapter": source})
  trained = common.load_trained(cfg, parallel.mesh_from_config(parallel.ONE_DEVICE), head="lm")
  want = flat(peft.load_adapter(source, trained.config))
  assert flat(trained.params).keys() == want.keys()
  for k, v in flat(trained.params).items():
    np.testing.assert_array_equal(v, want[k])
  out = str(tmp_path / "again")
  common.export_trained(out, trained, trained.params, hf=False)
  from safetensors.numpy import load_file
  a = load_file(os.path.join(source, peft.WEIGHTS_FILE))
  b = load_file(os.path.join(out, "adapter", peft.WEIGHTS_FILE))
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k


def test_init_adapter_that_does_not_match_is_refused_before_training(tmp_path, sft_run,
                                                                     sp_model_path, base_dirs):
  from cai_jax import preflight
  _, workdir, _, _ = sft_run
  cfg = train_worker.sft_config(sp_model_path, init_from=base_dirs["lm"],
                                **{"lora.rank": 8, "lora.init_adapter":
                                   os.path.join(workdir, "adapter")})
  problems = preflight.stage_problems("sft", cfg)
  assert any("lora.init_adapter" in p and "r is 4" in p for p in problems), problems
  cfg.lora.targets = "q_proj,lm_head"
  assert any("lora.targets" in p for p in preflight.value_problems("sft", cfg))


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("pairs") / "train.jsonl")
  return train_worker.write_comparisons(path, train_worker.synthetic_pairs(32, seed=0))


def test_lora_reward_model_trains_adapters_and_its_head(tmp_path, sp_model_path, base_dirs,
                                                        comparisons):
  from cai_jax.train.reward import run_rm
  cfg = train_worker.pair_stage_config("rm", sp_model_path, comparisons,
                                       init_from=base_dirs["lm"], **ONE_DEVICE, **{"lora.rank": 4})
  workdir = str(tmp_path / "rm")
  run_rm(cfg, workdir)
  leaves = checkpoint_leaves(workdir)
  assert ("score", "kernel") in leaves
  assert all(k[-1] in lora.ADAPTER_LEAVES for k in leaves - {("score", "kernel")})
  # The RM starts from an LM base: compare with the body of that base.
  base_cfg, base, _ = checkpoint.load_model(base_dirs["lm"])
  _, merged, _ = checkpoint.load_model(os.path.join(workdir, "model"))
  adapters = peft.load_adapter(os.path.join(workdir, "adapter"),
                               base_cfg.replace(lora_rank=4, lora_alpha=32.0), head="scalar")
  assert "score" in adapters and jsonl.read_json(
      os.path.join(workdir, "adapter", peft.CONFIG_FILE))["modules_to_save"] == ["score"]
  np.testing.assert_array_equal(flat(merged)[("score", "kernel")], adapters["score"]["kernel"])
  for path, x in flat(base).items():
    if path[0] != "lm_head" and path[:-1] not in lora.adapter_pairs(adapters):
      np.testing.assert_array_equal(flat(merged)[path], x, err_msg=str(path))


@pytest.mark.slow
def test_lora_dpo_runs_and_keeps_the_base(tmp_path, sp_model_path, base_dirs, comparisons):
  from cai_jax.train.dpo import run_dpo
  cfg = train_worker.pair_stage_config("dpo", sp_model_path, comparisons,
                                       init_from=base_dirs["lm"], **ONE_DEVICE,
                                       **{"lora.rank": 4, "optim.lr": 1e-2})
  workdir = str(tmp_path / "dpo")
  report = run_dpo(cfg, workdir)
  assert all(k[-1] in lora.ADAPTER_LEAVES for k in checkpoint_leaves(workdir))
  assert_lora_export(workdir, base_dirs["lm"], "lm")
  assert np.isfinite(report["final_train"]["loss"])


# ---- the RL stage ------------------------------------------------------------------------


def test_ppo_lora_reference_is_the_base_and_the_critic_shares_the_reward_model(
    sp_model_path, prompt_files, base_dirs):
  from cai_jax.tokenizer import Tokenizer
  cfg = ppo_worker.config_from_files(sp_model_path, prompt_files, actor_init=base_dirs["lm"],
                                     rm_init=base_dirs["scalar"], **{"lora.rank": 4})
  tokenizer = Tokenizer.from_file(sp_model_path)
  step, state, _ = ppo.build(cfg, parallel.mesh_from_config(cfg.mesh), tokenizer)
  m = step.models
  # One frozen copy of each base: the reference is the actor's base, the critic's body is
  # the reward model's (the same arrays), and the trained leaves are adapters (+ value head).
  assert m.ref_params is m.frozen.actor
  rm_leaves = flat(m.reward_params)
  for path, x in traverse_util.flatten_dict(dict(m.frozen.critic)).items():
    assert x is traverse_util.flatten_dict(dict(m.reward_params))[path], path
  assert ("score", "kernel") not in traverse_util.flatten_dict(dict(m.frozen.critic))
  assert all(k[-1] in lora.ADAPTER_LEAVES for k in flat(state.actor.params))
  assert set(flat(state.critic.params)) - {("score", "kernel")} <= {
      k for k in flat(state.critic.params) if k[-1] in lora.ADAPTER_LEAVES}
  np.testing.assert_array_equal(flat(state.critic.params)[("score", "kernel")],
                                rm_leaves[("score", "kernel")])

  rows, _ = ppo.load_prompt_rows(cfg.train_prompts, tokenizer, NEMO, cfg.max_prompt_len,
                                 tokenizer.pad_id)
  batch = {k: np.stack([r[k] for r in rows[:cfg.rollout_batch_size]]) for k in ("ids", "length")}
  before = flat(m.frozen.actor)
  new_state, metrics = step(state, step.put_batch(batch))
  exp = step.last_experience
  # Reference log-probs are the base model's own (loaded from its directory, no adapters).
  base_cfg, base, _ = checkpoint.load_model(base_dirs["lm"])
  r = jax.device_get(exp.rollout)
  want, _ = ppo.response_logprobs(base_cfg, base, r, step.P, cfg.ppo.temperature)
  np.testing.assert_allclose(np.asarray(exp.ref_logp), np.asarray(want), atol=1e-5)
  # Fresh adapters: the actor starts as the base, so the first ratios and KL are ~0.
  np.testing.assert_allclose(np.asarray(r.logp), np.asarray(want), atol=1e-5)
  assert metrics["approx_kl"] > 0 and np.isfinite(metrics["value_loss"])
  for path, x in flat(m.frozen.actor).items():         # the base is bit-identical afterwards
    np.testing.assert_array_equal(x, before[path])
  assert any(np.max(np.abs(v)) > 0 for k, v in flat(new_state.actor.params).items()
             if k[-1] == "lora_b")


@pytest.mark.slow
def test_ppo_init_adapter_starts_the_actor_and_the_critic_starts_fresh(
    sft_run, sp_model_path, prompt_files, base_dirs):
  from cai_jax.tokenizer import Tokenizer
  _, workdir, _, _ = sft_run
  source = os.path.join(workdir, "adapter")
  cfg = ppo_worker.config_from_files(sp_model_path, prompt_files, actor_init=base_dirs["lm"],
                                     rm_init=base_dirs["scalar"],
                                     **{"lora.rank": 4, "lora.init_adapter": source})
  _, state, _ = ppo.build(cfg, parallel.mesh_from_config(cfg.mesh),
                          Tokenizer.from_file(sp_model_path))
  config = checkpoint.read_model_config(base_dirs["lm"])[0].replace(lora_rank=4, lora_alpha=32.0)
  want = flat(peft.load_adapter(source, config))
  got = flat(state.actor.params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  critic = flat(state.critic.params)
  assert all(np.all(v == 0) for k, v in critic.items() if k[-1] == "lora_b")


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_ppo_lora_runs_with_the_critic_free_estimators(tmp_path, sp_model_path, prompt_files,
                                                        estimator):
  cfg = ppo_worker.config_from_files(sp_model_path, prompt_files, val_prompts="",
                                     **{"lora.rank": 4, "ppo.advantage": estimator,
                                        "ppo.samples_per_prompt": 2, "rollout_batch_size": 8})
  report = ppo.run_ppo(cfg, str(tmp_path), reward_fn=ppo_worker.reward(cfg))
  assert np.isfinite(report["final_train"]["policy_loss"])
  assert os.path.isfile(os.path.join(report["outputs"]["adapter"], peft.WEIGHTS_FILE))


LORA_PPO = {"lora.rank": 4, "actor_optim.lr": 1e-2, "critic_optim.lr": 1e-2}


@pytest.mark.slow
def test_ppo_lora_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, sp_model_path,
                                                                  prompt_files):
  k = 2
  make = lambda n: ppo_worker.config_from_files(sp_model_path, prompt_files, val_prompts="",
                                                iterations=n, save_every=1, **LORA_PPO)
  cut = str(tmp_path / "cut")
  ppo.run_ppo(make(k), cut, reward_fn=ppo_worker.reward(make(k)))
  assert all(k[-1] in lora.ADAPTER_LEAVES for k in checkpoint_leaves(cut, ("actor",)))
  critic = checkpoint_leaves(cut, ("critic",))
  assert ("score", "kernel") in critic
  assert all(k[-1] in lora.ADAPTER_LEAVES for k in critic - {("score", "kernel")})
  report = ppo.run_ppo(make(2 * k), cut, reward_fn=ppo_worker.reward(make(2 * k)))
  assert report["resumed_from"] == k
  straight = str(tmp_path / "straight")
  ppo.run_ppo(make(2 * k), straight, reward_fn=ppo_worker.reward(make(2 * k)))
  assert ppo_worker.train_metrics(cut) == ppo_worker.train_metrics(straight)
  a, b = (flat(checkpoint.load_model(os.path.join(w, "model"))[1]) for w in (cut, straight))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
  assert (jsonl.file_sha256(os.path.join(cut, "adapter", peft.WEIGHTS_FILE))
          == jsonl.file_sha256(os.path.join(straight, "adapter", peft.WEIGHTS_FILE)))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(2, 2, 2)])
def test_ppo_lora_sharded_iteration_matches_one_device(mesh, tmp_path, sp_model_path,
                                                       prompt_files):
  runs = []
  for shape in ((1, 1, 1), mesh):
    cfg = ppo_worker.config_from_files(sp_model_path, prompt_files, val_prompts="",
                                       **LORA_PPO)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
    workdir = str(tmp_path / "x".join(map(str, shape)))
    ppo.run_ppo(cfg, workdir, reward_fn=ppo_worker.reward(cfg))
    _, params, _ = checkpoint.load_model(os.path.join(workdir, "model"))
    runs.append((ppo_worker.train_metrics(workdir)[0], flat(params)))
  ppo_worker.assert_metrics_close(runs[1][0], runs[0][0])
  for path, x in runs[0][1].items():
    np.testing.assert_allclose(runs[1][1][path], x, atol=1e-4, err_msg=str(path))


@pytest.mark.slow
def test_ppo_lora_reward_rises_on_held_out_prompts_with_bounded_kl(tmp_path, sp_model_path,
                                                                   prompt_files):
  """PPO training rank-4 adapters of a frozen random policy on the synthetic reward (the
  fraction of response tokens in a quarter of the vocabulary). The base's LM head is drawn
  at 10x the init scale, as a trained head is: behind the 0.02-scale init head (logits
  ~0.2 apart) no change of the hidden states can move the groups of tokens by more than
  ~0.3 nats, which a frozen head never lets an adapter overcome. Seeds 0-2 gain 0.30-0.38
  with an exact KL of 18-25 nats per 8-token response (collapsing onto one token would
  cost ~50)."""
  from configs.models import get_config as model_preset
  config = MistralConfig.from_config(model_preset("tiny"))
  params, _ = init_params(config, parallel.mesh_from_config(parallel.ONE_DEVICE),
                          jax.random.PRNGKey(0))
  params = jax.device_get(params)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10.0
  base = str(tmp_path / "base")
  checkpoint.save_model(base, config, params)
  cfg = ppo_worker.config_from_files(sp_model_path, prompt_files, iterations=20,
                                     rollout_batch_size=64, eval_every=0, save_every=0,
                                     sample_every=0, eval_greedy=False, actor_init=base,
                                     **LORA_PPO)
  report = ppo.run_ppo(cfg, str(tmp_path / "run"), reward_fn=ppo_worker.reward(cfg))
  before, after = report["first_eval"], report["final_eval"]
  assert after["eval_score_mean"] - before["eval_score_mean"] > 0.2, (before, after)
  assert after["eval_kl_per_sequence"] < 30.0, after


def test_the_pipelines_lora_block_reaches_every_trained_stage_unless_set_there():
  from configs.pipeline import get_config
  from configs.pipeline import apply_lora
  cfg = get_config("tiny")
  cfg.lora.rank, cfg.lora.alpha = 16, 64.0
  cfg.rm.lora.rank = 4
  apply_lora(cfg)
  assert [cfg[s].lora.rank for s in ("sft", "rm", "ppo", "dpo", "base")] == [16, 4, 16, 16, 0]
  assert cfg.sft.lora.alpha == cfg.ppo.lora.alpha == 64.0 and cfg.rm.lora.alpha == 32.0
