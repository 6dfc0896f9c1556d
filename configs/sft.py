"""SFT stage: `python -m launch.train_sft --config=configs/sft.py:tiny --workdir=DIR`.

Presets: `tiny` (CPU, the embedded pipeline and tests) and `mistral_7b`
(NeMo-Aligner CAI tutorial step 3: lr 1e-6, global batch 128, micro batch 1,
max length 4096, answer-only loss, validation every 50 steps).
"""

import ml_collections

from configs import models
from configs.common import add_run_fields, optim_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = models.get_config("tiny")   # used when init_from is empty (random init)
  c.init_from = ""                      # HF or cai_jax model dir
  c.tokenizer = ""                      # sentencepiece .model
  c.template = "nemo"
  c.train_file = ""
  c.val_file = ""                       # empty: hold out val_fraction of train
  c.val_fraction = 0.05
  c.max_seq_len = 256
  c.overlong = "truncate"               # or "drop"
  c.packing = True
  c.global_batch_size = 16
  c.micro_batch_size = 0                # per data-parallel replica (NeMo); 0 = whole batch
  c.num_epochs = 3
  c.max_steps = 0                       # > 0 overrides num_epochs
  c.optim = optim_config(lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.01)
  add_run_fields(c, eval_every=20, save_every=50)
  if preset == "tiny":
    pass
  elif preset == "mistral_7b":
    c.model = models.get_config("mistral_7b")
    c.max_seq_len = 4096
    c.packing = False
    c.global_batch_size = 128
    c.micro_batch_size = 1
    c.num_epochs = 1
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.lora.base_dtype = "bfloat16"       # with lora.rank > 0: the frozen 7B base in bf16
    c.remat = True
    c.optim = optim_config(lr=1e-6, min_lr=0.0, warmup_steps=10, weight_decay=0.01)
    c.log_every = 1
    c.eval_every = 50
    c.save_every = 50
  else:
    raise ValueError(f"unknown sft preset {preset!r}; choose tiny or mistral_7b")
  return c
