"""Bradley-Terry reward model: scalar head read at the last token, pairwise loss.

Loss per pair with d = r_chosen - r_rejected and soft label p = P(chosen wins):

    -(p log sigmoid(d - m) + (1 - p) log sigmoid(-(d - m)))  [+ c * (r_c + r_r)^2]

which is `-log sigmoid(d)` for hard labels (p = 1, margin m = 0). Chosen and
rejected rows of a pair are stacked along the batch and go through one forward
of `cai_jax.scoring.rm_scores`, the function that scores texts after training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.data import batching
from cai_jax.model import MistralConfig
from cai_jax.scoring import rm_scores
from cai_jax.tokenizer import ChatTemplate, Tokenizer, get_template
from cai_jax.train import supervised


def pair_loss(r_chosen, r_rejected, p_chosen, margin: float = 0.0, center_coef: float = 0.0):
  """Per-pair Bradley-Terry loss (soft labels, optional margin and reward centering)."""
  d = r_chosen - r_rejected - margin
  loss = -(p_chosen * jax.nn.log_sigmoid(d) + (1.0 - p_chosen) * jax.nn.log_sigmoid(-d))
  if center_coef:
    loss = loss + center_coef * (r_chosen + r_rejected) ** 2
  return loss


def make_rm_loss(config: MistralConfig, margin: float = 0.0, center_coef: float = 0.0):
  """loss_fn(params, batch, rng) over a batch of pairs: tokens [B, 2, T], lengths [B, 2]."""

  def loss_fn(params, batch, rng):
    B, _, T = batch["tokens"].shape
    valid = batch["lengths"][:, 0] > 0          # padding pairs (eval) have length 0
    scores = rm_scores(config, params, batch["tokens"].reshape(2 * B, T),
                       batch["lengths"].reshape(2 * B), dropout_rng=rng).reshape(B, 2)
    rc, rr = scores[:, 0], scores[:, 1]
    p = batch["p_chosen"].astype(jnp.float32)
    w = valid.astype(jnp.float32)
    loss = pair_loss(rc, rr, p, margin, center_coef)
    correct = jnp.where(p >= 0.5, rc > rr, rr > rc).astype(jnp.float32)
    sums = {"accuracy": jnp.sum(correct * w), "margin": jnp.sum((rc - rr) * w),
            "reward_chosen": jnp.sum(rc * w), "reward_rejected": jnp.sum(rr * w),
            "reward_chosen_sq": jnp.sum(rc * rc * w), "reward_rejected_sq": jnp.sum(rr * rr * w)}
    return jnp.sum(loss * w), jnp.sum(w), sums

  return loss_fn


def _with_std(metrics: dict, prefix: str = "") -> dict:
  """Adds reward std from the mean and mean-of-squares sums."""
  out = dict(metrics)
  for side in ("chosen", "rejected"):
    m, sq = out.get(f"{prefix}reward_{side}"), out.pop(f"{prefix}reward_{side}_sq", None)
    if m is not None and sq is not None:
      out[f"{prefix}reward_{side}_std"] = float(np.sqrt(max(sq - m * m, 0.0)))
  return out


def build_pair_rows(path: str, tokenizer: Tokenizer, template: ChatTemplate, max_seq_len: int,
                    overlong: str, prefix: str):
  pairs, read_stats = batching.read_comparisons(path)
  examples, tok_stats = batching.tokenize_pairs(pairs, tokenizer, template,
                                                max_seq_len=max_seq_len, overlong=overlong)
  rows = batching.pad_pairs(examples, max_seq_len)
  stats = {f"{prefix}_{k}": v for k, v in {**read_stats, **tok_stats}.items()
           if isinstance(v, (int, float))}
  stats[f"{prefix}_pairs"] = len(rows)
  return rows, stats


def run_rm(cfg, workdir: str, *, mesh=None, force: bool = False) -> dict:
  """Trains (or resumes) the reward model described by `configs/rm.py`.

  `mesh` overrides `cfg.mesh`; `force` restarts a workdir that holds another run
  (see `cai_jax.train.identity`). The report holds the test metrics before
  training (`initial_eval`, the chance-level baseline) and after
  (`final_eval`, `test_accuracy`).
  """
  data_files = {"train_file": cfg.train_file, "test_file": cfg.test_file}
  tokenizer, mesh = supervised.prepare(cfg, workdir, mesh, stage="rm", data_files=data_files,
                                       force=force)
  template = get_template(cfg.template)
  train_rows, stats = build_pair_rows(cfg.train_file, tokenizer, template, cfg.max_seq_len,
                                      cfg.overlong, "train")
  test_rows, test_stats = ([], {})
  if cfg.test_file:
    test_rows, test_stats = build_pair_rows(cfg.test_file, tokenizer, template, cfg.max_seq_len,
                                            cfg.overlong, "test")
  stats.update(test_stats)
  if not train_rows:
    raise ValueError(f"{cfg.train_file}: no usable comparison pairs ({stats})")

  _, summary, paths, steps = supervised.fit_supervised(
      cfg, workdir, mesh=mesh, tokenizer=tokenizer, head="scalar",
      make_loss=lambda config: make_rm_loss(config, cfg.margin, cfg.center_coef),
      train_rows=train_rows, eval_rows=test_rows,
      count_tokens=lambda b: int(np.asarray(b["lengths"]).sum()), desc="reward model",
      allow_head_change=True, trained_heads=("score",))
  for key, prefix in (("initial_eval", "val_"), ("final_eval", "val_"), ("final_train", "")):
    summary[key] = _with_std(summary.get(key, {}), prefix)
  report = {"stage": "rm", "data": stats, "steps": steps, **summary, "outputs": paths,
            "test_accuracy": summary["final_eval"].get("val_accuracy")}
  supervised.write_report(cfg, workdir, stage="rm", report=report,
                          data_files=data_files, counts={"steps": steps, **stats})
  return report
