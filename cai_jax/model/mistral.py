"""Mistral decoder in Flax Linen, computing what Hugging Face's `MistralModel` computes.

Layout choices that matter elsewhere:
- Decoder layers are one `nn.scan`, so every layer param has a leading `layers`
  axis ([num_layers, ...]); HF conversion stacks / unstacks along it.
- Attention kernels keep heads as their own axis: q_proj kernel is
  [embed, heads, head_dim] (HF's [heads*head_dim, embed] transposed and reshaped),
  with HF's rotate-half RoPE, so no q/k permutation is involved.
- The attention mask is built from *column indices* (position of a token in its
  row of the batch) rather than from RoPE positions: column c attends to column j
  iff j is valid, j <= c, c - j < sliding_window and both share a segment. This
  one rule serves right/left padding, packing and the rolling KV cache.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax.model.config import MistralConfig
from cai_jax.parallel import constrain

# Finite "minus infinity": a fully masked row (a pad query) gives a uniform,
# finite softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

Array = jax.Array
_MAX_QUERY_BLOCKS = 8


def _init(axes):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)


class KVCache(NamedTuple):
  """Decode-time state of every layer.

  k: [layers, batch, kv_heads, head_dim, slots] and v: [layers, batch,
  kv_heads, slots, head_dim]: the layouts a decode step's two attention
  matmuls read without transposing (q @ k and probs @ v, both plain).
  `col[b, s]` is the column index of the token held in slot s of row b, -1
  when empty or padding. The column written at step c goes to slot c % slots,
  so with slots == sliding_window the buffer rolls and never grows past the
  window.
  `index` is the next column to be written (scalar int32).
  """
  k: Array
  v: Array
  col: Array
  index: Array

  @property
  def num_slots(self) -> int:
    return self.v.shape[3]


def init_cache(config: MistralConfig, batch: int, num_slots: int, dtype=None) -> KVCache:
  shape = (config.num_hidden_layers, batch, config.num_key_value_heads, num_slots, config.head_dim)
  dtype = dtype or config.compute_dtype
  return KVCache(
      k=jnp.zeros(shape[:3] + shape[4:] + shape[3:4], dtype), v=jnp.zeros(shape, dtype),
      col=jnp.full((batch, num_slots), -1, jnp.int32), index=jnp.zeros((), jnp.int32))


def cache_slots(config: MistralConfig, total_len: int) -> int:
  """Slots a cache needs for `total_len` columns: capped at the sliding window."""
  if config.sliding_window is not None:
    return min(total_len, config.sliding_window)
  return total_len


def cache_from_prefill(k: Array, v: Array, valid: Array, num_slots: int) -> KVCache:
  """Turns a prefill's per-layer keys/values [L, B, kv_heads, T, head_dim] into a cache
  (keys stored transposed, see `KVCache`).

  Only the last `num_slots` columns are kept, each in slot `column % num_slots`,
  so later decode steps continue the same ring.
  """
  T = k.shape[3]
  cols = jnp.where(valid, jnp.arange(T, dtype=jnp.int32)[None, :], -1)
  if T <= num_slots:
    pad = num_slots - T
    k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    cols = jnp.pad(cols, ((0, 0), (0, pad)), constant_values=-1)
  else:
    start = T - num_slots
    shift = start % num_slots
    k = jnp.roll(k[:, :, :, start:], shift, axis=3)
    v = jnp.roll(v[:, :, :, start:], shift, axis=3)
    cols = jnp.roll(cols[:, start:], shift, axis=1)
  return KVCache(k=k.swapaxes(3, 4), v=v, col=cols, index=jnp.asarray(T, jnp.int32))


def attention_mask_from_columns(q_col: Array, k_col: Array, sliding_window: int | None,
                                q_seg: Array | None = None, k_seg: Array | None = None) -> Array:
  """[B, Tq, Tk] boolean mask: causal, windowed, same segment, valid keys (k_col >= 0)."""
  qc = q_col[:, :, None]
  kc = k_col[:, None, :]
  mask = (kc >= 0) & (kc <= qc)
  if sliding_window is not None:
    mask &= (qc - kc) < sliding_window
  if q_seg is not None:
    mask &= q_seg[:, :, None] == k_seg[:, None, :]
  return mask


def rope_cos_sin(positions: Array, head_dim: int, theta: float):
  """HF's rotate-half RoPE tables: cos/sin of shape [B, T, head_dim], float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [B, T, heads, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


class Projection(nn.Module):
  """A bias-free projection `x @ kernel` over x's last `n_in` dims with a logically
  partitioned kernel [in dims..., out dims...], plus LoRA adapters when
  `config.adapts(name)`.

  Used instead of `nn.DenseGeneral`, whose initializer sees a flattened kernel
  shape and so cannot carry per-dimension logical axis names. Adapters: `lora_a` [in
  dims..., r] (uniform in +-1/sqrt(fan_in), PEFT's default) and `lora_b` [r, out dims...]
  (zero), float32, sharded on the kernel's axes; the output gains scale * (dropout(x) A) B.
  """
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  config: MistralConfig
  n_in: int = 1

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    n = self.n_in
    kernel = self.param("kernel", _init(self.axes), self.shape, cfg.weight_dtype)
    y = _flat_matmul(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), n)
    if not cfg.adapts(self.name):
      return y
    r = cfg.lora_rank
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                              in_axis=tuple(range(n)), out_axis=n)
    a = self.param("lora_a", nn.with_logical_partitioning(a_init, self.axes[:n] + ("lora_rank",)),
                   self.shape[:n] + (r,), jnp.float32)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          ("lora_rank",) + self.axes[n:]),
                   (r,) + self.shape[n:], jnp.float32)
    if cfg.lora_dropout and self.has_rng("dropout"):
      x = nn.Dropout(cfg.lora_dropout, deterministic=False)(x)
    h = _flat_matmul(x.astype(cfg.compute_dtype), a.astype(cfg.compute_dtype), n)
    delta = _flat_matmul(h * cfg.lora_scale, b.astype(cfg.compute_dtype), 1)
    return y + delta.astype(y.dtype)


def _flat_matmul(x: Array, kernel: Array, n_in: int) -> Array:
  """x [..., in dims] @ kernel [in dims, out dims] -> [..., out dims] (x's last `n_in` dims
  against the kernel's first ones), as one 2-D matmul ([rows, in] @ [in, out]). Not an
  einsum over the unflattened dims because XLA:CPU runs the gradient of that einsum
  (kernel gradient contracting over batch *and* time) about 2x slower than the same
  contraction over one flattened dim, and a LoRA adapter's skinny einsums ~3x slower."""
  lead = x.shape[:x.ndim - n_in]
  k_in = math.prod(kernel.shape[:n_in])
  out = kernel.shape[n_in:]
  y = x.reshape(-1, k_in) @ kernel.reshape(k_in, -1)
  return y.reshape(lead + out)


def _attend(q: Array, k: Array, v: Array, mask: Array, dtype, k_transposed: bool = False) -> Array:
  """softmax(q k / sqrt(head_dim), masked) v: q [B, T, H, hd], k/v [B, K, S, hd]
  (k [B, K, hd, S] if `k_transposed`), mask [B, T, S] -> [B, T, H, hd].

  Each KV head's G query heads are stacked with time, [B, K, G*T, hd], so the
  scores are one [G*T, S] matmul per (batch, KV head) that lands in the layout
  the mask, the softmax and the second matmul read (no transposes of [.., S]).
  """
  B, T, H, hd = q.shape
  K, S = v.shape[1], v.shape[2]
  G = H // K
  q = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, hd)
  scores = jnp.einsum("bkqd,bkds->bkqs" if k_transposed else "bkqd,bksd->bkqs", q, k,
                      preferred_element_type=jnp.float32) * (hd ** -0.5)
  scores = jnp.where(mask[:, None, None], scores.reshape(B, K, G, T, S), _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(B, K, G * T, S)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
  return out.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def cudnn_supports(config: MistralConfig) -> str | None:
  """Why cuDNN flash attention cannot serve `config` (None when it can): it takes
  bf16/fp16 operands and head sizes that are multiples of 8 up to 128."""
  if config.compute_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"compute dtype {config.dtype} (cuDNN flash attention takes bfloat16 or float16)"
  if config.head_dim % 8 or config.head_dim > 128:
    return f"head_dim {config.head_dim} (cuDNN flash attention takes multiples of 8 up to 128)"
  return None


def resolve_attention_impl(config: MistralConfig, backend: str | None = None) -> str:
  """The attention implementation a whole-sequence pass of `config` uses on `backend`
  (default: JAX's default backend).

  "auto" is "cudnn" on an NVIDIA GPU when `cudnn_supports(config)`, else "einsum": on
  a GPU the query-blocked einsum path beats `jax.nn.dot_product_attention`'s XLA
  implementation (BENCHMARKS.md), and on CPU and TPU it is the XLA program that skips
  the blocks a causal or windowed mask hides. An explicit "cudnn" where it cannot run
  is an error naming why.
  """
  impl = config.attention_impl
  backend = backend or jax.default_backend()
  if impl == "auto":
    return "cudnn" if backend == "gpu" and cudnn_supports(config) is None else "einsum"
  if impl == "cudnn":
    if backend != "gpu":
      raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU; this process runs on "
                       f"{backend!r} (use 'auto', 'einsum' or 'xla')")
    why = cudnn_supports(config)
    if why:
      raise ValueError(f"attention_impl='cudnn' cannot serve {why}; use 'auto' or 'einsum'")
  return impl


def whole_sequence_attention(config: MistralConfig, seq_len: int, masked: bool,
                             backend: str | None = None) -> str:
  """The implementation a whole-sequence pass of `seq_len` tokens uses: as
  `resolve_attention_impl`, except that cuDNN applies a mask as a bias, which its
  gradient kernels take only for even lengths; then "auto" falls back to "einsum" and
  an explicit "cudnn" is an error."""
  impl = resolve_attention_impl(config, backend)
  if impl == "cudnn" and masked and seq_len % 2:
    if config.attention_impl == "auto":
      return "einsum"
    raise ValueError(f"attention_impl='cudnn' cannot apply a padding/segment mask over an odd "
                     f"sequence length ({seq_len}); use an even length or 'auto'")
  return impl


def fused_attention_mask(k_col: Array, segment_ids: Array | None) -> Array:
  """[B, 1, T, T] mask for `jax.nn.dot_product_attention` (which adds causality and the
  window itself): key valid (k_col >= 0) and in the query's segment. The diagonal is
  always allowed, so a padding query attends to itself instead of to nothing (a fully
  masked row would be NaN in a flash kernel, and NaN reaches every output it touches
  through 0 * NaN); real queries see their own key anyway."""
  T = k_col.shape[1]
  mask = jnp.broadcast_to((k_col >= 0)[:, None, :], (k_col.shape[0], T, T))
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return (mask | jnp.eye(T, dtype=bool)[None])[:, None]


def attend_fused(q: Array, k: Array, v: Array, mask: Array | None, sliding_window: int | None,
                 implementation: str) -> Array:
  """Causal (windowed) attention through `jax.nn.dot_product_attention`: q [B, T, H, hd],
  k/v [B, T, K, hd] (GQA by K < H), `mask` from `fused_attention_mask` or None (every
  key valid, one segment). The window is Mistral's: query c sees keys c - W < j <= c."""
  T = q.shape[1]
  window = None
  if sliding_window is not None and sliding_window < T:
    window = (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                      local_window_size=window, implementation=implementation)


class Attention(nn.Module):
  config: MistralConfig
  impl: str = "einsum"   # `whole_sequence_attention`'s choice; decode steps: "einsum"

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache, write_slots):
    """`mask`: [B, T, S] for the einsum path; for a fused `impl` the
    `fused_attention_mask` or None."""
    cfg = self.config
    H, K, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    q = Projection((D, H, hd), ("embed", "heads", "head_dim"), cfg, name="q_proj")(x)
    k = Projection((D, K, hd), ("embed", "kv_heads", "head_dim"), cfg, name="k_proj")(x)
    v = Projection((D, K, hd), ("embed", "kv_heads", "head_dim"), cfg, name="v_proj")(x)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    fused = None
    if self.impl != "einsum":  # [B, T, K, hd] is the layout jax.nn.dot_product_attention takes
      fused = attend_fused(q, k, v, mask, cfg.sliding_window, self.impl)
    k = k.transpose(0, 2, 1, 3)    # [B, K, T, hd], the cache layout
    v = v.transpose(0, 2, 1, 3)

    if layer_cache is None:
      k_all, v_all = k, v
      new_cache = (k, v)
    else:
      # The whole [layers, ...] cache rides in the scan carry and is updated in
      # place at (layer, :, slot); slicing it per layer as scan xs/ys would copy
      # every layer's cache on every decode step.
      ck_all, cv_all, layer = layer_cache
      k_new, v_new = k.astype(ck_all.dtype)[None], v.astype(cv_all.dtype)[None]
      if k.shape[2] == 1:
        ck_all = jax.lax.dynamic_update_slice(ck_all, k_new.swapaxes(3, 4),
                                              (layer, 0, 0, 0, write_slots[0]))
        cv_all = jax.lax.dynamic_update_slice(cv_all, v_new, (layer, 0, 0, write_slots[0], 0))
      else:  # [layer, :, :, :, slots] / [layer, :, :, slots] index as [T, B, K, hd]
        ck_all = ck_all.at[layer, :, :, :, write_slots].set(k_new[0].transpose(2, 0, 1, 3))
        cv_all = cv_all.at[layer, :, :, write_slots].set(v_new[0].transpose(2, 0, 1, 3))
      k_all = jax.lax.dynamic_index_in_dim(ck_all, layer, keepdims=False).astype(q.dtype)
      v_all = jax.lax.dynamic_index_in_dim(cv_all, layer, keepdims=False).astype(q.dtype)
      new_cache = (ck_all, cv_all, layer + 1)

    T = q.shape[1]
    # At most _MAX_QUERY_BLOCKS blocks (each unrolled in the program), of at least
    # attention_query_block queries.
    block = cfg.attention_query_block and max(cfg.attention_query_block, -(-T // _MAX_QUERY_BLOCKS))
    if fused is not None:
      out = fused
    elif layer_cache is None and block and T > block:
      # Query block [s, e) only needs keys [lo, e): later columns are in its
      # future and columns before lo are outside every one of its windows.
      outs = []
      for s in range(0, T, block):
        e = min(s + block, T)
        lo = 0 if cfg.sliding_window is None else max(0, s - cfg.sliding_window + 1)
        outs.append(_attend(q[:, s:e], k_all[:, :, lo:e], v_all[:, :, lo:e], mask[:, s:e, lo:e],
                            cfg.compute_dtype))
      out = jnp.concatenate(outs, axis=1)
    else:
      out = _attend(q, k_all, v_all, mask, cfg.compute_dtype, k_transposed=layer_cache is not None)
    out = Projection((H, hd, D), ("heads", "head_dim", "embed"), cfg, 2, name="o_proj")(out)
    return out, new_cache


class MLP(nn.Module):
  config: MistralConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    D, F = cfg.hidden_size, cfg.intermediate_size
    gate = Projection((D, F), ("embed", "mlp"), cfg, name="gate_proj")(x)
    up = Projection((D, F), ("embed", "mlp"), cfg, name="up_proj")(x)
    h = constrain(jax.nn.silu(gate) * up,
                  ("activation_batch", "activation_length", "activation_mlp"))
    return Projection((F, D), ("mlp", "embed"), cfg, name="down_proj")(h)


class DecoderLayer(nn.Module):
  """One pre-norm block; the scan carry is the residual stream."""
  config: MistralConfig
  return_kv: bool = False
  attention: str = "einsum"   # the attention implementation (`Attention.impl`)

  @nn.compact
  def __call__(self, carry, cos, sin, mask, write_slots):
    x, layer_cache = carry
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name)
    attn_out, new_cache = Attention(cfg, self.attention, name="self_attn")(
        norm("input_layernorm")(x), cos, sin, mask, layer_cache, write_slots)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    if layer_cache is not None:
      return (x, new_cache), None
    return (x, None), (new_cache if self.return_kv else None)


def dropout_rngs(config: MistralConfig, rng) -> dict | None:
  """`rngs` for `Mistral.apply` in a training forward: a "dropout" key when the model has
  LoRA dropout and `rng` is given; None (deterministic) otherwise, e.g. in evaluation."""
  if rng is None or not (config.lora_rank and config.lora_dropout):
    return None
  return {"dropout": rng}


class MistralOutput(NamedTuple):
  logits: Array | None        # [B, T, vocab] (lm head) or [B, T] (scalar head), float32;
                              # None with apply_head=False
  hidden: Array | None        # final-norm hidden states [B, T, D] if asked for
  cache: KVCache | None       # updated cache (decode) or None
  kv: tuple | None            # per-layer (k, v) [L, B, kv_heads, T, head_dim] from a prefill


def lm_head_kernel(config: MistralConfig, params) -> Array:
  """The vocab projection of an LM-head `Mistral`'s params as an [embed, vocab]
  matrix in the compute dtype (the transposed embedding when tied): what the
  module's head multiplies the final hidden states by."""
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].astype(config.compute_dtype).T
  return params["lm_head"]["kernel"].astype(config.compute_dtype)


def grow_vocab(config: MistralConfig, params, vocab_size: int):
  """(config, params) with room for `vocab_size` tokens: new embedding rows (and LM-head
  columns, when untied) are the mean of the existing ones, the usual start for tokens
  added to a trained model (e.g. chat markers); existing ids keep their weights, so
  text without the new tokens gets exactly the logits it had. Host (NumPy) arrays."""
  import numpy as np
  old = config.vocab_size
  if vocab_size < old:
    raise ValueError(f"grow_vocab: {vocab_size} is smaller than the model's vocab {old}")
  if vocab_size == old:
    return config, params

  def grow(x, axis):
    x = np.asarray(x)
    mean = np.mean(x.astype(np.float64), axis=axis, keepdims=True).astype(x.dtype)
    reps = [1] * x.ndim
    reps[axis] = vocab_size - old
    return np.concatenate([x, np.tile(mean, reps)], axis=axis)

  params = dict(params)
  params["embed_tokens"] = {"embedding": grow(params["embed_tokens"]["embedding"], 0)}
  if "lm_head" in params:
    params["lm_head"] = {**params["lm_head"], "kernel": grow(params["lm_head"]["kernel"], 1)}
  return config.replace(vocab_size=vocab_size), params


class Mistral(nn.Module):
  """Mistral decoder with a vocab head (`head="lm"`) or a scalar head (`head="scalar"`).

  `Mistral(cfg).apply({"params": p}, tokens)` returns logits [batch, seq, vocab]
  (float32). For the scalar head it returns [batch, seq] values, one per position.

  Args to `__call__`:
    tokens: int [B, T].
    positions: int [B, T] RoPE positions; default: column index (0..T-1), or
      continuing from the cache's index when decoding.
    attention_mask: [B, T] 1 for real tokens, 0 for padding (keys that are
      padding are never attended to).
    segment_ids: [B, T] packed-sequence ids; attention never crosses segments.
    cache: a `KVCache` to decode into; the new tokens occupy columns
      cache.index .. cache.index + T - 1.
    return_kv: also return each layer's keys/values (to build a cache after a prefill).
    return_hidden: also return the final hidden states.
    head_columns: (start, stop), static: apply the head to those columns only,
      e.g. the positions that predict a response, so the vocab projection is
      not spent on the prompt. Logits are then [B, stop - start, ...].
    apply_head: False skips the head: returns a `MistralOutput` whose `logits`
      is None and whose `hidden` holds the final hidden states, for a loss that
      applies the head itself (`lm_head_kernel`, `train.lm.vocab_logprobs`).
      Only for `apply`: `init` must run the head to create its params.
    full_output: return a `MistralOutput` instead of just the logits.
  """
  config: MistralConfig
  head: str = "lm"

  @nn.compact
  def __call__(self, tokens, positions=None, attention_mask=None, segment_ids=None, *,
               cache: KVCache | None = None, return_kv: bool = False,
               return_hidden: bool = False, full_output: bool = False,
               head_columns: tuple[int, int] | None = None, apply_head: bool = True):
    cfg = self.config
    B, T = tokens.shape
    if self.head not in ("lm", "scalar"):
      raise ValueError(f"head must be 'lm' or 'scalar', got {self.head!r}")

    if cache is None:
      cols = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      k_col = cols if attention_mask is None else jnp.where(attention_mask.astype(bool), cols, -1)
      masked = attention_mask is not None or segment_ids is not None
      attention = whole_sequence_attention(cfg, T, masked)
      if attention == "einsum":
        mask = attention_mask_from_columns(cols, k_col, cfg.sliding_window, segment_ids,
                                           segment_ids)
      elif not masked:
        mask = None  # plain causal: the kernel needs no mask at all
      else:
        mask = fused_attention_mask(k_col, segment_ids)
      write_slots = None
      new_col = None
    else:
      attention = "einsum"  # a decode step reads the cache in its own layout
      q_cols = cache.index + jnp.arange(T, dtype=jnp.int32)
      write_slots = q_cols % cache.num_slots
      written = jnp.broadcast_to(q_cols, (B, T))
      if attention_mask is not None:
        written = jnp.where(attention_mask.astype(bool), written, -1)
      new_col = cache.col.at[:, write_slots].set(written)
      cols = jnp.broadcast_to(q_cols, (B, T))
      mask = attention_mask_from_columns(cols, new_col, cfg.sliding_window)
    if positions is None:
      positions = cols
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, embedding_init=_init(("vocab", "embed")),
                     name="embed_tokens")
    x = embed(tokens)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    layer_cls = DecoderLayer
    if cfg.remat:
      layer_cls = nn.remat(layer_cls, prevent_cse=False)
    elif cfg.remat_policy == "minimal":
      layer_cls = nn.remat(layer_cls, prevent_cse=False,
                           policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    layers = nn.scan(
        layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
        # Fully unrolled, lax.scan emits no loop: each layer reads its slice of the
        # stacked weights at a static offset (see MistralConfig.decode_loop).
        unroll=cfg.num_hidden_layers if (cache is not None and cfg.unrolls_decode()) else 1,
    )(cfg, return_kv=return_kv, attention=attention, name="layers")
    layer_cache = None if cache is None else (cache.k, cache.v, jnp.zeros((), jnp.int32))
    (x, carried), kv = layers((x, layer_cache), cos, sin, mask, write_slots)

    hidden = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="norm")(x)
    head_in = hidden if head_columns is None else hidden[:, head_columns[0]:head_columns[1]]
    if not apply_head:
      out = None
    elif self.head == "scalar":
      out = nn.Dense(1, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                     kernel_init=_init(("embed", "score")), name="score")(head_in)
      out = out[..., 0].astype(jnp.float32)
    elif cfg.tie_word_embeddings:
      out = embed.attend(head_in).astype(jnp.float32)
    else:
      out = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, kernel_init=_init(("embed", "vocab")),
                     name="lm_head")(head_in).astype(jnp.float32)

    if apply_head and not (full_output or return_kv or return_hidden or cache is not None):
      return out
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=carried[0], v=carried[1], col=new_col, index=cache.index + T)
    return MistralOutput(logits=out, hidden=hidden if (return_hidden or not apply_head) else None,
                         cache=new_cache, kv=kv if (return_kv and cache is None) else None)
