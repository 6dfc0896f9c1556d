"""What SFT and the reward model share: model set-up, the loop, export, report and manifest.

A stage supplies its rows (host dicts of arrays), a loss factory and a token
counter; `fit_supervised` builds the sharded train state, the jitted train
and eval steps, runs (or resumes) the shared loop and exports the model.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from cai_jax import parallel, preflight
from cai_jax.data import batching, jsonl
from cai_jax.metrics import MetricsWriter
from cai_jax.model import MistralConfig, lora
from cai_jax.tokenizer import Tokenizer
from cai_jax.train import common, identity
from cai_jax.train.checkpointing import Checkpointer
from cai_jax.train.loop import (DivergenceGuard, LoopSettings, check_workdir_writable,
                                default_peak_flops, run_training)
from cai_jax.train.optim import make_optimizer
from cai_jax.train.state import create_state, make_eval_step, make_train_step


def stage_inputs(cfg, data_files: dict) -> dict:
  """The files a supervised stage reads (hashed into its run identity and manifest)."""
  inputs = {k: v for k, v in data_files.items() if v}
  inputs["tokenizer"] = cfg.tokenizer
  if cfg.init_from:
    inputs["init_from_config"] = os.path.join(cfg.init_from, "config.json")
  return inputs


def prepare(cfg, workdir: str, mesh=None, *, stage: str, data_files: dict, force: bool = False):
  """Checks the config's values and the workdir's run identity (see `identity`), opens the
  tokenizer, builds the mesh. Returns (tokenizer, mesh)."""
  preflight.require(preflight.value_problems(stage, cfg), f"{stage} config")
  check_workdir_writable(workdir)
  if not cfg.tokenizer:
    raise ValueError("config.tokenizer: path to a sentencepiece .model is required")
  identity.claim_workdir(workdir, cfg, stage_inputs(cfg, data_files), force=force,
                         lead=jax.process_index() == 0)
  tokenizer = Tokenizer.from_file(cfg.tokenizer)
  return tokenizer, (mesh if mesh is not None else parallel.mesh_from_config(cfg.get("mesh")))


def make_evaluate(eval_step, rows: list[dict], global_batch_size: int, put_batch) -> Any:
  """Validation over every row once (the last batch padded with empty rows, which count for nothing).

  Batches are global: each process feeds only its slice of each one, as in
  training, so a multi-host evaluation neither repeats rows nor needs all of
  them on every device.
  """
  if not rows:
    return None
  stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  n = len(rows)
  pad = (-n) % global_batch_size
  if pad:
    stacked = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in stacked.items()}
  local = global_batch_size // jax.process_count()
  lo = jax.process_index() * local
  batches = [{k: v[i + lo:i + lo + local] for k, v in stacked.items()}
             for i in range(0, n + pad, global_batch_size)]

  def evaluate(params):
    num = den = 0.0
    sums: dict = {}
    for b in batches:
      b_num, b_den, b_metrics = jax.device_get(eval_step(params, put_batch(b)))
      num, den = num + float(b_num), den + float(b_den)
      for k, v in b_metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    den = max(den, 1.0)
    return {"val_loss": num / den, **{f"val_{k}": v / den for k, v in sums.items()}}

  return evaluate


def fit_supervised(cfg, workdir: str, *, mesh, tokenizer: Tokenizer, head: str,
                   make_loss: Callable[[MistralConfig], Any], train_rows: list[dict],
                   eval_rows: list[dict], count_tokens: Callable[[dict], int], desc: str,
                   allow_head_change: bool = False, rows_with_model: Callable | None = None,
                   trained_heads: tuple[str, ...] = ()):
  """Trains (or resumes) on `train_rows`; returns (config, summary, export paths, steps);
  the summary's "training" says how (`common.training_summary`).

  With `cfg.lora.rank` > 0 only the adapters and `trained_heads` train (`common.load_trained`),
  checkpoints hold those alone, and the export is the merged model plus the adapter in PEFT
  format. `rows_with_model(config, params, param_shardings, train_rows, eval_rows)`, if
  given, sees the starting model (every leaf) before training and returns the rows to train
  and evaluate on (DPO adds its frozen reference's log-probs to them); it must not keep
  `params`, which the train state takes over.
  """
  trained = common.load_trained(cfg, mesh, head=head, seed=cfg.seed,
                                allow_head_change=allow_head_change, trained_heads=trained_heads)
  config = trained.config
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size} tokens but the model "
                     f"only {config.vocab_size}")
  # The base must be split over the model axes; adapters are sharded along their kernels'
  # axes but their rank side is replicated (r / (in + out) of a kernel), so they are exempt.
  parallel.assert_params_sharded(lora.split(trained.full()[0])[1], mesh)
  if rows_with_model is not None:
    train_rows, eval_rows = rows_with_model(config, *trained.full(), train_rows, eval_rows)
  batches = batching.BatchIterator(
      train_rows, cfg.global_batch_size, seed=cfg.seed, shuffle=True, drop_remainder=True,
      process_index=jax.process_index(), process_count=jax.process_count())
  total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * batches.steps_per_epoch
  accum = common.accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, mesh)
  optimizer, schedule = make_optimizer(cfg.optim, total_steps)
  state, shardings = create_state(trained.params, optimizer, trained.shardings, mesh,
                                  seed=cfg.seed)

  example = {k: np.asarray(v)[None] for k, v in train_rows[0].items()}
  batch_sh = common.batch_shardings_for(mesh, example)
  loss_fn = make_loss(config)
  frozen = dict(frozen=trained.frozen, frozen_shardings=trained.frozen_shardings)
  train_step = make_train_step(loss_fn, optimizer, schedule, accum_steps=accum,
                               shardings=shardings, batch_shardings=batch_sh, mesh=mesh, **frozen)
  put_batch = common.make_put_batch(mesh)
  eval_step = make_eval_step(loss_fn, param_shardings=trained.shardings, batch_shardings=batch_sh,
                             mesh=mesh, **frozen)
  evaluate = make_evaluate(eval_step, eval_rows, cfg.global_batch_size, put_batch)

  writer = MetricsWriter(workdir)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                              best_metric="val_loss" if evaluate else None)
  settings = LoopSettings(total_steps=total_steps, log_every=cfg.log_every,
                          eval_every=cfg.eval_every, save_every=cfg.save_every,
                          flops_per_token=3 * config.flops_per_token(cfg.max_seq_len, head=head),
                          peak_flops=default_peak_flops(), desc=desc)
  summary_of_training = common.training_summary(trained)
  logging.info("%s: %d train rows, %d eval rows, %d steps, accumulation %d, mesh %s, %s", desc,
               len(train_rows), len(eval_rows), total_steps, accum, dict(mesh.shape),
               common.describe_trained(trained))
  try:
    state, summary = run_training(
        state=state, shardings=shardings, step=train_step, batches=batches,
        put_batch=put_batch, count_tokens=count_tokens, settings=settings,
        checkpointer=checkpointer, writer=writer,
        evaluate=(lambda s: evaluate(s.params)) if evaluate else None,
        guard=DivergenceGuard(cfg.get("guard", None), spike_metrics=("loss",)),
        host_state=common.host_state_of(trained))
  finally:
    checkpointer.close()
    writer.close()
  paths = common.export_trained(workdir, trained, state.params, head=head, hf=cfg.export_hf,
                                tokenizer_path=cfg.tokenizer)
  return config, {**summary, "training": summary_of_training}, paths, total_steps


def write_report(cfg, workdir: str, *, stage: str, report: dict, data_files: dict,
                 counts: dict) -> None:
  """report.json and manifest.json (inputs hashed), from process 0."""
  if jax.process_index() != 0:
    return
  jsonl.atomic_write_json(os.path.join(workdir, "report.json"), report)
  jsonl.write_manifest(workdir, stage=stage, config=cfg, inputs=stage_inputs(cfg, data_files),
                       counts=counts, seed=cfg.seed)
