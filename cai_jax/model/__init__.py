"""Mistral in Flax Linen: config, module, KV cache, LoRA adapters."""

from cai_jax.model import lora

from cai_jax.model.config import MistralConfig
from cai_jax.model.mistral import (KVCache, Mistral, MistralOutput, attention_mask_from_columns,
                                   cache_from_prefill, cache_slots, cudnn_supports, dropout_rngs, grow_vocab,
                                   init_cache, lm_head_kernel, resolve_attention_impl)
from cai_jax.model.sharding import init_params, model_logical_specs, param_shardings

__all__ = [
    "KVCache", "Mistral", "MistralConfig", "MistralOutput", "attention_mask_from_columns",
    "cache_from_prefill", "cache_slots", "cudnn_supports", "dropout_rngs", "grow_vocab", "init_cache",
    "init_params", "lm_head_kernel", "model_logical_specs", "param_shardings",
    "resolve_attention_impl",
]
