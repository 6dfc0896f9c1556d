"""What a mode runs on: its sizes (`Shapes`), its random token ids, and the stand-in
tokenizer the RL modes give cai_jax (`IdTokenizer`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from launch.benchmark import figures


def _cpu_size(name: str):
  """A field whose default is the CPU mode's size (targets.json), read when a Shapes is made."""
  return dataclasses.field(default_factory=lambda: figures.shape_sizes("cpu")[name])


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Batch sizes and lengths of every mode; a size not given is the CPU mode's
  (BENCHMARKS.md's); `for_device` gives a device mode's whole set."""
  model_batch: int = _cpu_size("model_batch")
  model_seq: int = _cpu_size("model_seq")
  gen_batches: tuple[int, ...] = _cpu_size("gen_batches")
  gen_prompt: int = _cpu_size("gen_prompt")
  gen_new: int = _cpu_size("gen_new")
  sft_batch: int = _cpu_size("sft_batch")
  sft_seq: int = _cpu_size("sft_seq")
  sft_extra: tuple[tuple[int, int], ...] = _cpu_size("sft_extra")   # more (batch, seq) steps
  ppo_batch: int = _cpu_size("ppo_batch")
  ppo_prompt: int = _cpu_size("ppo_prompt")
  ppo_new: int = _cpu_size("ppo_new")
  grpo_prompts: int = _cpu_size("grpo_prompts")    # prompts per iteration
  grpo_group: int = _cpu_size("grpo_group")        # responses per prompt (TRL's num_generations)
  grpo_prompt: int = _cpu_size("grpo_prompt")
  grpo_new: int = _cpu_size("grpo_new")
  dpo_batch: int = _cpu_size("dpo_batch")          # pairs per step
  dpo_prompt: int = _cpu_size("dpo_prompt")
  dpo_reply: int = _cpu_size("dpo_reply")          # chosen reply; the rejected one is 3/4 of it
  lora_rank: int = _cpu_size("lora_rank")          # the lora mode's adapters (sft sizes)

  @classmethod
  def for_device(cls, device: str) -> "Shapes":
    return cls(**figures.shape_sizes(device))


def random_tokens(seed: int, shape, vocab: int, low: int = 3) -> np.ndarray:
  """Random ids avoiding 0..2 (pad / bos / eos), so no reference treats one as padding."""
  return np.random.default_rng(seed).integers(low, vocab, shape, dtype=np.int64).astype(np.int32)


class IdTokenizer:
  """Just enough of `cai_jax.tokenizer.Tokenizer` for a PPO / GRPO iteration on raw token ids."""

  def __init__(self, vocab_size: int, pad_id: int, eot_id: int):
    self.vocab_size = vocab_size
    self.pad_id = pad_id
    self.source = "<benchmark ids>"
    self.special_token_ids = {"<extra_id_1>": eot_id}
