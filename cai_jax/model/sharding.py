"""Where Mistral's params live on a mesh: their logical axes mapped by `parallel.RULES`.

The model-aware half of the sharding helpers; `cai_jax.parallel` (mesh, rules, generic
tree helpers) knows nothing of the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cai_jax import parallel
from cai_jax.model.config import MistralConfig
from cai_jax.model.mistral import Mistral


def _dummy_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def model_logical_specs(config: MistralConfig, head: str = "lm"):
  """(logical PartitionSpecs, abstract params) of `Mistral(config, head)`; allocates nothing."""
  boxed = jax.eval_shape(
      lambda: Mistral(config, head=head).init(jax.random.PRNGKey(0), _dummy_tokens()))
  return parallel.logical_specs(boxed)["params"], nn.unbox(boxed)["params"]


def param_shardings(config: MistralConfig, mesh: Mesh, head: str = "lm", rules=parallel.RULES):
  """NamedShardings of the params pytree of `Mistral(config, head)` on `mesh`."""
  specs, abstract = model_logical_specs(config, head)
  return parallel.tree_shardings(abstract, specs, mesh, rules)


def init_params(config: MistralConfig, mesh: Mesh, rng, head: str = "lm", rules=parallel.RULES):
  """Random params created directly sharded (eval_shape -> shardings -> jitted init), so a
  model bigger than one device is never materialised whole. Returns (params, shardings)."""
  shardings = param_shardings(config, mesh, head, rules)
  model = Mistral(config, head=head)

  def init(r):
    return nn.unbox(model.init(r, _dummy_tokens()))["params"]

  return jax.jit(init, out_shardings=shardings)(rng), shardings
