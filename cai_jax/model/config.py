"""Mistral hyper-parameters, named as Hugging Face's `MistralConfig` names them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp


def _dtype_name(value: Any) -> str:
  return jnp.dtype(value).name


REMAT_POLICIES = ("minimal", "none")
# How attention over a whole sequence (training, scoring, prefill) is computed; decode
# steps against the KV cache always use the einsum path. See `resolve_attention_impl`.
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
DECODE_LOOPS = ("auto", "unroll", "scan")
# The projections LoRA can adapt, by their Hugging Face module names (PEFT's target_modules).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class MistralConfig:
  """Shapes and numerics of a Mistral decoder.

  Field names follow `transformers.MistralConfig` so a `config.json` maps onto
  it one to one. `dtype` is the compute dtype, `param_dtype` the storage dtype
  of parameters (e.g. bfloat16 compute over float32 master weights).
  `sliding_window=None` means global causal attention.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 14336
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = 4096
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  # Recompute each decoder layer's activations in the backward pass, keeping
  # only the layer inputs (least memory, one extra forward of compute).
  remat: bool = False
  # What a layer keeps for the backward when `remat` is False: "minimal" keeps
  # the outputs of the projection and MLP matmuls and recomputes the cheap rest
  # (norms, RoPE, SwiGLU, attention scores and probabilities); "none" keeps
  # everything. "minimal" is both faster (the [heads, seq, seq] probabilities
  # and elementwise temporaries are never written out and read back) and lighter.
  remat_policy: str = "minimal"
  # Causal attention over the whole sequence (training, scoring, prefill) runs
  # in query blocks of at least this many tokens (and at most 8 blocks), each
  # against only the keys it can see: ~(n+1)/2n of the full [T, T] work for n
  # blocks, less with a sliding window shorter than T. 0 = one block.
  attention_query_block: int = 128
  # "einsum": the query-blocked einsum path above (fastest on CPU); "cudnn": cuDNN flash
  # attention through `jax.nn.dot_product_attention` (NVIDIA GPU, bf16/fp16); "xla":
  # that function's XLA implementation (one [T, T] block); "auto": cudnn on a GPU when
  # the dtype and head size allow it, einsum everywhere else (`resolve_attention_impl`).
  attention_impl: str = "auto"
  # How a decode step loops over the layers: "unroll" (one copy of the layer per layer in
  # the program, each reading its weights at a static offset of the stacked params) or
  # "scan" (`lax.scan`, whose per-layer slicing ran a memory-bound step ~3x slower on a
  # GPU, BENCHMARKS.md); "auto": unroll on accelerators, scan on CPU (where unrolling
  # measured ~13% slower, README). Training and prefill always scan.
  decode_loop: str = "auto"
  # LoRA (Hu et al., 2021): with lora_rank > 0 every projection named in lora_targets gets
  # adapters A [in, r] (random) and B [r, out] (zero) in float32 beside its kernel, and computes
  # x W + (lora_alpha / lora_rank) * dropout(x) A B (dropout only when the caller passes a
  # "dropout" rng). Not Hugging Face config fields: a merged export has lora_rank 0.
  lora_rank: int = 0
  lora_alpha: float = 32.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    object.__setattr__(self, "dtype", _dtype_name(self.dtype))
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if self.decode_loop not in DECODE_LOOPS:
      raise ValueError(f"decode_loop must be one of {DECODE_LOOPS}, got {self.decode_loop!r}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      object.__setattr__(self, "sliding_window", None)
    targets = self.lora_targets
    if isinstance(targets, str):
      targets = [t for t in targets.replace(" ", "").split(",") if t]
    object.__setattr__(self, "lora_targets", tuple(targets))
    unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if unknown:
      raise ValueError(f"lora targets {unknown} are not projections of Mistral; choose from "
                       f"{', '.join(LORA_TARGETS)}")
    if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"lora rank must be >= 0 and dropout in [0, 1), got rank="
                       f"{self.lora_rank}, dropout={self.lora_dropout}")
    if self.lora_rank and not self.lora_targets:
      raise ValueError("lora rank > 0 needs at least one target projection")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def lora_scale(self) -> float:
    """alpha / rank: the factor of the adapters' product B A (0 without LoRA)."""
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def adapts(self, module: str) -> bool:
    """Whether the projection named `module` (e.g. "q_proj") carries LoRA adapters."""
    return self.lora_rank > 0 and module in self.lora_targets

  def without_lora(self) -> "MistralConfig":
    """The same model without adapters (the base a LoRA run trains on, or its merge)."""
    return self.replace(lora_rank=0)

  def unrolls_decode(self, backend: str | None = None) -> bool:
    """Whether a decode step unrolls its layer loop on `backend` (default: JAX's)."""
    if self.decode_loop == "auto":
      import jax
      return (backend or jax.default_backend()) != "cpu"
    return self.decode_loop == "unroll"

  @classmethod
  def from_config(cls, cfg: Any, **overrides) -> "MistralConfig":
    """From a stage config's `model` block (a ConfigDict or mapping with this class's field
    names, e.g. `configs/models.py`'s presets), with `overrides` on top; an unknown field is
    an error naming it."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"model config: unknown field(s) {unknown}; MistralConfig has "
                       f"{sorted(known)}")
    return cls(**d)

  def replace(self, **changes) -> "MistralConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, head: str = "lm") -> int:
    """Parameter count; `head` is "lm" (vocab head) or "scalar"."""
    d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
    attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
    layer = attn + 3 * d * f + 2 * d
    total = v * d + self.num_hidden_layers * layer + d
    if head == "lm" and not self.tie_word_embeddings:
      total += d * v
    elif head == "scalar":
      total += d
    return total

  def flops_per_token(self, seq_len: int, head: str = "lm") -> float:
    """Forward FLOPs per token: 2 * matmul params + attention scores."""
    n = self.num_params(head) - self.vocab_size * self.hidden_size  # embedding gather is free
    if head == "lm" and self.tie_word_embeddings:
      n += self.vocab_size * self.hidden_size
    window = min(seq_len, self.sliding_window or seq_len)
    attn = 2 * 2 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * window
    return 2 * n + attn / 2  # causal: on average half the keys

  # --- Hugging Face config.json ---------------------------------------------

  def to_hf_dict(self) -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "sliding_window": self.sliding_window,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": self.param_dtype,
    }

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json", **overrides) -> "MistralConfig":
    """Builds a config from an HF `config.json` dict; rejects other architectures."""
    model_type = d.get("model_type")
    if model_type not in ("mistral", "llama"):
      raise ValueError(f"{source}: model_type is {model_type!r}, expected 'mistral'")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: hidden_act={act!r} is not supported (Mistral uses 'silu')")
    rope_theta = d.get("rope_theta")
    if rope_theta is None:
      rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{source}: missing field(s) {missing}")
    kwargs = dict(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
        head_dim=d.get("head_dim"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        sliding_window=d.get("sliding_window"),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=int(_first(d.get("bos_token_id"), 1)),
        eos_token_id=int(_first(d.get("eos_token_id"), 2)),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


def _first(value, default):
  if value is None:
    return default
  if isinstance(value, (list, tuple)):
    return value[0] if value else default
  return value
