"""The RL stage's other estimators and settings (`ppo.advantage`, `kl_in`, `loss_agg`,
`unfinished`) end to end on the tiny random policy with a synthetic reward.

The formulas themselves are checked against NumPy in tests/test_rl_math.py; here the
stage wires them: groups of samples per prompt, no critic for the critic-free
estimators, the KL in the loss, NeMo-Aligner's exact losses, exact resume, sharding.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ppo_worker as worker
from cai_jax import parallel
from cai_jax.tokenizer import NEMO, Tokenizer
from cai_jax.train import ppo, rl
from test_rl_math import group_np, nemo_actor_loss, nemo_critic_loss

GROUP = {"ppo.advantage": "grpo", "ppo.samples_per_prompt": 4}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(train_compile_cache):
  return train_compile_cache


make_cfg, reward, train_metrics = worker.config_from_files, worker.reward, worker.train_metrics


def one_step(cfg, sp_model_path):
  """build() and one iteration on one device: (iteration, state after it, metrics)."""
  tokenizer = Tokenizer.from_file(sp_model_path)
  rows, _ = ppo.load_prompt_rows(cfg.train_prompts, tokenizer, NEMO, cfg.max_prompt_len,
                                 tokenizer.pad_id)
  step, state, _ = ppo.build(cfg, parallel.mesh_from_config(cfg.mesh), tokenizer,
                             reward_fn=reward(cfg))
  batch = {k: np.stack([r[k] for r in rows[:cfg.rollout_batch_size]]) for k in ("ids", "length")}
  state, metrics = step(state, step.put_batch(batch))
  return step, state, metrics


# An iteration's metrics on another mesh or in two processes vs one device. The rollout,
# rewards and advantages agree to float32 rounding (sums reduced in another order): 1e-4.
# The update statistics average over 8 successive updates whose rounding compounds
# (observed 6e-4 on ratio_mean), and clip_fraction counts tokens whose ratio sits at the clip
# boundary, where that rounding flips a few of ~1000 (observed 0.012): looser bounds for
# those alone. A wrong group layout or a reduction over one shard is far off in the
# advantages and losses, which keep the tight bound.
COMPOUNDING = {"ratio_mean": 2e-3, "approx_kl": 2e-3, "clip_fraction": 0.03}


# ---- critic-free estimators --------------------------------------------------------------

@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_load_no_critic(method, sp_model_path, prompt_files):
  group = 1 if method == "reinforce_pp" else 2
  cfg = make_cfg(sp_model_path, prompt_files, rollout_batch_size=8, **{
      "ppo.advantage": method, "ppo.samples_per_prompt": group})
  step, state, metrics = one_step(cfg, sp_model_path)
  assert state.critic is None and step.models.critic_cfg is None
  # On the mesh: the actor's params and AdamW moments, the frozen reference, nothing else
  # (the reward is a function here).
  n_actor = sum(x.size for x in jax.tree_util.tree_leaves(state.actor.params))
  n_ref = sum(x.size for x in jax.tree_util.tree_leaves(step.models.ref_params))
  assert n_actor == n_ref and not jax.tree_util.tree_leaves(step.models.reward_params)
  assert not {"value_loss", "critic_grad_norm", "critic_param_norm", "explained_variance",
              "value_mean"} & set(metrics)
  assert step.rows == 8 * group
  exp = jax.device_get(step.last_experience)
  assert exp.rollout.seq.shape[0] == 8 * group and np.all(exp.values == 0)
  if group > 1:   # each prompt's responses sit side by side
    prompts = exp.rollout.seq[:, :cfg.max_prompt_len].reshape(8, group, -1)
    assert np.all(prompts == prompts[:, :1])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_advantages_of_an_iteration(method, sp_model_path, prompt_files):
  """The advantage on every token of a response is the group formula applied to the
  sequence reward, score - beta * KL summed over the response (KL in the reward)."""
  cfg = make_cfg(sp_model_path, prompt_files, rollout_batch_size=8,
                 **{**GROUP, "ppo.advantage": method, "ppo.init_kl_coef": 0.5})
  step, _, metrics = one_step(cfg, sp_model_path)
  exp = jax.device_get(step.last_experience)
  m = exp.rollout.mask
  sequence_reward = exp.score - 0.5 * (exp.kl * m).sum(-1)
  want = group_np(sequence_reward, 4, method)
  np.testing.assert_allclose(exp.advantages, np.where(m, want[:, None], 0.0), atol=1e-4)
  assert metrics["kl_coef"] == 0.5


def test_reinforce_pp_whitens_discounted_returns(sp_model_path, prompt_files):
  cfg = make_cfg(sp_model_path, prompt_files, rollout_batch_size=8,
                 **{"ppo.advantage": "reinforce_pp", "ppo.gamma": 0.9})
  step, _, _ = one_step(cfg, sp_model_path)
  exp = jax.device_get(step.last_experience)
  m = exp.rollout.mask
  rewards = np.asarray(rl.token_rewards(exp.score, exp.kl, m, cfg.ppo.init_kl_coef))
  returns = np.zeros_like(rewards)
  for b in range(len(rewards)):
    g = 0.0
    for t in reversed(range(rewards.shape[1])):
      if m[b, t]:
        g = rewards[b, t] + 0.9 * g
        returns[b, t] = g
  valid = returns[m]
  np.testing.assert_allclose(exp.advantages[m], (valid - valid.mean()) / valid.std(), atol=1e-4)


def test_kl_in_the_loss(sp_model_path, prompt_files):
  """kl_in=loss: the reward (so the advantage) carries no KL, and the policy loss gains
  beta x the KL estimate (k3 here, GRPO's), reduced like the loss."""
  cfg = make_cfg(sp_model_path, prompt_files, rollout_batch_size=8, **{
      **GROUP, "ppo.kl_in": "loss", "ppo.kl_estimator": "k3", "ppo.init_kl_coef": 0.3,
      "ppo.num_minibatches": 1, "ppo.ppo_epochs": 2})
  step, _, metrics = one_step(cfg, sp_model_path)
  exp = jax.device_get(step.last_experience)
  m = exp.rollout.mask
  np.testing.assert_allclose(exp.advantages, np.where(m, group_np(exp.score, 4, "grpo")[:, None],
                                                      0.0), atol=1e-4)
  stats = step.last_update_stats
  # First minibatch of the first epoch: the policy is the rollout's, so the fresh log-probs
  # are the rollout's and the KL term is the aggregate of its per-token k3.
  k3 = np.asarray(rl.kl_penalty(exp.rollout.logp, exp.ref_logp, "k3"))
  np.testing.assert_allclose(stats["kl_loss"][0, 0], (k3 * m).sum() / m.sum(), rtol=1e-4,
                             atol=1e-6)
  assert stats["kl_loss"][1, 0] != stats["kl_loss"][0, 0]   # the update moved the policy
  assert "kl_loss" in metrics


def test_nemo_exact_setting_reproduces_nemo_aligners_losses(sp_model_path, prompt_files):
  """kl_estimator=abs, loss_agg=seq_mean_token_mean, unfinished=mask: on the first
  minibatch (the rollout's own policy and critic, ratio 1, values = old values) the
  logged losses are NeMo-Aligner's formulas with its micro-batch of one sequence, on a
  rollout where some responses never ended and responses have different lengths."""
  cfg = make_cfg(sp_model_path, prompt_files, rollout_batch_size=16, **{
      "ppo.kl_estimator": "abs", "ppo.loss_agg": "seq_mean_token_mean",
      "ppo.unfinished": "mask", "ppo.num_minibatches": 1, "ppo.ppo_epochs": 1})
  tokenizer = Tokenizer.from_file(sp_model_path)
  rows, _ = ppo.load_prompt_rows(cfg.train_prompts, tokenizer, NEMO, cfg.max_prompt_len,
                                 tokenizer.pad_id)
  step, state, _ = ppo.build(cfg, parallel.mesh_from_config(cfg.mesh), tokenizer,
                             reward_fn=reward(cfg))
  batch = step.put_batch({k: np.stack([r[k] for r in rows[:16]]) for k in ("ids", "length")})
  _, roll_key, update_key = step.rng_fn(state.actor.rng)
  rollout = step.rollout_fn(state.actor.params, step.models.frozen, batch["ids"], batch["length"],
                            step.train_sp, roll_key)
  # The random policy rarely emits the end of turn in 8 tokens; which rows "ended" (NeMo's
  # is_end) and how long they are is set here, as a policy that stops would make them.
  lengths = np.array([1, 8, 3, 8, 5, 8, 2, 8, 8, 6, 8, 4, 8, 7, 8, 8], np.int32)
  stopped = lengths < 8
  stopped[[1, 5]] = True                      # full-length rows that ended on the last token
  mask = np.arange(8)[None, :] < lengths[:, None]
  host = jax.device_get(rollout)
  rollout = jax.tree_util.tree_map(step.put, host._replace(
      mask=mask, lengths=lengths, stopped=stopped, logp=np.where(mask, host.logp, 0.0),
      valid=np.concatenate([host.valid[:, :cfg.max_prompt_len], mask], axis=1)))
  beta = step.put_replicated(np.float32(cfg.ppo.init_kl_coef))
  exp, _ = step.score_fn(state.actor.params, state.critic.params, step.models.frozen,
                         step.models.ref_params, step.models.reward_params, rollout, beta)
  _, _, stats = step.update_fn(state.actor, state.critic, exp, beta, update_key,
                               step.models.frozen)
  exp, stats = jax.device_get((exp, stats))
  r, m = exp.rollout, exp.rollout.mask
  assert 0 < r.stopped.sum() < len(r.stopped)
  want_actor = nemo_actor_loss(r.logp, r.logp, exp.advantages, m, r.stopped, 0.2)
  np.testing.assert_allclose(stats["policy_loss"][0, 0], want_actor, rtol=1e-4, atol=1e-6)
  want_critic = nemo_critic_loss(exp.values, exp.values, exp.returns, m, 0.2)
  np.testing.assert_allclose(stats["value_loss"][0, 0], want_critic, rtol=1e-4, atol=1e-6)


# ---- resume and sharding ---------------------------------------------------------------------

def test_grpo_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, sp_model_path,
                                                             prompt_files):
  kw = dict(rollout_batch_size=8, val_prompts="", save_every=1, **GROUP)
  cfg = make_cfg(sp_model_path, prompt_files, iterations=2, **kw)
  resumed = str(tmp_path / "resumed")
  ppo.run_ppo(cfg, resumed, reward_fn=reward(cfg))
  with ocp.CheckpointManager(os.path.join(resumed, "checkpoints")) as manager:
    data = manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  assert data["iteration"] == 2 and "kl_coef" in data
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(os.path.join(resumed, "checkpoints", "2", "state"))
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  assert set(tree["actor"]) >= {"params", "opt_state", "rng"} and not tree.get("critic")
  cfg = make_cfg(sp_model_path, prompt_files, iterations=4, **kw)
  report = ppo.run_ppo(cfg, resumed, reward_fn=reward(cfg))
  assert report["resumed_from"] == 2
  straight = str(tmp_path / "straight")
  ppo.run_ppo(cfg, straight, reward_fn=reward(cfg))
  assert train_metrics(resumed) == train_metrics(straight)


def test_grpo_sharded_iteration_matches_one_device(tmp_path, sp_model_path, prompt_files):
  runs = {}
  for mesh in ((1, 1, 1), (2, 2, 2)):
    cfg = make_cfg(sp_model_path, prompt_files, rollout_batch_size=8, val_prompts="", **GROUP)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    workdir = str(tmp_path / "x".join(map(str, mesh)))
    ppo.run_ppo(cfg, workdir, reward_fn=reward(cfg))
    runs[mesh] = train_metrics(workdir)[0]
  got, want = runs[(2, 2, 2)], runs[(1, 1, 1)]
  assert set(got) == set(want)
  worker.assert_metrics_close(got, want, loose=COMPOUNDING)


def test_group_estimators_need_two_samples_per_prompt(tmp_path, sp_model_path, prompt_files):
  from cai_jax.preflight import PreflightError
  cfg = make_cfg(sp_model_path, prompt_files, **{"ppo.advantage": "rloo"})
  with pytest.raises(PreflightError, match="samples_per_prompt=1.*at least 2"):
    ppo.run_ppo(cfg, str(tmp_path / "w"), reward_fn=reward(cfg))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_grpo_two_processes_match_one_device(tmp_path, sp_model_path, prompt_files):
  """Two `jax.distributed` processes on loopback (2 devices each, mesh 1x2x2) == one device."""
  import loopback
  cfg = make_cfg(sp_model_path, prompt_files, val_prompts="", **{
      "ppo.advantage": "grpo", "ppo.samples_per_prompt": 2})
  single = str(tmp_path / "single")
  ppo.run_ppo(cfg, single, reward_fn=reward(cfg))
  shared = str(tmp_path / "shared")
  loopback.run_workers(worker.__file__, [
      f"--workdir={shared}", f"--tokenizer={sp_model_path}", f"--train_prompts={prompt_files[0]}",
      "--advantage=grpo", "--samples_per_prompt=2"])
  (got,), (want,) = train_metrics(shared), train_metrics(single)
  assert set(got) == set(want) and "value_loss" not in got
  worker.assert_metrics_close(got, want, loose=COMPOUNDING)


# ---- learning ------------------------------------------------------------------------------

# 16 prompts x 4 samples = the 64 responses PPO's learning test uses per iteration. Seed 0
# measured 0.30 -> 0.54 (GRPO) and -> 0.59 (RLOO) in 20 iterations, KL 1.6 / 2.2 nats per
# response; a no-op or a sign error gains nothing, noise ~0.03.
GAIN = {"grpo": 0.15, "rloo": 0.15}
LEARN = dict(iterations=20, rollout_batch_size=16, eval_every=0, save_every=0, sample_every=0,
             eval_greedy=False, **{"ppo.samples_per_prompt": 4})


@pytest.fixture(scope="module")
def learned(tmp_path_factory, sp_model_path, prompt_files):
  out = {}
  for method in ("grpo", "rloo"):
    cfg = make_cfg(sp_model_path, prompt_files, **LEARN, **{"ppo.advantage": method})
    workdir = str(tmp_path_factory.mktemp(f"learn_{method}"))
    out[method] = ppo.run_ppo(cfg, workdir, reward_fn=reward(cfg))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_estimators_raise_held_out_reward_with_bounded_kl(method, learned):
  report = learned[method]
  before, after = report["first_eval"], report["final_eval"]
  # The random policy scores ~0.3 (noise of the mean over 31 held-out prompts ~0.03); the
  # same fixed evaluation key every time, so an unchanged policy scores exactly the same.
  assert after["eval_score_mean"] - before["eval_score_mean"] > GAIN[method], (before, after)
  assert after["eval_kl_per_sequence"] < 10.0, after


@pytest.mark.slow
def test_large_kl_coefficient_keeps_grpo_at_the_reference(tmp_path, sp_model_path, prompt_files,
                                                          learned):
  cfg = make_cfg(sp_model_path, prompt_files, **LEARN,
                 **{"ppo.advantage": "grpo", "ppo.init_kl_coef": 5.0})
  report = ppo.run_ppo(cfg, str(tmp_path), reward_fn=reward(cfg))
  before, after = report["first_eval"], report["final_eval"]
  assert abs(after["eval_score_mean"] - before["eval_score_mean"]) < 0.06, (before, after)
  # A third of the KL the same run reaches at the preset's coefficient. Measured 2026-12-01:
  # 0.40 vs 1.56 nats (26%); the bound was a quarter until the projections' rewrite as 2-D
  # matmuls changed float rounding, and so the sampled trajectories, to just above it.
  assert after["eval_kl_per_sequence"] < learned["grpo"]["final_eval"][
      "eval_kl_per_sequence"] / 3
