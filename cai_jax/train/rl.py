"""PPO maths: KL estimators, per-token rewards, GAE, whitening, clipped losses.

Pure functions on [B, T] (batch-major) arrays with a validity mask; GAE runs
time-major inside. Kept apart from the stage runner so tests can check each
formula against a plain NumPy/Python version.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "abs") -> jax.Array:
  """Per-token KL(actor || ref) estimate from sampled tokens' log-probs.

  k1: log r;  abs: |log r| (NeMo-Aligner's default);  k3: (r - 1) - log r with
  r = p_ref / p_actor evaluated at the actor's sample (Schulman's unbiased,
  non-negative estimator).
  """
  log_ratio = logp - ref_logp
  if estimator == "k1":
    return log_ratio
  if estimator == "abs":
    return jnp.abs(log_ratio)
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"kl estimator must be k1, abs or k3, got {estimator!r}")


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


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over valid entries; whatever sits under the mask (even NaN/Inf) is ignored."""
  mask = mask.astype(bool)
  return jnp.where(mask, x, 0).sum() / jnp.maximum(mask.sum(), 1).astype(x.dtype)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over valid entries. Inside jit on sharded arrays the
  reductions are global, so the statistics span every device."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  return jnp.where(mask, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_eps: float):
  """Clipped surrogate: mean over valid tokens of max(-A r, -A clip(r, 1-eps, 1+eps))."""
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  stats = {
      "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
      "ratio_mean": masked_mean(ratio, mask),
  }
  return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float):
  """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped = v_old + clip(v - v_old, -c, c)."""
  v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  loss = 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
  frac = masked_mean((jnp.abs(values - old_values) > clip).astype(jnp.float32), mask)
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
