"""LoRA adapters as leaves of the params tree: split from and combined with the frozen base,
created on a mesh, merged into the kernels.

With `MistralConfig.lora_rank > 0` every adapted projection's params hold `lora_a` and
`lora_b` beside `kernel` (see `mistral.Projection`). A LoRA run trains the adapters (and, where a
stage says so, a head) and keeps the rest frozen: `split` cuts a params tree into those two
disjoint trees, `combine` joins them again (inside a jitted step, for free), so the optimizer,
its state and the checkpoints see only the trained leaves.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from cai_jax import parallel
from cai_jax.model.config import MistralConfig
from cai_jax.model.mistral import Mistral

ADAPTER_LEAVES = ("lora_a", "lora_b")


def is_adapter(path: tuple) -> bool:
  return path[-1] in ADAPTER_LEAVES


def trainable_leaves(heads: Sequence[str] = ()) -> Callable[[tuple], bool]:
  """The predicate of what a LoRA stage trains: the adapters plus the named top-level
  modules (e.g. ("score",): the reward model's head)."""
  heads = tuple(heads)
  return lambda path: is_adapter(path) or path[0] in heads


def split(tree, trainable: Callable[[tuple], bool] = is_adapter) -> tuple[dict, dict]:
  """(the leaves `trainable(path)` selects, the rest), each a nested dict of the same shape
  as `tree` minus the other's leaves. Works on params and on their shardings."""
  flat = traverse_util.flatten_dict(dict(tree))
  picked = {k: v for k, v in flat.items() if trainable(k)}
  rest = {k: v for k, v in flat.items() if not trainable(k)}
  return traverse_util.unflatten_dict(picked), traverse_util.unflatten_dict(rest)


def combine(*trees) -> dict:
  """The union of disjoint nested dicts (`split`'s inverse); empty trees add nothing."""
  flat = {}
  for t in trees:
    for k, v in traverse_util.flatten_dict(dict(t)).items():
      if k in flat:
        raise ValueError(f"combine: leaf {'/'.join(k)} is in more than one tree")
      flat[k] = v
  return traverse_util.unflatten_dict(flat)


def adapter_pairs(params) -> dict[tuple, tuple[Any, Any]]:
  """{path of an adapted module (e.g. ("layers", "self_attn", "q_proj")): (A, B)}."""
  flat = traverse_util.flatten_dict(dict(params))
  return {k[:-1]: (v, flat[k[:-1] + ("lora_b",)]) for k, v in flat.items() if k[-1] == "lora_a"}


def delta(a, b, kernel_shape: tuple[int, ...]):
  """B A as a kernel update, float32: A [L, in..., r] and B [L, r, out...] (L: the scanned
  layers) -> [L, in..., out...] = `kernel_shape`."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  L, r = a.shape[0], a.shape[-1]
  d = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r), b.reshape(L, r, -1),
                 precision=jax.lax.Precision.HIGHEST)
  return d.reshape(kernel_shape)


def merge(config: MistralConfig, params) -> tuple[MistralConfig, dict]:
  """(config without LoRA, params with every kernel W replaced by W + scale * B A): one model
  that computes what base + adapters compute, for export and serving. Every leaf and the
  config's param_dtype are float32 (exact for a bf16 base): rounding W + scale * B A back to
  a bf16 base's precision would erase most of a LoRA run's small updates."""
  flat = traverse_util.flatten_dict(dict(params))
  out = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items() if not is_adapter(k)}
  for module, (a, b) in adapter_pairs(params).items():
    w = out[module + ("kernel",)]
    out[module + ("kernel",)] = w + config.lora_scale * delta(a, b, w.shape)
  return config.without_lora().replace(param_dtype="float32"), traverse_util.unflatten_dict(out)


def init_adapters(config: MistralConfig, mesh: Mesh, rng, head: str = "lm",
                  rules=parallel.RULES) -> tuple[dict, dict]:
  """Fresh adapters (A random, B zero) for every target of `config`, created sharded, and
  their shardings. Only the adapters are materialised: the jitted init returns them alone,
  so XLA drops the base weights' initialisation."""
  if not config.lora_rank:
    raise ValueError("init_adapters: the config has lora_rank 0")
  boxed = jax.eval_shape(
      lambda: Mistral(config, head=head).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  specs, _ = split(parallel.logical_specs(boxed)["params"])
  abstract, _ = split(nn.unbox(boxed)["params"])
  shardings = parallel.tree_shardings(abstract, specs, mesh, rules)
  model = Mistral(config, head=head)

  def init(r):
    full = nn.unbox(model.init(r, jnp.zeros((1, 1), jnp.int32)))["params"]
    return split(full)[0]

  return jax.jit(init, out_shardings=shardings)(rng), shardings


def count(params) -> int:
  """Number of scalars in a params tree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
