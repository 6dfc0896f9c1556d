"""The RL stage's micro-batch knobs (`ppo.rollout_micro_batch_size`,
`ppo.forward_micro_batch_size`, `ppo.micro_batch_size`) change memory, not results.

Each test builds the tiny random policy twice from the same seed, once with a knob and
once without, and runs the phase it splits (`rollout_fn`, `score_fn` / `eval_fn`,
`update_fn`) on the same inputs: the chunked rollout samples exactly the same responses,
the chunked forwards give the same scores to float32 rounding, and the micro-batched update
the same parameters and minibatch statistics for every loss aggregation.

All on two fsdp devices (mesh 1x2x1; the knobs count responses per replica): the pieces
must split each device's rows where they lie. Compiling dominates on CPU, and one mesh
lets every build after the first load its model-init programs from the persistent cache.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import ppo_worker as worker
from cai_jax import parallel
from cai_jax.tokenizer import NEMO, Tokenizer
from cai_jax.train import ppo

make_cfg, reward = worker.config_from_files, worker.reward


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(train_compile_cache):
  return train_compile_cache


MESH = (1, 2, 1)


def build(sp_model_path, prompt_files, mesh=MESH, **overrides):
  """(step, first state, the first prompts as a put batch) for the tiny config: 8 responses
  an iteration (4 prompts x 2 samples for the group estimators), 2 minibatches."""
  overrides.setdefault("rollout_batch_size", 8 // overrides.get("ppo.samples_per_prompt", 1))
  cfg = make_cfg(sp_model_path, prompt_files, **{"ppo.ppo_epochs": 2}, **overrides)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  tokenizer = Tokenizer.from_file(sp_model_path)
  step, state, _ = ppo.build(cfg, parallel.mesh_from_config(cfg.mesh), tokenizer,
                             reward_fn=reward(cfg))
  rows, _ = ppo.load_prompt_rows(cfg.train_prompts, tokenizer, NEMO, cfg.max_prompt_len,
                                 tokenizer.pad_id)
  batch = {k: np.stack([r[k] for r in rows[:cfg.rollout_batch_size]]) for k in ("ids", "length")}
  return step, state, step.put_batch(batch)


def sample(step, state, batch, sp=None, key=None):
  _, roll_key, _ = step.rng_fn(state.actor.rng)
  return step.rollout_fn(state.actor.params, step.models.frozen, batch["ids"], batch["length"],
                         step.train_sp if sp is None else sp, roll_key if key is None else key)


def score(step, state, rollout):
  beta = step.put_replicated(np.float32(0.1))
  critic = state.critic.params if state.critic is not None else None
  return step.score_fn(state.actor.params, critic, step.models.frozen, step.models.ref_params,
                       step.models.reward_params, rollout, beta)


def assert_trees_close(got, want, tol):
  """Leaf by leaf: equal bit for bit (tol=0) or within `tol`, absolute and relative."""
  got, want = jax.device_get((got, want))
  leaves = jax.tree_util.tree_leaves_with_path(got)
  assert len(leaves) == len(jax.tree_util.tree_leaves(want))
  for (path, x), y in zip(leaves, jax.tree_util.tree_leaves(want)):
    x, y, where = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
    if tol == 0:
      np.testing.assert_array_equal(x, y, err_msg=where)
    else:
      np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=where)


def assert_samples_equal(got, want):
  """The same responses bit for bit; the sampler's log-probs to float32 rounding (XLA's CPU
  code reduces each row's log-sum-exp over the vocabulary in another order for a 2-row batch
  than for an 8-row one: up to 1 ulp, ~5e-7, from the third decode step on)."""
  assert_trees_close(got._replace(logp=None), want._replace(logp=None), 0)
  assert_trees_close(got.logp, want.logp, 1e-6)


# ---- rollout and score ------------------------------------------------------------------

def test_chunked_rollout_and_forwards_equal_one_pass(sp_model_path, prompt_files):
  """Decoding 1 response at a time on each device (4 pieces of the 8) samples the same
  responses, bit for bit (`assert_samples_equal`); forwards in pieces of 2 per device give
  the same log-probs, values, scores and metrics (recomputed actor log-probs included), and
  the evaluation program the same scores and exact KLs."""
  whole, state, batch = build(sp_model_path, prompt_files, **{"ppo.recompute_logprobs": True})
  split, _, _ = build(sp_model_path, prompt_files, **{
      "ppo.recompute_logprobs": True, "ppo.rollout_micro_batch_size": 1,
      "ppo.forward_micro_batch_size": 2})
  assert (split.rollout_chunks, split.forward_chunks, split.micro_steps) == (4, 2, 1)
  assert (whole.rollout_chunks, whole.forward_chunks) == (1, 1)
  for sp in ("train_sp", "eval_sp"):          # sampled, and greedy as the evaluation decodes
    want = sample(whole, state, batch, getattr(whole, sp))
    got = sample(split, state, batch, getattr(split, sp))
    assert_samples_equal(got, want)
    assert got.seq.sharding == want.seq.sharding      # the stated row sharding is kept
  want = sample(whole, state, batch)

  exp_want, metrics_want = score(whole, state, want)
  exp_got, metrics_got = score(split, state, want)
  assert_trees_close(exp_got, exp_want, 1e-6)
  assert_trees_close(metrics_got, metrics_want, 1e-6)
  assert exp_got.ref_logp.sharding == exp_want.ref_logp.sharding
  evaluate = lambda step: step.eval_fn(state.actor.params, step.models.frozen,
                                       step.models.ref_params, step.models.reward_params, want)
  assert_trees_close(evaluate(split), evaluate(whole), 1e-6)


# ---- update ---------------------------------------------------------------------------------

GROUP = {"ppo.advantage": "grpo", "ppo.samples_per_prompt": 2}
KL_LOSS = {"ppo.kl_in": "loss", "ppo.kl_estimator": "k3"}
# Every aggregation, with a critic and without, the KL in the loss, the entropy bonus and the
# policy mask of unfinished responses, over three pairs of compiled updates (each ~12 s on
# CPU); `test_loss_shares_add_up_to_the_minibatch_values` covers each aggregation with and
# without a critic on the losses alone.
UPDATE_CASES = {
    "gae-token_mean-kl_loss": {**KL_LOSS, "ppo.loss_agg": "token_mean", "ppo.unfinished": "mask"},
    "gae-seq_mean_token_sum_norm": {"ppo.loss_agg": "seq_mean_token_sum_norm",
                                    "ppo.entropy_coef": 0.01},
    "grpo-seq_mean_token_mean-kl_loss": {**GROUP, **KL_LOSS, "ppo.loss_agg": "seq_mean_token_mean",
                                         "ppo.entropy_coef": 0.01},
}


def varied_lengths(step, rollout):
  """The rollout with responses of 1..8 tokens, some ended and some not (the random policy
  rarely stops in 8 tokens), so micro-batches hold different numbers of valid tokens: a
  per-micro-batch mean would weigh them wrongly."""
  lengths = np.array([1, 8, 3, 8, 5, 2, 8, 6], np.int32)
  stopped = lengths < 8
  stopped[1] = True
  mask = np.arange(8)[None, :] < lengths[:, None]
  host = jax.device_get(rollout)
  P = host.seq.shape[1] - 8
  return jax.tree_util.tree_map(step.put, host._replace(
      mask=mask, lengths=lengths, stopped=stopped, logp=np.where(mask, host.logp, 0.0),
      valid=np.concatenate([host.valid[:, :P], mask], axis=1)))


@pytest.fixture(scope="module")
def experience(sp_model_path, prompt_files):
  """A scored rollout (host arrays) of the tiny policy with `varied_lengths`: the input of
  every update below (the update reads its rows whatever estimator scored them). Built as
  the first test's one-pass step is, so its programs come from the compilation cache."""
  step, state, batch = build(sp_model_path, prompt_files, **{"ppo.recompute_logprobs": True})
  exp, _ = score(step, state, varied_lengths(step, sample(step, state, batch)))
  return jax.device_get(exp)


# The first case runs in the fast suite; the other two (each loss_agg once) in the slow one.
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if i else [])
                                  for i, c in enumerate(UPDATE_CASES)])
def test_micro_batched_update_equals_whole_minibatch(case, experience, sp_model_path,
                                                     prompt_files):
  """2 epochs x 2 minibatches of 4 responses, each in 2 micro-batches of 2 (1 per device; one
  optimizer step per minibatch) == the same update on whole minibatches: the actor's (and
  critic's) params and optimizer states after it, and every per-minibatch statistic."""
  overrides = UPDATE_CASES[case]
  whole, state_a, _ = build(sp_model_path, prompt_files, **overrides)
  split, state_b, _ = build(sp_model_path, prompt_files,
                            **{**overrides, "ppo.micro_batch_size": 1})
  assert (whole.micro_steps, split.micro_steps) == (1, 2)
  assert (state_a.critic is None) == case.startswith("grpo")
  exp = jax.tree_util.tree_map(whole.put, experience)
  _, _, update_key = whole.rng_fn(state_a.actor.rng)
  beta = whole.put_replicated(np.float32(0.3))
  results = [step.update_fn(state.actor, state.critic, exp, beta, update_key, step.models.frozen)
             for step, state in ((whole, state_a), (split, state_b))]
  (actor_a, critic_a, stats_a), (actor_b, critic_b, stats_b) = jax.device_get(results)
  assert set(stats_a) == set(stats_b)
  assert ("kl_loss" in stats_a) == ("kl_loss" in case)
  for k in stats_a:
    np.testing.assert_allclose(stats_b[k], stats_a[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert_trees_close(actor_b, actor_a, 1e-5)
  assert_trees_close(critic_b, critic_a, 1e-5)
  assert int(actor_b.step) == 4                   # one optimizer step per minibatch
  assert np.ptp(stats_a["policy_loss"]) > 0       # the minibatches differ


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_shares_add_up_to_the_minibatch_values(agg):
  """`rl.policy_loss`, `rl.value_loss` and `rl.aggregate` on interleaved micro-batches with
  the minibatch's `rl.denominators`: the shares sum to the values on the whole minibatch,
  where the micro-batches' own means would not (their rows hold different numbers of valid
  tokens)."""
  from cai_jax.train import rl
  from cai_jax.train.state import split_microbatches
  rng = np.random.default_rng(0)
  B, T, steps = 8, 6, 4
  lengths = np.array([1, 6, 3, 6, 0, 2, 5, 4])
  mask = np.arange(T)[None, :] < lengths[:, None]
  x = {k: rng.normal(size=(B, T)).astype(np.float32)
       for k in ("logp", "old", "adv", "values", "old_values", "returns")}

  def losses(d, mask, den=None):
    p, p_stats = rl.policy_loss(d["logp"], d["old"], d["adv"], mask, 0.2, agg, den)
    v, v_stats = rl.value_loss(d["values"], d["old_values"], d["returns"], mask, 0.2, agg, den)
    return {"policy": p, "value": v, "entropy": rl.aggregate(d["logp"], mask, agg, den),
            **p_stats, **v_stats}

  whole = losses(x, mask)
  den = rl.denominators(mask, agg)
  parts = split_microbatches({**x, "mask": mask}, steps)
  shares = [losses({k: v[i] for k, v in parts.items()}, parts["mask"][i], den)
            for i in range(steps)]
  means = [losses({k: v[i] for k, v in parts.items()}, parts["mask"][i]) for i in range(steps)]
  for k in whole:
    np.testing.assert_allclose(sum(s[k] for s in shares), whole[k], rtol=1e-6, atol=1e-7,
                               err_msg=k)
  # The micro-batches' own token means are not the minibatch's (rows of 0 to 6 valid tokens).
  assert abs(np.mean([m["approx_kl"] for m in means]) - whole["approx_kl"]) > 1e-3


# ---- validation ---------------------------------------------------------------------------

def test_micro_batch_sizes_must_divide_each_replicas_rows(sp_model_path, prompt_files):
  """Sizes count responses per data-parallel replica and must divide what they split: on two
  devices the 8 responses are 4 per replica, a minibatch of 4 is 2 per replica."""
  hp = {"rollout_micro_batch_size": 1, "forward_micro_batch_size": 0, "micro_batch_size": 2}
  assert ppo.micro_steps(hp, "rollout_micro_batch_size", 8, 2, "rows") == 4
  assert ppo.micro_steps(hp, "forward_micro_batch_size", 8, 2, "rows") == 1
  assert ppo.micro_steps(hp, "micro_batch_size", 4, 2, "rows") == 1
  assert ppo.micro_steps(hp, "micro_batch_size", 8, 1, "rows") == 4
  for size in (-1, 1.5, True):
    with pytest.raises(ValueError, match=r"must be an integer >= 0 \(0 = all at once\)"):
      ppo.micro_steps({"micro_batch_size": size}, "micro_batch_size", 8, 1, "rows")
  with pytest.raises(ValueError, match="ppo.micro_batch_size=3 must divide the 2 responses each "
                                       "of the 2 data-parallel replicas holds of a minibatch"):
    build(sp_model_path, prompt_files, **{"ppo.micro_batch_size": 3})
  with pytest.raises(ValueError, match="ppo.rollout_micro_batch_size=8 must divide the 4"):
    build(sp_model_path, prompt_files, **{"ppo.rollout_micro_batch_size": 8})


@pytest.mark.slow
def test_lora_iteration_with_every_knob_equals_the_one_pass_iteration(sp_model_path,
                                                                     prompt_files):
  """A whole LoRA iteration (rank 4 adapters on the frozen actor; the critic an adapter and a
  head on the reward model's body), all three knobs at 1 response per device at a time vs
  none: the same samples, metrics, and adapters after the update. Without LoRA dropout: with
  it, each micro-batch draws its own dropout masks, alike in distribution only."""
  lora = {"lora.rank": 4, "lora.alpha": 8.0, "ppo.unfinished": "mask"}
  knobs = {f"ppo.{k}": 1 for k in ("rollout_micro_batch_size", "forward_micro_batch_size",
                                   "micro_batch_size")}
  runs = []
  for overrides in (lora, {**lora, **knobs}):
    step, state, batch = build(sp_model_path, prompt_files, **overrides)
    state, metrics = step(state, batch)
    runs.append((step, state, metrics))
  (whole, state_a, metrics_a), (split, state_b, metrics_b) = runs
  assert (split.rollout_chunks, split.forward_chunks, split.micro_steps) == (4, 4, 2)
  assert_samples_equal(split.last_experience.rollout, whole.last_experience.rollout)
  timing = {k for k in metrics_a if k.endswith("seconds") or k.endswith("per_sec")}
  worker.assert_metrics_close({k: v for k, v in metrics_b.items() if k not in timing},
                              {k: v for k, v in metrics_a.items() if k not in timing}, tol=1e-5)
  assert_trees_close(state_b.actor.params, state_a.actor.params, 1e-5)
  assert_trees_close(state_b.critic.params, state_a.critic.params, 1e-5)
