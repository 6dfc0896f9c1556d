"""The RL stage: PPO with GAE (actor, critic, reference and reward model in one SPMD
program), or a critic-free estimator (GRPO, RLOO, REINFORCE++: three models), per
`ppo.advantage`.

NeMo-Aligner runs PPO as an actor job plus a critic/RM server talking HTTP;
here the models share one mesh and each iteration is three compiled functions:

  rollout(actor, frozen, prompts, key)             -> responses, their log-probs (KV cache)
  score(actor, critic, frozen, ref, rm, rollout, beta)
                                                    -> rewards, values, advantages, metrics
  update(actor_state, critic_state, exp, beta, key, frozen)
                                                    -> E epochs x M shuffled minibatches
                                                       (nested lax.scan)

`frozen` (`Frozen`) holds what LoRA keeps fixed: the actor's base, which with the adapters
off is also the reference (no reference copy), and the critic's body, the reward model's own
arrays (the critic is an adapter and a value head on it); {} under full fine-tuning.

Each phase can work through its rows in sequential pieces inside its program, NeMo-Aligner's
micro-batch knobs, all counted in responses per data-parallel replica (0 = all at once):
`ppo.rollout_micro_batch_size` (responses decoded together: one piece's KV cache at a time),
`ppo.forward_micro_batch_size` (rows per forward pass of score and evaluation: one piece's
activations and logits at a time) and `ppo.micro_batch_size` (rows per forward + backward
of the update; gradients summed over a minibatch's micro-batches, one optimizer step per
minibatch). The results are those of the whole batch: the same samples, the same scores to
float rounding, the same update (the losses divide by the whole minibatch's denominators).

The rollout's log-probs serve as the "old" policy log-probs (no extra actor
forward); a test checks they equal a fresh forward pass. In bfloat16, where
the sampler's cached decode and a full forward round differently, set
`ppo.recompute_logprobs` to take them from one more actor forward instead.
Sequences are laid out as [prompt left-padded to P | response of N slots], so
the response token t sits in column P + t for every row.

Randomness: one key lives in the actor's `TrainState.rng` (so it is saved with
every checkpoint) and is split each iteration into the next key, the rollout
key and the minibatch-shuffling key. A resumed run therefore draws exactly
the samples and minibatches the uninterrupted run would have.

The file reads top to bottom: the data of an iteration (`Rollout`, `Experience`,
`PPOState`), the forward passes over [prompt | response], the three phases (the
maths they call, GAE, the clipped losses and the KL estimators, is in `rl.py`), the
models and first state, the `Iteration` (the training loop's step), and `run_ppo`,
which runs it on `cai_jax.train.loop.run_training` like SFT and the reward model.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cai_jax import parallel, preflight, sampling, scoring
from cai_jax.compile_options import gradient_program_options
from cai_jax.data import batching, jsonl
from cai_jax.metrics import MetricsWriter
from cai_jax.model import Mistral, MistralConfig, dropout_rngs, lm_head_kernel, lora
from cai_jax.tokenizer import ChatTemplate, Tokenizer, get_template
from cai_jax.train import common, identity, rl
from cai_jax.train.checkpointing import Checkpointer
from cai_jax.train.lm import vocab_logprobs
from cai_jax.train.loop import (DivergenceGuard, LoopSettings, NonFiniteError,
                                check_workdir_writable, run_training)
from cai_jax.train.optim import make_optimizer
from cai_jax.train.state import TrainState, create_state, split_microbatches

# reward_fn(seq [B, S], valid [B, S], positions [B, S], last_col [B]) -> score [B].
# Traced inside the compiled scoring function, so it must be jittable. Tests
# inject synthetic rewards here; by default it is the frozen reward model.
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# Per-minibatch update statistics, returned by `update` with shape [epochs, minibatches].
# Plus the actor's and critic's param norms after the update (scalars), which the
# divergence guard watches.
UPDATE_STATS = ("policy_loss", "entropy", "clip_fraction", "approx_kl", "ratio_mean",
                "value_loss", "value_clip_fraction", "actor_grad_norm", "critic_grad_norm")


class Rollout(NamedTuple):
  seq: jax.Array          # i32 [B, P+N]
  valid: jax.Array        # bool [B, P+N]
  positions: jax.Array    # i32 [B, P+N]
  mask: jax.Array         # bool [B, N] response tokens (stop token included)
  logp: jax.Array         # f32 [B, N] behaviour log-probs (the "old" policy)
  lengths: jax.Array      # i32 [B]
  stopped: jax.Array      # bool [B]


class Experience(NamedTuple):
  rollout: Rollout
  ref_logp: jax.Array     # f32 [B, N]
  values: jax.Array       # f32 [B, N]
  advantages: jax.Array   # f32 [B, N] (whitened if configured)
  returns: jax.Array      # f32 [B, N]
  score: jax.Array        # f32 [B] reward-model score (after the no-stop penalty)
  kl: jax.Array           # f32 [B, N] per-token KL estimate


@flax.struct.dataclass
class PPOState:
  """The trained half of PPO, carried from iteration to iteration and checkpointed whole by
  the loop (beta, host-side, is the `Iteration`'s `kl` controller)."""
  actor: TrainState       # its rng is the run's key, split every iteration
  critic: TrainState | None   # None for the critic-free estimators (grpo, rloo, reinforce_pp)


# --- forward passes over [prompt | response] ------------------------------------

def response_logprobs(config: MistralConfig, params, r: Rollout, P: int, temperature: float,
                      with_entropy: bool = False, dropout_rng=None):
  """Log-probs [B, N] of the response tokens (and per-token entropies) at `temperature`.

  Column P+t-1 predicts response token t; the vocab head runs on those columns only,
  fused with the log-softmax (`vocab_logprobs`). `dropout_rng`: LoRA dropout in the update."""
  N = r.mask.shape[1]
  hidden = Mistral(config).apply({"params": params}, r.seq, positions=r.positions,
                                 attention_mask=r.valid, apply_head=False,
                                 rngs=dropout_rngs(config, dropout_rng)).hidden
  out = vocab_logprobs(hidden[:, P - 1:P + N - 1], lm_head_kernel(config, params), r.seq[:, P:],
                       temperature, with_entropy)
  logp = jnp.where(r.mask, out.logp, 0.0)
  if not with_entropy:
    return logp, None
  return logp, jnp.where(r.mask, out.entropy, 0.0)


def response_values(config: MistralConfig, params, r: Rollout, P: int, dropout_rng=None):
  """Critic values [B, N]: V before emitting response token t = head output at column P+t-1."""
  N = r.mask.shape[1]
  v = Mistral(config, head="scalar").apply({"params": params}, r.seq, positions=r.positions,
                                           attention_mask=r.valid, head_columns=(P - 1, P + N - 1),
                                           rngs=dropout_rngs(config, dropout_rng))
  return jnp.where(r.mask, v, 0.0)


def sequence_kl(actor_cfg, actor_params, ref_cfg, ref_params, r: Rollout, P: int,
                temperature: float):
  """Exact KL(actor || reference) of each response [B]: the full-vocabulary KL of the
  next-token distributions, summed over the response's tokens. Unlike the sampled
  estimators used in the reward, it has no sampling noise at a given state."""
  N = r.mask.shape[1]

  def log_probs(cfg, params):
    logits = Mistral(cfg).apply({"params": params}, r.seq, positions=r.positions,
                                attention_mask=r.valid, head_columns=(P - 1, P + N - 1))
    return jax.nn.log_softmax(logits / temperature)

  lp, lq = log_probs(actor_cfg, actor_params), log_probs(ref_cfg, ref_params)
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
  return jnp.sum(jnp.where(r.mask, kl, 0.0), axis=-1)


def sequence_scores(reward, reward_params, r: Rollout, *, P: int, hp):
  """(raw reward [B], reward after the no-stop penalty [B])."""
  last_col = P + jnp.maximum(r.lengths - 1, 0)
  raw = reward(reward_params, r.seq, r.valid, r.positions, last_col).astype(jnp.float32)
  return raw, no_stop_penalty(raw, r, hp)


def no_stop_penalty(raw, r: Rollout, hp):
  """The score [B] after `hp.no_stop_penalty` is taken from responses that never ended."""
  return raw - hp.no_stop_penalty * (~r.stopped).astype(jnp.float32)


# --- the three compiled phases --------------------------------------------------

def split_rng(rng):
  """Raw key data -> (next key, rollout key, update key), all raw key data."""
  keys = jax.random.split(jax.random.wrap_key_data(rng), 3)
  return tuple(jax.random.key_data(k) for k in keys)


def map_rows(fn, rows, chunks: int):
  """`fn(rows)` computed on `chunks` pieces of the rows one after another (a `lax.map`, one
  loop in the compiled program), so only one piece's temporaries (KV cache, activations,
  logits) exist at a time. `fn` must treat rows independently and return arrays with the
  rows first; the result is laid out as `fn(rows)`'s.

  Piece i holds rows i, i + chunks, ... (`split_microbatches`): rows sharded over the
  data-parallel devices stay where they are, every device working on its own share of each
  piece. chunks=1 calls `fn` once on all rows."""
  if chunks == 1:
    return fn(rows)
  out = jax.lax.map(fn, split_microbatches(rows, chunks))
  return jax.tree_util.tree_map(lambda x: x.swapaxes(0, 1).reshape((-1,) + x.shape[2:]), out)


def rollout(actor_cfg: MistralConfig, actor_params, prompt_ids, prompt_lengths,
            sp: sampling.SamplingParams, key, *, max_new_tokens: int, pad_id: int,
            chunks: int = 1) -> Rollout:
  """Samples one response per prompt. `key` (raw key data) replaces `sp.seeds`, so
  the samples depend on the run's key, not on anything decided on the host.

  `chunks` > 1 decodes the rows in that many sequential pieces (`map_rows`), each with its
  own KV cache. Each row's seed is drawn for its place in the whole batch and every row
  samples on its own, so the responses are those of the single pass."""
  B, Pn = prompt_ids.shape
  seeds = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key), B))
  sp = sp._replace(seeds=seeds)
  out = map_rows(lambda x: sampling.sample(actor_cfg, actor_params, *x,
                                           max_new_tokens=max_new_tokens, pad_id=pad_id),
                 (prompt_ids, prompt_lengths, sp), chunks)
  N = max_new_tokens
  cols = jnp.arange(Pn)[None, :]
  pad = (Pn - prompt_lengths)[:, None]
  mask = jnp.arange(N)[None, :] < out.lengths[:, None]
  seq = jnp.concatenate([prompt_ids, out.tokens], axis=1)
  valid = jnp.concatenate([cols >= pad, mask], axis=1)
  positions = jnp.maximum(jnp.arange(Pn + N)[None, :] - pad, 0)
  return Rollout(seq=seq, valid=valid, positions=positions, mask=mask,
                 logp=jnp.where(mask, out.logprobs, 0.0), lengths=out.lengths,
                 stopped=out.stop_lengths > 0)


def score(ref_cfg, ref_params, critic_cfg, critic_params, reward, reward_params, r: Rollout,
          kl_coef, *, P: int, hp, actor_cfg=None, actor_params=None,
          chunks: int = 1) -> tuple[Experience, dict]:
  """Reference log-probs, values, rewards and GAE for a rollout, plus its metrics.

  With `hp.recompute_logprobs` the "old" log-probs come from a full forward of
  the actor (the computation the update differentiates) instead of the
  sampler, as NeMo-Aligner does. In float32 the two agree to ~1e-6 (tested);
  in bfloat16 the KV-cache decode rounds differently (up to ~2e-3 per token
  on the tiny model; `sampler_logp_error` logs it), and on accelerators the
  decode and prefill kernels differ too.

  `chunks` > 1 runs the forward passes (reference, actor, critic, reward) on that many
  sequential pieces of the rows (`map_rows`); the advantages and metrics, which mix rows,
  follow on the whole batch.
  """
  recompute = hp.get("recompute_logprobs", False)
  critic_free = critic_params is None

  def forwards(r: Rollout) -> dict:
    out = {"ref_logp": response_logprobs(ref_cfg, ref_params, r, P, hp.temperature)[0],
           "raw_score": sequence_scores(reward, reward_params, r, P=P, hp=hp)[0]}
    if recompute:
      out["logp"] = response_logprobs(actor_cfg, actor_params, r, P, hp.temperature)[0]
    if not critic_free:
      out["values"] = response_values(critic_cfg, critic_params, r, P)
    return out

  f = map_rows(forwards, r, chunks)
  extra = {}
  if recompute:
    extra["sampler_logp_error"] = jnp.max(jnp.where(r.mask, jnp.abs(f["logp"] - r.logp), 0.0))
    r = r._replace(logp=f["logp"])
  ref_logp = f["ref_logp"]
  values = jnp.zeros_like(r.logp) if critic_free else f["values"]
  raw_score = f["raw_score"]
  seq_score = no_stop_penalty(raw_score, r, hp)
  kl = jnp.where(r.mask, rl.kl_penalty(r.logp, ref_logp, hp.kl_estimator), 0.0)
  raw_adv, adv, returns = rl.estimate_advantages(
      hp.advantage, score=seq_score, kl=kl, values=values, mask=r.mask,
      beta=kl_coef if hp.kl_in == "reward" else 0.0, gamma=hp.gamma, lam=hp.lam,
      group_size=hp.samples_per_prompt, whiten=hp.whiten_advantages,
      std_normalize=hp.grpo_std_normalize)
  exp = Experience(rollout=r, ref_logp=ref_logp, values=values, advantages=adv,
                   returns=returns, score=seq_score, kl=kl)
  k3 = jnp.where(r.mask, rl.kl_penalty(r.logp, ref_logp, "k3"), 0.0)
  metrics = experience_metrics(exp, raw_score, raw_adv, k3)
  if critic_free:
    for k in ("explained_variance", "value_mean"):
      del metrics[k]
  return exp, {**metrics, **extra}


def experience_metrics(exp: Experience, raw_score, raw_adv, k3) -> dict:
  """Rollout-side metrics (before the update). Advantage stats are pre-whitening:
  after whitening they are 0 and 1 by construction and say nothing."""
  r = exp.rollout
  m = r.mask
  adv_mean = rl.masked_mean(raw_adv, m)
  return {
      "score_mean": jnp.mean(exp.score), "score_std": jnp.std(exp.score),
      "rm_score_mean": jnp.mean(raw_score), "rm_score_std": jnp.std(raw_score),
      "kl_per_sequence": jnp.mean(jnp.sum(exp.kl, axis=-1)),
      "kl_per_token": rl.masked_mean(exp.kl, m),
      "kl_k3_per_sequence": jnp.mean(jnp.sum(k3, axis=-1)),
      "response_length": jnp.mean(r.lengths.astype(jnp.float32)),
      "response_tokens": jnp.sum(r.lengths),
      "stopped_fraction": jnp.mean(r.stopped.astype(jnp.float32)),
      "explained_variance": rl.explained_variance(exp.values, exp.returns, m),
      "advantage_mean": adv_mean,
      "advantage_std": jnp.sqrt(rl.masked_mean((raw_adv - adv_mean) ** 2, m)),
      "advantage_min": jnp.min(jnp.where(m, raw_adv, jnp.inf)),
      "advantage_max": jnp.max(jnp.where(m, raw_adv, -jnp.inf)),
      "return_mean": rl.masked_mean(exp.returns, m),
      "value_mean": rl.masked_mean(exp.values, m),
  }


def update(actor_cfg, critic_cfg, actor_tx, critic_tx, actor: TrainState,
           critic: TrainState | None, exp: Experience, kl_coef, key, frozen: "Frozen", *, P: int,
           hp, micro_steps: int = 1):
  """E epochs x M shuffled minibatches of the clipped policy loss (plus `kl_coef` x the KL
  to the reference when `hp.kl_in == "loss"`) and, with a critic, the clipped value loss;
  each reduced by `hp.loss_agg`. With `hp.unfinished == "mask"` responses that never ended
  are left out of the policy loss (NeMo-Aligner's `is_end` mask; the value loss keeps them).

  Returns the new states and the per-minibatch statistics, each [E, M] (the
  first minibatch of the first epoch sees the rollout policy itself: ratio 1, unless LoRA
  dropout perturbs it), plus the param norms after the update. Under LoRA the states hold
  the adapters (and the critic's head) and `frozen` the bases they are joined with.

  `micro_steps` > 1 runs each minibatch's forward and backward passes in that many
  micro-batches (`accumulate`) and applies one optimizer step per minibatch. The losses and
  statistics divide by the minibatch's own denominators (`rl.denominators`: its valid
  tokens, or rows), fixed before the split, so the summed shares are the minibatch's values
  for every `hp.loss_agg` and the gradients the minibatch's gradients.
  """
  B = exp.rollout.seq.shape[0]
  M = hp.num_minibatches
  r = exp.rollout
  policy_mask = r.mask & r.stopped[:, None] if hp.unfinished == "mask" else r.mask
  rows = dict(seq=r.seq, valid=r.valid, positions=r.positions, mask=r.mask,
              policy_mask=policy_mask, logp=r.logp, ref_logp=exp.ref_logp, values=exp.values,
              advantages=exp.advantages, returns=exp.returns)

  # Each loss takes the denominators of the minibatch its rows belong to (`den`): on a
  # micro-batch it returns its share of the minibatch's loss and statistics.
  def actor_loss(params, mb, rng, den):
    r = Rollout(mb["seq"], mb["valid"], mb["positions"], mb["mask"], mb["logp"], None, None)
    logp, entropy = response_logprobs(actor_cfg, lora.combine(params, frozen.actor), r, P,
                                      hp.temperature, with_entropy=True, dropout_rng=rng)
    mask = mb["policy_mask"]
    loss, stats = rl.policy_loss(logp, mb["logp"], mb["advantages"], mask, hp.clip_eps,
                                 hp.loss_agg, den)
    ent = rl.aggregate(entropy, mask, hp.loss_agg, den)
    total = loss - hp.entropy_coef * ent
    if hp.kl_in == "loss":
      kl = rl.aggregate(rl.kl_penalty(logp, mb["ref_logp"], hp.kl_estimator), mask, hp.loss_agg,
                        den)
      total = total + kl_coef * kl
      stats["kl_loss"] = kl
    return total, {"policy_loss": loss, "entropy": ent, **stats}

  def critic_loss(params, mb, rng, den):
    r = Rollout(mb["seq"], mb["valid"], mb["positions"], mb["mask"], None, None, None)
    values = response_values(critic_cfg, lora.combine(params, frozen.critic), r, P, rng)
    loss, stats = rl.value_loss(values, mb["values"], mb["returns"], mb["mask"], hp.value_clip,
                                hp.loss_agg, den)
    return hp.vf_coef * loss, {"value_loss": loss, **stats}

  def apply(state, tx, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  def minibatch_step(carry, xs):
    actor, critic = carry
    mb, k = xs
    a_key, c_key = jax.random.split(jax.random.wrap_key_data(k))
    policy_den = rl.denominators(mb["policy_mask"], hp.loss_agg)
    stats, a_grads = accumulate(actor_loss, actor.params, mb, a_key, policy_den, micro_steps)
    stats["actor_grad_norm"] = optax.global_norm(a_grads)
    if critic is not None:
      value_den = rl.denominators(mb["mask"], hp.loss_agg)
      c_stats, c_grads = accumulate(critic_loss, critic.params, mb, c_key, value_den,
                                    micro_steps)
      stats.update(c_stats, critic_grad_norm=optax.global_norm(c_grads))
      critic = apply(critic, critic_tx, c_grads)
    return (apply(actor, actor_tx, a_grads), critic), stats

  def epoch_step(carry, k):
    perm = jax.random.permutation(jax.random.wrap_key_data(k), B)
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(k), 1)
    mbs = jax.tree_util.tree_map(lambda x: x[perm].reshape((M, B // M) + x.shape[1:]), rows)
    return jax.lax.scan(minibatch_step, carry,
                        (mbs, jax.random.key_data(jax.random.split(dropout_key, M))))

  keys = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key), hp.ppo_epochs))
  (actor, critic), stats = jax.lax.scan(epoch_step, (actor, critic), keys)
  stats["actor_param_norm"] = optax.global_norm(actor.params)
  if critic is not None:
    stats["critic_param_norm"] = optax.global_norm(critic.params)
  return actor, critic, stats


def accumulate(loss_fn, params, mb: dict, key, den: rl.Denominators, steps: int):
  """(statistics, gradients) of `loss_fn(params, rows, key, den) -> (loss, statistics)` on a
  minibatch, summed over `steps` micro-batches of its rows (a `lax.scan`; interleaved as
  `split_microbatches` lays them out, so no row changes device), each with its own dropout
  key. With the minibatch's `den` each micro-batch's loss and statistics are its shares,
  and the sums are the minibatch's. steps=1: one pass on the whole minibatch with `key`.
  (With LoRA dropout a micro-batch draws its own masks: alike in distribution to the whole
  minibatch's, not the same draws.)"""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    (_, stats), grads = grad_fn(params, mb, key, den)
    return stats, grads
  micro = split_microbatches(mb, steps)
  keys = jax.random.split(key, steps)
  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  (_, stat_shapes), grad_shapes = jax.eval_shape(grad_fn, params, first, keys[0], den)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (stat_shapes, grad_shapes))

  def body(carry, xs):
    rows, k = xs
    (_, stats), grads = grad_fn(params, rows, k, den)
    return jax.tree_util.tree_map(jnp.add, carry, (stats, grads)), None

  (stats, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
  return stats, grads


def summarize_update(stats: dict) -> dict:
  """Host-side: means over all minibatches plus the first minibatch's ratio stats (and the
  param norms after the update)."""
  out = {k: float(np.mean(v)) for k, v in stats.items()}
  for k in ("ratio_mean", "clip_fraction", "approx_kl"):
    out[f"{k}_first_minibatch"] = float(np.asarray(stats[k])[0, 0])
  return out


# --- the models and the state ---------------------------------------------------

class Frozen(NamedTuple):
  """The untrained leaves the trained models are joined with: under LoRA the actor's base
  (which is also the reference) and the critic's body (the reward model's, shared); {} under
  full fine-tuning. An argument of every compiled phase, never a baked-in constant."""
  actor: Any
  critic: Any


class Models(NamedTuple):
  """The models on the mesh (four with GAE's critic, three without). The leaves that train
  (actor, critic) live in `PPOState`; here are the configs, the frozen leaves and models, and
  (`actor`, `critic`: `common.Trained` without params) what exporting the actor needs."""
  actor_cfg: MistralConfig
  critic_cfg: MistralConfig | None
  ref_cfg: MistralConfig
  ref_params: Any
  ref_shardings: Any
  reward: Callable          # (params, seq, valid, positions, last_col) -> score [B]
  reward_params: Any
  reward_shardings: Any
  frozen: Frozen
  frozen_shardings: Frozen
  actor: common.Trained
  critic: common.Trained | None


def _with(cfg, **changes):
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    for k, v in changes.items():
      c[k] = v
  return c


def load_models(cfg, mesh, *, reward_fn: RewardFn | None = None):
  """Actor and reference from `cfg.actor_init` (the SFT model), critic (GAE only) from
  `cfg.critic_init` or the reward model, reward model from `cfg.rm_init` (or `reward_fn`),
  all created or restored directly on `mesh`; the frozen ones in `cfg.frozen_dtype`.

  With `cfg.lora.rank` > 0 there is no separate reference: the actor's frozen base (in
  lora.base_dtype, default frozen_dtype) with the adapters off is the reference; and the
  critic is an adapter with its own value head on the reward model's frozen body (the same
  arrays the reward model scores with), unless `critic_init` names another model.
  Returns (Models, actor `common.Trained`, critic `common.Trained` or None)."""
  if reward_fn is None and not cfg.rm_init:
    raise ValueError("config.rm_init: a reward model directory is required (the output "
                     "directory of launch.train_rm, or an HF sequence-classification model)")
  if not cfg.actor_init:
    logging.warning("config.actor_init is empty: the actor and reference are RANDOM "
                    "config.model weights (tests only; pass the SFT model directory)")
  seed = cfg.seed
  frozen_cfg = _with(cfg, **{k: cfg.frozen_dtype for k in ("param_dtype", "dtype")
                             if cfg.frozen_dtype})
  use_lora = common.lora_rank(cfg) > 0
  if use_lora and not cfg.lora.base_dtype and cfg.frozen_dtype:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.lora.base_dtype = cfg.frozen_dtype
  actor = common.load_trained(cfg, mesh, head="lm", init_from=cfg.actor_init, seed=seed)
  if use_lora:
    ref_cfg, ref_params, ref_sh = actor.config.without_lora(), actor.frozen, actor.frozen_shardings
  else:
    ref_cfg, ref_params, ref_sh = common.load_or_init(
        frozen_cfg, mesh, head="lm", init_from=cfg.actor_init, seed=seed)
  rm = None
  if reward_fn is None:
    rm = common.load_or_init(frozen_cfg, mesh, head="scalar", init_from=cfg.rm_init, seed=seed)
    rm_cfg, reward_params, reward_sh = rm
    reward = lambda params, seq, valid, positions, last_col: scoring.rm_scores_at(
        rm_cfg, params, seq, valid, last_col, positions)
  else:
    reward_params, reward_sh = {}, {}
    reward = lambda _, *args: reward_fn(*args)
  critic = None
  if cfg.ppo.advantage == "gae":
    shared = rm if use_lora and cfg.critic_init in ("", cfg.rm_init) else None
    # lora.init_adapter starts the actor; the critic's adapter always starts fresh.
    critic_cfg = _with(cfg, lora=_with(cfg.lora, init_adapter="")) if use_lora else cfg
    critic = common.load_trained(critic_cfg, mesh, head="scalar",
                                 init_from=cfg.critic_init or cfg.rm_init,
                                 seed=seed + 1, allow_head_change=True,
                                 trained_heads=("score",), frozen_base=shared)
  frozen = Frozen(actor.frozen, critic.frozen if critic else {})
  frozen_sh = Frozen(actor.frozen_shardings, critic.frozen_shardings if critic else {})
  models = Models(actor.config, critic.config if critic else None, ref_cfg, ref_params, ref_sh,
                  reward, reward_params, reward_sh, frozen, frozen_sh,
                  actor._replace(params=None), critic._replace(params=None) if critic else None)
  return models, actor, critic


def init_state(cfg, mesh, actor: common.Trained, critic: common.Trained | None):
  """The first `PPOState` (AdamW states of the trained leaves, the run's key) and its
  shardings, from `load_models`' trained models (critic None: no critic). Also returns the
  optimizers."""
  hp = cfg.ppo
  total_updates = cfg.iterations * hp.ppo_epochs * hp.num_minibatches
  actor_tx, _ = make_optimizer(cfg.actor_optim, total_updates)
  actor_state, actor_sh = create_state(actor.params, actor_tx, actor.shardings, mesh, cfg.seed)
  critic_tx = critic_state = critic_sh = None
  if critic is not None:
    critic_tx, _ = make_optimizer(cfg.critic_optim, total_updates)
    critic_state, critic_sh = create_state(critic.params, critic_tx, critic.shardings, mesh,
                                           cfg.seed + 1)
  state = PPOState(actor=actor_state, critic=critic_state)
  shardings = PPOState(actor=actor_sh, critic=critic_sh)
  return state, shardings, (actor_tx, critic_tx)


# --- the iteration ---------------------------------------------------------------

def micro_steps(hp, knob: str, rows: int, dp: int, what: str) -> int:
  """How many sequential pieces `hp.<knob>` (responses per data-parallel replica at once,
  0 = all) splits `rows` global rows into; a clear error unless it divides each replica's
  share."""
  size = hp.get(knob, 0)
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise ValueError(f"ppo.{knob}={size!r}: must be an integer >= 0 (0 = all at once)")
  per_replica = rows // dp
  if size == 0:
    return 1
  if per_replica % size:
    raise ValueError(f"ppo.{knob}={size} must divide the {per_replica} responses each of the "
                     f"{dp} data-parallel replicas holds of {what} ({rows})")
  return per_replica // size


class Iteration:
  """One PPO iteration, the training loop's step: `(state, prompt batch) -> (state,
  metrics)`. Rollout, score and update are three compiled programs; between them the host
  checks the rewards (a NaN reward stops the run before the update) and moves beta
  (`kl`, an `rl.KLController`, host-side state the loop checkpoints).

  The prompt batch is `put_batch({"ids": [B, P] left-padded, "length": [B]})`. The
  iteration's experience and per-minibatch statistics stay readable as
  `last_experience` / `last_update_stats` (sample logging, tests).
  """

  def __init__(self, cfg, mesh, tokenizer: Tokenizer, models: Models, shardings: PPOState,
               optimizers):
    self.cfg, self.mesh, self.tokenizer, self.models = cfg, mesh, tokenizer, models
    self.hp = hp = cfg.ppo
    self.P, self.N = cfg.max_prompt_len, hp.max_new_tokens
    # The end of turn may be several tokens (NeMo's `<extra_id_1>` in Mistral's own
    # tokenizer): the rollout stops on the sequence, and the reward is read at its last token.
    template = get_template(cfg.template)
    self.eot_ids = template.end_of_turn_ids(tokenizer)
    if not 0 < len(self.eot_ids) <= sampling.MAX_STOP_LENGTH:
      raise ValueError("; ".join(template.check(tokenizer, sampling.MAX_STOP_LENGTH)) or
                       f"config.template={cfg.template}: end of turn is {self.eot_ids}")
    actor_cfg = models.actor_cfg
    if tokenizer.vocab_size > actor_cfg.vocab_size:
      raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the actor only "
                       f"{actor_cfg.vocab_size}")
    if self.P + self.N > actor_cfg.max_position_embeddings:
      raise ValueError(f"max_prompt_len={self.P} + ppo.max_new_tokens={self.N} exceeds the "
                       f"model's max_position_embeddings={actor_cfg.max_position_embeddings}")
    # Rows of a rollout: each prompt's `samples_per_prompt` responses side by side.
    self.group = hp.samples_per_prompt
    self.rows = B = cfg.rollout_batch_size * self.group
    if B % hp.num_minibatches:
      raise ValueError(f"rollout_batch_size x ppo.samples_per_prompt = {B} responses must be a "
                       f"multiple of ppo.num_minibatches={hp.num_minibatches}")
    dp = parallel.data_parallel_size(mesh)
    if B % dp or (B // hp.num_minibatches) % dp:
      raise ValueError(f"the {B} responses of an iteration and their minibatches of "
                       f"{B // hp.num_minibatches} must be multiples of the data-parallel "
                       f"size {dp}")
    # Sequential pieces of each phase: rollout decodes, score forwards, update micro-batches.
    self.rollout_chunks = micro_steps(hp, "rollout_micro_batch_size", B, dp,
                                      "the responses of an iteration")
    self.forward_chunks = micro_steps(hp, "forward_micro_batch_size", B, dp,
                                      "the responses of an iteration")
    self.micro_steps = micro_steps(hp, "micro_batch_size", B // hp.num_minibatches, dp,
                                   "a minibatch's responses")
    self.kl = rl.KLController(hp.init_kl_coef, adaptive=hp.adaptive_kl, target=hp.target_kl,
                              horizon=hp.kl_horizon)
    self.replicated = parallel.replicated(mesh)
    self._compile(shardings, optimizers)
    self.train_sp = self._put_tree(self._sampling_params(greedy=False))
    self.eval_sp = self._put_tree(self._sampling_params(greedy=cfg.get("eval_greedy", True)))
    # Evaluation reuses one key: every evaluation samples with the same random
    # numbers, so differences between evaluations are the policy's.
    self.eval_key = self.put_replicated(
        np.asarray(jax.random.key_data(jax.random.PRNGKey(cfg.seed + 7919)), np.uint32))
    self.last_experience: Experience | None = None
    self.last_update_stats: dict | None = None

  def _compile(self, shardings: PPOState, optimizers):
    m, mesh, P, N, hp = self.models, self.mesh, self.P, self.N, self.hp
    rows = lambda nd: parallel.batch_sharding(mesh, nd)
    replicated = self.replicated
    actor_sh, critic_sh = shardings.actor, shardings.critic
    critic_params_sh = critic_sh.params if critic_sh is not None else None
    roll_sh = Rollout(rows(2), rows(2), rows(2), rows(2), rows(2), rows(1), rows(1))
    exp_sh = Experience(roll_sh, rows(2), rows(2), rows(2), rows(2), rows(1), rows(2))

    self.rng_fn = jax.jit(split_rng, in_shardings=replicated, out_shardings=replicated)
    # Every program takes the frozen leaves (`Frozen`, {} under full fine-tuning) as an
    # argument and joins them with the trained ones (`lora.combine`) inside.
    frozen_sh = m.frozen_shardings
    self.rollout_fn = jax.jit(
        lambda actor, frozen, *args: rollout(
            m.actor_cfg, lora.combine(actor, frozen.actor), *args, max_new_tokens=N,
            pad_id=self.tokenizer.pad_id, chunks=self.rollout_chunks),
        in_shardings=(actor_sh.params, frozen_sh, rows(2), rows(1),
                      sampling.sampling_params_shardings(mesh), replicated),
        out_shardings=roll_sh)
    self.score_fn = jax.jit(
        lambda actor, critic, frozen, ref, reward_params, r, beta: score(
            m.ref_cfg, ref, m.critic_cfg,
            None if critic is None else lora.combine(critic, frozen.critic), m.reward,
            reward_params, r, beta, P=P, hp=hp, actor_cfg=m.actor_cfg,
            actor_params=lora.combine(actor, frozen.actor), chunks=self.forward_chunks),
        in_shardings=(actor_sh.params, critic_params_sh, frozen_sh, m.ref_shardings,
                      m.reward_shardings, roll_sh, replicated),
        out_shardings=(exp_sh, replicated))
    self.update_fn = jax.jit(
        functools.partial(update, m.actor_cfg, m.critic_cfg, *optimizers, P=P, hp=hp,
                          micro_steps=self.micro_steps),
        in_shardings=(actor_sh, critic_sh, exp_sh, replicated, replicated, frozen_sh),
        out_shardings=(actor_sh, critic_sh, replicated),
        donate_argnums=(0, 1), compiler_options=gradient_program_options())
    # Small programs that hand results to the host, replicated so every process
    # can read them (a batch-sharded array is not addressable on one host).
    self.eval_fn = jax.jit(
        lambda actor, frozen, ref, reward_params, r: map_rows(
            lambda r: (sequence_scores(m.reward, reward_params, r, P=P, hp=hp)[1], r.lengths,
                       r.stopped, sequence_kl(m.actor_cfg, lora.combine(actor, frozen.actor),
                                              m.ref_cfg, ref, r, P, hp.temperature)),
            r, self.forward_chunks),
        in_shardings=(actor_sh.params, frozen_sh, m.ref_shardings, m.reward_shardings, roll_sh),
        out_shardings=replicated)
    self.gather_fn = jax.jit(lambda x: x, out_shardings=replicated)

  def _sampling_params(self, greedy: bool) -> sampling.SamplingParams:
    B = self.rows
    return sampling.make_sampling_params(
        B, B, greedy=greedy, temperature=self.hp.temperature, max_new_tokens=self.N,
        stop_sequences=[self.eot_ids], seed=0)

  def put(self, x):
    """A global batch-sharded array from the same host array on every process."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, parallel.batch_sharding(self.mesh, x.ndim),
                                        lambda index: x[index])

  def put_replicated(self, x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

  def _put_tree(self, tree):
    return jax.tree_util.tree_map(self.put, tree)

  def put_prompts(self, batch: dict) -> dict:
    """Host prompt rows (the same on every process) -> the global batch on the mesh."""
    return {k: self.put(batch[k]) for k in ("ids", "length")}

  def put_batch(self, batch: dict) -> dict:
    """`rollout_batch_size` host prompts -> the rollout's rows on the mesh: each prompt
    `samples_per_prompt` times, side by side (the group estimators' layout)."""
    return self.put_prompts({k: np.repeat(np.asarray(batch[k]), self.group, axis=0)
                             for k in ("ids", "length")})

  def __call__(self, state: PPOState, batch: dict) -> tuple[PPOState, dict]:
    """Rollout -> score -> update. Raises `NonFiniteError` before the update if a reward
    is NaN/Inf (the loop then stops without saving)."""
    t0 = time.perf_counter()
    next_rng, roll_key, update_key = self.rng_fn(state.actor.rng)
    frozen = self.models.frozen
    r = self.rollout_fn(state.actor.params, frozen, batch["ids"], batch["length"], self.train_sp,
                        roll_key)
    jax.block_until_ready(r)
    t1 = time.perf_counter()
    kl_coef = self.kl.value
    beta = self.put_replicated(np.float32(kl_coef))
    critic_params = state.critic.params if state.critic is not None else None
    exp, exp_metrics = self.score_fn(state.actor.params, critic_params, frozen,
                                     self.models.ref_params, self.models.reward_params, r, beta)
    exp_metrics = {k: float(v) for k, v in jax.device_get(exp_metrics).items()}
    t2 = time.perf_counter()
    bad = [k for k in ("rm_score_mean", "kl_per_sequence", "value_mean")
           if k in exp_metrics and not math.isfinite(exp_metrics[k])]
    if bad:
      raise NonFiniteError(
          f"non-finite {', '.join(f'{k}={exp_metrics[k]}' for k in bad)} in the rollout's "
          "rewards; the update was not applied. Check the reward model (or reward_fn) for NaN "
          "scores")
    actor, critic, upd = self.update_fn(state.actor.replace(rng=next_rng), state.critic, exp,
                                        beta, update_key, frozen)
    upd = jax.device_get(upd)
    t3 = time.perf_counter()
    self.last_experience, self.last_update_stats = exp, upd
    metrics = {**exp_metrics, **summarize_update(upd)}
    metrics.update(rollout_seconds=t1 - t0, score_seconds=t2 - t1, update_seconds=t3 - t2,
                   rollout_tokens_per_sec=exp_metrics["response_tokens"] / max(t1 - t0, 1e-9),
                   kl_coef=kl_coef)
    self.kl.update(metrics["kl_per_sequence"], self.rows)
    return PPOState(actor=actor, critic=critic), metrics

  def evaluate(self, state: PPOState, rows: list[dict]) -> dict:
    """Responses to held-out prompts (greedy, or sampled with a fixed key): the
    reward alone (no KL term), length, and the exact KL(actor || reference)
    summed over each response."""
    if not rows:
      return {}
    scores, lengths, stopped, kls = [], [], [], []
    B = self.rows
    for i in range(0, len(rows), B):
      chunk = rows[i:i + B]
      n = len(chunk)
      batch = self.put_prompts({k: np.stack([r[k] for r in chunk + [chunk[-1]] * (B - n)])
                                for k in ("ids", "length")})
      r = self.rollout_fn(state.actor.params, self.models.frozen, batch["ids"], batch["length"],
                          self.eval_sp, self.eval_key)
      s, lens, stop, kl = jax.device_get(self.eval_fn(
          state.actor.params, self.models.frozen, self.models.ref_params,
          self.models.reward_params, r))
      scores.extend(s[:n].tolist())
      lengths.extend(lens[:n].tolist())
      stopped.extend(stop[:n].tolist())
      kls.extend(kl[:n].tolist())
    return {"eval_score_mean": float(np.mean(scores)), "eval_score_std": float(np.std(scores)),
            "eval_response_length": float(np.mean(lengths)),
            "eval_stopped_fraction": float(np.mean(stopped)),
            "eval_kl_per_sequence": float(np.mean(kls))}

  def decode_samples(self, exp: Experience, k: int) -> list[dict]:
    k = min(k, exp.rollout.seq.shape[0])
    r, score_ = jax.device_get(self.gather_fn((exp.rollout, exp.score)))
    out = []
    for i in range(k):
      prompt = [t for t, v in zip(r.seq[i, :self.P], r.valid[i, :self.P]) if v]
      resp = r.seq[i, self.P:self.P + int(r.lengths[i])].tolist()
      out.append({"prompt": self.tokenizer.decode(prompt), "response": self.tokenizer.decode(resp),
                  "score": float(score_[i]), "stopped": bool(r.stopped[i])})
    return out


def build(cfg, mesh, tokenizer: Tokenizer, *, reward_fn: RewardFn | None = None):
  """Models, first state and compiled iteration for `cfg` (its values checked first, as
  `run_ppo` does). Returns (Iteration, PPOState, its shardings)."""
  preflight.require(preflight.value_problems("ppo", cfg), "ppo config")
  models, actor, critic = load_models(cfg, mesh, reward_fn=reward_fn)
  logging.info("actor: %s; critic: %s", common.describe_trained(actor),
               common.describe_trained(critic) if critic else "none")
  state, shardings, optimizers = init_state(cfg, mesh, actor, critic)
  return Iteration(cfg, mesh, tokenizer, models, shardings, optimizers), state, shardings


# --- the stage ------------------------------------------------------------------

def load_prompt_rows(path: str, tokenizer: Tokenizer, template: ChatTemplate, max_prompt_len: int,
                     pad_id: int):
  """`{"text": prompt}` jsonl -> left-padded id rows; over-long prompts dropped and counted.

  Prompts are encoded by `template.encode`, so a prompt's ids are the first ids
  of the SFT and reward-model rows of the same conversation."""
  rows, stats = [], {"prompts_read": 0, "prompts_too_long": 0, "prompts_empty": 0}
  for line_no, rec in jsonl.read_records(path):
    jsonl.require(rec, "text", str, path, line_no)
    stats["prompts_read"] += 1
    if not rec["text"].strip():
      stats["prompts_empty"] += 1
      continue
    ids = template.encode(tokenizer, rec["text"])
    if len(ids) > max_prompt_len:
      stats["prompts_too_long"] += 1
      continue
    row = np.full((max_prompt_len,), pad_id, np.int32)
    row[max_prompt_len - len(ids):] = ids
    rows.append({"ids": row, "length": np.asarray(len(ids), np.int32)})
  if stats["prompts_too_long"]:
    logging.warning("%s: dropped %d of %d prompts longer than max_prompt_len=%d tokens", path,
                    stats["prompts_too_long"], stats["prompts_read"], max_prompt_len)
  if not rows:
    raise ValueError(f"{path}: no usable prompts ({stats}); raise config.max_prompt_len or "
                     "check the file's 'text' fields")
  return rows, stats


def sample_table(samples: list[dict]) -> str:
  """Markdown table (TensorBoard renders it) of prompts, responses and scores."""
  cell = lambda s: s.replace("|", "\\|").replace("\n", "\\n")
  lines = ["| prompt | response | score |", "|---|---|---|"]
  lines += [f"| {cell(s['prompt'])} | {cell(s['response'])} | {s['score']:.4f} |"
            for s in samples]
  return "\n".join(lines)


def stage_inputs(cfg) -> dict:
  """The files PPO reads (hashed into its run identity and manifest)."""
  inputs = {"train_prompts": cfg.train_prompts, "tokenizer": cfg.tokenizer}
  if cfg.val_prompts:
    inputs["val_prompts"] = cfg.val_prompts
  for k in ("actor_init", "rm_init", "critic_init"):
    if cfg.get(k):
      inputs[k] = os.path.join(cfg[k], "config.json")
  return inputs


def run_ppo(cfg, workdir: str, *, reward_fn: RewardFn | None = None, force: bool = False) -> dict:
  """Runs (or resumes) PPO described by `configs/ppo.py` on the shared training loop.
  Returns the report dict.

  `reward_fn` (jittable, see `RewardFn`) replaces the reward model; without
  it `config.rm_init` is required. A workdir holding a run of another config
  or other inputs is refused unless `force` (see `cai_jax.train.identity`).
  """
  lead = jax.process_index() == 0
  preflight.require(preflight.value_problems("ppo", cfg), "ppo config")
  check_workdir_writable(workdir)
  if not cfg.tokenizer:
    raise ValueError("config.tokenizer: path to a sentencepiece .model is required")
  if reward_fn is None and not cfg.rm_init:
    raise ValueError("config.rm_init: a reward model directory is required (the output "
                     "directory of launch.train_rm, or an HF sequence-classification model)")
  for key in ("actor_init", "rm_init", "critic_init"):
    if cfg.get(key) and not os.path.isdir(cfg[key]):
      raise ValueError(f"config.{key}={cfg[key]!r}: no such model directory")
  if not cfg.train_prompts:
    raise ValueError("config.train_prompts: a jsonl of {\"text\": prompt} records is required")
  identity.claim_workdir(workdir, cfg, stage_inputs(cfg), force=force, lead=lead)
  tokenizer = Tokenizer.from_file(cfg.tokenizer)
  template = get_template(cfg.template)
  mesh = parallel.mesh_from_config(cfg.get("mesh"))
  train_rows, train_stats = load_prompt_rows(cfg.train_prompts, tokenizer, template,
                                             cfg.max_prompt_len, tokenizer.pad_id)
  if len(train_rows) < cfg.rollout_batch_size:
    raise ValueError(f"{cfg.train_prompts}: {len(train_rows)} usable prompts, fewer than "
                     f"rollout_batch_size={cfg.rollout_batch_size}")
  val_rows, val_stats = ([], {})
  if cfg.val_prompts:
    val_rows, val_stats = load_prompt_rows(cfg.val_prompts, tokenizer, template,
                                           cfg.max_prompt_len, tokenizer.pad_id)
    val_rows = val_rows[:cfg.max_eval_prompts]
  iteration, state, shardings = build(cfg, mesh, tokenizer, reward_fn=reward_fn)
  # Every process holds the whole prompt set and builds the same global batch
  # (`Iteration.put` keeps each device's rows). Whole batches only: a filler row
  # would be sampled from and trained on like a real prompt.
  batches = batching.BatchIterator(train_rows, cfg.rollout_batch_size, seed=cfg.seed,
                                   shuffle=True, drop_remainder=True)
  guard = DivergenceGuard(cfg.get("guard", None), spike_metrics=("value_loss",),
                          vocab_size=iteration.models.actor_cfg.vocab_size)
  # Param norms are guarded against the models PPO starts from (a resumed run restores them).
  guard.set_base_norm("actor_param_norm", float(optax.global_norm(state.actor.params)))
  if state.critic is not None:
    guard.set_base_norm("critic_param_norm", float(optax.global_norm(state.critic.params)))
  samples_path = os.path.join(workdir, "samples.jsonl")

  def log_samples(it, _state, _metrics):
    if not (cfg.sample_every and it % cfg.sample_every == 0):
      return
    samples = iteration.decode_samples(iteration.last_experience, cfg.num_samples_logged)
    writer.write_text(it, "samples", sample_table(samples))
    if lead:
      with open(samples_path, "a") as fh:
        fh.writelines(json.dumps({"iteration": it, **s}) + "\n" for s in samples)

  settings = LoopSettings(
      total_steps=cfg.iterations, log_every=1, eval_every=cfg.eval_every,
      save_every=cfg.save_every, desc="PPO", unit="iteration",
      finite_metrics=("policy_loss", "value_loss"),
      postfix=("score_mean", "kl_per_sequence"), eval_postfix=("eval_score_mean",),
      overlap=False, advice="Lower the learning rates or check the reward scale.")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                      best_metric=None)
  writer = MetricsWriter(workdir)
  try:
    state, summary = run_training(
        state=state, shardings=shardings, step=iteration, batches=batches,
        put_batch=iteration.put_batch, settings=settings, checkpointer=ckpt, writer=writer,
        evaluate=(lambda s: iteration.evaluate(s, val_rows)) if val_rows else None,
        guard=guard, after_step=log_samples, step_logs=[(samples_path, "iteration")],
        host_state={"kl_coef": iteration.kl, **common.host_state_of(iteration.models.actor)})
  finally:
    ckpt.close()
    writer.close()

  m = iteration.models
  training = {"actor": common.training_summary(m.actor._replace(params=state.actor.params))}
  if state.critic is not None:
    training["critic"] = common.training_summary(m.critic._replace(params=state.critic.params))
  paths = common.export_trained(workdir, m.actor, state.actor.params, head="lm",
                                hf=cfg.export_hf, tokenizer_path=cfg.tokenizer)
  report = {"stage": "ppo", "iterations": cfg.iterations, "resumed_from": summary["resumed_from"],
            "data": {**train_stats, **{f"val_{k}": v for k, v in val_stats.items()}},
            "first_eval": summary["initial_eval"] or None, "final_eval": summary["final_eval"],
            "final_train": summary["final_train"], "kl_coef": iteration.kl.value,
            "training": training, "outputs": paths}
  if lead:
    jsonl.atomic_write_json(os.path.join(workdir, "report.json"), report)
    jsonl.write_manifest(workdir, stage="ppo", config=cfg, inputs=stage_inputs(cfg),
                         counts={"iterations": cfg.iterations, **train_stats}, seed=cfg.seed)
  return report
