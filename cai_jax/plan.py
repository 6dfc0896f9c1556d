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

A stage's total is what its components sum to, with one exception: the RL stage runs as
separate compiled programs, one after another (rollout, score, update; the evaluation is
counted with the score's forwards), so the temporaries of one never coexist with another's.
Its components named after a phase (`rollout_...`, `score_...`, `update_...`, see `PHASES`)
are that program's temporaries; the total (`total`) is every other component (the models,
resident throughout) plus the largest phase. Each phase is counted per micro-batch when the
config splits it (`ppo.rollout_micro_batch_size`, `forward_micro_batch_size`,
`micro_batch_size`: rows per data-parallel replica that one program step holds).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cai_jax.model import MistralConfig

GIB = 2**30
HEADROOM = 0.1          # of device memory kept free for XLA's scratch and fragmentation
TRAINED_BYTES = 16      # per LoRA-trained param: fp32 param, grad, AdamW mu and nu
# Programs that run one after another; a component "<phase>_..." lives only during its own.
PHASES = ("rollout", "score", "update")


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


def forward_bytes(cfg: MistralConfig, batch: int, seq: int, head: str = "lm",
                  logit_columns: int | None = None, logit_copies: int = 2) -> int:
  """Temporaries of an inference forward (no gradients) of `batch` x `seq` tokens, unsharded.

  Nothing is kept for a backward: one layer's activations exist at a time (the same
  Korthikanti count as `activation_bytes`' per-layer term) plus the residual stream in and
  out of it. The LM head adds fp32 logits on `logit_columns` positions per row (default
  every position), `logit_copies` of them alive at once (logits and their log-softmax: 2; the
  exact KL of two models' distributions: 3)."""
  a = _bytes(cfg.dtype)
  tokens = batch * seq
  window = min(seq, cfg.sliding_window or seq)
  per_layer = tokens * (34 * cfg.hidden_size + 5 * cfg.num_attention_heads * window) * a / 2
  stream = 2 * tokens * cfg.hidden_size * a
  logits = 0
  if head == "lm":
    logits = logit_copies * batch * (seq if logit_columns is None else logit_columns) * (
        cfg.vocab_size * 4)
  return int(per_layer + stream + logits)


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
              base_dtype: str | None = None, rollout_micro_batch: int = 0,
              forward_micro_batch: int = 0, micro_batch: int = 0) -> dict:
  """Per-device bytes of the RL stage. `critic` is the reward model's shape (the critic
  starts from it); `with_critic=False` (GRPO, RLOO, REINFORCE++) has no critic.
  `rollout_batch` and `minibatch` count responses (prompts x samples per prompt).

  The phases' temporaries (their total rule: `total`): `rollout_kv_cache` for the responses
  decoded at once (`rollout_micro_batch` per data-parallel replica, 0 = all of the
  replica's), plus `rollout_prefill_activations`, the forward over their prompts that fills
  it (logits at the last column only); `score_forward_activations`, the largest forward of
  the score and evaluation programs on `forward_micro_batch` rows (the actor's or
  reference's log-probs, the evaluation's exact KL over two models' distributions, the
  critic's or reward model's values); `update_activations`, the actor's (and critic's)
  forward + backward on `micro_batch` rows (0 = the replica's share of a minibatch).

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
  # A micro-batch holds at most the replica's rows (the run itself requires it to divide them).
  decoded = min(rollout_micro_batch or per_replica_rollout, per_replica_rollout)
  forwarded = min(forward_micro_batch or per_replica_rollout, per_replica_rollout)
  trained = min(micro_batch or per_replica_mb, per_replica_mb)
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
  activations = activation_bytes(actor, trained, seq, remat, "lm")
  if with_critic:
    activations += activation_bytes(critic, trained, seq, remat, "scalar")
  # The evaluation's exact KL holds the most logits (two models' log-softmaxes and a third
  # tensor while they combine), more than the score's fused log-probs; the value and reward
  # forwards have scalar heads.
  forwards = max(forward_bytes(actor, forwarded, seq, "lm", new_tokens, logit_copies=3),
                 forward_bytes(critic, forwarded, seq, "scalar"))
  parts.update({
      "rollout_kv_cache": kv_cache_bytes(actor, decoded, seq) / mesh.tensor,
      "rollout_prefill_activations": forward_bytes(actor, decoded, prompt_len, "lm", 1,
                                                   logit_copies=1) / mesh.tensor,
      "score_forward_activations": forwards / mesh.tensor,
      "update_activations": activations / mesh.tensor,
  })
  return parts


def generation_stage(cfg: MistralConfig, mesh: Mesh, *, batch: int, total_len: int) -> dict:
  per_replica = max(batch // mesh.batch_shards, 1)
  return {"params": weights_bytes(cfg) / mesh.model_shards,
          "kv_cache": kv_cache_bytes(cfg, per_replica, total_len) / mesh.tensor}


def phase_of(component: str) -> str | None:
  """The program (`PHASES`) whose temporary `component` is, or None: resident throughout."""
  phase = component.split("_", 1)[0]
  return phase if phase in PHASES else None


def phase_totals(parts: dict) -> dict[str, float]:
  """{phase: bytes of its components}, for the phases `parts` has."""
  out: dict[str, float] = {}
  for k, v in parts.items():
    if phase_of(k):
      out[phase_of(k)] = out.get(phase_of(k), 0) + v
  return out


def total(parts: dict) -> float:
  """A stage's peak bytes: the resident components plus its largest phase (module docstring);
  the plain sum for a stage without phases."""
  resident = sum(v for k, v in parts.items() if phase_of(k) is None)
  return resident + max(phase_totals(parts).values(), default=0)


def fits(parts: dict, device_gib: float) -> bool:
  """Whether a stage's `total` is at most the device's memory less `HEADROOM`."""
  return total(parts) / GIB <= device_gib * (1 - HEADROOM)


def format_table(stages: dict[str, dict], device_gib: float,
                 notes: dict[str, str] | None = None) -> str:
  """Markdown table of every stage's components and total, with its fit verdict; `notes`
  (by stage) adds a first row naming how the stage trains, e.g. "LoRA rank 16"."""
  lines = ["| stage | component | GiB per device |", "|---|---|---|"]
  for name, parts in stages.items():
    if notes and notes.get(name):
      lines.append(f"| {name} | ({notes[name]}) | |")
    for k, v in parts.items():
      lines.append(f"| {name} | {k} | {v / GIB:.2f} |")
    verdict = "fits" if fits(parts, device_gib) else "DOES NOT FIT"
    phases = phase_totals(parts)
    rule = ""
    if phases:
      peak = max(phases, key=phases.get)
      rule = f"models + the largest phase, {peak}; "
    lines.append(f"| **{name}** | **total** ({rule}{verdict} in {device_gib:g} GiB, "
                 f"{HEADROOM:.0%} headroom) | **{total(parts) / GIB:.2f}** |")
  return "\n".join(lines)
