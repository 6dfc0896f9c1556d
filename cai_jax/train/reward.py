"""Bradley-Terry reward model: scalar head read at the last token, pairwise loss.

Loss per pair with d = r_chosen - r_rejected and soft label p = P(chosen wins):

    -(p log sigmoid(d - m) + (1 - p) log sigmoid(-(d - m)))  [+ c * (r_c + r_r)^2]

which is `-log sigmoid(d)` for hard labels (p = 1, margin m = 0). Chosen and
rejected rows of a pair are stacked along the batch and go through one forward.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import checkpoint, parallel
from cai_jax.data import batching
from cai_jax.model import Mistral, MistralConfig, param_shardings
from cai_jax.tokenizer import ChatTemplate, Tokenizer, get_template
from cai_jax.train import supervised


def last_token_scores(values: jax.Array, lengths: jax.Array) -> jax.Array:
  """values [B, T] per-position scalars, right-padded rows of `lengths` -> [B] at the last token."""
  return jnp.take_along_axis(values, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]


def segment_last_scores(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Packed rows: [B, K] score at the last token of segments 1..K (0 where absent)."""
  T = values.shape[1]
  ks = jnp.arange(1, num_segments + 1)
  in_seg = segment_ids[:, None, :] == ks[None, :, None]                       # [B, K, T]
  last = jnp.max(jnp.where(in_seg, jnp.arange(T)[None, None, :], -1), axis=-1)  # [B, K]
  picked = jnp.take_along_axis(values, jnp.maximum(last, 0), axis=1)
  return jnp.where(last >= 0, picked, 0.0)


def pair_loss(r_chosen, r_rejected, p_chosen, margin: float = 0.0, center_coef: float = 0.0):
  """Per-pair Bradley-Terry loss (soft labels, optional margin and reward centering)."""
  d = r_chosen - r_rejected - margin
  loss = -(p_chosen * jax.nn.log_sigmoid(d) + (1.0 - p_chosen) * jax.nn.log_sigmoid(-d))
  if center_coef:
    loss = loss + center_coef * (r_chosen + r_rejected) ** 2
  return loss


def rm_scores(config: MistralConfig, params, tokens, lengths):
  """tokens [B, T] right-padded, lengths [B] -> scores [B]."""
  T = tokens.shape[1]
  mask = jnp.arange(T)[None, :] < lengths[:, None]
  values = Mistral(config, head="scalar").apply({"params": params}, tokens, attention_mask=mask)
  return last_token_scores(values, lengths)


def make_rm_loss(config: MistralConfig, margin: float = 0.0, center_coef: float = 0.0):
  """loss_fn(params, batch, rng) over a batch of pairs: tokens [B, 2, T], lengths [B, 2]."""

  def loss_fn(params, batch, rng):
    del rng
    B, _, T = batch["tokens"].shape
    valid = batch["lengths"][:, 0] > 0          # padding pairs (eval) have length 0
    scores = rm_scores(config, params, batch["tokens"].reshape(2 * B, T),
                       batch["lengths"].reshape(2 * B)).reshape(B, 2)
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
      allow_head_change=True)
  for key, prefix in (("initial_eval", "val_"), ("final_eval", "val_"), ("final_train", "")):
    summary[key] = _with_std(summary.get(key, {}), prefix)
  report = {"stage": "rm", "data": stats, "steps": steps, **summary, "outputs": paths,
            "test_accuracy": summary["final_eval"].get("val_accuracy")}
  supervised.write_report(cfg, workdir, stage="rm", report=report,
                          data_files=data_files, counts={"steps": steps, **stats})
  return report


class RewardScorer:
  """Scores texts with a trained reward model: `RewardScorer(model_dir).score(texts)`.

  Texts are encoded exactly as training encoded comparison texts
  (`template.encode`; an overlong one keeps its first tokens and its whole
  end-of-turn marker, at whose last token the reward is read), so a text gets
  the score training would have given it.
  Batches are right-padded to a power-of-two length (>= 16) to bound the
  number of compiled shapes.
  """

  def __init__(self, model_dir: str, tokenizer_path: str | None = None, *, max_seq_len: int = 4096,
               batch_size: int = 16, mesh=None, template: str = "nemo"):
    if batch_size < 1 or max_seq_len < 2:
      raise ValueError(f"need batch_size >= 1 and max_seq_len >= 2, got {batch_size}, "
                       f"{max_seq_len}")
    self.mesh = mesh or parallel.mesh_from_config(parallel.ONE_DEVICE)
    self.config, head = checkpoint.read_model_config(model_dir)
    if head != "scalar":
      raise ValueError(f"{model_dir}: not a reward model (its head is {head!r})")
    _, self.params, _ = checkpoint.load_model(
        model_dir, head="scalar", shardings=param_shardings(self.config, self.mesh, "scalar"))
    self.tokenizer = Tokenizer.from_file(tokenizer_path or os.path.join(model_dir, "tokenizer.model"))
    self.template = get_template(template)
    self.end_of_turn = self.template.end_of_turn_ids(self.tokenizer)
    self.max_seq_len = max_seq_len
    self.batch_size = batch_size
    self._fn = jax.jit(lambda p, t, l: rm_scores(self.config, p, t, l))

  def encode(self, text: str) -> list[int]:
    ids = self.template.encode(self.tokenizer, text)
    if not ids:
      raise ValueError("RewardScorer: an empty text has no last token to read a reward at")
    if len(ids) > self.max_seq_len:
      ids = batching.truncate_keep_end(ids, self.max_seq_len, self.end_of_turn)
    return ids

  def score(self, texts: list[str]) -> list[float]:
    out: list[float] = []
    for i in range(0, len(texts), self.batch_size):
      chunk = texts[i:i + self.batch_size]
      ids = [self.encode(t) for t in chunk]
      T = 16
      while T < max(len(x) for x in ids):
        T *= 2
      tokens = np.full((self.batch_size, T), self.tokenizer.pad_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)  # filler rows: one pad token, ignored
      for j, x in enumerate(ids):
        tokens[j, :len(x)] = x
        lengths[j] = len(x)
      scores = np.asarray(self._fn(self.params, tokens, lengths))
      out.extend(float(s) for s in scores[:len(chunk)])
    return out
