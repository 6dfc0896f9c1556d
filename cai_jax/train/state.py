"""Train state, its shardings, and the jitted train / eval steps shared by every stage.

A stage supplies a *loss function*

    loss_fn(params, batch, rng) -> (numerator, denominator, metric_sums)

whose loss over a batch is `numerator / denominator` (e.g. summed token NLL
over the number of target tokens). Returning sums rather than means makes
gradient accumulation exact: the step adds numerators, denominators and
gradients over micro-batches and divides once, so 4 micro-batches of 2 give
the same update as one batch of 8. `metric_sums` are divided by the same
denominator.

Under LoRA the state's params are only the trained leaves; the steps take the frozen rest
(`frozen`, bound once when the step is made, an argument of the compiled program, not a
constant) and join them (`lora.combine`), so the loss always sees the whole model while
gradients and optimizer state exist for the trained leaves only.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cai_jax.compile_options import gradient_program_options
from cai_jax.model import lora

# rng: the step's key (training) or None (evaluation); losses use it for LoRA dropout only.
LossFn = Callable[[Any, dict, jax.Array | None], tuple[jax.Array, jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array         # uint32[2] raw PRNG key data


def create_state(params, optimizer: optax.GradientTransformation, param_shardings, mesh: Mesh,
                 seed: int = 0) -> tuple[TrainState, Any]:
  """Builds a TrainState directly on the mesh and returns it with its shardings."""
  shardings = state_shardings(params, optimizer, param_shardings, mesh)

  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                      rng=jax.random.key_data(jax.random.PRNGKey(seed)))

  state = jax.jit(init, in_shardings=(param_shardings,), out_shardings=shardings,
                  donate_argnums=(0,))(params)
  return state, shardings


def state_shardings(params, optimizer, param_shardings, mesh: Mesh):
  """Shardings of a TrainState: optimizer moments follow their params, scalars replicate."""
  replicated = NamedSharding(mesh, P())
  params_def = jax.tree_util.tree_structure(param_shardings)
  opt_abstract = jax.eval_shape(optimizer.init, params)

  def is_params_like(node):
    try:
      return jax.tree_util.tree_structure(node) == params_def
    except Exception:
      return False

  opt_shardings = jax.tree_util.tree_map(
      lambda node: param_shardings if is_params_like(node) else replicated,
      opt_abstract, is_leaf=lambda n: is_params_like(n) or isinstance(n, jax.ShapeDtypeStruct))
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                    rng=replicated)


def abstract_state(state_or_shapes, shardings):
  """ShapeDtypeStructs (with shardings) of a state, for orbax restores."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_or_shapes, shardings)


def split_microbatches(batch: dict, accum_steps: int) -> dict:
  """[B, ...] -> [accum, B / accum, ...], micro-batch i = rows i, i+accum, ...

  Interleaving keeps every device's contiguous shard of the batch spread over
  all micro-batches, so accumulation moves no rows between devices.
  """
  def split(x):
    B = x.shape[0]
    if B % accum_steps:
      raise ValueError(f"batch of {B} rows does not split into {accum_steps} micro-batches")
    return x.reshape((B // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params, batch: dict, rng, accum_steps: int):
  """Sums (numerator, denominator, metric sums, grads) over micro-batches with a scan."""
  grad_fn = jax.value_and_grad(lambda p, b, r: _with_aux(loss_fn(p, b, r)), has_aux=True)
  if accum_steps == 1:
    (num, (den, metrics)), grads = grad_fn(params, batch, rng)
    return num, den, metrics, grads
  micro = split_microbatches(batch, accum_steps)
  rngs = jax.random.split(rng, accum_steps)
  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  (_, (_, metric_shapes)), _ = jax.eval_shape(grad_fn, params, first, rngs[0])
  zeros = (jnp.zeros(()), jnp.zeros(()),
           jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
           jax.tree_util.tree_map(jnp.zeros_like, params))

  def body(carry, xs):
    mb, r = xs
    (num, (den, metrics)), grads = grad_fn(params, mb, r)
    return jax.tree_util.tree_map(jnp.add, carry, (num, den, metrics, grads)), None

  (num, den, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, rngs))
  return num, den, metrics, grads


def _with_aux(out):
  num, den, metrics = out
  return num, (jnp.asarray(den, jnp.float32), metrics)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule,
                    *, accum_steps: int, shardings: TrainState, batch_shardings, mesh: Mesh,
                    frozen=None, frozen_shardings=None):
  """Jitted `(state, batch) -> (state, metrics)` with stated shardings and donation;
  `frozen` (with `frozen_shardings`): the model's untrained leaves (LoRA)."""

  def step(state: TrainState, batch: dict, frozen):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    num, den, metric_sums, grads = accumulate_gradients(
        lambda p, b, r: loss_fn(lora.combine(p, frozen), b, r), state.params, batch, step_rng,
        accum_steps)
    denom = jnp.maximum(den, 1.0)  # an all-masked batch gives zero loss and grads, not NaN
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / denom for k, v in metric_sums.items()}
    # param_norm is of the *updated* params: a finite loss and gradient can still
    # give a non-finite update (an inf learning rate, an Adam step on a tiny v),
    # and the loop must see that before it checkpoints this state.
    metrics.update(loss=num / denom, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), lr=schedule(state.step),
                   denominator=den)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=jax.random.key_data(rng))
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings, frozen_shardings or {}),
                   out_shardings=(shardings, replicated), donate_argnums=(0,),
                   compiler_options=gradient_program_options())
  frozen = frozen or {}
  return lambda state, batch: jitted(state, batch, frozen)


def make_eval_step(loss_fn: LossFn, *, param_shardings, batch_shardings, mesh: Mesh,
                   frozen=None, frozen_shardings=None):
  """Jitted `(params, batch) -> (numerator, denominator, metric_sums)`; `frozen` as in
  `make_train_step`."""

  def step(params, batch, frozen):
    num, den, metrics = loss_fn(lora.combine(params, frozen), batch, None)  # no dropout
    return num, jnp.asarray(den, jnp.float32), metrics

  jitted = jax.jit(step, in_shardings=(param_shardings, batch_shardings, frozen_shardings or {}),
                   out_shardings=NamedSharding(mesh, P()))
  frozen = frozen or {}
  return lambda params, batch: jitted(params, batch, frozen)
