"""The dpo mode: seconds per DPO train step, cai_jax's (`cai_jax.train.dpo`) vs TRL 1.9.2's
`DPOTrainer`, on the same weights and the same pairs.

A step: `dpo_batch` pairs, each a `dpo_prompt`-token prompt with a `dpo_reply`-token chosen
reply and a rejected reply 3/4 as long (random ids, each reply ending with the EOS id),
chosen and rejected through one forward ([2B, T] rows, right-padded to T = prompt +
reply), the sigmoid DPO loss at beta 0.1 (TRL's default) on the replies' summed
log-probs, backward, gradient clipping at 1.0, AdamW at a constant lr.

Both sides read the reference's log-probs from the batch instead of running the
reference in the step: cai_jax computes them once before training
(`dpo.reference_logprobs`, as its stage does), TRL with `precompute_ref_log_probs=True`
(its pass over the dataset in the trainer's constructor). The two passes are not timed;
their values are compared (same weights: they agree to float32 rounding). TRL's default
gradient checkpointing is turned off (it only slows a CPU step that has the memory), and
its default bf16 too (fp32 on both sides, as every CPU mode).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from launch.benchmark.hardware import peak_flops
from launch.benchmark.report import row
from launch.benchmark.timing import log, median, time_calls
from launch.benchmark.torch_ref import Setup, id_text, id_tokenizer, import_torch
from launch.benchmark.workload import Shapes, random_tokens

DPO_HP = dict(beta=0.1, loss_type="sigmoid", lr=1e-6, b1=0.9, b2=0.999, eps=1e-8,
              weight_decay=0.0, grad_clip=1.0)


def make_pairs(shapes: Shapes, count: int, vocab: int, eos_id: int) -> list[dict]:
  """`count` pairs of random ids: prompt [P], chosen [R], rejected [R - R // 4], each
  reply ending with `eos_id` (as a rendered reply ends with its end token)."""
  P, R = shapes.dpo_prompt, shapes.dpo_reply
  rejected_len = R - R // 4
  prompts = random_tokens(300, (count, P), vocab)
  chosen = random_tokens(301, (count, R), vocab)
  rejected = random_tokens(302, (count, rejected_len), vocab)
  chosen[:, -1] = rejected[:, -1] = eos_id
  return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected)]


def _rows(pairs: list[dict], seq_len: int) -> list[dict]:
  """cai_jax's DPO rows (`dpo.pad_dpo_pairs`): prompt + reply ids, reply masks, hard labels."""
  from cai_jax.train import dpo
  examples = []
  for pair in pairs:
    example = {"p_chosen": 1.0}
    for side in ("chosen", "rejected"):
      reply = pair[side]
      example[f"{side}_ids"] = np.concatenate([pair["prompt"], reply]).tolist()
      example[f"{side}_mask"] = [0] * len(pair["prompt"]) + [1] * len(reply)
    examples.append(example)
  return dpo.pad_dpo_pairs(examples, seq_len)


def _ours_dpo(setup: Setup, shapes: Shapes, pairs: list[dict],
              reps: int) -> tuple[list[float], np.ndarray]:
  """Seconds of `reps` compiled train steps after one warm-up, and the reference log-probs
  [B, 2] (chosen, rejected) the batch carries."""
  import ml_collections

  from cai_jax import parallel
  from cai_jax.model import param_shardings
  from cai_jax.train import common, dpo
  from cai_jax.train.optim import make_optimizer
  from cai_jax.train.state import create_state, make_train_step
  cfg = setup.config
  B, T = shapes.dpo_batch, shapes.dpo_prompt + shapes.dpo_reply
  rows = _rows(pairs, T)
  mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
  p_sh = param_shardings(cfg, mesh)
  optim_cfg = ml_collections.ConfigDict({**{k: DPO_HP[k] for k in ("lr", "b1", "b2", "eps",
                                                                     "weight_decay",
                                                                     "grad_clip")},
                                         "min_lr": DPO_HP["lr"], "schedule": "constant",
                                         "warmup_steps": 0})
  tx, schedule = make_optimizer(optim_cfg, total_steps=reps + 1)
  with parallel.use_mesh(mesh):
    log(f"dpo: cai_jax reference log-probs of {B} pairs (not timed)")
    width = dpo.reply_width(rows)      # the stage's vocab head runs on reply positions only
    ref = dpo.reference_logprobs(cfg, setup.params, p_sh, rows, mesh=mesh, batch_size=B,
                                 width=width)
    host_batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    host_batch["ref_chosen"], host_batch["ref_rejected"] = ref[:, 0], ref[:, 1]
    params = jax.tree_util.tree_map(jnp.copy, setup.params)  # create_state donates its input
    state, st_sh = create_state(params, tx, p_sh, mesh)
    step = make_train_step(
        dpo.make_dpo_loss(cfg, beta=DPO_HP["beta"], loss_type=DPO_HP["loss_type"],
                          width=width), tx,
        schedule, accum_steps=1, shardings=st_sh,
        batch_shardings=common.batch_shardings_for(mesh, host_batch), mesh=mesh)
    batch = common.make_put_batch(mesh)(host_batch)
    holder = {"state": state}

    def ours():
      holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics)

    log(f"dpo: cai_jax train step, {B} pairs x {T} tokens")
    seconds = time_calls(ours, reps)
    setup.profile(f"dpo_B{B}xT{T}", ours)
  del holder, state, step
  return seconds, ref


def _trl_dpo(setup: Setup, shapes: Shapes, pairs: list[dict], steps: int,
             threads: int) -> tuple[list[float], np.ndarray, dict]:
  """Seconds of each of TRL's `steps` train steps (step begin to step end: forward,
  loss, backward, clipping, AdamW; the batch is collated before), and its precomputed
  reference log-probs of the first `dpo_batch` pairs [B, 2]."""
  torch, transformers = import_torch()
  import datasets
  from trl import DPOConfig, DPOTrainer
  B, T = shapes.dpo_batch, shapes.dpo_prompt + shapes.dpo_reply
  V = setup.config.vocab_size
  eos = setup.config.eos_token_id
  # Padding with id 0 is masked out (attention and reply masks), as cai_jax's; each
  # reply already ends with the EOS token, so TRL appends none.
  tokenizer = id_tokenizer(V, pad=0, eos=eos, unk=None)
  dataset = datasets.Dataset.from_dict({
      "prompt": [id_text(tokenizer, p["prompt"]) for p in pairs],
      "chosen": [" " + id_text(tokenizer, p["chosen"]) for p in pairs],
      "rejected": [" " + id_text(tokenizer, p["rejected"]) for p in pairs]})
  outdir = tempfile.mkdtemp(prefix="trl_dpo_", dir=setup.workdir)
  args = DPOConfig(
      output_dir=outdir, per_device_train_batch_size=B, gradient_accumulation_steps=1,
      max_length=T, precompute_ref_log_probs=True, precompute_ref_batch_size=B,
      beta=DPO_HP["beta"], loss_type=[DPO_HP["loss_type"]], learning_rate=DPO_HP["lr"],
      adam_beta1=DPO_HP["b1"], adam_beta2=DPO_HP["b2"], adam_epsilon=DPO_HP["eps"],
      weight_decay=DPO_HP["weight_decay"], max_grad_norm=DPO_HP["grad_clip"],
      lr_scheduler_type="constant", max_steps=steps, bf16=False, fp16=False, use_cpu=True,
      gradient_checkpointing=False, report_to="none", save_strategy="no", eval_strategy="no",
      logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=setup.seed)

  marks: list[dict] = []
  batch_shapes: list[tuple] = []

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      log(f"dpo: TRL train step {len(marks) + 1}/{steps}" + (" (warm-up)" if not marks else ""))
      marks.append({"start": time.perf_counter()})

    def on_step_end(self, args, state, control, **kwargs):
      marks[-1]["end"] = time.perf_counter()

  log("dpo: building TRL DPOTrainer (tokenizes the pairs, precomputes the reference "
      "log-probs)")
  policy = setup.torch_lm()
  policy.register_forward_pre_hook(
      lambda _, a, kw: batch_shapes.append(tuple(kw.get("input_ids", a[0] if a else None).shape)),
      with_kwargs=True)
  with contextlib.redirect_stdout(sys.stderr):
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[StepTimer()])
    torch.set_num_threads(threads)  # accelerate may have touched it
    first = trainer.train_dataset[:B]
    for i in range(B):  # TRL's ids are the pairs' ids (no EOS added, nothing split)
      for side in ("prompt", "chosen", "rejected"):
        if first[f"{side}_ids"][i] != pairs[i][side].tolist():
          raise RuntimeError(f"TRL tokenized pair {i}'s {side} as {first[f'{side}_ids'][i]}, "
                             f"expected {pairs[i][side].tolist()}")
    ref = np.stack([np.asarray(first["ref_chosen_logps"], np.float32),
                    np.asarray(first["ref_rejected_logps"], np.float32)], axis=1)
    trainer.train()
  if len(marks) != steps or any(s != (2 * B, T) for s in batch_shapes):
    raise RuntimeError(f"TRL ran {len(marks)} steps (expected {steps}) on batches "
                       f"{sorted(set(batch_shapes))} (expected {(2 * B, T)})")
  info = {"optim": str(getattr(args.optim, "value", args.optim)),
          "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
          "precompute_ref_log_probs": args.precompute_ref_log_probs,
          "reference_model_in_step": trainer.ref_model is not None}
  del trainer, policy
  return [m["end"] - m["start"] for m in marks], ref, info


def measure(setup: Setup, shapes: Shapes, reps: int, ceilings: dict, *, threads: int) -> dict:
  """Seconds per DPO train step after one warm-up step, against TRL's on CPU (no TRL run
  in the GPU mode)."""
  B, P, R = shapes.dpo_batch, shapes.dpo_prompt, shapes.dpo_reply
  T = P + R
  cfg = setup.config
  # TRL's loader shuffles its dataset: every pair of its steps comes from this set, and
  # its first B are cai_jax's batch (the reference log-probs are compared on them).
  pairs = make_pairs(shapes, B * (reps + 1), cfg.vocab_size, cfg.eos_token_id)
  ours_s, ours_ref = _ours_dpo(setup, shapes, pairs[:B], reps)
  gc.collect()
  trl_s, trl_ref, trl_info, ref_diff = None, None, None, None
  if setup.device != "gpu":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation renames
      trl_s, trl_ref, trl_info = _trl_dpo(setup, shapes, pairs, reps + 1, threads)
    ref_diff = float(np.max(np.abs(ours_ref - trl_ref)))
    log(f"dpo: reference log-probs, cai_jax vs TRL: max abs difference {ref_diff:.3g} "
        f"(values ~{float(np.mean(np.abs(ours_ref))):.3g})")
  step_flops = 2 * B * T * 3 * cfg.flops_per_token(T)
  floor = step_flops / peak_flops(ceilings)
  rows = [row("dpo", "step s", "s", median(ours_s), None if trl_s is None else median(trl_s[1:]),
              higher_is_better=False, floor=floor, device=setup.device)]
  return {"pairs": B, "prompt_len": P, "chosen_reply_len": R, "rejected_reply_len": R - R // 4,
          "seq_len": T, "hyperparameters": DPO_HP, "dtype": cfg.dtype,
          "step_flops": step_flops, "floor_seconds": floor,
          "seconds": {"cai_jax": ours_s, "trl": trl_s}, "trl": trl_info,
          "reference_logps": {"cai_jax": ours_ref, "trl": trl_ref,
                              "max_abs_difference": ref_diff},
          "note": ("cai_jax: median of reps after one warm-up call; TRL: median of its steps "
                   "after the first; both read precomputed reference log-probs; no TRL run in "
                   "the GPU mode"),
          "rows": rows}
