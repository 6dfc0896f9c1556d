"""Model presets: `--config=configs/models.py:small` or `get_config("tiny")`.

Every stage config embeds one of these under `config.model`; the field names
are `cai_jax.model.MistralConfig`'s (HF's names), which builds one with
`MistralConfig.from_config(cfg.model)`. Plain data: nothing here imports the library.
"""

import ml_collections

PRESETS = {
    # Tests and the embedded pipeline: a vocab that matches the shipped tokenizer,
    # and a sliding window shorter than the longest sequences so the windowed path runs.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128,
                 max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False),
    # Benchmarks on a CPU: 57M params, 16M of them in the untied LM head.
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=4096,
                  max_position_embeddings=32768, rope_theta=10000.0, tie_word_embeddings=False),
    # GPU MFU measurements: ~1.1B params.
    "mistral_1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=22, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, sliding_window=4096, max_position_embeddings=32768,
                       rope_theta=10000.0, tie_word_embeddings=False),
    # Exactly Mistral-7B-v0.1.
    "mistral_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, sliding_window=4096, max_position_embeddings=32768,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
_DEFAULTS = dict(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, dtype="float32",
                 param_dtype="float32", remat=False, remat_policy="minimal",
                 attention_query_block=128, attention_impl="auto", decode_loop="auto")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
  return ml_collections.ConfigDict({**_DEFAULTS, **PRESETS[preset]})
