"""PPO: `python -m launch.train_ppo --config=configs/ppo.py:tiny --workdir=DIR`.

Presets: `tiny` (CPU) and `mistral_7b` (NeMo-Aligner CAI tutorial step 6: 512
rollout samples per step, global batch 64 (= 8 minibatches), actor lr 9e-8 ->
9e-9, critic lr 3e-7 -> 9e-8, initial KL penalty 0.02, max length 1024).

`tiny` is tuned on tests/test_ppo.py's learning test (a from-scratch 2-layer
policy, a synthetic reward): 64 rollouts x 4 epochs x 2 minibatches at a
constant actor lr of 1e-3 raise the held-out reward by 0.37-0.56 in 20
iterations over five seeds, with the exact KL to the reference at 3.6-7.4
nats per 8-token response. Fewer samples or one epoch left the gradient too
noisy to learn in that budget; a decaying lr stalled the second half.
"""

import ml_collections

from configs import models
from configs.common import guard_config, lora_config, mesh_config, optim_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = models.get_config("tiny")   # only used when actor_init is empty (tests)
  c.init_from = ""                      # unused by PPO (kept for the shared loader)
  c.actor_init = ""                     # SFT model dir: actor and frozen reference
  c.rm_init = ""                        # reward model dir (frozen)
  c.critic_init = ""                    # default: the reward model
  c.tokenizer = ""
  c.template = "nemo"
  c.train_prompts = ""                  # {"text": prompt ending with the assistant header}
  c.val_prompts = ""
  c.max_eval_prompts = 64
  c.max_prompt_len = 64                 # longer prompts are dropped (counted)
  c.rollout_batch_size = 64             # prompts (= samples) per iteration
  c.iterations = 24
  c.mesh = mesh_config()
  c.dtype = ""
  c.param_dtype = ""
  c.frozen_dtype = ""                   # e.g. "bfloat16" for the reference and reward model
  c.remat = False
  # LoRA on the actor (the reference is its base with the adapters off) and, with gae, on the
  # critic (an adapter and its own value head on the reward model's frozen body).
  c.lora = lora_config()
  c.ppo = ml_collections.ConfigDict(dict(
      max_new_tokens=32,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      ppo_epochs=4,
      num_minibatches=2,
      clip_eps=0.2,
      value_clip=0.2,
      vf_coef=1.0,
      entropy_coef=0.0,
      gamma=1.0,
      lam=0.95,
      kl_estimator="abs",               # k1 | abs (NeMo's default) | k2 | k3
      init_kl_coef=0.02,
      adaptive_kl=False,
      target_kl=6.0,
      kl_horizon=10000,
      whiten_advantages=True,
      no_stop_penalty=0.0,              # subtracted from the score of responses that never end
      # "Old" log-probs from a full actor forward instead of the sampler (as
      # NeMo-Aligner does): for bfloat16, where the two round differently.
      recompute_logprobs=False,
      # The advantage estimator: gae (PPO with a critic) | grpo | rloo | reinforce_pp (no
      # critic is loaded); grpo and rloo compare each prompt's samples_per_prompt responses.
      advantage="gae",
      samples_per_prompt=1,
      grpo_std_normalize=True,           # False: Dr. GRPO (score - group mean only)
      kl_in="reward",                    # reward (-beta * KL per token) | loss (GRPO's KL term)
      # token_mean | seq_mean_token_mean (NeMo-Aligner with its micro-batch of 1) |
      # seq_mean_token_sum_norm (Dr. GRPO)
      loss_agg="token_mean",
      unfinished="keep",                 # keep | mask (out of the policy loss, as NeMo's is_end)
      # Memory, not results: responses per data-parallel replica processed at once (0 = all).
      rollout_micro_batch_size=0,        # decoded together (one KV cache of this many rows)
      forward_micro_batch_size=0,        # per forward pass of the score and evaluation programs
      micro_batch_size=0,                # per forward + backward of the update (grads summed)
  ))
  # Tiny: a from-scratch 2-layer model over a few dozen iterations. A constant
  # rate keeps learning through the whole run (a cosine decay to lr/10 stalls
  # the second half) and makes `iterations` irrelevant to the updates, so a run
  # extended from K to 2K iterations is the same as one planned for 2K.
  c.actor_optim = optim_config(lr=1e-3, min_lr=1e-3, schedule="constant")
  c.critic_optim = optim_config(lr=3e-3, min_lr=3e-3, schedule="constant")
  c.eval_every = 5
  c.eval_greedy = True                  # False: sample at ppo.temperature with a fixed key
  c.save_every = 10
  c.sample_every = 5
  c.num_samples_logged = 4
  c.keep_checkpoints = 2
  c.seed = 0
  c.export_hf = True
  # Value-loss spikes, param-norm growth of actor or critic, KL per response.
  c.guard = guard_config(loss_spike=100.0, max_kl_per_sequence=100.0)
  if preset == "tiny":
    pass
  elif preset == "mistral_7b":
    c.model = models.get_config("mistral_7b")
    c.max_prompt_len = 512
    c.rollout_batch_size = 512
    c.iterations = 100
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.frozen_dtype = "bfloat16"
    c.remat = True
    c.ppo.max_new_tokens = 512          # prompt + response <= 1024, NeMo's max_length
    c.ppo.num_minibatches = 8           # global batch 64
    c.ppo.recompute_logprobs = True     # bfloat16 compute
    # Memory only (responses per data-parallel replica at once; results unchanged): with
    # lora.rank=16 PPO fits one 80 GB GPU (launch.plan: ~28 GiB of models + the largest phase,
    # the score's forwards, ~16 GiB). Each divides a replica's share on 1 to 8 GPUs (on 8 a
    # replica holds 64 responses and 8 of each minibatch: fewer pieces, or one).
    c.ppo.rollout_micro_batch_size = 64   # KV cache of 64 x 1024 positions: 8 GiB
    c.ppo.forward_micro_batch_size = 32   # largest piece of the score / evaluation forwards
    c.ppo.micro_batch_size = 8            # 1/8 of a one-GPU minibatch's activations: 10.6 GiB
    c.actor_optim = optim_config(lr=9e-8, min_lr=9e-9)
    c.critic_optim = optim_config(lr=3e-7, min_lr=9e-8)
    c.eval_every = 10
    c.save_every = 10
    # A trained 7B policy writes at a few nats per token; near ln(32000) = 10.4 it is noise.
    c.guard.max_entropy_fraction = 0.9
  else:
    raise ValueError(f"unknown ppo preset {preset!r}; choose tiny or mistral_7b")
  return c
