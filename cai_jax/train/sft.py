"""Supervised fine-tuning on chat jsonl (the SL-CAI blend): answer-only loss.

Reads NeMo-style chat records, renders them with the chat template
(loss on each assistant reply and its end-of-turn token), optionally packs
several conversations per row, and trains with the shared loop. Writes to the
workdir: checkpoints/, metrics.jsonl, tensorboard/, model/ (cai_jax orbax
model dir + tokenizer.model), hf/ (safetensors), report.json, manifest.json.
"""

from __future__ import annotations

import numpy as np

from cai_jax.data import batching, sources
from cai_jax.tokenizer import Tokenizer, get_template
from cai_jax.train import supervised
from cai_jax.train.lm import count_tokens, make_lm_loss


def build_rows(cfg, tokenizer: Tokenizer, path: str, stats_prefix: str) -> tuple[list[dict], dict]:
  """Chat jsonl -> padded or packed rows of `cfg.max_seq_len` tokens, with counts."""
  records, read_stats = sources.read_chat_records(path)
  examples, tok_stats = batching.tokenize_conversations(
      records, tokenizer, get_template(cfg.template), max_seq_len=cfg.max_seq_len,
      overlong=cfg.overlong)
  if cfg.packing:
    rows = batching.pack_examples(examples, cfg.max_seq_len)
  else:
    rows = batching.pad_examples(examples, cfg.max_seq_len)
  # The reader's `records` counts every line read (with the skipped ones); the
  # tokenizer's counts only the records it was given, so it must not overwrite it.
  tok_stats = {k: v for k, v in tok_stats.items() if k != "records"}
  stats = {f"{stats_prefix}_{k}": v for k, v in {**read_stats, **tok_stats}.items()
           if isinstance(v, (int, float))}
  stats[f"{stats_prefix}_examples"] = len(examples)
  stats[f"{stats_prefix}_rows"] = len(rows)
  return rows, stats


def split_validation(rows: list[dict], fraction: float, seed: int):
  """Deterministic hold-out of `fraction` of the rows (at least one)."""
  if fraction <= 0 or len(rows) < 2:
    return rows, []
  order = np.random.default_rng(seed).permutation(len(rows))
  n_val = max(1, int(round(len(rows) * fraction)))
  val = set(order[:n_val].tolist())
  return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def run_sft(cfg, workdir: str, *, mesh=None, force: bool = False) -> dict:
  """Runs (or resumes) SFT described by `configs/sft.py`. Returns the report dict.

  `mesh` overrides `cfg.mesh` (e.g. a one-device mesh in a multi-device process).
  A workdir holding a run of another config or other inputs is refused unless
  `force` (then it is cleared): see `cai_jax.train.identity`.
  """
  data_files = {"train_file": cfg.train_file, "val_file": cfg.val_file}
  tokenizer, mesh = supervised.prepare(cfg, workdir, mesh, stage="sft", data_files=data_files,
                                       force=force)
  train_rows, stats = build_rows(cfg, tokenizer, cfg.train_file, "train")
  if cfg.val_file:
    val_rows, val_stats = build_rows(cfg, tokenizer, cfg.val_file, "val")
    stats.update(val_stats)
  else:
    train_rows, val_rows = split_validation(train_rows, cfg.val_fraction, cfg.seed)
  if not train_rows:
    raise ValueError(f"{cfg.train_file}: no usable training conversations ({stats})")
  stats["train_rows_after_split"], stats["val_rows"] = len(train_rows), len(val_rows)

  _, summary, paths, steps = supervised.fit_supervised(
      cfg, workdir, mesh=mesh, tokenizer=tokenizer, head="lm", make_loss=make_lm_loss,
      train_rows=train_rows, eval_rows=val_rows, count_tokens=count_tokens, desc="sft")
  report = {"stage": "sft", "data": stats, "steps": steps, **summary, "outputs": paths}
  supervised.write_report(cfg, workdir, stage="sft", report=report,
                          data_files=data_files, counts={"steps": steps, **stats})
  return report
