"""Causal-LM loss over a loss mask, for SFT (and its tests and benchmarks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cai_jax.model import Mistral, MistralConfig, lm_head_kernel


def lm_hidden(config: MistralConfig, params, batch: dict):
  """Final hidden states [B, T, D] for a batch of `tokens`, `segment_ids` (0 = pad),
  `positions`; the vocab head is left to `vocab_cross_entropy`."""
  seg = batch["segment_ids"]
  return Mistral(config).apply({"params": params}, batch["tokens"], positions=batch["positions"],
                               attention_mask=seg > 0, segment_ids=seg, apply_head=False).hidden


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


def _vocab_xent_fwd(hidden, kernel, targets):
  logits = jnp.einsum("btd,dv->btv", hidden, kernel).astype(jnp.float32)
  top = jnp.max(logits, axis=-1)
  lse = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) + top
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  # "The target has the highest logit", as a max rather than an argmax: XLA:CPU
  # runs the (value, index) argmax reduction over the vocab several times slower.
  correct = (target_logit >= top).astype(jnp.float32)
  return (lse - target_logit, correct), (hidden, kernel, targets, logits, lse)


def _vocab_xent_bwd(res, cotangents):
  hidden, kernel, targets, logits, lse = res
  g_nll, _ = cotangents  # `correct` is piecewise constant: zero derivative
  onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * g_nll[..., None]).astype(hidden.dtype)
  d_hidden = jnp.einsum("btv,dv->btd", dlogits, kernel)
  # h^T made explicit (a [D, B*T] copy, small next to the logits) so the kernel's
  # gradient is a plain [D, N] @ [N, V] matmul; left to itself, XLA:CPU transposes
  # the [N, V] logits gradient instead.
  B, T, D = hidden.shape
  hidden_t = jax.lax.optimization_barrier(hidden.reshape(B * T, D).T)
  d_kernel = (hidden_t @ dlogits.reshape(B * T, -1)).astype(kernel.dtype)
  return d_hidden, d_kernel, None


@jax.custom_vjp
def vocab_cross_entropy(hidden, kernel, targets):
  """Softmax cross-entropy of `targets` under the logits `hidden @ kernel`, fused.

  Args: hidden [B, T, D] and kernel [D, V] in the compute dtype (`lm_head_kernel`),
  targets int [B, T]. Returns (nll [B, T], correct [B, T]): the per-position NLL
  and 1.0 where the target has the highest logit (ties count as correct).

  The same value and gradients as `optax.softmax_cross_entropy_with_integer_labels`
  on the module's logits, written out because autodiff of that composition costs
  ~20% of an SFT step on CPU: the target-logit gather differentiates to a scatter
  into a zeroed [B, T, V] buffer, and XLA recomputes or transposes the [B, T, V]
  logits gradient for each of its two consumers. Here it is formed once, as
  softmax - one-hot, and fed to two plain matmuls.
  """
  return _vocab_xent_fwd(hidden, kernel, targets)[0]


vocab_cross_entropy.defvjp(_vocab_xent_fwd, _vocab_xent_bwd)


def make_lm_loss(config: MistralConfig):
  """loss_fn(params, batch, rng) -> (sum NLL, #targets, {"accuracy": #correct})."""

  def loss_fn(params, batch, rng):
    del rng
    hidden = lm_hidden(config, params, batch)
    targets, mask = next_token_targets(batch)
    nll, correct = vocab_cross_entropy(hidden, lm_head_kernel(config, params), targets)
    maskf = mask.astype(jnp.float32)
    return jnp.sum(nll * maskf), jnp.sum(maskf), {"accuracy": jnp.sum(correct * maskf)}

  return loss_fn


def count_tokens(batch: dict) -> int:
  """Non-padding tokens of a host batch (for tokens/s)."""
  return int((batch["segment_ids"] > 0).sum())
