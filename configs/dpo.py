"""DPO: `python -m launch.train_dpo --config=configs/dpo.py:tiny --workdir=DIR`.

Direct preference optimisation on the comparison files RL-CAI and hh-rlhf write
(alternating chosen / rejected `{"text": ...}` lines; RL-CAI's soft labels `p_chosen`
become per-pair label smoothing, conservative DPO). The policy starts from `init_from`
(the SFT model) and the frozen reference is that same starting model.

Presets: `tiny` (CPU, tests: a random tiny model when `init_from` is empty) and
`mistral_7b` (bf16 compute, fp32 master weights, beta 0.1, lr 5e-7, global batch 64,
the SL-CAI SFT model as `init_from` and RL-CAI's
`*_{train,test}_comparisons_with_chat_prompt.jsonl` as `train_file` / `test_file`).
"""

import ml_collections

from configs import models
from configs.common import add_run_fields, optim_config


def dpo_config(*, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               ref_batch_size: int = 0) -> ml_collections.ConfigDict:
  """beta: the KL strength (sigmoid: scales the log-ratio margin; ipo: the target
  1 / (2 beta)). loss_type: sigmoid | ipo. label_smoothing: eps for pairs with hard
  labels (a pair with a soft label p < 1 uses eps = 1 - p). ref_batch_size: pairs per
  forward of the reference pass (0 = the training micro-batch over all replicas)."""
  return ml_collections.ConfigDict(dict(beta=beta, loss_type=loss_type,
                                        label_smoothing=label_smoothing,
                                        ref_batch_size=ref_batch_size))


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = models.get_config("tiny")   # used when init_from is empty (tests only)
  c.init_from = ""                      # the SFT model dir (HF or cai_jax): policy and reference
  c.tokenizer = ""
  c.template = "nemo"                   # the template the comparison texts are rendered with
  c.train_file = ""                     # comparisons jsonl: alternating chosen / rejected lines
  c.test_file = ""
  c.max_seq_len = 256
  c.overlong = "truncate"               # keep each text's first max_seq_len tokens, or "drop"
  c.global_batch_size = 16
  c.micro_batch_size = 0                # per data-parallel replica (NeMo); 0 = whole batch
  c.num_epochs = 2
  c.max_steps = 0
  c.dpo = dpo_config(beta=0.1)
  c.optim = optim_config(lr=1e-3, min_lr=1e-4, warmup_steps=3, weight_decay=0.0)
  add_run_fields(c, eval_every=20, save_every=50)
  if preset == "tiny":
    pass
  elif preset == "mistral_7b":
    c.model = models.get_config("mistral_7b")
    c.max_seq_len = 4096
    c.global_batch_size = 64
    c.micro_batch_size = 1
    c.num_epochs = 1
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.lora.base_dtype = "bfloat16"       # with lora.rank > 0: the frozen 7B base in bf16
    c.remat = True
    c.dpo = dpo_config(beta=0.1, ref_batch_size=0)
    c.optim = optim_config(lr=5e-7, min_lr=0.0, warmup_steps=10, weight_decay=0.0)
    c.log_every = 1
    c.eval_every = 25
    c.save_every = 25
    c.keep_checkpoints = 1
  else:
    raise ValueError(f"unknown dpo preset {preset!r}; choose tiny or mistral_7b")
  return c
