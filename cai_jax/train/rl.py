"""RL maths: KL estimators, per-token rewards, advantage estimators (GAE, GRPO, RLOO,
REINFORCE++), whitening, loss aggregation, clipped losses.

Pure functions on [B, T] (batch-major) arrays with a validity mask; the reverse scans run
time-major inside. Group estimators see the rows of one prompt's G samples next to each
other (row i * G + g). Kept apart from the stage runner so tests can check each formula
against a plain NumPy/Python version.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


KL_ESTIMATORS = ("k1", "abs", "k2", "k3")
ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "abs") -> jax.Array:
  """Per-token KL(actor || ref) estimate from sampled tokens' log-probs.

  With log r = log p_actor - log p_ref at the actor's sample: k1: log r; abs: |log r|
  (NeMo-Aligner's default); k2: (log r)^2 / 2 (its gradient is k1's score-function
  gradient); k3: 1/r - 1 + log r (Schulman's unbiased, non-negative estimator, GRPO's).
  """
  log_ratio = logp - ref_logp
  if estimator == "k1":
    return log_ratio
  if estimator == "abs":
    return jnp.abs(log_ratio)
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def token_rewards(score: jax.Array, kl: jax.Array, mask: jax.Array, beta) -> jax.Array:
  """`-beta * KL_t` on every valid token plus the sequence score on the last valid one.

  "Last valid" is found from the mask itself (not from its sum), so a mask with
  holes still gets the score at its final valid step; a row with no valid
  token gets none.
  """
  mask = mask.astype(bool)
  T = mask.shape[1]
  rewards = jnp.where(mask, -beta * kl, 0.0)
  last = (T - 1) - jnp.argmax(mask[:, ::-1], axis=1)
  has_any = mask.any(axis=1)
  bonus = jax.nn.one_hot(last, T, dtype=rewards.dtype) * jnp.where(has_any, score, 0.0)[:, None]
  return rewards + bonus


def gae_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
                   lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation as a reverse `lax.scan` over time.

  Inputs are [B, T]. A masked step carries the running advantage and the next
  value through unchanged, so trailing padding, no padding and holes in the
  middle are all handled by one rule. The value after the last valid token is
  0 (the response is the whole episode). Returns (advantages, returns), zero
  on masked steps.
  """
  mask = mask.astype(bool)
  xs = (rewards.T, values.T, mask.T)                       # time-major [T, B]

  def step(carry, x):
    next_adv, next_value = carry
    r, v, m = x
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    carry = (jnp.where(m, adv, next_adv), jnp.where(m, v, next_value))
    return carry, jnp.where(m, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[0], rewards.dtype)
  _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
  adv = adv.T
  returns = jnp.where(mask, adv + values, 0.0)
  return adv, returns


def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma: float) -> jax.Array:
  """G_t = r_t + gamma * G_{t+1} over valid steps (a masked step carries G through), 0 after
  the last valid token; zero on masked steps. [B, T] -> [B, T]."""
  mask = mask.astype(bool)

  def step(next_return, x):
    r, m = x
    g = r + gamma * next_return
    return jnp.where(m, g, next_return), jnp.where(m, g, 0.0)

  _, returns = jax.lax.scan(step, jnp.zeros(rewards.shape[0], rewards.dtype),
                            (rewards.T, mask.T), reverse=True)
  return returns.T


def group_advantages(scores: jax.Array, group_size: int, method: str, *,
                     std_normalize: bool = True, eps: float = 1e-4) -> jax.Array:
  """One advantage per response [B*G] from the scores of each prompt's G responses.

  grpo: (s - group mean) / (group std + eps), the std with Bessel's correction as
  GRPO's reference implementations take it; `std_normalize=False` keeps s - mean
  (Dr. GRPO). rloo: s minus the mean of the group's other G - 1 scores.
  """
  s = scores.reshape(-1, group_size)
  if method == "grpo":
    centred = s - s.mean(axis=1, keepdims=True)
    if std_normalize:
      centred = centred / (jnp.std(s, axis=1, keepdims=True, ddof=1) + eps)
    return centred.reshape(-1)
  if method == "rloo":
    baseline = (s.sum(axis=1, keepdims=True) - s) / (group_size - 1)
    return (s - baseline).reshape(-1)
  raise ValueError(f"group advantage method must be grpo or rloo, got {method!r}")


class Denominators(NamedTuple):
  """What a batch's reductions divide by, fixed before the batch is split into micro-batches:
  a micro-batch's share (its sum over these) of every loss and statistic then adds up over
  the micro-batches to the whole batch's value."""
  agg: jax.Array      # `aggregate`'s: valid tokens (at least 1) for token_mean, else rows
  tokens: jax.Array   # `masked_mean`'s: valid tokens, at least 1


def denominators(mask: jax.Array, how: str = "token_mean") -> Denominators:
  """The `Denominators` of a batch's mask [B, T] under the aggregation `how`."""
  mask = mask.astype(bool)
  tokens = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
  if how == "token_mean":
    return Denominators(tokens, tokens)
  if how in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
    return Denominators(jnp.asarray(mask.shape[0], jnp.float32), tokens)
  raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {how!r}")


def aggregate(x: jax.Array, mask: jax.Array, how: str = "token_mean",
              den: Denominators | None = None) -> jax.Array:
  """A per-token loss [B, T] reduced to a scalar over the valid tokens.

  token_mean: sum / number of valid tokens in the batch. seq_mean_token_mean: each row's
  token mean, averaged over the B rows (a row with no valid token counts 0), which is what
  NeMo-Aligner's per-micro-batch mean gives with its default micro-batch of one sequence.
  seq_mean_token_sum_norm: each row's token sum divided by T, averaged over rows (Dr. GRPO:
  no length bias from a per-row normaliser).

  `den` (default: these rows' own, `denominators`) makes it a micro-batch's share of a larger
  batch: the row sums divided by that batch's denominator.
  """
  mask = mask.astype(bool)
  x = jnp.where(mask, x, 0.0)
  den = denominators(mask, how) if den is None else den
  if how == "token_mean":
    total = x.sum()
  elif how == "seq_mean_token_mean":
    total = (x.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1).astype(x.dtype)).sum()
  elif how == "seq_mean_token_sum_norm":
    total = (x.sum(axis=1) / x.shape[1]).sum()
  else:
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {how!r}")
  return total / den.agg.astype(x.dtype)


def estimate_advantages(method: str, *, score: jax.Array, kl: jax.Array, values: jax.Array,
                        mask: jax.Array, beta, gamma: float, lam: float, group_size: int = 1,
                        whiten: bool = True, std_normalize: bool = True):
  """(raw advantages, advantages the loss uses, returns), each [B, T] and zero off `mask`.

  The reward is the sequence `score` [B] minus `beta` x the per-token KL estimate `kl` (pass
  beta = 0 when the KL goes into the loss instead). gae: per-token rewards, GAE against the
  critic's `values`, whitened over the batch if `whiten`. reinforce_pp (REINFORCE++): the
  same per-token rewards, discounted returns, always whitened over every valid token of the
  batch; no critic. grpo / rloo: the sequence reward score - beta * sum_t KL_t, a group
  baseline over each prompt's `group_size` responses (`group_advantages`), the same
  advantage on every token of a response; no critic.
  """
  mask = mask.astype(bool)
  if method in ("gae", "reinforce_pp"):
    rewards = token_rewards(score, kl, mask, beta)
    if method == "gae":
      raw, returns = gae_advantages(rewards, values, mask, gamma, lam)
      return raw, (masked_whiten(raw, mask) if whiten else raw), returns
    raw = discounted_returns(rewards, mask, gamma)
    return raw, masked_whiten(raw, mask), raw
  if method in ("grpo", "rloo"):
    sequence_reward = score - beta * jnp.sum(jnp.where(mask, kl, 0.0), axis=1)
    per_row = group_advantages(sequence_reward, group_size, method, std_normalize=std_normalize)
    raw = jnp.where(mask, per_row[:, None], 0.0)
    return raw, raw, jnp.where(mask, sequence_reward[:, None], 0.0)
  raise ValueError(f"advantage estimator must be one of {ADVANTAGES}, got {method!r}")


def masked_mean(x: jax.Array, mask: jax.Array, tokens: jax.Array | None = None) -> jax.Array:
  """Mean over valid entries; whatever sits under the mask (even NaN/Inf) is ignored.
  `tokens` (default: the valid entries here, at least 1): divide by a larger batch's count
  instead, for a micro-batch's share of it."""
  mask = mask.astype(bool)
  tokens = jnp.maximum(mask.sum(), 1) if tokens is None else tokens
  return jnp.where(mask, x, 0).sum() / tokens.astype(x.dtype)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over valid entries. Inside jit on sharded arrays the
  reductions are global, so the statistics span every device."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  return jnp.where(mask, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_eps: float, agg: str = "token_mean", den: Denominators | None = None):
  """Clipped surrogate max(-A r, -A clip(r, 1-eps, 1+eps)) per token, reduced by `agg`
  (`aggregate`); the statistics are token means. `den`: a larger batch's `Denominators`
  (the loss and statistics are then this micro-batch's shares of that batch's)."""
  tokens = None if den is None else den.tokens
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = aggregate(jnp.maximum(unclipped, clipped), mask, agg, den)
  stats = {
      "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask, tokens),
      "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask, tokens),
      "ratio_mean": masked_mean(ratio, mask, tokens),
  }
  return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float, agg: str = "token_mean", den: Denominators | None = None):
  """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped = v_old + clip(v - v_old, -c, c),
  reduced by `agg`; `den` as in `policy_loss`."""
  v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  loss = 0.5 * aggregate(jnp.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask,
                         agg, den)
  frac = masked_mean((jnp.abs(values - old_values) > clip).astype(jnp.float32), mask,
                     None if den is None else den.tokens)
  return loss, {"value_clip_fraction": frac}


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
  resid = returns - values
  var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
  return 1.0 - var_e / jnp.maximum(var_r, 1e-8)


def adaptive_kl_coef(beta: float, observed_kl: float, target: float, horizon: int,
                     n_steps: int) -> float:
  """Ziegler et al.'s proportional controller: beta *= 1 + clip(kl/target - 1, +-0.2) n/horizon."""
  error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
  return beta * (1.0 + error * n_steps / horizon)


class KLController:
  """beta of the KL penalty between iterations: fixed, or moved by `adaptive_kl_coef`.

  Host-side state of a PPO run: the training loop checkpoints it (`state()` /
  `restore()`), so a resumed run continues with the beta the killed run had reached.
  """

  def __init__(self, init: float, *, adaptive: bool = False, target: float = 6.0,
               horizon: int = 10000):
    self.value = float(init)
    self.adaptive, self.target, self.horizon = adaptive, target, horizon

  def update(self, observed_kl: float, n_steps: int) -> None:
    if self.adaptive:
      self.value = adaptive_kl_coef(self.value, observed_kl, self.target, self.horizon, n_steps)

  def state(self) -> float:
    return self.value

  def restore(self, saved: float) -> None:
    self.value = float(saved)
