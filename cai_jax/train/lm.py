"""Causal-LM loss over a loss mask, for SFT (and its tests and benchmarks)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from cai_jax.model import Mistral, MistralConfig


def lm_forward(config: MistralConfig, params, batch: dict):
  """Logits [B, T, V] for a batch of `tokens`, `segment_ids` (0 = pad), `positions`."""
  seg = batch["segment_ids"]
  return Mistral(config).apply({"params": params}, batch["tokens"], positions=batch["positions"],
                               attention_mask=seg > 0, segment_ids=seg)


def token_nll(logits, batch: dict):
  """Per-position NLL [B, T] of the next token, and the target mask [B, T].

  Position t predicts token t+1; `loss_mask[t+1] = 1` marks that token as a
  target, predicted from the tokens before it in the same segment (a packed row
  never predicts across conversations). The last position has no target. The
  targets are shifted rather than the logits, so the [B, T, vocab] logits are
  never copied.
  """
  tokens, seg = batch["tokens"], batch["segment_ids"]
  shift = lambda a: jnp.pad(a[:, 1:], ((0, 0), (0, 1)))
  targets = shift(tokens)
  next_seg = shift(seg)
  mask = (shift(batch["loss_mask"]) > 0) & (next_seg == seg) & (next_seg > 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return nll, mask, targets


def make_lm_loss(config: MistralConfig):
  """loss_fn(params, batch, rng) -> (sum NLL, #targets, {"accuracy": #correct})."""

  def loss_fn(params, batch, rng):
    del rng
    logits = lm_forward(config, params, batch)
    nll, mask, targets = token_nll(logits, batch)
    maskf = mask.astype(jnp.float32)
    # "The target has the highest logit", as a max rather than an argmax: XLA:CPU
    # runs the (value, index) argmax reduction over the vocab several times slower.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)) & mask
    return jnp.sum(nll * maskf), jnp.sum(maskf), {"accuracy": jnp.sum(correct.astype(jnp.float32))}

  return loss_fn


def count_tokens(batch: dict) -> int:
  """Non-padding tokens of a host batch (for tokens/s)."""
  return int((batch["segment_ids"] > 0).sum())
