"""AdamW with warmup + cosine/constant schedule, decay mask and clipping (optax)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(*, lr: float, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "cosine", min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` (or constant)."""
  warmup_steps = max(int(warmup_steps), 0)
  if schedule == "constant":
    after = optax.constant_schedule(lr)
  elif schedule == "cosine":
    decay_steps = max(int(total_steps) - warmup_steps, 1)
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=(min_lr / lr) if lr else 0.0)
  else:
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")
  if warmup_steps == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after],
                              [warmup_steps])


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings, LoRA adapters) only; never on norm
  scales."""
  def keep(path, _):
    return getattr(path[-1], "key", None) in ("kernel", "embedding", "lora_a", "lora_b")
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, total_steps: int):
  """Returns (optax transformation, schedule) from an `optim` ConfigDict.

  Fields: lr, min_lr, warmup_steps, schedule, weight_decay, b1, b2, eps, grad_clip.
  """
  schedule = learning_rate_schedule(
      lr=optim_cfg.lr, total_steps=total_steps, warmup_steps=optim_cfg.get("warmup_steps", 0),
      schedule=optim_cfg.get("schedule", "cosine"), min_lr=optim_cfg.get("min_lr", 0.0))
  chain = []
  if optim_cfg.get("grad_clip", 0.0):
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.98),
                           eps=optim_cfg.get("eps", 1e-8),
                           weight_decay=optim_cfg.get("weight_decay", 0.0), mask=decay_mask))
  return optax.chain(*chain), schedule
