"""Config blocks every training stage shares."""

import ml_collections


def optim_config(*, lr: float, min_lr: float, warmup_steps: int = 0, schedule: str = "cosine",
                 weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8,
                 grad_clip: float = 1.0) -> ml_collections.ConfigDict:
  """AdamW with linear warmup then cosine decay to min_lr (or constant); see cai_jax.train.optim."""
  return ml_collections.ConfigDict(dict(
      lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, schedule=schedule,
      weight_decay=weight_decay, b1=b1, b2=b2, eps=eps, grad_clip=grad_clip))


def mesh_config(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Device mesh sizes; -1 fills with the remaining devices."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def guard_config(*, loss_spike: float = 10.0, max_param_norm_growth: float = 10.0,
                 max_kl_per_sequence: float = 0.0, min_entropy: float = 0.0,
                 max_entropy_fraction: float = 0.0) -> ml_collections.ConfigDict:
  """Divergence guard (cai_jax.train.loop.DivergenceGuard); each bound is off at 0.

  loss_spike: a loss (PPO: value loss) above this multiple of its running median
  over the last spike_window values (and above it by more than loss_spike_min_delta),
  once min_history are known.
  max_param_norm_growth: a param norm above this multiple of its first value.
  PPO only: max_kl_per_sequence (nats per response), min_entropy (nats per token),
  max_entropy_fraction (of ln(vocab)). A run stopped by the guard keeps its last
  checkpoint that passed it; loosen a bound and rerun to resume (guard fields are
  not part of the run identity).
  """
  return ml_collections.ConfigDict(dict(
      loss_spike=loss_spike, loss_spike_min_delta=1.0, spike_window=50, min_history=10,
      max_param_norm_growth=max_param_norm_growth, max_kl_per_sequence=max_kl_per_sequence,
      min_entropy=min_entropy, max_entropy_fraction=max_entropy_fraction))


LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def lora_config(rank: int = 0) -> ml_collections.ConfigDict:
  """LoRA for a trained stage (cai_jax.model.lora); rank 0 = full fine-tuning.

  rank, alpha (the adapters' product is scaled by alpha / rank), dropout (on the adapters'
  input, training only), targets (comma-separated HF projection names), base_dtype (the
  frozen base's storage dtype, e.g. "bfloat16"; "" = param_dtype; adapters are always
  float32), init_adapter (a Hugging Face PEFT adapter directory to start from instead of
  fresh adapters; its r, lora_alpha and target_modules must match).
  """
  return ml_collections.ConfigDict(dict(rank=rank, alpha=32.0, dropout=0.0, targets=LORA_TARGETS,
                                        base_dtype="", init_adapter=""))


def add_run_fields(c: ml_collections.ConfigDict, *, eval_every: int, save_every: int,
                   log_every: int = 5, keep_checkpoints: int = 2) -> None:
  """Fields every training stage has: mesh, numerics, cadence, checkpoints, seed, export."""
  c.mesh = mesh_config()
  c.dtype = ""                          # compute dtype override, e.g. "bfloat16"
  c.param_dtype = ""                    # master weights, e.g. "float32"
  c.remat = False                       # recompute each layer's activations in the backward
  c.remat_policy = ""                   # without remat: "minimal" (model default) or "none"
  c.attention_impl = ""                 # "" = the model's ("auto"); einsum / xla / cudnn
  c.log_every = log_every
  c.eval_every = eval_every
  c.save_every = save_every
  c.keep_checkpoints = keep_checkpoints
  c.seed = 0
  c.export_hf = True                    # also write the final model as HF safetensors
  c.guard = guard_config()
  c.lora = lora_config()


def backend_config(**overrides) -> ml_collections.ConfigDict:
  """Where a data stage's text comes from (`cai_jax.cai.backends.make_backend`).

  kind: local (a cai_jax model dir, in this process) | nemo (`PUT /generate`) | openai
  (`/v1/completions`). `timeout` (seconds per request), `retries` and `backoff` (first retry
  delay, doubling) apply to the remote kinds; `batch_size` is prompts per engine call
  (local) or per request (nemo); `concurrency` is requests in flight (openai); the API key
  is read from the environment variable `api_key_env`, never from the config.
  """
  c = ml_collections.ConfigDict(dict(kind="local", model_dir="", tokenizer="", template="nemo",
                                     url="", model="", api_key_env="", timeout=600.0, retries=3,
                                     backoff=1.0, batch_size=32, concurrency=8))
  c.update(overrides)
  return c
