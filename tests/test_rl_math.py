"""PPO maths (`cai_jax/train/rl.py`) against plain Python / NumPy versions of the formulas.

Each reference below is written to be checked by eye against the papers
(GAE: Schulman et al. 2015; clipped surrogate: Schulman et al. 2017; KL
estimators: Schulman's "Approximating KL divergence" note), not for speed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cai_jax.train import rl

B, T = 6, 13


# ---- references -----------------------------------------------------------------

def gae_loop(rewards, values, mask, gamma, lam):
  """Per row, walk backwards over the valid steps only; masked steps are skipped,
  so the value after the last valid step is 0 and holes are stepped over."""
  adv = np.zeros_like(rewards, dtype=np.float64)
  for b in range(rewards.shape[0]):
    next_value, next_adv = 0.0, 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[b, t]:
        continue
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      next_adv = delta + gamma * lam * next_adv
      next_value = float(values[b, t])
      adv[b, t] = next_adv
  return adv


def policy_loss_np(logp, old_logp, adv, mask, eps):
  ratio = np.exp(logp - old_logp)
  unclipped = -adv * ratio
  clipped = -adv * np.clip(ratio, 1 - eps, 1 + eps)
  m = mask.astype(np.float64)
  loss = (np.maximum(unclipped, clipped) * m).sum() / m.sum()
  clip_fraction = ((clipped > unclipped) * m).sum() / m.sum()
  return loss, clip_fraction


def value_loss_np(values, old_values, returns, mask, clip):
  v_clipped = old_values + np.clip(values - old_values, -clip, clip)
  m = mask.astype(np.float64)
  per_token = 0.5 * np.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
  return (per_token * m).sum() / m.sum()


def masks():
  rng = np.random.default_rng(0)
  lengths = np.array([0, 1, 5, T - 1, T, 7])
  trailing = np.arange(T)[None, :] < lengths[:, None]   # right padding, incl. empty and full rows
  none = np.ones((B, T), bool)
  arbitrary = rng.random((B, T)) < 0.6                   # holes anywhere
  arbitrary[0] = False                                   # a row with nothing valid
  arbitrary[1, :] = True
  return {"trailing": trailing, "none": none, "arbitrary": arbitrary}


# ---- GAE ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", ["trailing", "none", "arbitrary"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_python_loop(mask_kind, gamma, lam):
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(B, T)).astype(np.float32)
  values = rng.normal(size=(B, T)).astype(np.float32)
  mask = masks()[mask_kind]
  adv, returns = jax.jit(rl.gae_advantages, static_argnums=(3, 4))(
      rewards, values, mask, gamma, lam)
  expected = gae_loop(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-6, rtol=0)
  # Returns are the critic's targets: advantage + value on valid steps, 0 elsewhere.
  np.testing.assert_allclose(np.asarray(returns), np.where(mask, expected + values, 0.0),
                             atol=1e-6, rtol=0)
  assert np.all(np.asarray(adv)[~mask] == 0)


def test_gae_garbage_in_masked_steps_is_ignored():
  """Whatever sits under the mask (padding rewards/values) must not leak in."""
  rng = np.random.default_rng(2)
  mask = masks()["arbitrary"]
  rewards = rng.normal(size=(B, T)).astype(np.float32)
  values = rng.normal(size=(B, T)).astype(np.float32)
  noisy_r = np.where(mask, rewards, 1e6).astype(np.float32)
  noisy_v = np.where(mask, values, -1e6).astype(np.float32)
  a1, r1 = rl.gae_advantages(rewards, values, mask, 1.0, 0.95)
  a2, r2 = rl.gae_advantages(noisy_r, noisy_v, mask, 1.0, 0.95)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  np.testing.assert_array_equal(np.asarray(r1), np.asarray(r2))


def test_gae_single_terminal_reward_gamma_lambda_one():
  """gamma = lambda = 1: advantage = (sum of future rewards) - V(s_t) exactly."""
  rewards = np.zeros((1, 5), np.float32)
  rewards[0, 3] = 2.0
  values = np.array([[0.5, -1.0, 0.25, 1.0, 7.0]], np.float32)
  mask = np.array([[True, True, True, True, False]])
  adv, _ = rl.gae_advantages(rewards, values, mask, 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv), [[1.5, 3.0, 1.75, 1.0, 0.0]], atol=1e-6)


# ---- policy and value losses ----------------------------------------------------------

EPS = 0.2
# ratio x advantage sign: every branch of the clipped objective.
RATIOS = np.array([0.5, 0.79, 0.9, 1.0, 1.1, 1.21, 1.5, 2.0], np.float32)


def _grid():
  ratios = np.concatenate([RATIOS, RATIOS])
  adv = np.concatenate([np.full(len(RATIOS), 1.5), np.full(len(RATIOS), -0.7)]).astype(np.float32)
  old_logp = np.linspace(-3.0, -0.5, len(ratios)).astype(np.float32)
  logp = old_logp + np.log(ratios).astype(np.float32)
  return logp[None], old_logp[None], adv[None]


def test_policy_loss_matches_numpy_on_every_clip_branch():
  logp, old_logp, adv = _grid()
  mask = np.ones_like(logp, bool)
  mask[0, 3] = False   # a masked entry must not count
  loss, stats = rl.policy_loss(logp, old_logp, adv, mask, EPS)
  ref_loss, ref_frac = policy_loss_np(logp.astype(np.float64), old_logp.astype(np.float64),
                                      adv.astype(np.float64), mask, EPS)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(stats["clip_fraction"]), ref_frac, atol=1e-7)
  ratio = np.exp(logp - old_logp)
  np.testing.assert_allclose(float(stats["ratio_mean"]), ratio[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["approx_kl"]),
                             ((ratio - 1) - np.log(ratio))[mask].mean(), rtol=1e-5, atol=1e-8)
  # Clipped exactly where the ratio left [1-eps, 1+eps] in the advantage's direction:
  # A > 0 and r > 1.2, or A < 0 and r < 0.8.
  a, r = adv[0], ratio[0]
  clipped = ((a > 0) & (r > 1 + EPS)) | ((a < 0) & (r < 1 - EPS))
  assert clipped.sum() == 5   # r in {1.21, 1.5, 2} with A > 0; {0.5, 0.79} with A < 0
  np.testing.assert_allclose(ref_frac, (clipped & mask[0]).sum() / mask.sum())


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
  """The clip's point: no gradient pushes a token further once its ratio is out of range
  in the advantage's direction; everywhere else the gradient is -A r / n."""
  logp, old_logp, adv = _grid()
  mask = np.ones_like(logp, bool)
  grad = jax.grad(lambda lp: rl.policy_loss(lp, old_logp, adv, mask, EPS)[0])(logp)
  r = np.exp(logp - old_logp)[0]
  a = adv[0]
  clipped = ((a > 0) & (r > 1 + EPS)) | ((a < 0) & (r < 1 - EPS))
  expected = np.where(clipped, 0.0, -a * r / mask.sum())
  np.testing.assert_allclose(np.asarray(grad)[0], expected, rtol=1e-5, atol=1e-7)


def test_value_loss_matches_numpy_on_every_clip_branch():
  clip = 0.2
  old = np.zeros((1, 8), np.float32)
  # new values inside and beyond +-clip, returns on either side, so that the
  # clipped term is the larger (used) one in some entries and the smaller in others.
  values = np.array([[0.1, 0.5, -0.5, 0.5, -0.5, 0.15, 1.0, -1.0]], np.float32)
  returns = np.array([[0.3, 1.0, -1.0, 0.0, 0.0, -0.4, 0.1, -0.1]], np.float32)
  mask = np.ones_like(values, bool)
  loss, stats = rl.value_loss(values, old, returns, mask, clip)
  np.testing.assert_allclose(float(loss), value_loss_np(values, old, returns, mask, clip),
                             rtol=1e-6)
  np.testing.assert_allclose(float(stats["value_clip_fraction"]), 6 / 8)   # |v - v_old| > clip
  # Which term wins, per entry: (v - R)^2 vs (v_clip - R)^2.
  v_clip = np.clip(values, -clip, clip)
  uses_clipped = (v_clip - returns) ** 2 > (values - returns) ** 2
  assert uses_clipped.any() and (~uses_clipped & (np.abs(values) > clip)).any()
  # Gradient: zero wherever the clipped term is used and the value was clipped.
  grad = jax.grad(lambda v: rl.value_loss(v, old, returns, mask, clip)[0])(values)
  dead = uses_clipped & (np.abs(values) > clip)
  expected = np.where(dead, 0.0, (values - returns) / values.size)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


def test_value_loss_ignores_masked_entries():
  rng = np.random.default_rng(3)
  v, o, r = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
  mask = masks()["arbitrary"]
  loss, _ = rl.value_loss(v, o, r, mask, 0.2)
  np.testing.assert_allclose(float(loss), value_loss_np(v, o, r, mask, 0.2), rtol=1e-5)


# ---- KL estimators and per-token rewards -------------------------------------------------

def test_kl_estimators():
  rng = np.random.default_rng(4)
  logp = rng.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
  ref = rng.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
  lr = logp.astype(np.float64) - ref
  np.testing.assert_allclose(np.asarray(rl.kl_penalty(logp, ref, "k1")), lr, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rl.kl_penalty(logp, ref, "abs")), np.abs(lr), atol=1e-6)
  r = np.exp(ref - logp.astype(np.float64))          # p_ref / p_actor at the actor's sample
  k3 = np.asarray(rl.kl_penalty(logp, ref, "k3"))
  np.testing.assert_allclose(k3, (r - 1) - np.log(r), rtol=1e-5, atol=1e-6)
  assert np.all(k3 >= 0)
  np.testing.assert_allclose(np.asarray(rl.kl_penalty(logp, ref, "k2")), 0.5 * lr ** 2,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="k1, abs, k2, k3|kl estimator"):
    rl.kl_penalty(logp, ref, "k4")


def test_k3_is_unbiased_for_the_true_kl():
  """Sampling from p, E[k1] = E[k3] = KL(p || q); k3 has lower variance."""
  rng = np.random.default_rng(5)
  logits_p, logits_q = rng.normal(size=7), rng.normal(size=7)
  p = np.exp(logits_p) / np.exp(logits_p).sum()
  q = np.exp(logits_q) / np.exp(logits_q).sum()
  kl = float((p * np.log(p / q)).sum())
  x = rng.choice(7, size=200_000, p=p)
  logp, logq = np.log(p[x]).astype(np.float32), np.log(q[x]).astype(np.float32)
  k1 = np.asarray(rl.kl_penalty(logp, logq, "k1"))
  k3 = np.asarray(rl.kl_penalty(logp, logq, "k3"))
  assert abs(k1.mean() - kl) < 0.01 and abs(k3.mean() - kl) < 0.01
  assert k3.std() < k1.std()


@pytest.mark.parametrize("mask_kind", ["trailing", "none", "arbitrary"])
def test_token_rewards_score_on_last_valid_token_only(mask_kind):
  rng = np.random.default_rng(6)
  mask = masks()[mask_kind]
  kl = rng.random((B, T)).astype(np.float32)
  score = rng.normal(size=B).astype(np.float32)
  beta = 0.05
  out = np.asarray(rl.token_rewards(score, kl, mask, beta))
  expected = np.where(mask, -beta * kl, 0.0)
  for b in range(B):
    valid = np.flatnonzero(mask[b])
    if len(valid):
      expected[b, valid[-1]] += score[b]
  np.testing.assert_allclose(out, expected, atol=1e-6)
  # The score appears once per row that has a response, and nowhere else.
  np.testing.assert_allclose((out - np.where(mask, -beta * kl, 0.0)).sum(-1),
                             np.where(mask.any(-1), score, 0.0), atol=1e-6)


# ---- whitening, explained variance, adaptive KL ------------------------------------------

def test_masked_whiten_uses_valid_tokens_only():
  rng = np.random.default_rng(7)
  mask = masks()["arbitrary"]
  x = rng.normal(3.0, 2.0, size=(B, T)).astype(np.float32)
  x_noisy = np.where(mask, x, np.nan).astype(np.float32)   # padding garbage, even NaN
  w = np.asarray(rl.masked_whiten(x_noisy, mask))
  valid = x[mask].astype(np.float64)
  np.testing.assert_allclose(w[mask], (valid - valid.mean()) / valid.std(), rtol=1e-4, atol=1e-5)
  assert np.all(w[~mask] == 0)


def test_explained_variance():
  rng = np.random.default_rng(8)
  mask = masks()["arbitrary"]
  returns = rng.normal(size=(B, T)).astype(np.float32)
  values = (returns + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
  r, v = returns[mask].astype(np.float64), values[mask].astype(np.float64)
  expected = 1 - np.var(r - v) / np.var(r)
  np.testing.assert_allclose(float(rl.explained_variance(values, returns, mask)), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(float(rl.explained_variance(returns, returns, mask)), 1.0)


def test_adaptive_kl_coef_is_a_clipped_proportional_controller():
  # Too much KL: beta grows, at most by 20% x n / horizon.
  assert rl.adaptive_kl_coef(0.1, 12.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
  assert rl.adaptive_kl_coef(0.1, 6.6, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
  # Too little: beta shrinks.
  assert rl.adaptive_kl_coef(0.1, 0.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
  assert rl.adaptive_kl_coef(0.1, 6.0, 6.0, 100, 10) == pytest.approx(0.1)


# ---- critic-free estimators and loss aggregation (#17) -----------------------------------

def group_np(scores, G, method, std_normalize=True, eps=1e-4):
  out = np.zeros_like(scores, dtype=np.float64)
  for start in range(0, len(scores), G):
    s = scores[start:start + G].astype(np.float64)
    for g in range(G):
      if method == "grpo":
        a = s[g] - s.mean()
        out[start + g] = a / (np.std(s, ddof=1) + eps) if std_normalize else a
      else:                                          # rloo: the other G - 1 as the baseline
        out[start + g] = s[g] - np.delete(s, g).mean()
  return out


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("method,std", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_group_advantages_match_numpy(G, method, std):
  scores = np.random.default_rng(G).normal(size=(5 * G,)).astype(np.float32)
  scores[:G] = 0.25                                  # a group of equal scores: no signal, no NaN
  got = np.asarray(rl.group_advantages(scores, G, method, std_normalize=std))
  np.testing.assert_allclose(got, group_np(scores, G, method, std), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[:G], 0.0, atol=1e-6)
  # Each group's advantages sum to zero for both baselines (RLOO's is G/(G-1) x GRPO's).
  np.testing.assert_allclose(got.reshape(-1, G).sum(axis=1), 0.0, atol=1e-4)


def returns_np(rewards, mask, gamma):
  out = np.zeros_like(rewards, dtype=np.float64)
  for b in range(rewards.shape[0]):
    g = 0.0
    for t in reversed(range(rewards.shape[1])):
      if mask[b, t]:
        g = float(rewards[b, t]) + gamma * g
        out[b, t] = g
  return out


@pytest.mark.parametrize("mask_kind", ["trailing", "none", "arbitrary"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_with_masks_and_different_lengths(mask_kind, gamma):
  """REINFORCE++: per-token -beta * KL plus the score at the last token, discounted returns,
  whitened over every valid token of the batch."""
  rng = np.random.default_rng(7)
  mask = masks()[mask_kind]
  kl = rng.normal(size=(B, T)).astype(np.float32)
  score = rng.normal(size=(B,)).astype(np.float32)
  rewards = np.asarray(rl.token_rewards(score, kl, mask, 0.1))
  got = np.asarray(rl.discounted_returns(rewards, mask, gamma))
  want = returns_np(rewards, mask, gamma)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  white = np.asarray(rl.masked_whiten(got, mask))
  valid = want[mask]
  np.testing.assert_allclose(white[mask], (valid - valid.mean()) / np.sqrt(valid.var() + 1e-8),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_kind", ["trailing", "none", "arbitrary"])
def test_loss_aggregations_equal_their_formulas(mask_kind):
  mask = masks()[mask_kind]
  x = np.random.default_rng(3).normal(size=(B, T))
  m = mask.astype(np.float64)
  rows = (x * m).sum(1)
  want = {"token_mean": rows.sum() / m.sum(),
          "seq_mean_token_mean": np.mean(rows / np.maximum(m.sum(1), 1)),
          "seq_mean_token_sum_norm": np.mean(rows / T)}
  for how, value in want.items():
    np.testing.assert_allclose(float(rl.aggregate(x, mask, how)), value, rtol=1e-6, err_msg=how)
  with pytest.raises(ValueError, match="loss aggregation"):
    rl.aggregate(x, mask, "sum")


def nemo_actor_loss(logp, old_logp, adv, mask, is_end, eps):
  """NeMo-Aligner's actor loss (megatron_gpt_ppo_actor.py loss_func) with its default
  micro-batch of one sequence: a token mean over mask * is_end per sequence (0 for a
  sequence that never ended: its micro-batch is skipped), averaged over micro-batches."""
  per_seq = []
  for i in range(logp.shape[0]):
    m = mask[i] * is_end[i]
    ratio = np.exp(logp[i] - old_logp[i])
    loss = np.maximum(-adv[i] * ratio, -adv[i] * np.clip(ratio, 1 - eps, 1 + eps))
    per_seq.append((loss * m).sum() / m.sum() if m.sum() > 0 else 0.0)
  return np.mean(per_seq)


def nemo_critic_loss(values, old_values, returns, mask, clip):
  """NeMo-Aligner's critic loss (megatron_gpt_critic.py loss_func), micro-batch of one: 0.5 x
  the token mean over the response mask (no is_end) of the larger squared error."""
  per_seq = []
  for i in range(values.shape[0]):
    v_clipped = old_values[i] + np.clip(values[i] - old_values[i], -clip, clip)
    err = np.maximum((v_clipped - returns[i]) ** 2, (values[i] - returns[i]) ** 2)
    per_seq.append(0.5 * (err * mask[i]).sum() / mask[i].sum())
  return np.mean(per_seq)


def test_nemo_exact_setting_gives_nemo_aligners_actor_and_critic_losses():
  """unfinished=mask + loss_agg=seq_mean_token_mean == NeMo-Aligner's losses on random inputs
  with unfinished responses of different lengths."""
  rng = np.random.default_rng(11)
  lengths = np.array([1, 4, T, 7, T, 2])
  mask = np.arange(T)[None, :] < lengths[:, None]
  is_end = np.array([True, False, True, True, False, True])
  logp = rng.normal(-2, 0.5, (B, T))
  old = logp + rng.normal(0, 0.3, (B, T))
  adv = rng.normal(size=(B, T))
  got, _ = rl.policy_loss(logp, old, adv, mask & is_end[:, None], 0.2, "seq_mean_token_mean")
  np.testing.assert_allclose(float(got), nemo_actor_loss(logp, old, adv, mask, is_end, 0.2),
                             rtol=1e-6)
  values, old_values, returns = (rng.normal(size=(B, T)) for _ in range(3))
  got, _ = rl.value_loss(values, old_values, returns, mask, 0.2, "seq_mean_token_mean")
  np.testing.assert_allclose(float(got), nemo_critic_loss(values, old_values, returns, mask, 0.2),
                             rtol=1e-6)
  # The batch's token mean weighs long responses more: a different number.
  token_mean, _ = rl.policy_loss(logp, old, adv, mask & is_end[:, None], 0.2)
  assert abs(float(token_mean) - nemo_actor_loss(logp, old, adv, mask, is_end, 0.2)) > 1e-3
