"""Reward-model inference: the scalar head read at each text's last token.

`rm_scores` is the one scoring function: the reward-model trainer's loss
(`cai_jax.train.reward`) and evaluation go through it, and so does
`RewardScorer`, which scores texts with a trained reward model for
`cai_jax.cai.evaluate` and `launch.score_rm`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import checkpoint, parallel
from cai_jax.data import batching
from cai_jax.model import Mistral, MistralConfig, dropout_rngs, param_shardings
from cai_jax.tokenizer import Tokenizer, get_template


def last_token_scores(values: jax.Array, lengths: jax.Array) -> jax.Array:
  """values [B, T] per-position scalars, right-padded rows of `lengths` -> [B] at the last token."""
  return jnp.take_along_axis(values, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]


def segment_last_scores(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Packed rows: [B, K] score at the last token of segments 1..K (0 where absent)."""
  T = values.shape[1]
  ks = jnp.arange(1, num_segments + 1)
  in_seg = segment_ids[:, None, :] == ks[None, :, None]                       # [B, K, T]
  last = jnp.max(jnp.where(in_seg, jnp.arange(T)[None, None, :], -1), axis=-1)  # [B, K]
  picked = jnp.take_along_axis(values, jnp.maximum(last, 0), axis=1)
  return jnp.where(last >= 0, picked, 0.0)


def rm_scores_at(config: MistralConfig, params, tokens, attention_mask, last, positions=None,
                 dropout_rng=None):
  """The reward model's scalar at column `last` [B] of each row of `tokens` [B, T] (any
  layout: PPO's left-padded prompt | response rows pass their `positions`). The params are
  an argument, not a closure: a closed-over 7B reward model would be baked into the
  compiled program as constants."""
  values = Mistral(config, head="scalar").apply({"params": params}, tokens, positions=positions,
                                                attention_mask=attention_mask,
                                                rngs=dropout_rngs(config, dropout_rng))
  return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def rm_scores(config: MistralConfig, params, tokens, lengths, dropout_rng=None):
  """tokens [B, T] right-padded, lengths [B] -> scores [B] at each row's last token."""
  T = tokens.shape[1]
  mask = jnp.arange(T)[None, :] < lengths[:, None]
  return rm_scores_at(config, params, tokens, mask, jnp.maximum(lengths - 1, 0),
                      dropout_rng=dropout_rng)


class RewardScorer:
  """Scores texts with a trained reward model: `RewardScorer(model_dir).score(texts)`.

  Texts are encoded exactly as training encoded comparison texts
  (`template.encode`; an overlong one keeps its first tokens and its whole
  end-of-turn marker, at whose last token the reward is read), so a text gets
  the score training would have given it.
  Batches are right-padded to a power-of-two length (>= 16) to bound the
  number of compiled shapes.
  """

  def __init__(self, model_dir: str, tokenizer_path: str | None = None, *, max_seq_len: int = 4096,
               batch_size: int = 16, mesh=None, template: str = "nemo"):
    if batch_size < 1 or max_seq_len < 2:
      raise ValueError(f"need batch_size >= 1 and max_seq_len >= 2, got {batch_size}, "
                       f"{max_seq_len}")
    self.mesh = mesh or parallel.mesh_from_config(parallel.ONE_DEVICE)
    self.config, head = checkpoint.read_model_config(model_dir)
    if head != "scalar":
      raise ValueError(f"{model_dir}: not a reward model (its head is {head!r})")
    _, self.params, _ = checkpoint.load_model(
        model_dir, head="scalar", shardings=param_shardings(self.config, self.mesh, "scalar"))
    self.tokenizer = Tokenizer.from_file(
        tokenizer_path or os.path.join(model_dir, "tokenizer.model"))
    self.template = get_template(template)
    self.end_of_turn = self.template.end_of_turn_ids(self.tokenizer)
    self.max_seq_len = max_seq_len
    self.batch_size = batch_size
    self._fn = jax.jit(lambda p, t, l: rm_scores(self.config, p, t, l))

  def encode(self, text: str) -> list[int]:
    ids = self.template.encode(self.tokenizer, text)
    if not ids:
      raise ValueError("RewardScorer: an empty text has no last token to read a reward at")
    if len(ids) > self.max_seq_len:
      ids = batching.truncate_keep_end(ids, self.max_seq_len, self.end_of_turn)
    return ids

  def score(self, texts: list[str]) -> list[float]:
    out: list[float] = []
    for i in range(0, len(texts), self.batch_size):
      chunk = texts[i:i + self.batch_size]
      ids = [self.encode(t) for t in chunk]
      T = 16
      while T < max(len(x) for x in ids):
        T *= 2
      tokens = np.full((self.batch_size, T), self.tokenizer.pad_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)  # filler rows: one pad token, ignored
      for j, x in enumerate(ids):
        tokens[j, :len(x)] = x
        lengths[j] = len(x)
      scores = np.asarray(self._fn(self.params, tokens, lengths))
      out.extend(float(s) for s in scores[:len(chunk)])
    return out
