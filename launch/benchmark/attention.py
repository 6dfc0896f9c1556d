"""The attention mode: the attention implementations alone against the einsum path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from launch.benchmark.report import row
from launch.benchmark.timing import log, median, time_calls
from launch.benchmark.torch_ref import Setup
from launch.benchmark.workload import Shapes


def measure(setup: Setup, shapes: Shapes, reps: int, ceilings: dict) -> dict:
  """Causal attention alone at the model's head layout (B, T, H, K, hd) with B, T half
  and all of the model mode's batch and sequence, forward and forward+backward: the
  einsum path against `jax.nn.dot_product_attention`'s XLA and (on a GPU) cuDNN
  implementations. Rows: ms, the einsum path as the reference."""
  from cai_jax.model.mistral import _attend, attend_fused
  cfg = setup.config
  batch, seq = max(shapes.model_batch // 2, 1), shapes.model_seq
  H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  dtype = cfg.compute_dtype
  ks = jax.random.split(jax.random.PRNGKey(7), 3)
  q = jax.random.normal(ks[0], (batch, seq, H, hd), dtype)
  k = jax.random.normal(ks[1], (batch, seq, K, hd), dtype)
  v = jax.random.normal(ks[2], (batch, seq, K, hd), dtype)
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))

  def einsum(q, k, v):  # the model's query-blocked path is per layer; here one block
    return _attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), causal, dtype)

  impls = {"einsum": einsum,
           "xla": lambda q, k, v: attend_fused(q, k, v, None, None, "xla")}
  if jax.devices()[0].platform == "gpu":
    impls["cudnn"] = lambda q, k, v: attend_fused(q, k, v, None, None, "cudnn")
  out, seconds = {}, {}
  for name, f in impls.items():
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
    log(f"attention: {name} {batch}x{seq}")
    seconds[name] = {"forward": time_calls(lambda: fwd(q, k, v).block_until_ready(), reps),
                     "forward_backward": time_calls(
                         lambda: jax.block_until_ready(grad(q, k, v)), reps)}
    out[name] = float(jnp.max(jnp.abs(fwd(q, k, v).astype(jnp.float32)
                                      - einsum(q, k, v).astype(jnp.float32))))
  rows = []
  for name in impls:
    if name == "einsum":
      continue
    for phase in ("forward", "forward_backward"):
      rows.append(row("attention", f"{name} {phase.replace('_', '+')} ms", "ms",
                      1e3 * median(seconds[name][phase]),
                      1e3 * median(seconds["einsum"][phase]), higher_is_better=False,
                      reference_name="einsum path", device=setup.device))
  return {"shape": [batch, seq, H, K, hd], "dtype": dtype.name, "seconds": seconds,
          "max_abs_diff_vs_einsum": out, "rows": rows}
