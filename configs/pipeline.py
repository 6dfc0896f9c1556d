"""The whole CAI pipeline: `python -m launch.pipeline --workdir=DIR [--config=configs/pipeline.py:tiny]`.

One ConfigDict holding every stage's config (each is that stage's own
`configs/<stage>.py` preset), so `--config.sft.optim.lr=...` reaches any field.
The cross-stage paths (which model a stage starts from, which files it reads)
are filled in by `launch/pipeline.py` from the workdir layout; a field you set
explicitly wins.

Presets:
- `tiny` (default): CPU, minutes, data shipped in `data/`. There is no
  pretrained tiny Mistral, so stage `base` first trains a helpful-only
  assistant (SFT on the shipped helpfulness conversations) from random
  weights: the "helpful-only model" CAI starts from.
- `add_chat_tokens=True` (either preset): stage `chat_tokens` adds the SFT
  template's markers (`<extra_id_0..2>`) to the tokenizer as single pieces and
  grows the base model's embedding and LM head by rows set to the mean
  embedding; every later stage uses that tokenizer and model. Off by default:
  a tokenizer without the markers works as shipped (they are token sequences).
- `--config.lora.rank=R` (either preset): every trained stage (sft, rm, ppo, dpo; not the
  tiny `base`, which trains from random weights) trains LoRA adapters with this block,
  except a stage whose own `lora.rank` is set, which keeps its own block.
- `mistral_7b`: NeMo-Aligner's CAI tutorial. `--config.base_model` (HF
  Mistral-7B-v0.1, the SFT starting point) and `--config.instruct_model` (HF
  Mistral-7B-Instruct-v0.1, SL-CAI's helpful model and its tokenizer) are
  required; RL-CAI's and the evaluation's judge is an OpenAI-compatible
  endpoint (`--config.judge_url`, key in $NVIDIA_API_KEY by default).
"""

import ml_collections

from configs import dpo, models, ppo, process_hh, rl_cai, rm, sft, sl_cai
from configs.common import backend_config, lora_config

STAGES = ("tokenizer", "chat_tokens", "base", "sl_cai", "sft", "hh", "rl_cai", "rm", "ppo",
          "dpo", "evaluate")
POLICY_STAGES = ("ppo", "dpo")


LORA_STAGES = ("sft", "rm", "ppo", "dpo")


def apply_lora(cfg) -> None:
  """The pipeline's `lora` block (rank > 0) becomes the block of every trained stage whose
  own rank is 0; a stage with its own rank keeps its block."""
  lora = cfg.get("lora", None)
  if lora is None or not lora.rank:
    return
  for stage in LORA_STAGES:
    if not cfg[stage].lora.rank:
      with cfg[stage].unlocked():
        cfg[stage].lora = lora.copy_and_resolve_references()


def evaluate_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.red_team_prompts = "data/red_team_attempts_eval.jsonl"   # held out from every stage
  c.helpful_prompts = "data/sft_datablend_eval.jsonl"
  c.limit = 0                           # prompts per set; 0 = all
  c.template = "nemo"
  c.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=32, greedy=True, temperature=1.0, top_k=0, top_p=1.0,
      repetition_penalty=1.0, min_new_tokens=1, end_strings=("<extra_id_1>",)))
  c.batch_size = 32
  c.judge = rl_cai.judge_config(batch_size=32)
  c.seed = 0
  c.num_examples = 3                    # example responses shown in summary.md
  if preset == "mistral_7b":
    c.red_team_prompts = "Anthropic/hh-rlhf"
    c.helpful_prompts = "nvidia/sft_datablend_v1"
    c.limit = 256
    c.generation.max_new_tokens = 512
    c.batch_size = 64
  return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.stages = ",".join(STAGES)           # a subset, e.g. "rm,ppo,evaluate"
  # The stage that turns the SFT model into the aligned policy: ppo (the RL stage, with any
  # ppo.advantage estimator: gae, grpo, rloo, reinforce_pp) or dpo (on RL-CAI's comparisons);
  # the other one is skipped, and evaluation compares whichever ran with base and SFT.
  c.policy_stage = "ppo"
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.tokenizer = ""                      # "" (tiny): trained on tokenizer_corpus in the workdir;
                                        # a path: that SentencePiece model (the tiny model's
                                        # vocab follows it)
  c.add_chat_tokens = False             # add the template's markers to the tokenizer as pieces
                                        # and grow the base model's embedding and LM head
  c.tokenizer_corpus = "data/tokenizer_corpus.txt"
  c.tokenizer_vocab_size = 512
  c.base_model = ""                     # mistral_7b: HF Mistral-7B dir (SFT starts here)
  c.instruct_model = ""                 # mistral_7b: HF Mistral-7B-Instruct dir (SL-CAI model)
  c.judge_url = ""                      # mistral_7b: OpenAI-compatible judge endpoint
  c.lora = lora_config()                # rank > 0: LoRA in every trained stage (see above)

  c.base = sft.get_config("tiny")       # tiny only: the helpful-only starting model
  c.base.train_file = "data/sft_datablend_sample.jsonl"
  c.base.num_epochs = 16
  c.base.optim.lr = 2e-3
  c.base.eval_every = 40
  c.base.save_every = 100
  c.sl_cai = sl_cai.get_config(preset)
  c.sft = sft.get_config(preset)
  c.hh = process_hh.get_config(preset)
  c.rl_cai = rl_cai.get_config(preset)
  c.rm = rm.get_config(preset)
  c.ppo = ppo.get_config(preset)
  c.dpo = dpo.get_config(preset)
  c.evaluate = evaluate_config(preset)

  if preset == "tiny":
    c.base.model = models.get_config("tiny")
    c.base.model.hidden_size = 128
    c.base.model.intermediate_size = 384
    c.base.model.num_hidden_layers = 4
    c.base.model.head_dim = 32
    c.base.max_seq_len = 192
    c.sft.max_seq_len = 192
    c.sft.num_epochs = 4
    c.rm.max_seq_len = 192
    c.rm.num_epochs = 3
    c.ppo.max_prompt_len = 128
    c.ppo.iterations = 12
    # Against a learned reward model (not the synthetic reward the tiny PPO preset is
    # tuned on): a gentler actor and a firmer KL penalty keep the policy near the SFT model.
    c.ppo.actor_optim.lr = 2e-4
    c.ppo.ppo.init_kl_coef = 0.1
    c.dpo.max_seq_len = 192
    c.dpo.num_epochs = 2
    c.dpo.optim.lr = 2e-4                # from the SFT model, not from scratch
    c.dpo.optim.min_lr = 2e-5
  elif preset == "mistral_7b":
    c.lora.base_dtype = "bfloat16"
    c.tokenizer_corpus = ""
    # One command, no servers: SL-CAI generates in process with the instruct model.
    c.sl_cai.backend = backend_config(kind="local", template="mistral_inst", batch_size=64)
    c.judge_url = "https://integrate.api.nvidia.com/v1"
    c.evaluate.judge = rl_cai.get_config("mistral_7b").judge
  else:
    raise ValueError(f"unknown pipeline preset {preset!r}; choose tiny or mistral_7b")
  return c
