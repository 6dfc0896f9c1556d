"""Memory estimates per stage, so a job's fit is known before it is launched.

Counts bytes per device for: parameters, gradients, AdamW moments (two fp32
tensors per param), fp32 master weights when compute is lower precision,
activations (with or without per-layer rematerialisation), the loss's logits,
and the KV caches of generation. Sharding: params, grads and optimizer state
are split over fsdp x tensor; activations over the data-parallel batch and
tensor. Formulas are first-order (the usual Megatron/Korthikanti accounting)
and meant for a fits / does-not-fit decision, not a byte-exact prediction.

LoRA (a config with `lora_rank > 0`): the base is frozen (weights only, in the base dtype)
and only the adapters (plus a scalar head where the stage trains one) carry fp32 params,
grads and AdamW moments. Activations are as in full fine-tuning: the backward still runs
through every layer to reach the earlier adapters.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cai_jax.model import MistralConfig

GIB = 2**30
HEADROOM = 0.1          # of device memory kept free for XLA's scratch and fragmentation
TRAINED_BYTES = 16      # per LoRA-trained param: fp32 param, grad, AdamW mu and nu


@dataclasses.dataclass
class Mesh:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def model_shards(self) -> int:
    return self.fsdp * self.tensor

  @property
  def batch_shards(self) -> int:
    return self.data * self.fsdp


def _bytes(dtype: str) -> int:
  return np.dtype(dtype).itemsize if dtype != "bfloat16" else 2


def weights_bytes(cfg: MistralConfig, head: str = "lm", dtype: str | None = None) -> int:
  return cfg.num_params(head) * _bytes(dtype or cfg.param_dtype)


def projection_shapes(cfg: MistralConfig) -> dict[str, tuple[int, int]]:
  """(in, out) features of each projection LoRA can adapt, by its Hugging Face name."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
          "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def lora_params(cfg: MistralConfig) -> int:
  """Adapter scalars of `cfg`: r (in + out) per adapted projection (A [in, r], B [r, out]),
  per layer; 0 without LoRA."""
  if not cfg.lora_rank:
    return 0
  shapes = projection_shapes(cfg)
  per_layer = sum(sum(shapes[t]) for t in cfg.lora_targets)
  return cfg.num_hidden_layers * cfg.lora_rank * per_layer


def trainable_bytes(cfg: MistralConfig, head: str = "lm") -> dict:
  """Params + grads + AdamW (mu, nu in fp32) for one trained model, unsharded."""
  n = cfg.num_params(head)
  p = _bytes(cfg.param_dtype)
  return {"params": n * p, "grads": n * p, "optimizer": n * 8}


def lora_bytes(cfg: MistralConfig, head: str = "lm", base_dtype: str | None = None) -> dict:
  """A LoRA-trained model, unsharded: the frozen base (in `base_dtype`, default the param
  dtype) and the trained adapters (plus the scalar head, trained in fp32) with their state."""
  head_params = cfg.hidden_size if head == "scalar" else 0
  trained = "adapters+head+grads+optimizer" if head_params else "adapters+grads+optimizer"
  base = (cfg.num_params(head) - head_params) * _bytes(base_dtype or cfg.param_dtype)
  return {"frozen_base": base, trained: (lora_params(cfg) + head_params) * TRAINED_BYTES}


def activation_bytes(cfg: MistralConfig, batch: int, seq: int, remat: bool,
                     head: str = "lm") -> int:
  """Training activations for one micro-batch of `batch` x `seq` tokens (unsharded).

  A layer's full activations are ~ (34 D + 5 H S) bytes per token at 2-byte
  activations (Korthikanti et al.), scaled to the compute dtype; that is what
  every layer keeps with `remat_policy="none"`. With remat, each layer keeps
  its input (D per token); with the "minimal" policy it keeps its matmul
  outputs (input, q, k, v, attention output, MLP gate/up/down: 3 D + H hd +
  2 K hd + 2 F per token). Either way one layer's full activations exist while
  it is recomputed. The logits of the loss (fp32, plus their softmax) come on top.
  """
  a = _bytes(cfg.dtype)
  tokens = batch * seq
  window = min(seq, cfg.sliding_window or seq)
  per_layer = tokens * (34 * cfg.hidden_size + 5 * cfg.num_attention_heads * window) * a / 2
  if remat:
    acts = cfg.num_hidden_layers * tokens * cfg.hidden_size * a + per_layer
  elif cfg.remat_policy == "minimal":
    kept = (3 * cfg.hidden_size + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
            * cfg.head_dim + 2 * cfg.intermediate_size)
    acts = cfg.num_hidden_layers * tokens * kept * a + per_layer
  else:
    acts = cfg.num_hidden_layers * per_layer
  logits = 2 * tokens * (cfg.vocab_size if head == "lm" else 1) * 4
  return int(acts + logits)


def kv_cache_bytes(cfg: MistralConfig, batch: int, total_len: int) -> int:
  slots = min(total_len, cfg.sliding_window or total_len)
  return (2 * cfg.num_hidden_layers * batch * slots * cfg.num_key_value_heads * cfg.head_dim
          * _bytes(cfg.dtype))


def train_stage(cfg: MistralConfig, mesh: Mesh, *, micro_batch: int, seq: int, remat: bool,
                head: str = "lm", base_dtype: str | None = None) -> dict:
  """Per-device bytes of an SFT / reward-model stage (micro_batch per data replica). With
  `cfg.lora_rank > 0`: frozen base (in `base_dtype`, default param_dtype) + trained adapters
  (and the scalar head) instead of params, grads and optimizer."""
  t = lora_bytes(cfg, head, base_dtype) if cfg.lora_rank else trainable_bytes(cfg, head)
  out = {k: v / mesh.model_shards for k, v in t.items()}
  out["activations"] = activation_bytes(cfg, micro_batch, seq, remat, head) / mesh.tensor
  return out


def ppo_stage(actor: MistralConfig, critic: MistralConfig, mesh: Mesh, *, rollout_batch: int,
              prompt_len: int, new_tokens: int, minibatch: int, remat: bool,
              frozen_dtype: str | None = None, with_critic: bool = True,
              base_dtype: str | None = None) -> dict:
  """Per-device bytes of the RL stage. `critic` is the reward model's shape (the critic
  starts from it); `with_critic=False` (GRPO, RLOO, REINFORCE++) has no critic.
  `rollout_batch` and `minibatch` count responses (prompts x samples per prompt).

  Full fine-tuning (`actor.lora_rank` 0): actor (+ critic) trained, reference and reward
  model frozen in `frozen_dtype`: four models (three without a critic). LoRA: the actor's
  frozen base (in `base_dtype`, else `frozen_dtype`, else param_dtype) is also the
  reference; the critic is adapters (`critic`'s LoRA fields) and a value head on the reward
  model's frozen body, so that body is counted once; only adapters and heads train.
  """
  shards = mesh.model_shards
  seq = prompt_len + new_tokens
  per_replica_rollout = max(rollout_batch // mesh.batch_shards, 1)
  per_replica_mb = max(minibatch // mesh.batch_shards, 1)
  rm_weights = weights_bytes(critic, "scalar", frozen_dtype)
  if actor.lora_rank:
    base = lora_bytes(actor, "lm", base_dtype or frozen_dtype)
    parts = {"actor_frozen_base (also the reference)": base["frozen_base"] / shards,
             "actor_adapters+grads+optimizer": base["adapters+grads+optimizer"] / shards}
    if with_critic:
      heads = (lora_params(critic) + critic.hidden_size) * TRAINED_BYTES
      parts["reward_model_params (shared by the critic)"] = rm_weights / shards
      parts["critic_adapters+head+grads+optimizer"] = heads / shards
    else:
      parts["reward_model_params"] = rm_weights / shards
  else:
    parts = {"actor_params+grads+optimizer": sum(trainable_bytes(actor, "lm").values()) / shards}
    if with_critic:
      critic_bytes = sum(trainable_bytes(critic, "scalar").values())
      parts["critic_params+grads+optimizer"] = critic_bytes / shards
    parts["reference_params"] = weights_bytes(actor, "lm", frozen_dtype) / shards
    parts["reward_model_params"] = rm_weights / shards
  activations = activation_bytes(actor, per_replica_mb, seq, remat, "lm")
  if with_critic:
    activations += activation_bytes(critic, per_replica_mb, seq, remat, "scalar")
  parts.update({
      "rollout_kv_cache": kv_cache_bytes(actor, per_replica_rollout, seq) / mesh.tensor,
      "update_activations": activations / mesh.tensor,
  })
  return parts


def generation_stage(cfg: MistralConfig, mesh: Mesh, *, batch: int, total_len: int) -> dict:
  per_replica = max(batch // mesh.batch_shards, 1)
  return {"params": weights_bytes(cfg) / mesh.model_shards,
          "kv_cache": kv_cache_bytes(cfg, per_replica, total_len) / mesh.tensor}


def fits(parts: dict, device_gib: float) -> bool:
  """Whether a stage's components sum to at most the device's memory less `HEADROOM`."""
  return sum(parts.values()) / GIB <= device_gib * (1 - HEADROOM)


def format_table(stages: dict[str, dict], device_gib: float,
                 notes: dict[str, str] | None = None) -> str:
  """Markdown table of every stage's components and total, with its fit verdict; `notes`
  (by stage) adds a first row naming how the stage trains, e.g. "LoRA rank 16"."""
  lines = ["| stage | component | GiB per device |", "|---|---|---|"]
  for name, parts in stages.items():
    if notes and notes.get(name):
      lines.append(f"| {name} | ({notes[name]}) | |")
    total = sum(parts.values())
    for k, v in parts.items():
      lines.append(f"| {name} | {k} | {v / GIB:.2f} |")
    verdict = "fits" if fits(parts, device_gib) else "DOES NOT FIT"
    lines.append(f"| **{name}** | **total** ({verdict} in {device_gib:g} GiB, "
                 f"{HEADROOM:.0%} headroom) | **{total / GIB:.2f}** |")
  return "\n".join(lines)
