"""Mistral in Flax vs `transformers.MistralForCausalLM`: logits, gradients, KV cache.

Each test builds a random tiny HF model, saves it with `save_pretrained` and
loads it through `cai_jax.checkpoint.load_hf`, so the name/transposition
mapping is exercised by every comparison. Shapes are chosen so that the odd
paths actually run: GQA ratios 4/2/1, a sliding window (5) shorter than the
sequence (13), a vocab (101) that is not a multiple of 8, right padding.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_utils
from cai_jax import checkpoint
from cai_jax.model import (Mistral, MistralConfig, cache_from_prefill, cache_slots,
                           lm_head_kernel)
from cai_jax.train.lm import make_lm_loss

SEQ = 13
WINDOW = 5


def _load(tmp_path, seed=0, **overrides):
  """(torch model, our config, our params) for one random tiny HF model."""
  model, path = hf_utils.make_hf_dir(tmp_path / "hf", seed, **overrides)
  cfg, params = checkpoint.load_hf(path)
  return model, cfg, params


def _apply_fn(cfg, head="lm"):
  model = Mistral(cfg, head=head)
  return jax.jit(lambda p, tokens, mask=None, pos=None, seg=None: model.apply(
      {"params": p}, tokens, pos, mask, seg))


def _right_padded_mask(batch, length, valid_lengths):
  return (np.arange(length)[None, :] < np.asarray(valid_lengths)[:, None]).astype(np.int32)


# --- logit parity ---------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("window", [None, WINDOW])
def test_logits_match_transformers(tmp_path, kv_heads, window):
  # Row 0 is full length, row 1 right-padded: both are checked on valid positions only.
  torch_model, cfg, params = _load(tmp_path, seed=kv_heads, num_key_value_heads=kv_heads,
                                   sliding_window=window)
  assert cfg.num_key_value_heads == kv_heads and cfg.sliding_window == window
  tokens = hf_utils.random_tokens(1, 2, SEQ, cfg.vocab_size)
  mask = _right_padded_mask(2, SEQ, [SEQ, 8])
  ref = hf_utils.torch_logits(torch_model, tokens, mask)
  valid = mask.astype(bool)
  # One attention block, and blocks of 4 queries (4+4+4+1), each against only the
  # keys it can see (with the window, later blocks skip the earliest keys).
  for block in (0, 4):
    out = _apply_fn(cfg.replace(attention_query_block=block))(params, tokens, mask)
    chex.assert_shape(out, (2, SEQ, 101))
    chex.assert_type(out, jnp.float32)
    out = np.asarray(out)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 1.0  # the comparison is not vacuous


def test_logits_match_transformers_tied_embeddings(tmp_path):
  torch_model, cfg, params = _load(tmp_path, seed=7, tie_word_embeddings=True,
                                   sliding_window=WINDOW)
  assert cfg.tie_word_embeddings and "lm_head" not in params
  tokens = hf_utils.random_tokens(2, 2, SEQ, cfg.vocab_size)
  ref = hf_utils.torch_logits(torch_model, tokens)
  out = np.asarray(_apply_fn(cfg)(params, tokens))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_packed_row_equals_separate_sequences(tmp_path):
  """Two sequences packed in one row (segment ids, restarting positions) don't see each other."""
  _, cfg, params = _load(tmp_path, seed=3, sliding_window=4)
  la, lb = 5, 8
  tokens = hf_utils.random_tokens(4, 1, la + lb, cfg.vocab_size)
  seg = np.array([[1] * la + [2] * lb], np.int32)
  pos = np.array([list(range(la)) + list(range(lb))], np.int32)
  model = Mistral(cfg)
  alone_a = np.asarray(model.apply({"params": params}, tokens[:, :la]))
  alone_b = np.asarray(model.apply({"params": params}, tokens[:, la:]))
  for block in (0, 3):  # query blocks that straddle the segment boundary
    packed = np.asarray(_apply_fn(cfg.replace(attention_query_block=block))(
        params, tokens, None, pos, seg))
    np.testing.assert_allclose(packed[:, :la], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[:, la:], alone_b, atol=1e-5, rtol=0)


# --- gradient parity --------------------------------------------------------------

def _masked_token_ce(logits, tokens, loss_mask):
  """Mean next-token cross-entropy over positions where loss_mask is 1 (NumPy/JAX)."""
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  m = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.sum(m)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("loss", ["logits", "sft"])
def test_gradients_match_torch_autograd(tmp_path, tied, loss):
  """`loss="logits"`: cross-entropy written on the module's logits; `"sft"`: the
  SFT loss, whose vocab head and cross-entropy have a hand-written gradient."""
  import torch
  torch_model, cfg, params = _load(tmp_path, seed=11, sliding_window=WINDOW,
                                   tie_word_embeddings=tied)
  tokens = hf_utils.random_tokens(5, 2, SEQ, cfg.vocab_size)
  attn = _right_padded_mask(2, SEQ, [SEQ, 9])
  loss_mask = attn.copy()
  loss_mask[:, :4] = 0  # prompt tokens carry no loss

  model = Mistral(cfg)
  sft_loss = make_lm_loss(cfg)
  batch = {"tokens": tokens, "segment_ids": attn, "loss_mask": loss_mask,
           "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)}

  def loss_fn(p):
    if loss == "sft":
      num, den, _ = sft_loss(p, batch, None)
      return num / den
    return _masked_token_ce(model.apply({"params": p}, tokens, attention_mask=attn), tokens,
                            loss_mask)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

  torch_model.zero_grad()
  t_logits = torch_model(torch.as_tensor(tokens, dtype=torch.long),
                         attention_mask=torch.as_tensor(attn)).logits
  t_logp = torch.log_softmax(t_logits[:, :-1], dim=-1)
  t_nll = -t_logp.gather(-1, torch.as_tensor(tokens[:, 1:, None], dtype=torch.long))[..., 0]
  t_mask = torch.as_tensor(loss_mask[:, 1:], dtype=torch.float32)
  t_loss = (t_nll * t_mask).sum() / t_mask.sum()
  t_loss.backward()
  np.testing.assert_allclose(float(loss), float(t_loss.detach()), rtol=1e-5)

  # Our grads in HF names/layout, through the checkpoint's own converters.
  ours = {name: thunk() for name, _, thunk in checkpoint._hf_tensors(cfg, grads, "lm")}
  theirs = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
  if tied:
    theirs.pop("lm_head.weight", None)  # the same tensor as embed_tokens
  assert set(ours) == set(theirs)
  for name, t_grad in theirs.items():
    scale = np.abs(t_grad).max()
    assert scale > 0, name
    err = np.abs(ours[name] - t_grad).max() / scale
    assert err <= 1e-4, f"{name}: relative grad error {err:.2e}"


def test_remat_policies_and_attention_blocks_give_the_same_gradients():
  """What a layer keeps for the backward, and how attention is blocked, change speed
  and memory, never the gradients."""
  base = MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW)
  tokens = hf_utils.random_tokens(3, 2, SEQ, base.vocab_size)
  loss_mask = _right_padded_mask(2, SEQ, [SEQ, 9])
  params = Mistral(base).init(jax.random.PRNGKey(0), tokens)["params"]

  def grads(cfg):
    loss = lambda p: _masked_token_ce(Mistral(cfg).apply({"params": p}, tokens), tokens, loss_mask)
    return jax.jit(jax.grad(loss))(params)

  with pytest.raises(ValueError, match="remat_policy"):
    base.replace(remat_policy="dots")
  reference = grads(base.replace(remat_policy="none"))
  for cfg in (base.replace(remat_policy="minimal"), base.replace(remat=True),
              base.replace(attention_query_block=4)):
    chex.assert_trees_all_close(grads(cfg), reference, atol=1e-6, rtol=1e-5)


# --- numerics and heads -----------------------------------------------------------

def test_bf16_compute_fp32_params_close_to_fp32(tmp_path):
  _, cfg, params = _load(tmp_path, seed=2, sliding_window=WINDOW)
  bf16 = cfg.replace(dtype="bfloat16")
  assert bf16.compute_dtype == jnp.bfloat16 and bf16.weight_dtype == jnp.float32
  tokens = hf_utils.random_tokens(6, 2, SEQ, cfg.vocab_size)
  ref = np.asarray(_apply_fn(cfg)(params, tokens))
  out = _apply_fn(bf16)(params, tokens)
  chex.assert_type(out, jnp.float32)  # logits come back in float32 whatever the compute dtype
  out = np.asarray(out)
  assert np.isfinite(out).all()
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < rel <= 5e-2, rel


@pytest.mark.parametrize("head, tied", [("lm", False), ("lm", True), ("scalar", False)])
def test_head_columns_is_the_same_slice_of_the_head(head, tied):
  cfg = MistralConfig(**{**hf_utils.TINY, "sliding_window": WINDOW, "tie_word_embeddings": tied})
  model = Mistral(cfg, head=head)
  tokens = jnp.asarray(hf_utils.random_tokens(8, 2, SEQ, cfg.vocab_size))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens)["params"])
  full = model.apply({"params": params}, tokens)
  part = jax.jit(lambda p, t: model.apply({"params": p}, t, head_columns=(4, 9)))(params, tokens)
  chex.assert_shape(part, (2, 5) + full.shape[2:])
  np.testing.assert_allclose(np.asarray(part), np.asarray(full)[:, 4:9], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_skipping_the_head_returns_what_the_head_multiplies(tied):
  cfg = MistralConfig(**{**hf_utils.TINY, "tie_word_embeddings": tied})
  model = Mistral(cfg)
  tokens = jnp.asarray(hf_utils.random_tokens(9, 2, SEQ, cfg.vocab_size))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(2), tokens)["params"])
  out = model.apply({"params": params}, tokens, apply_head=False)
  assert out.logits is None
  chex.assert_shape(out.hidden, (2, SEQ, cfg.hidden_size))
  kernel = lm_head_kernel(cfg, params)
  chex.assert_shape(kernel, (cfg.hidden_size, cfg.vocab_size))
  np.testing.assert_allclose(np.asarray(out.hidden @ kernel),
                             np.asarray(model.apply({"params": params}, tokens)),
                             atol=1e-5, rtol=0)


def test_scalar_head_returns_one_float32_per_position():
  cfg = MistralConfig(**{**hf_utils.TINY, "sliding_window": WINDOW})
  model = Mistral(cfg, head="scalar")
  tokens = jnp.asarray(hf_utils.random_tokens(7, 3, SEQ, cfg.vocab_size))
  # init returns `nn.Partitioned` boxes (logical axis names); unbox to plain arrays.
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))["params"]
  chex.assert_shape(params["score"]["kernel"], (cfg.hidden_size, 1))
  assert "lm_head" not in params
  values = model.apply({"params": params}, tokens)
  chex.assert_shape(values, (3, SEQ))
  chex.assert_type(values, jnp.float32)
  chex.assert_tree_all_finite(values)


# --- KV cache ---------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, WINDOW])
def test_prefill_then_decode_matches_full_forward(tmp_path, window):
  """Prefill 7 columns, decode 6 more one at a time; rows are left-padded by 0, 3 and 5.

  With window 5 the cache has 5 slots, so the prefill is already cut to the
  window and the ring wraps during decoding.
  """
  _, cfg, params = _load(tmp_path, seed=4, sliding_window=window)
  B, N, P = 3, SEQ, 7
  pad = np.array([0, 3, 5])
  tokens = hf_utils.random_tokens(8, B, N, cfg.vocab_size)
  cols = np.arange(N)[None, :]
  attn = (cols >= pad[:, None]).astype(np.int32)
  pos = np.maximum(cols - pad[:, None], 0).astype(np.int32)
  valid = attn.astype(bool)

  model = Mistral(cfg)
  full = np.asarray(_apply_fn(cfg)(params, tokens, attn, pos))

  pre = jax.jit(lambda p, t, q, a: model.apply({"params": p}, t, q, a, return_kv=True))(
      params, tokens[:, :P], pos[:, :P], attn[:, :P])
  slots = cache_slots(cfg, N)
  assert slots == (N if window is None else window)
  cache = cache_from_prefill(*pre.kv, jnp.asarray(valid[:, :P]), slots)
  chex.assert_shape(cache.k, (cfg.num_hidden_layers, B, cfg.num_key_value_heads, cfg.head_dim,
                              slots))
  chex.assert_shape(cache.v, (cfg.num_hidden_layers, B, cfg.num_key_value_heads, slots,
                              cfg.head_dim))
  pre_logits = np.asarray(pre.logits)
  np.testing.assert_allclose(pre_logits[valid[:, :P]], full[:, :P][valid[:, :P]], atol=1e-5, rtol=0)

  step = jax.jit(lambda p, t, q, c: model.apply({"params": p}, t, q, cache=c))
  for c in range(P, N):
    out = step(params, tokens[:, c:c + 1], pos[:, c:c + 1], cache)
    cache = out.cache
    assert int(cache.index) == c + 1
    np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, c], atol=1e-5, rtol=0,
                               err_msg=f"decode column {c}")
