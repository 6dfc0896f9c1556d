"""Attention implementations (`MistralConfig.attention_impl`) against the einsum path.

Each implementation runs the whole model on the same params and inputs; outputs
and gradients are compared with the einsum path's at the positions a loss can
see (padding queries differ by design: the fused mask lets them attend to
themselves). "xla" runs everywhere; "cudnn" joins on an NVIDIA GPU
(`JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py`), with the very
arguments the CPU runs check through "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.model import Mistral, MistralConfig, resolve_attention_impl
from cai_jax.model.mistral import whole_sequence_attention
from configs.models import get_config as model_preset

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["xla"] + (["cudnn"] if ON_GPU else [])
B, T = 2, 48
TOL = {"float32": (2e-5, 1e-4), "bfloat16": (3e-2, 6e-2)}   # (outputs, gradients), relative


def _inputs(case: str):
  """(kwargs for the model, [B, T] 0/1 weights of the positions a loss may read)."""
  seen = np.ones((B, T), np.float32)
  if case == "packed":
    seg = np.zeros((B, T), np.int32)
    seg[0, :20], seg[0, 20:41] = 1, 2           # two documents, then padding (segment 0)
    seg[1, :33], seg[1, 33:] = 1, 2
    seen = (seg > 0).astype(np.float32)
    return {"segment_ids": jnp.asarray(seg)}, seen
  if case == "left_padded":                      # a prefill's layout
    valid = np.arange(T)[None, :] >= np.array([[0], [11]])
    return {"attention_mask": jnp.asarray(valid.astype(np.int32))}, valid.astype(np.float32)
  return {}, seen


def _run(cfg: MistralConfig, params, tokens, kwargs, seen):
  def loss(p):
    logits = Mistral(cfg).apply({"params": p}, tokens, **kwargs)
    w = jnp.asarray(seen)[..., None]
    return jnp.sum(jnp.sin(logits) * w) / jnp.sum(w), logits
  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


def _rel(a, b, w=None):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if w is not None:
    a, b = a * w, b * w
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# (case, window, kv heads of the 4 query heads): every case and GQA group size 4/2/1
# once by default; the whole product in the slow suite.
FAST_CASES = [("causal", None, 2), ("causal", 16, 1), ("packed", None, 4), ("packed", 12, 2),
              ("left_padded", 16, 1)]
SLOW_CASES = [(c, w, k) for c, w in [("causal", None), ("causal", 16), ("packed", None),
                                     ("packed", 12), ("left_padded", 16)]
              for k in (1, 2, 4) if (c, w, k) not in FAST_CASES]
CASES = FAST_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CASES]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case,window,kv_heads", CASES)
def test_outputs_and_gradients_match_the_einsum_path(impl, dtype, kv_heads, case, window):
  if impl == "cudnn" and dtype == "float32":
    pytest.skip("cuDNN flash attention takes bf16/fp16 only")
  base = MistralConfig.from_config(model_preset("tiny"), num_key_value_heads=kv_heads, sliding_window=window, dtype=dtype,
                      attention_query_block=16, num_hidden_layers=1)
  tokens = jnp.asarray(np.random.default_rng(kv_heads).integers(3, 500, (B, T)), jnp.int32)
  params = Mistral(base).init(jax.random.PRNGKey(kv_heads), tokens)["params"]
  kwargs, seen = _inputs(case)
  ref_logits, ref_grads = _run(base.replace(attention_impl="einsum"), params, tokens, kwargs, seen)
  logits, grads = _run(base.replace(attention_impl=impl), params, tokens, kwargs, seen)
  out_tol, grad_tol = TOL[dtype]
  assert np.all(np.isfinite(np.asarray(logits)))
  assert _rel(logits, ref_logits, seen[..., None]) < out_tol
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
    assert _rel(g, ref) < grad_tol, jax.tree_util.keystr(path)


def test_window_and_segments_change_the_fused_result():
  """The comparisons above would pass vacuously if the fused path ignored the window or
  the segments; it must not."""
  cfg = MistralConfig.from_config(model_preset("tiny"), sliding_window=None, attention_impl="xla")
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, (B, T)), jnp.int32)
  params = Mistral(cfg).init(jax.random.PRNGKey(0), tokens)["params"]
  plain = Mistral(cfg).apply({"params": params}, tokens)
  windowed = Mistral(cfg.replace(sliding_window=8)).apply({"params": params}, tokens)
  kwargs, _ = _inputs("packed")
  packed = Mistral(cfg).apply({"params": params}, tokens, **kwargs)
  np.testing.assert_allclose(windowed[:, :8], plain[:, :8], atol=1e-5)
  assert float(jnp.max(jnp.abs(windowed[:, 8:] - plain[:, 8:]))) > 1e-2
  np.testing.assert_allclose(packed[0, :20], plain[0, :20], atol=1e-5)
  assert float(jnp.max(jnp.abs(packed[0, 20:41] - plain[0, 20:41]))) > 1e-2


def test_prefill_cache_is_the_same_for_every_implementation():
  """A prefill through a fused implementation hands decode the same keys and values."""
  cfg = MistralConfig.from_config(model_preset("tiny"), dtype="bfloat16" if ON_GPU else "float32")
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, 500, (B, T)), jnp.int32)
  valid = jnp.asarray(np.arange(T)[None, :] >= np.array([[0], [5]]))
  params = Mistral(cfg).init(jax.random.PRNGKey(3), tokens)["params"]
  outs = {impl: Mistral(cfg.replace(attention_impl=impl)).apply(
      {"params": params}, tokens, attention_mask=valid, return_kv=True)
      for impl in ["einsum"] + IMPLS}
  w = np.asarray(valid)[None, :, None, :, None]
  for impl in IMPLS:
    for a, b in zip(outs[impl].kv, outs["einsum"].kv):
      assert _rel(a, b, w) < (2e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("backend,dtype,head_dim,expected", [
    ("cpu", "bfloat16", 128, "einsum"),
    ("tpu", "bfloat16", 128, "einsum"),
    ("gpu", "bfloat16", 128, "cudnn"),
    ("gpu", "float16", 64, "cudnn"),
    ("gpu", "float32", 128, "einsum"),     # cuDNN flash attention has no fp32 kernel
    ("gpu", "bfloat16", 256, "einsum"),
])
def test_auto_picks_the_documented_implementation(backend, dtype, head_dim, expected):
  cfg = MistralConfig.from_config(model_preset("tiny"), dtype=dtype, head_dim=head_dim)
  assert resolve_attention_impl(cfg, backend) == expected
  for explicit in ("einsum", "xla"):
    assert resolve_attention_impl(cfg.replace(attention_impl=explicit), backend) == explicit


@pytest.mark.parametrize("backend,dtype,match", [
    ("cpu", "bfloat16", "needs an NVIDIA GPU; this process runs on 'cpu'"),
    ("gpu", "float32", "cannot serve compute dtype float32"),
])
def test_cudnn_where_it_cannot_run_is_a_clear_error(backend, dtype, match):
  cfg = MistralConfig.from_config(model_preset("tiny"), dtype=dtype, attention_impl="cudnn")
  with pytest.raises(ValueError, match=match):
    resolve_attention_impl(cfg, backend)


def test_odd_masked_lengths_leave_cudnn():
  """cuDNN's gradient kernels take a mask (applied as a bias) only over even lengths."""
  auto = MistralConfig.from_config(model_preset("tiny"), dtype="bfloat16")
  assert whole_sequence_attention(auto, 48, True, "gpu") == "cudnn"
  assert whole_sequence_attention(auto, 47, False, "gpu") == "cudnn"
  assert whole_sequence_attention(auto, 47, True, "gpu") == "einsum"
  with pytest.raises(ValueError, match="odd sequence length"):
    whole_sequence_attention(auto.replace(attention_impl="cudnn"), 47, True, "gpu")
  assert whole_sequence_attention(auto.replace(attention_impl="xla"), 47, True, "gpu") == "xla"


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    MistralConfig.from_config(model_preset("tiny"), attention_impl="flash")
