"""Shared test helpers: tiny random `transformers` Mistral models and torch references.

Weights are drawn at roughly unit output scale (not HF's 0.02 init) and the
RMSNorm scales are perturbed away from 1, so a transposed kernel or a dropped
norm shows up as an O(1) logit error instead of hiding under a 1e-4 tolerance.
"""

from __future__ import annotations

import os

import numpy as np

from launch.benchmark.torch_ref import randomize_hf_weights

# Small enough to build and compile in well under a second; vocab 101 is not a
# multiple of 8 and head_dim 8 is the smallest that still exercises rotate-half.
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=None,
            max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False)


def hf_config(**overrides):
  """A tiny `transformers.MistralConfig` (eager attention, float32)."""
  import transformers
  kwargs = {**TINY, **overrides}
  cfg = transformers.MistralConfig(**kwargs)
  cfg._attn_implementation = "eager"
  return cfg


def randomize_(model, seed: int) -> None:
  """Redraws every parameter in place: ~unit-variance activations, norms != 1."""
  randomize_hf_weights(model, seed)


def make_hf_model(seed: int = 0, *, cls: str = "MistralForCausalLM", **overrides):
  """A random tiny HF Mistral (`cls` names the transformers class) in eval mode."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = hf_config(**overrides)
  if cls == "MistralForSequenceClassification":
    cfg.num_labels = 1
    cfg.pad_token_id = 0
  model = getattr(transformers, cls)(cfg)
  model.config._attn_implementation = "eager"
  randomize_(model, seed)
  return model.eval()


def save_hf_model(model, path, **kwargs) -> str:
  """`save_pretrained` to `path` (safetensors); returns the path as str."""
  path = str(path)
  model.save_pretrained(path, **kwargs)
  return path


def make_hf_dir(path, seed: int = 0, **overrides):
  """Random tiny HF model saved to `path`; returns (model, path)."""
  model = make_hf_model(seed, **overrides)
  return model, save_hf_model(model, path)


def load_torch(path, cls: str = "MistralForCausalLM"):
  """Loads a saved directory with transformers (float32, eager attention)."""
  import torch
  import transformers
  model = getattr(transformers, cls).from_pretrained(
      str(path), attn_implementation="eager", dtype=torch.float32)
  return model.eval()


def torch_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
  """Float32 logits [B, T, V] (or [B, T, num_labels] scores) as NumPy."""
  import torch
  kwargs = {}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  if position_ids is not None:
    kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kwargs)
  return out.logits.float().numpy()


def random_tokens(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def read_safetensors_dir(path) -> dict[str, np.ndarray]:
  """Every tensor of an HF directory (single file or sharded), by name, as NumPy."""
  from safetensors.numpy import load_file
  out = {}
  for fname in sorted(os.listdir(path)):
    if fname.endswith(".safetensors"):
      out.update(load_file(os.path.join(path, fname)))
  return out
