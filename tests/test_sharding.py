"""Sharded == unsharded on 8 simulated CPU devices, and params really laid out per the rules.

The single-device run is the reference; every mesh must reproduce its logits
and loss gradients. The model's shapes divide some mesh axes and not others
(vocab 101 is odd), so the "leave it replicated when it does not divide" rule
runs too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hf_utils
from cai_jax import parallel
from cai_jax.model import Mistral, MistralConfig, init_params, param_shardings
from cai_jax.train.lm import make_lm_loss

CFG = MistralConfig(**{**hf_utils.TINY, "hidden_size": 64, "intermediate_size": 128,
                       "sliding_window": 5})
B, T = 8, 11


def _batch():
  tokens = hf_utils.random_tokens(0, B, T, CFG.vocab_size)
  lengths = np.array([T, 9, 11, 4, 7, 11, 10, 6])
  attn = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
  loss_mask = attn.copy()
  loss_mask[:, :2] = 0
  return tokens, attn, loss_mask


def _forward_and_grads(params, tokens, attn, loss_mask):
  """Logits, masked next-token cross-entropy and its gradient w.r.t. every param."""
  model = Mistral(CFG)

  def loss_fn(p):
    logits = model.apply({"params": p}, tokens, attention_mask=attn)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.sum(m), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return logits, loss, grads


@pytest.fixture(scope="module")
def reference():
  """Params initialised on one device, and the single-device logits/loss/grads."""
  model = Mistral(CFG)
  params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 1), jnp.int32)))["params"])(
      jax.random.PRNGKey(0))
  # Scale the std-0.02 matrices up so logits are O(1) and the comparison is not vacuous.
  params = jax.device_get(jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 10.0, params))
  outputs = jax.device_get(jax.jit(_forward_and_grads)(params, *_batch()))
  assert np.abs(outputs[0]).max() > 1.0
  return params, outputs


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_and_grads_match_single_device(reference, shape):
  params, (ref_logits, ref_loss, ref_grads) = reference
  mesh = parallel.create_mesh(shape)
  shardings = param_shardings(CFG, mesh)
  batch_s = parallel.batch_sharding(mesh)
  sharded = parallel.shard_tree(params, shardings)
  with parallel.use_mesh(mesh):
    step = jax.jit(_forward_and_grads,
                   in_shardings=(shardings, batch_s, batch_s, batch_s),
                   out_shardings=(parallel.batch_sharding(mesh, 3), parallel.replicated(mesh),
                                  shardings))
    logits, loss, grads = step(sharded, *_batch())
  assert logits.sharding.spec == P(parallel.BATCH_AXES, None, None)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-5, rtol=0)
  for (path, g), r, s in zip(jax.tree_util.tree_leaves_with_path(grads),
                             jax.tree_util.tree_leaves(ref_grads),
                             jax.tree_util.tree_leaves(shardings)):
    assert g.sharding == s, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(g), r, atol=1e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_params_laid_out_per_rules():
  mesh = parallel.create_mesh((2, 2, 2))
  params, shardings = init_params(CFG, mesh, jax.random.PRNGKey(0))
  layers = params["layers"]
  expected = {
      # [layers, embed, heads, head_dim]: FSDP over embed, tensor parallel over heads.
      ("self_attn", "q_proj"): P(None, "fsdp", "tensor", None),
      ("self_attn", "k_proj"): P(None, "fsdp", "tensor", None),
      ("self_attn", "o_proj"): P(None, "tensor", None, "fsdp"),
      ("mlp", "gate_proj"): P(None, "fsdp", "tensor"),
      ("mlp", "down_proj"): P(None, "tensor", "fsdp"),
  }
  for (block, name), spec in expected.items():
    kernel = layers[block][name]["kernel"]
    assert kernel.sharding.spec == spec, (block, name, kernel.sharding.spec)
  q = layers["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 8)  # [L, D/2, H/2, hd]
  # Vocab 101 does not divide over 'tensor': that dimension stays replicated.
  assert params["embed_tokens"]["embedding"].sharding.spec == P(None, "fsdp")
  assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", None)
  assert layers["input_layernorm"]["scale"].sharding.is_fully_replicated


def test_init_params_is_sharded_and_equals_unsharded_init():
  mesh = parallel.create_mesh((1, 4, 2))
  params, shardings = init_params(CFG, mesh, jax.random.PRNGKey(3))
  model = Mistral(CFG)
  plain = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 1), jnp.int32)))["params"])(
      jax.random.PRNGKey(3))
  for x, s, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings),
                     jax.tree_util.tree_leaves(plain)):
    assert x.sharding == s
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  parallel.assert_params_sharded(params, mesh, min_size=2048)


def test_assert_params_sharded_catches_replicated_params():
  mesh = parallel.create_mesh((1, 8, 1))
  params, _ = init_params(CFG, mesh, jax.random.PRNGKey(0))
  parallel.assert_params_sharded(params, mesh, min_size=2048)
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  with pytest.raises(AssertionError, match="q_proj"):
    parallel.assert_params_sharded(replicated, mesh, min_size=2048)
  # A mesh without model parallelism has nothing to check.
  parallel.assert_params_sharded(replicated, parallel.create_mesh((8, 1, 1)), min_size=2048)


def test_create_mesh_shapes_and_errors():
  assert dict(parallel.create_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  mesh = parallel.create_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert mesh.axis_names == parallel.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(parallel.create_mesh((-1, 1, 4)).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  with pytest.raises(ValueError, match="do not divide"):
    parallel.create_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="needs 12 devices, 8 are available"):
    parallel.create_mesh((2, 2, 3))
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.create_mesh((-1, -1, 2))
  with pytest.raises(ValueError, match="3 sizes"):
    parallel.create_mesh((2, 4))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sft_loss_gradients_sharded_match_single_device(reference, shape):
  """The SFT loss (vocab head + cross-entropy with a hand-written gradient) on a mesh
  gives the single-device gradients of the same masked cross-entropy."""
  params, (_, ref_loss, ref_grads) = reference
  tokens, attn, loss_mask = _batch()
  batch = {"tokens": tokens, "segment_ids": attn, "loss_mask": loss_mask,
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))}
  loss = make_lm_loss(CFG)

  def mean_loss(p, b):
    num, den, _ = loss(p, b, None)
    return num / den

  mesh = parallel.create_mesh(shape)
  shardings = param_shardings(CFG, mesh)
  with parallel.use_mesh(mesh):
    step = jax.jit(jax.value_and_grad(mean_loss),
                   in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(parallel.replicated(mesh), shardings))
    value, grads = step(parallel.shard_tree(params, shardings), batch)
  np.testing.assert_allclose(float(value), float(ref_loss), atol=1e-5, rtol=0)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), r, atol=1e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
