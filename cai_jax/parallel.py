"""Device mesh, logical-axis rules and sharding helpers.

One mesh with axes ('data', 'fsdp', 'tensor'). Params carry logical axis names
(set by `nn.with_logical_partitioning` in the model); `RULES` maps them to mesh
axes. A logical axis whose size does not divide evenly over its mesh axes is
left replicated on that dimension (e.g. one KV head on a 2-way tensor axis);
`assert_params_sharded` then tells whether the big tensors are still split.

Typical use:

    mesh = create_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    params, shardings = cai_jax.model.init_params(config, mesh, rng)  # born sharded
    with use_mesh(mesh):                                      # activation constraints
      logits = jax.jit(apply, in_shardings=..., out_shardings=...)(params, batch)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# `mesh_from_config(ONE_DEVICE)`: the first device (in a single-process job).
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Weights: FSDP over the embedding dimension,
# Megatron-style tensor parallelism over heads / MLP / vocab. Activations:
# batch over data+fsdp.
RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("score", None),
    ("lora_rank", None),     # LoRA adapters: split like their kernel's other dimension
)


def create_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh ('data', 'fsdp', 'tensor'); at most one axis may be -1 (fill the rest).

  `shape` is a mapping (e.g. a ConfigDict with data/fsdp/tensor) or a triple;
  default: all devices on 'fsdp'.
  """
  devices = list(devices if devices is not None else jax.devices())
  if shape is None:
    sizes = [1, -1, 1]
  elif isinstance(shape, Mapping) or hasattr(shape, "get"):
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
  if len(sizes) != 3:
    raise ValueError(f"mesh shape needs 3 sizes (data, fsdp, tensor), got {sizes}")
  n = len(devices)
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if n % known:
      raise ValueError(f"mesh shape {sizes}: {n} devices do not divide by {known}")
    sizes[fill[0]] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices, {n} are available")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # CPU / odd topologies: plain row-major order
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg: Mapping[str, int] | None = None) -> Mesh:
  """The mesh a config's `mesh` block (data / fsdp / tensor sizes, -1 = the rest) asks for;
  None or {} = all devices on 'fsdp'. When every size is given and together they ask for
  fewer devices than this single process has (a one-device run on a bigger host), the mesh
  takes the first devices. Every stage, the server and the benchmark build meshes here."""
  m = mesh_cfg or {}
  sizes = [int(m.get(a, default)) for a, default in zip(MESH_AXES, (1, -1, 1))]
  n = math.prod(sizes)
  if -1 not in sizes and jax.process_count() == 1 and n < jax.device_count():
    return create_mesh(sizes, devices=jax.devices()[:n])
  return create_mesh(sizes)


def mesh_spec(logical: Sequence[str | None] | P | None, shape: Sequence[int], mesh: Mesh,
              rules=RULES) -> P:
  """Maps logical axis names to a PartitionSpec valid for an array of `shape`."""
  rule_map = dict(rules)
  logical = tuple(logical or ())
  logical = logical + (None,) * (len(shape) - len(logical))
  used: set[str] = set()
  out = []
  for name, size in zip(logical, shape):
    axes = rule_map.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    # Keep the longest prefix of unused axes whose product divides this dim.
    chosen: list[str] = []
    for a in axes:
      if a in used or mesh.shape[a] == 1:
        continue
      if size % (math.prod(mesh.shape[c] for c in chosen) * mesh.shape[a]) == 0:
        chosen.append(a)
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*out)


def logical_specs(boxed_tree):
  """Logical PartitionSpecs of a tree of `nn.Partitioned` boxes (from `init`/`eval_shape`)."""
  return nn.get_partition_spec(boxed_tree)


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh, rules=RULES):
  """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map(
      lambda a, spec: NamedSharding(mesh, mesh_spec(spec, a.shape, mesh, rules)),
      abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, P))


def shard_tree(tree, shardings):
  """Places an existing pytree (host or device arrays) onto the given shardings."""
  return jax.tree_util.tree_map(jax.device_put, tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def assert_params_sharded(params, mesh: Mesh, min_size: int = 2**14, max_fraction: float = 0.5):
  """Raises if, on a mesh with fsdp*tensor > 1, a large param is not split.

  Every param with >= `min_size` elements must hold at most `max_fraction` of
  its elements on each device (MaxText's "sufficiently sharded" guard).
  """
  model_parallel = mesh.shape["fsdp"] * mesh.shape["tensor"]
  if model_parallel == 1:
    return
  offenders = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if x.size < min_size:
      continue
    local = x.sharding.shard_shape(x.shape)
    fraction = math.prod(local) / x.size
    if fraction > max_fraction:
      offenders.append(f"{jax.tree_util.keystr(path)} {x.shape} -> per-device {local}")
  if offenders:
    raise AssertionError("params not sharded on mesh "
                         f"{dict(mesh.shape)}:\n  " + "\n  ".join(offenders))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, mesh_spec(logical, x.shape, mesh, rules))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=RULES):
  """Mesh + logical rules in scope, so the model's activation constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
