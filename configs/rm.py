"""Reward model: `python -m launch.train_rm --config=configs/rm.py:tiny --workdir=DIR`.

Presets: `tiny` (CPU) and `mistral_7b` (NeMo-Aligner CAI tutorial step 5: lr 9e-6
cosine to 9e-7, weight decay 0.1, global batch 512, micro batch 1, seq 4096,
activation checkpointing, initialised from the SL-CAI SFT model).
"""

import ml_collections

from configs import models
from configs.common import add_run_fields, optim_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = models.get_config("tiny")   # used when init_from is empty
  c.init_from = ""                      # the SFT model dir (HF or cai_jax); its LM head is replaced
  c.tokenizer = ""
  c.template = "nemo"                   # the template the comparison texts are rendered with
  c.train_file = ""                     # comparisons jsonl: alternating chosen / rejected lines
  c.test_file = ""
  c.max_seq_len = 256
  c.overlong = "drop"                   # or "truncate" (keeps the end-of-turn token)
  c.margin = 0.0
  c.center_coef = 0.0                   # reward-centering: coef * mean((r_c + r_r)^2)
  c.global_batch_size = 16
  c.micro_batch_size = 0                # per data-parallel replica (NeMo); 0 = whole batch
  c.num_epochs = 2
  c.max_steps = 0
  c.optim = optim_config(lr=1e-3, min_lr=1e-4, warmup_steps=3, weight_decay=0.1)
  add_run_fields(c, eval_every=20, save_every=50)
  if preset == "tiny":
    pass
  elif preset == "mistral_7b":
    c.model = models.get_config("mistral_7b")
    c.max_seq_len = 4096
    c.global_batch_size = 512
    c.micro_batch_size = 1
    c.num_epochs = 1
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.lora.base_dtype = "bfloat16"       # with lora.rank > 0: the frozen 7B base in bf16
    c.remat = True
    c.optim = optim_config(lr=9e-6, min_lr=9e-7, warmup_steps=10, weight_decay=0.1)
    c.log_every = 1
    c.eval_every = 25
    c.save_every = 25
    c.keep_checkpoints = 1
  else:
    raise ValueError(f"unknown rm preset {preset!r}; choose tiny or mistral_7b")
  return c
