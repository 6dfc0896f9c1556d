"""Causal-LM loss over a loss mask, for SFT (and its tests and benchmarks), and the
fused vocab head + log-softmax it and PPO's policy log-probs share."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cai_jax.model import Mistral, MistralConfig, dropout_rngs, lm_head_kernel


def lm_hidden(config: MistralConfig, params, batch: dict, dropout_rng=None):
  """Final hidden states [B, T, D] for a batch of `tokens`, `segment_ids` (0 = pad),
  `positions`; the vocab head is left to `vocab_logprobs`. `dropout_rng`: a training
  forward's key for LoRA dropout (`dropout_rngs`)."""
  seg = batch["segment_ids"]
  return Mistral(config).apply({"params": params}, batch["tokens"], positions=batch["positions"],
                               attention_mask=seg > 0, segment_ids=seg, apply_head=False,
                               rngs=dropout_rngs(config, dropout_rng)).hidden


def next_token_targets(batch: dict):
  """Targets [B, T] (the next token) and the target mask [B, T].

  Position t predicts token t+1; `loss_mask[t+1] = 1` marks that token as a
  target, predicted from the tokens before it in the same segment (a packed row
  never predicts across conversations). The last position has no target.
  """
  tokens, seg = batch["tokens"], batch["segment_ids"]
  shift = lambda a: jnp.pad(a[:, 1:], ((0, 0), (0, 1)))
  targets = shift(tokens)
  next_seg = shift(seg)
  mask = (shift(batch["loss_mask"]) > 0) & (next_seg == seg) & (next_seg > 0)
  return targets, mask


class TokenLogprobs(NamedTuple):
  logp: jax.Array            # f32 [...]: log-probability of each target token
  entropy: jax.Array | None  # f32 [...]: entropy of each next-token distribution, if asked for
  is_top: jax.Array          # f32 [...]: 1.0 where the target has the highest logit (ties too)


def _logprobs_fwd(hidden, kernel, targets, temperature, with_entropy):
  z = jnp.einsum("...d,dv->...v", hidden, kernel).astype(jnp.float32)
  if temperature != 1.0:
    z = z / temperature
  top = jnp.max(z, axis=-1)
  e = jnp.exp(z - top[..., None])
  total = jnp.sum(e, axis=-1)
  lse = jnp.log(total) + top
  target_z = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  # "The target has the highest logit", as a max rather than an argmax: XLA:CPU
  # runs the (value, index) argmax reduction over the vocab several times slower.
  is_top = (target_z >= top).astype(jnp.float32)
  mean_z = jnp.sum(e * z, axis=-1) / total if with_entropy else None   # E_p[z]
  out = TokenLogprobs(target_z - lse, None if mean_z is None else lse - mean_z, is_top)
  return out, (hidden, kernel, targets, z, lse, mean_z)


def _logprobs_bwd(temperature, with_entropy, res, g: TokenLogprobs):
  hidden, kernel, targets, z, lse, mean_z = res
  # d logp / dz = onehot - p;  d entropy / dz = -p (z - E_p[z]);  is_top is piecewise
  # constant (zero derivative).
  p = jnp.exp(z - lse[..., None])
  weight = g.logp[..., None]
  if with_entropy:
    weight = weight + g.entropy[..., None] * (z - mean_z[..., None])
  onehot = jnp.arange(z.shape[-1], dtype=targets.dtype) == targets[..., None]
  dz = jnp.where(onehot, g.logp[..., None], 0.0) - p * weight
  if temperature != 1.0:
    dz = dz / temperature
  dz = dz.astype(hidden.dtype)
  d_hidden = jnp.einsum("...v,dv->...d", dz, kernel)
  # h^T made explicit (a [D, N] copy, small next to the logits) so the kernel's
  # gradient is a plain [D, N] @ [N, V] matmul; left to itself, XLA:CPU transposes
  # the [N, V] logits gradient instead.
  D, V = kernel.shape
  hidden_t = jax.lax.optimization_barrier(hidden.reshape(-1, D).T)
  d_kernel = (hidden_t @ dz.reshape(-1, V)).astype(kernel.dtype)
  return d_hidden, d_kernel, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logprobs(hidden, kernel, targets, temperature, with_entropy):
  return _logprobs_fwd(hidden, kernel, targets, temperature, with_entropy)[0]


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def vocab_logprobs(hidden, kernel, targets, temperature: float = 1.0,
                   with_entropy: bool = False) -> TokenLogprobs:
  """Log-probs of `targets` under softmax(hidden @ kernel / temperature): the vocab
  head and the log-softmax fused, with a hand-written gradient.

  Args: hidden [..., D] and kernel [D, V] in the compute dtype (`lm_head_kernel`),
  targets int [...]; temperature and with_entropy are static.

  The same values and gradients as autodiff of `log_softmax` (or optax's
  cross-entropy) on the module's logits, written out because autodiff of that
  composition costs ~20% of an SFT step on CPU: the target gather differentiates
  to a scatter into a zeroed [..., V] buffer, and XLA recomputes or transposes the
  [..., V] logits gradient for each of its two consumers. Here that gradient is
  formed once and fed to two plain matmuls.
  """
  return _logprobs(hidden, kernel, targets, float(temperature), bool(with_entropy))


def make_lm_loss(config: MistralConfig):
  """loss_fn(params, batch, rng) -> (sum NLL, #targets, {"accuracy": #correct})."""

  def loss_fn(params, batch, rng):
    hidden = lm_hidden(config, params, batch, rng)
    targets, mask = next_token_targets(batch)
    out = vocab_logprobs(hidden, lm_head_kernel(config, params), targets)
    maskf = mask.astype(jnp.float32)
    return -jnp.sum(out.logp * maskf), jnp.sum(maskf), {"accuracy": jnp.sum(out.is_top * maskf)}

  return loss_fn


def count_tokens(batch: dict) -> int:
  """Non-padding tokens of a host batch (for tokens/s)."""
  return int((batch["segment_ids"] > 0).sum())
