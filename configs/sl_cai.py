"""SL-CAI data: `python -m launch.generate_sl_cai --config=configs/sl_cai.py:tiny --workdir=DIR`.

Presets:
- `tiny`: the in-process engine on a small local model (give it with
  `--config.backend.model_dir=DIR`), the red-team and helpfulness samples
  shipped in `data/`, one few-shot example (the tiny model's context is short),
  24 new tokens per step, one round.
- `mistral_7b`: NeMo-Aligner CAI tutorial step 2 (`generate_sl_cai_dataset.py`):
  Mistral-7B-Instruct behind a NeMo `/generate` server on port 5999, the
  `[INST]` template, greedy with top_k 1, top_p 0.9, repetition penalty 1.2,
  1024 new tokens, end string `</s>`, the full `Anthropic/hh-rlhf`
  red-team-attempts and all of `nvidia/sft_datablend_v1` blended in.

Fields:
- `red_team_prompts`: a local json/jsonl of red-team transcripts or
  `{"prompt": ...}` records, or a hub name (`Anthropic/hh-rlhf`).
  `limit` (-1: all), `shuffle`, `seed` choose which prompts.
- `critique_revision_path`, `few_shot_path`: constitution files ("" = shipped);
  `num_few_shot` (-1: all) examples go before every prompt.
- `rounds`: critique -> revision rounds per prompt (the paper used up to 4).
- `one_record_per_round`: one SFT record per revision instead of per prompt.
- `helpfulness_path` ("" = no blend), `helpfulness_ratio` (-1: all of it; else
  that many helpfulness records per SL-CAI record).
- `template`: chat template that renders every prompt (nemo | mistral_inst).
- `generation`: `cai_jax.cai.backends.GenerationSettings` fields.
- `backend`: where text comes from (`configs.common.backend_config`): kind local
  (model_dir) | nemo (url of `PUT /generate`) | openai (url of `/v1`).
- `mesh`: how a local model is sharded over the devices (data, fsdp, tensor).
- `restart`: discard a partial output instead of resuming it.
"""

import ml_collections

from configs.common import backend_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.red_team_prompts = "data/red_team_attempts_sample.jsonl"
  c.red_team_split = "train"
  c.limit = -1
  c.shuffle = False
  c.seed = 0
  c.critique_revision_path = ""
  c.few_shot_path = ""
  c.num_few_shot = -1
  c.template = "nemo"
  c.system = ""
  c.rounds = 1
  c.one_record_per_round = False
  c.batch_size = 32                     # prompts taken through all steps together
  c.overlong = "drop"                   # a prompt too long for a local model: drop (counted in
                                        # the raw file as status too_long) | truncate | error
  c.helpfulness_path = "data/sft_datablend_sample.jsonl"
  c.helpfulness_ratio = -1.0
  c.dataset_name = "sl_cai"
  c.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=256, greedy=False, temperature=1.0, top_k=0, top_p=1.0,
      repetition_penalty=1.0, min_new_tokens=0, end_strings=("<extra_id_1>",)))
  c.backend = backend_config()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))   # local backend only
  c.restart = False
  c.fsync_every = 32
  c.progress = True

  if preset == "tiny":
    c.num_few_shot = 1
    c.generation.max_new_tokens = 24
    c.generation.min_new_tokens = 1
  elif preset == "mistral_7b":
    c.red_team_prompts = "Anthropic/hh-rlhf"
    c.helpfulness_path = "nvidia/sft_datablend_v1"
    c.template = "mistral_inst"
    c.generation = ml_collections.ConfigDict(dict(
        max_new_tokens=1024, greedy=True, temperature=1.0, top_k=1, top_p=0.9,
        repetition_penalty=1.2, min_new_tokens=1, end_strings=("</s>",)))
    c.backend = backend_config(kind="nemo", url="http://localhost:5999",
                               template="mistral_inst", timeout=1800.0, retries=3)
  else:
    raise ValueError(f"unknown sl_cai preset {preset!r}; choose tiny or mistral_7b")
  return c
