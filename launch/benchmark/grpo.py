"""The grpo mode: seconds per GRPO iteration by phase, cai_jax's `ppo.Iteration` with
`ppo.advantage = "grpo"` vs TRL 1.9.2's `GRPOTrainer`.

Both sides run the same iteration on the same weights: `grpo_prompts` prompts of
`grpo_prompt` random ids (the PPO mode's prompts and lengths), `grpo_group` responses to
each of exactly `grpo_new` sampled tokens (no stop token can be sampled; checked), scored
by the same frozen reward model (the LM's body and one random score head,
`Setup.reward_model_dirs`: TRL's sequence-classification model reads the last token, as
cai_jax's `scoring.rm_scores_at` does); advantages (score - group mean) / (group std +
1e-4); the clipped token-level policy loss averaged over every response token of the
batch (TRL's default `loss_type="dapo"`, cai_jax's `loss_agg="token_mean"`) plus beta x
the k3 KL to the reference in the loss; one epoch of one minibatch (TRL's defaults
`num_iterations=1`, `steps_per_generation=1`), so neither side runs a separate forward
for the "old" log-probs; AdamW at a constant lr with gradient clipping at 1.0 (TRL's
Trainer default).

beta is 0.04 on both sides (DeepSeekMath's GRPO value): TRL's default of 0 loads no
reference model at all, while cai_jax's iteration always runs the reference forward.
TRL's own default of gradient checkpointing is turned off (it only slows a CPU step that
has the memory), as in the PPO mode.

Phases: rollout (sampling), score (reference and reward-model forwards, rewards and
advantages; TRL also decodes the completions to text and encodes prompt + completion again
for its reward model, which it requires), update (policy forward, backward, clipping,
AdamW).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import time
import warnings

import numpy as np

from launch.benchmark.hardware import decode_step_floor, peak_flops
from launch.benchmark.ppo import rl_config, run_ours
from launch.benchmark.report import row
from launch.benchmark.timing import log, median
from launch.benchmark.torch_ref import Setup, id_text, id_tokenizer, import_torch
from launch.benchmark.workload import Shapes, random_tokens

GRPO_HP = dict(temperature=1.0, beta=0.04, kl_estimator="k3", clip_eps=0.2, lr=1e-6,
               grad_clip=1.0, weight_decay=0.0, scale="group std", loss="token mean (TRL dapo)")
PHASES = ("rollout", "score", "update")


def _prompts(shapes: Shapes, iterations: int, vocab: int) -> list[np.ndarray]:
  """Each iteration's [grpo_prompts, grpo_prompt] ids, the same for both sides."""
  return [random_tokens(100 + it, (shapes.grpo_prompts, shapes.grpo_prompt), vocab)
          for it in range(iterations)]


def _ours_grpo(setup: Setup, shapes: Shapes, iterations: int) -> list[dict]:
  B, G, P, N = shapes.grpo_prompts, shapes.grpo_group, shapes.grpo_prompt, shapes.grpo_new
  cfg = rl_config(setup, prompts=B, prompt_len=P, iterations=iterations)
  cfg.ppo.update(advantage="grpo", samples_per_prompt=G, grpo_std_normalize=True, kl_in="loss",
                 kl_estimator=GRPO_HP["kl_estimator"], init_kl_coef=GRPO_HP["beta"],
                 adaptive_kl=False, loss_agg="token_mean", unfinished="keep", max_new_tokens=N,
                 temperature=GRPO_HP["temperature"], ppo_epochs=1, num_minibatches=1,
                 clip_eps=GRPO_HP["clip_eps"], entropy_coef=0.0, no_stop_penalty=0.0)
  cfg.actor_optim.update(lr=GRPO_HP["lr"], min_lr=GRPO_HP["lr"], schedule="constant",
                         warmup_steps=0, b2=0.999, weight_decay=GRPO_HP["weight_decay"],
                         grad_clip=GRPO_HP["grad_clip"])
  return run_ours(setup, cfg, "grpo", _prompts(shapes, iterations, setup.config.vocab_size), N)


def _trl_grpo(setup: Setup, shapes: Shapes, iterations: int,
              threads: int) -> tuple[list[dict], dict]:
  """Runs TRL's `train()` for `iterations` steps (one step = one generation batch, as
  TRL's defaults make it), timing its phases by wrapping the trainer's
  `_generate_and_score_completions` (its start: the iteration's start; its end: the
  update's start) and `_generate_single_turn` (the rollout's end), and a step-end
  callback (after the optimizer step)."""
  torch, transformers = import_torch()
  import datasets
  from trl import GRPOConfig, GRPOTrainer
  B, G, P, N = shapes.grpo_prompts, shapes.grpo_group, shapes.grpo_prompt, shapes.grpo_new
  V = setup.config.vocab_size
  rm_hf, _ = setup.reward_model_dirs()
  # Every special token sits past the model's vocabulary: no sampled token stops a
  # completion or is dropped when TRL decodes completions for its reward model.
  tokenizer = id_tokenizer(V, pad=None, eos=None, unk=None)
  policy = setup.torch_lm()
  reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      rm_hf, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
  # A trailing space, so TRL's prompt + completion text splits into the same ids.
  prompts = [id_text(tokenizer, p) + " " for batch in _prompts(shapes, iterations, V)
             for p in batch]
  dataset = datasets.Dataset.from_dict({"prompt": prompts})
  outdir = tempfile.mkdtemp(prefix="trl_grpo_", dir=setup.workdir)
  args = GRPOConfig(
      output_dir=outdir, per_device_train_batch_size=B * G, num_generations=G,
      gradient_accumulation_steps=1, num_iterations=1, max_completion_length=N,
      temperature=GRPO_HP["temperature"], top_k=0, top_p=1.0, beta=GRPO_HP["beta"],
      epsilon=GRPO_HP["clip_eps"], loss_type="dapo", scale_rewards="group",
      learning_rate=GRPO_HP["lr"], lr_scheduler_type="constant",
      weight_decay=GRPO_HP["weight_decay"], max_grad_norm=GRPO_HP["grad_clip"],
      max_steps=iterations, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
      report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
      disable_tqdm=True, dataloader_num_workers=0, seed=setup.seed)

  marks: list[dict] = []

  class StepTimer(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
      marks[-1]["end"] = time.perf_counter()

  log("grpo: building TRL GRPOTrainer (policy, reference from the same directory, reward "
      "model)")
  trainer = GRPOTrainer(model=policy, reward_funcs=[reward_model], args=args,
                        train_dataset=dataset, processing_class=tokenizer,
                        reward_processing_classes=[tokenizer], callbacks=[StepTimer()])
  torch.set_num_threads(threads)  # accelerate may have touched it

  def record_rm_input(_, a, kw):
    marks[-1]["rm_ids"] = kw.get("input_ids", a[0] if a else None).tolist()

  reward_model.register_forward_pre_hook(record_rm_input, with_kwargs=True)
  generate_and_score = trainer._generate_and_score_completions
  single_turn = trainer._generate_single_turn

  def timed_generate_and_score(inputs):
    log(f"grpo: TRL iteration {len(marks) + 1}/{iterations}" + (" (warm-up)" if not marks
                                                                 else ""))
    marks.append({"start": time.perf_counter()})
    out = generate_and_score(inputs)
    marks[-1]["score_end"] = time.perf_counter()
    return out

  def timed_single_turn(prompt_ids, *a, **k):
    completion_ids, logprobs = single_turn(prompt_ids, *a, **k)
    marks[-1].update(rollout_end=time.perf_counter(),
                     sequences=[list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)],
                     prompt_lens=sorted({len(p) for p in prompt_ids}),
                     completion_lens=sorted({len(c) for c in completion_ids}),
                     rows=len(completion_ids))
    return completion_ids, logprobs

  trainer._generate_and_score_completions = timed_generate_and_score
  trainer._generate_single_turn = timed_single_turn
  with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its metrics dicts
    trainer.train()
  expected = {"prompt_lens": [P], "completion_lens": [N], "rows": B * G}
  bad = [{k: m.get(k) for k in expected} for m in marks
         if any(m.get(k) != v for k, v in expected.items())]
  if len(marks) != iterations or bad:
    raise RuntimeError(f"TRL ran {len(marks)} iterations (expected {iterations}), "
                       f"generations {bad} (expected {expected})")
  # Its reward model read exactly the sampled rows (TRL goes through text to get them).
  if any(m.get("rm_ids") != m["sequences"] for m in marks):
    raise RuntimeError("TRL's reward model read other ids than prompt + completion")
  out = [{"rollout": m["rollout_end"] - m["start"], "score": m["score_end"] - m["rollout_end"],
          "update": m["end"] - m["score_end"]} for m in marks]
  info = {"optim": str(getattr(args.optim, "value", args.optim)),
          "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
          "beta": args.beta, "loss_type": args.loss_type, "scale_rewards": args.scale_rewards,
          "steps_per_generation": args.steps_per_generation,
          "generation_batch_size": args.generation_batch_size,
          "reference_model": trainer.ref_model is not None,
          "eos_token_id": trainer.generation_config.eos_token_id}
  del trainer, policy, reward_model
  return out, info


def grpo_floors(cfg, shapes: Shapes, ceilings: dict) -> dict:
  """Seconds a GRPO iteration's phases cannot beat at the measured ceilings, over its
  R = prompts x group responses: rollout = prefill FLOPs + N decode steps at batch R;
  score = reference and reward-model forwards over R x (P + N) tokens; update = forward
  + backward (3x forward FLOPs) of the policy."""
  R = shapes.grpo_prompts * shapes.grpo_group
  P, N = shapes.grpo_prompt, shapes.grpo_new
  peak = peak_flops(ceilings)
  lm, scalar = cfg.flops_per_token(P + N), cfg.flops_per_token(P + N, head="scalar")
  tokens = R * (P + N)
  rollout = R * P * cfg.flops_per_token(P) / peak + N * decode_step_floor(
      cfg, R, P + N / 2, ceilings)
  score = tokens * (lm + scalar) / peak
  update = tokens * 3 * lm / peak
  return {"rollout s": rollout, "score s": score, "update s": update,
          "iteration s": rollout + score + update}


def measure(setup: Setup, shapes: Shapes, reps: int, ceilings: dict, *, threads: int) -> dict:
  """Seconds per GRPO iteration (rollout, score, update) after one warm-up iteration,
  against TRL's on CPU (no TRL run in the GPU mode)."""
  iterations = reps + 1
  ours = _ours_grpo(setup, shapes, iterations)
  gc.collect()
  trl_iters, trl_info = None, None
  if setup.device != "gpu":
    with warnings.catch_warnings():
      # transformers' deprecation renames (gradient_checkpointing), TRL's notices.
      warnings.simplefilter("ignore", FutureWarning)
      warnings.simplefilter("ignore", UserWarning)
      trl_iters, trl_info = _trl_grpo(setup, shapes, iterations, threads)
  floors = grpo_floors(setup.config, shapes, ceilings)
  rows = []
  for phases, metric in [((p,), f"{p} s") for p in PHASES] + [(PHASES, "iteration s")]:
    o = median([sum(it[p] for p in phases) for it in ours[1:]])
    r = None if trl_iters is None else median([sum(it[p] for p in phases)
                                               for it in trl_iters[1:]])
    rows.append(row("grpo", metric, "s", o, r, higher_is_better=False, floor=floors[metric],
                    device=setup.device))
  return {"prompts": shapes.grpo_prompts, "group": shapes.grpo_group,
          "responses": shapes.grpo_prompts * shapes.grpo_group,
          "prompt_len": shapes.grpo_prompt, "new_tokens": shapes.grpo_new, "epochs": 1,
          "minibatches": 1, "hyperparameters": GRPO_HP, "dtype": setup.config.dtype,
          "floors": floors, "iterations": {"cai_jax": ours, "trl": trl_iters}, "trl": trl_info,
          "note": ("first iteration (compile / warm-up) excluded; TRL's 'score' also decodes "
                   "completions to text and encodes them again for its reward model; no TRL "
                   "run in the GPU mode"),
          "rows": rows}
