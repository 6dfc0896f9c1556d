"""The ppo mode: seconds per PPO iteration by phase, cai_jax's `ppo.Iteration` vs TRL's
`PPOTrainer`."""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import time
import warnings

import jax
import numpy as np

from launch.benchmark.hardware import decode_step_floor, peak_flops
from launch.benchmark.report import row
from launch.benchmark.timing import log, median, time_calls
from launch.benchmark.torch_ref import Setup, id_tokenizer, import_torch
from launch.benchmark.workload import IdTokenizer, Shapes, random_tokens

PPO_HP = dict(temperature=1.0, kl_coef=0.05, kl_estimator="k1", vf_coef=0.1, clip_eps=0.2,
              value_clip=0.2, gamma=1.0, lam=0.95, lr=3e-6)


def rl_config(setup: Setup, *, prompts: int, prompt_len: int, iterations: int):
  """`configs/ppo.py:tiny` pointed at the benchmark's policy and frozen reward model (and, on
  a GPU, in bf16 over fp32 masters as the mistral_7b preset); the modes set the rest."""
  from configs.ppo import get_config
  _, rm_dir = setup.reward_model_dirs()
  cfg = get_config("tiny")
  cfg.actor_init = setup.hf_dir
  cfg.rm_init = rm_dir
  cfg.max_prompt_len = prompt_len
  cfg.rollout_batch_size = prompts
  cfg.iterations = iterations
  cfg.seed = setup.seed
  if setup.device == "gpu":
    cfg.dtype, cfg.param_dtype, cfg.frozen_dtype = "bfloat16", "float32", "bfloat16"
  return cfg


def run_ours(setup: Setup, cfg, name: str, prompt_batches: list[np.ndarray],
             new_tokens: int) -> list[dict]:
  """cai_jax's RL iterations (`ppo.build`) on the given prompt id batches: each one's rollout /
  score / update seconds. The end-of-turn id is one past the vocabulary, so no row can stop:
  every response is exactly `new_tokens` long, as TRL's with no stop token (checked)."""
  from cai_jax import parallel
  from cai_jax.train import ppo
  mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
  V = setup.config.vocab_size
  log(f"{name}: building cai_jax's iteration ({cfg.ppo.advantage})")
  step, state, _ = ppo.build(cfg, mesh, IdTokenizer(V, 0, V))
  out = []
  for it, ids in enumerate(prompt_batches):
    batch = step.put_batch({"ids": ids, "length": np.full((len(ids),), ids.shape[1], np.int32)})
    log(f"{name}: cai_jax iteration {it + 1}/{len(prompt_batches)}"
        + (" (compile)" if it == 0 else ""))
    if it == len(prompt_batches) - 1 and it > 0 and setup.profile_dir:  # compiled; traced
      result = []
      setup.profile(f"{name}_iteration", lambda: result.append(step(state, batch)))
      state, metrics = result[0]
    else:
      state, metrics = step(state, batch)
    lengths = np.asarray(jax.device_get(step.last_experience.rollout.lengths))
    if lengths.shape != (step.rows,) or np.any(lengths != new_tokens):
      raise RuntimeError(f"cai_jax {name} rollout lengths {lengths.tolist()}, expected "
                         f"{step.rows} x {new_tokens}")
    out.append({"rollout": metrics["rollout_seconds"], "score": metrics["score_seconds"],
                "update": metrics["update_seconds"]})
  del step, state
  return out


def _ours_ppo(setup: Setup, shapes: Shapes, iterations: int) -> list[dict]:
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  cfg = rl_config(setup, prompts=B, prompt_len=P, iterations=iterations)
  cfg.ppo.update(max_new_tokens=N, temperature=PPO_HP["temperature"], ppo_epochs=1,
                 num_minibatches=1, clip_eps=PPO_HP["clip_eps"], value_clip=PPO_HP["value_clip"],
                 vf_coef=PPO_HP["vf_coef"], gamma=PPO_HP["gamma"], lam=PPO_HP["lam"],
                 kl_estimator=PPO_HP["kl_estimator"], init_kl_coef=PPO_HP["kl_coef"])
  for optim in (cfg.actor_optim, cfg.critic_optim):
    optim.update(lr=PPO_HP["lr"], min_lr=PPO_HP["lr"], schedule="constant", b2=0.999,
                 grad_clip=0.0)  # TRL's loop steps its optimizer without clipping
  V = setup.config.vocab_size
  return run_ours(setup, cfg, "ppo", [random_tokens(100 + it, (B, P), V)
                                      for it in range(iterations)], N)


def _trl_ppo(setup: Setup, shapes: Shapes, iterations: int,
             threads: int) -> tuple[list[dict], dict]:
  """Runs TRL's `train()` for `iterations` iterations, timing its phases by wrapping
  the module-level `batch_generation` (rollout) and `forward` (its first call on the
  policy+value wrapper starts the update) and a step-end callback (update end).
  "score" is the gap between rollout and update: old log-probs from the generate
  scores, reference, value and reward forwards, rewards, GAE and whitening."""
  torch, transformers = import_torch()
  import datasets
  import trl.experimental.ppo.ppo_trainer as ppo_mod
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  V = setup.config.vocab_size
  rm_hf, _ = setup.reward_model_dirs()
  # The pad token is id V, one the model cannot emit, so no sampled token is ever taken
  # for padding (TRL masks every pad-valued position) and every response is full-length,
  # as cai_jax's.
  tokenizer = id_tokenizer(V, pad=None, eos=setup.config.eos_token_id, unk=1)
  policy = setup.torch_lm()
  ref = setup.torch_lm()

  def scalar_model():
    m = transformers.AutoModelForSequenceClassification.from_pretrained(
        rm_hf, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    m.config.pad_token_id = 0  # for its own forward's pooling; TRL's get_reward masks by itself
    return m

  prompts = np.concatenate([random_tokens(100 + it, (B, P), V) for it in range(iterations)])
  dataset = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
  outdir = tempfile.mkdtemp(prefix="trl_ppo_", dir=setup.workdir)
  args = PPOConfig(
      output_dir=outdir, per_device_train_batch_size=B, gradient_accumulation_steps=1,
      num_mini_batches=1, num_ppo_epochs=1, total_episodes=B * iterations,
      local_rollout_forward_batch_size=B, response_length=N, stop_token=None,
      stop_token_id=None, missing_eos_penalty=None, temperature=PPO_HP["temperature"],
      kl_coef=PPO_HP["kl_coef"], kl_estimator=PPO_HP["kl_estimator"],
      vf_coef=PPO_HP["vf_coef"], cliprange=PPO_HP["clip_eps"],
      cliprange_value=PPO_HP["value_clip"], gamma=PPO_HP["gamma"], lam=PPO_HP["lam"],
      learning_rate=PPO_HP["lr"], lr_scheduler_type="constant", bf16=False, fp16=False,
      use_cpu=True, gradient_checkpointing=False, num_sample_generations=0,
      report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
      disable_tqdm=True, dataloader_num_workers=0, seed=setup.seed)

  def collate(rows):
    return {"input_ids": torch.as_tensor([r["input_ids"] for r in rows], dtype=torch.long)}

  marks: list[dict] = []

  class StepTimer(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
      marks[-1]["end"] = time.perf_counter()

  log("ppo: building TRL PPOTrainer")
  trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                       reward_model=scalar_model(), train_dataset=dataset,
                       value_model=scalar_model(), data_collator=collate,
                       callbacks=[StepTimer()])
  torch.set_num_threads(threads)  # accelerate may have touched it
  orig_generation, orig_forward = ppo_mod.batch_generation, ppo_mod.forward

  def timed_generation(model, queries, *a, **k):
    log(f"ppo: TRL iteration {len(marks) + 1}/{iterations}" + (" (warm-up)" if not marks else ""))
    t0 = time.perf_counter()
    query_responses, logits = orig_generation(model, queries, *a, **k)
    responses = query_responses[:, queries.shape[1]:]
    marks.append({"start": t0, "rollout_end": time.perf_counter(),
                  "response_len": int(responses.shape[1])})
    return query_responses, logits

  def timed_forward(model, *a, **k):
    if model is not trainer.ref_model and marks and "update_start" not in marks[-1]:
      marks[-1]["update_start"] = time.perf_counter()
    return orig_forward(model, *a, **k)

  ppo_mod.batch_generation, ppo_mod.forward = timed_generation, timed_forward
  try:
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its metrics dicts
      trainer.train()
  finally:
    ppo_mod.batch_generation, ppo_mod.forward = orig_generation, orig_forward
  if len(marks) != iterations or any(m["response_len"] != N for m in marks):
    raise RuntimeError(f"TRL ran {len(marks)} iterations with response lengths "
                       f"{[m['response_len'] for m in marks]}; expected {iterations} x {N}")
  out = [{"rollout": m["rollout_end"] - m["start"], "score": m["update_start"] - m["rollout_end"],
          "update": m["end"] - m["update_start"]} for m in marks]
  info = {"optim": str(getattr(args.optim, "value", args.optim)),
          "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
          "stop_token_id": trainer.stop_token_id,
          "policy_generation_eos": trainer.policy_model.generation_config.eos_token_id}
  del trainer, policy, ref
  return out, info


def ppo_floors(cfg, shapes: Shapes, ceilings: dict) -> dict:
  """Seconds a PPO iteration's phases cannot beat at the measured ceilings: rollout =
  prefill FLOPs + N decode steps (`decode_step_floor`); score = forwards of policy,
  reference, value and reward models over the B x (P + N) tokens; update = forward +
  backward (3x forward FLOPs) of the actor and the critic, one epoch."""
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  peak = peak_flops(ceilings)
  lm, scalar = cfg.flops_per_token(P + N), cfg.flops_per_token(P + N, head="scalar")
  tokens = B * (P + N)
  rollout = B * P * cfg.flops_per_token(P) / peak + N * decode_step_floor(
      cfg, B, P + N / 2, ceilings)
  score = tokens * 2 * (lm + scalar) / peak
  update = tokens * 3 * (lm + scalar) / peak
  return {"rollout s": rollout, "score s": score, "update s": update,
          "iteration s": rollout + score + update}


def _generate_like_rollout(setup: Setup, shapes: Shapes, reps: int) -> list[float]:
  """Seconds of `sampling.generate` on the PPO batch: the same model, B, P and N, sampled
  at the rollout's temperature with no stop, so its tok/s is what the rollout should reach."""
  from cai_jax import sampling
  B, P, N = shapes.ppo_batch, shapes.ppo_prompt, shapes.ppo_new
  prompts = random_tokens(99, (B, P), setup.config.vocab_size).tolist()
  log(f"ppo: cai_jax generate {B}x({P}+{N}) for the rollout's yardstick")
  return time_calls(lambda: sampling.generate(
      setup.config, setup.params, prompts, max_new_tokens=N, temperature=PPO_HP["temperature"],
      seed=1), reps)


def measure(setup: Setup, shapes: Shapes, reps: int, ceilings: dict, *, threads: int) -> dict:
  """Seconds per PPO iteration (rollout, score, update) after one warm-up iteration,
  against TRL's on CPU; the rollout's tok/s against `sampling.generate`'s."""
  iterations = reps + 1
  gpu = setup.device == "gpu"
  ours = _ours_ppo(setup, shapes, iterations)
  gc.collect()
  generate_s = _generate_like_rollout(setup, shapes, reps)
  trl_iters, trl_info = None, None
  if not gpu:
    with warnings.catch_warnings():
      # transformers' deprecation renames, and TRL's variance over a single minibatch.
      warnings.simplefilter("ignore", FutureWarning)
      warnings.filterwarnings("ignore", message=r"var\(\): degrees of freedom")
      trl_iters, trl_info = _trl_ppo(setup, shapes, iterations, threads)
  floors = ppo_floors(setup.config, shapes, ceilings)
  rows = []
  for phases, metric in ((("rollout",), "rollout s"), (("score",), "score s"),
                         (("update",), "update s"),
                         (("rollout", "score", "update"), "iteration s")):
    o = median([sum(it[p] for p in phases) for it in ours[1:]])
    r = None if trl_iters is None else median([sum(it[p] for p in phases)
                                               for it in trl_iters[1:]])
    rows.append(row("ppo", metric, "s", o, r, higher_is_better=False, floor=floors[metric],
                    device=setup.device))
  new_tokens = shapes.ppo_batch * shapes.ppo_new
  rows.append(row("ppo", "rollout tok/s", "tok/s",
                  new_tokens / median([it["rollout"] for it in ours[1:]]),
                  new_tokens / median(generate_s), device=setup.device,
                  reference_name="cai_jax generate"))
  return {"prompts": shapes.ppo_batch, "prompt_len": shapes.ppo_prompt,
          "new_tokens": shapes.ppo_new, "epochs": 1, "minibatches": 1, "hyperparameters": PPO_HP,
          "dtype": setup.config.dtype, "floors": floors,
          "iterations": {"cai_jax": ours, "trl": trl_iters}, "trl": trl_info,
          "generate_seconds": generate_s,
          "note": ("first iteration (compile / warm-up) excluded; TRL's 'score' also holds its "
                   "old log-probs from the generate scores, which cai_jax computes in the "
                   "rollout; no TRL run in the GPU mode"),
          "rows": rows}
