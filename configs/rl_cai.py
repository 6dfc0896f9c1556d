"""RL-CAI preference data: `python -m launch.generate_rl_cai --config=configs/rl_cai.py:tiny --workdir=DIR`.

Presets:
* `tiny` — CPU: the policy and the judge are the same tiny SFT model, in process
  (`--config.policy.model_dir=SFT_DIR`); 2 responses per prompt, short
  generations, the shipped `data/red_team_attempts_sample.jsonl`.
* `mistral_7b` — NeMo-Aligner CAI tutorial step 4: 4 responses per prompt at
  temperatures 0.01/0.51/1.01/1.51, top_k 50, top_p 0.95, 1024 new tokens, end
  string `<extra_id_1>`, batch 128, red-team prompts from the hub; the judge is
  an OpenAI-compatible endpoint (NVIDIA's hosted Mixtral-8x7B-Instruct, key in
  `$NVIDIA_API_KEY`). Point `policy` at the SL-CAI model (`policy.model_dir`
  in process, or `policy.kind=nemo` + `policy.url` for a server).
"""

import ml_collections

from configs.common import backend_config


def judge_config(**overrides) -> ml_collections.ConfigDict:
  """The RL-CAI and evaluation judge (`cai_jax.cai.judge.make_judge`), every field set.

  The one place the judge's defaults live: `make_judge` reads each field of the block and
  a missing one is an error, never a default written elsewhere. `overrides` replace fields.
  """
  c = ml_collections.ConfigDict(dict(
      kind="local",            # local (a model in process) | openai (any OpenAI-compatible API)
      model_dir="",            # local: empty = the policy's model (reused when it is local)
      tokenizer="",
      template="nemo",         # how judge prompts are rendered (local, and api=completions)
      chat=True,               # False: plain-text prompts for a base model
      system="",
      few_shot=-1,             # worked examples shown (-1 = all in few_shot_path)
      cot=False,               # chain of thought first; labels clamped to [clamp_low, clamp_high]
      cot_max_tokens=64,
      clamp_low=0.4,
      clamp_high=0.6,
      batch_size=8,            # local: questions per engine call (its batch rows)
      url="",                  # openai: base URL, e.g. http://localhost:5999/v1
      model="",
      api_key_env="",          # the key is read from this environment variable
      api="chat",              # openai: chat | completions
      max_tokens=16,
      logprobs=True,           # ask for top log-probs (soft labels when returned)
      top_logprobs=5,
      temperature=0.0,
      concurrency=8,
      timeout=600.0,
      retries=3,
      seed=0,
  ))
  c.update(overrides)
  return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.red_team = "data/red_team_attempts_sample.jsonl"   # local file or "Anthropic/hh-rlhf"
  c.limit = 0                   # prompts (after a seeded shuffle); 0 = all
  c.test_fraction = 0.1         # held-out prompts (RM test comparisons, PPO validation)
  c.seed = 0
  c.template = "nemo"           # how prompts and comparisons are rendered
  c.system = ""
  c.num_responses = 4
  c.temperatures = (0.01, 0.51, 1.01, 1.51)   # response k samples at temperatures[k % len]
  c.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=64, greedy=False, top_k=0, top_p=1.0, repetition_penalty=1.0,
      min_new_tokens=1, end_strings=("<extra_id_1>",)))
  c.policy = backend_config()
  c.judge = judge_config()
  c.principles = ""             # comparison principles json (empty: the shipped constitution)
  c.few_shot_path = ""          # judge worked examples json (empty: the shipped ones)
  c.pairing = "adjacent"        # adjacent (0-1, 2-3, as NeMo) | all | best_vs_worst
  c.min_confidence = 0.0        # drop pairs with |p - 0.5| below this
  c.prompts_per_step = 8        # prompts generated, judged and written per step
  c.overlong = "drop"           # a prompt too long for a local policy: drop (counted) |
                                # truncate | error (naming the file and line)
  c.prefix = "cai_rlaif"        # {prefix}_{train,test}_{prompts,comparisons}_with_chat_prompt.jsonl
  c.blend_with = ""             # a process_hh output dir; empty: no blend
  c.blend_prefix = "cai_preference_dataset"
  c.restart = False             # discard a partial run instead of resuming it

  if preset == "tiny":
    c.num_responses = 2
    c.temperatures = (0.01, 1.01)
    c.limit = 16
    c.test_fraction = 0.25
    c.generation.max_new_tokens = 16
    c.policy.batch_size = 8
    c.judge.batch_size = 8
    c.judge.cot_max_tokens = 16
    c.prompts_per_step = 4
  elif preset == "mistral_7b":
    c.red_team = "Anthropic/hh-rlhf"
    c.generation.max_new_tokens = 1024
    c.generation.top_k = 50
    c.generation.top_p = 0.95
    c.policy.batch_size = 128
    c.prompts_per_step = 128
    c.prefix = "mistral_7b_cai_preference_dataset"
    c.judge = judge_config(
        kind="openai", url="https://integrate.api.nvidia.com/v1",
        model="mistralai/mixtral-8x7b-instruct-v0.1", api_key_env="NVIDIA_API_KEY",
        api="chat", max_tokens=32, cot_max_tokens=512, concurrency=16)
  else:
    raise ValueError(f"unknown rl_cai preset {preset!r}; choose tiny or mistral_7b")
  return c
