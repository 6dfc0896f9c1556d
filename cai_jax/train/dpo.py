"""Direct preference optimisation on comparison files: sigmoid (DPO, conservative DPO) and IPO.

A pair is a prompt x with a chosen reply y_c and a rejected reply y_r, read from
a comparison file (alternating `{"text": chosen}` / `{"text": rejected}` lines,
each a whole rendered conversation; RL-CAI adds `p_chosen`, its judge's
probability that chosen is better). With the policy's and the frozen
reference's summed log-probs of each reply's tokens, log pi(y|x) and
log pi_ref(y|x), and

    r_c = beta (log pi(y_c|x) - log pi_ref(y_c|x)),   r_r likewise,   m = r_c - r_r,

the loss per pair is, with eps = 1 - p for a soft label p < 1 and
eps = `dpo.label_smoothing` for a hard one,

    sigmoid:  -((1 - eps) log sigmoid(m) + eps log sigmoid(-m))
    ipo:      (1 - eps) (h - 1/(2 beta))^2 + eps (h + 1/(2 beta))^2,
              h = (log-ratio of y_c) / |y_c| - (log-ratio of y_r) / |y_r|

(|y| = the reply's token count). With eps = 0 these are TRL's `loss_type="sigmoid"`
and `loss_type="ipo"` (TRL averages IPO's log-ratios over the reply's tokens, a
normalisation the IPO authors confirmed; we do the same). For eps > 0 the sigmoid
form is conservative DPO (older TRL's sigmoid with `label_smoothing`), and the IPO
form is IPO's expected loss when the order of the pair is flipped with
probability eps: its minimum is at h = (1 - 2 eps) / (2 beta), IPO's target for
preference probability 1 - eps.

The reply is the text after the last assistant header (the tokens the SFT loss
trains on in that turn: the reply and its end-of-turn marker). The reference
model's log-probs of every train and test pair are computed once, before
training, by a jitted sharded forward, stored as row columns `ref_chosen` /
`ref_rejected` and cached in the workdir (`reference_logps.npz`), so the train
step runs the policy only and a resumed run reuses exactly the same values.
Chosen and rejected go through one forward, stacked as the reward model stacks
them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from cai_jax import parallel
from cai_jax.data import batching, jsonl
from cai_jax.data.jsonl import DataError, data_error
from cai_jax.model import MistralConfig, lm_head_kernel
from cai_jax.tokenizer import ChatTemplate, Tokenizer, get_template
from cai_jax.train import common, identity, supervised
from cai_jax.train.lm import lm_hidden, next_token_targets, vocab_logprobs

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_CACHE = "reference_logps.npz"


# ----------------------------------------------------------------------------
# The loss.


def pair_epsilon(p_chosen, label_smoothing: float):
  """Label smoothing per pair: 1 - p for a soft label p < 1, else `label_smoothing`."""
  return jnp.where(p_chosen < 1.0, 1.0 - p_chosen, label_smoothing)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, eps, *, beta: float,
             loss_type: str = "sigmoid", chosen_tokens=None, rejected_tokens=None):
  """Per-pair loss and margin m = r_c - r_r (see the module docstring), all [B].

  `policy_*` / `ref_*` are summed log-probs of each reply; `*_tokens` (the replies'
  token counts) are needed by IPO only.
  """
  chosen_ratio = policy_chosen - ref_chosen
  rejected_ratio = policy_rejected - ref_rejected
  margin = beta * (chosen_ratio - rejected_ratio)
  if loss_type == "sigmoid":
    loss = -((1.0 - eps) * jax.nn.log_sigmoid(margin) + eps * jax.nn.log_sigmoid(-margin))
  elif loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("the ipo loss needs the replies' token counts")
    h = (chosen_ratio / jnp.maximum(chosen_tokens, 1.0)
         - rejected_ratio / jnp.maximum(rejected_tokens, 1.0))
    target = 1.0 / (2.0 * beta)
    loss = (1.0 - eps) * (h - target) ** 2 + eps * (h + target) ** 2
  else:
    raise ValueError(f"dpo loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  return loss, margin


def reply_width(rows: list[dict]) -> int:
  """The most reply tokens of any side of any row: how many positions per row go through
  the vocab head (a static shape, so one per run)."""
  return max((int(np.asarray(r["response_mask"]).sum(axis=-1).max()) for r in rows), default=0)


def response_logprobs(config: MistralConfig, params, tokens, response_mask, lengths,
                      width: int = 0, dropout_rng=None):
  """Summed log-probs [N] of the reply tokens of right-padded rows, and their counts [N].

  tokens, response_mask int [N, T] (1 on the reply's tokens, one contiguous span),
  lengths int [N] (0 = a padding row, which gives 0 and 0). With `width` (>= every row's
  reply length, `reply_width`) only the `width` positions from the one before each reply
  go through the vocab head, not all T: the head is most of a small model's FLOPs and
  the prompt's positions predict nothing DPO reads. The values are the same.
  """
  N, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (N, T))
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  batch = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
           "loss_mask": response_mask}
  hidden = lm_hidden(config, params, batch, dropout_rng)
  targets, mask = next_token_targets(batch)
  if 0 < width < T:
    first = jnp.argmax(response_mask > 0, axis=1)          # the reply's first token
    cols = jnp.maximum(first - 1, 0)[:, None] + jnp.arange(width)[None, :]
    inside = cols < T
    cols = jnp.minimum(cols, T - 1)
    hidden = jnp.take_along_axis(hidden, cols[..., None], axis=1)
    targets = jnp.take_along_axis(targets, cols, axis=1)
    mask = jnp.take_along_axis(mask, cols, axis=1) & inside
  out = vocab_logprobs(hidden, lm_head_kernel(config, params), targets)
  logp = jnp.sum(jnp.where(mask, out.logp, 0.0), axis=-1)
  return logp, jnp.sum(mask.astype(jnp.float32), axis=-1)


def pair_logprobs(config: MistralConfig, params, batch: dict, width: int = 0, dropout_rng=None):
  """Chosen and rejected in one forward: ([B, 2] summed reply log-probs, [B, 2] counts)."""
  B, _, T = batch["tokens"].shape
  logp, count = response_logprobs(config, params, batch["tokens"].reshape(2 * B, T),
                                  batch["response_mask"].reshape(2 * B, T),
                                  batch["lengths"].reshape(2 * B), width, dropout_rng)
  return logp.reshape(B, 2), count.reshape(B, 2)


def make_dpo_loss(config: MistralConfig, *, beta: float, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, width: int = 0):
  """loss_fn(params, batch, rng) over pairs: tokens / response_mask [B, 2, T], lengths
  [B, 2], p_chosen, ref_chosen, ref_rejected [B]. Sums over the real pairs (lengths > 0).
  `width`: see `response_logprobs` (0 = the vocab head on every position)."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")

  def loss_fn(params, batch, rng):
    logp, count = pair_logprobs(config, params, batch, width, rng)
    p = batch["p_chosen"].astype(jnp.float32)
    ref_c = batch["ref_chosen"].astype(jnp.float32)
    ref_r = batch["ref_rejected"].astype(jnp.float32)
    loss, margin = dpo_loss(logp[:, 0], logp[:, 1], ref_c, ref_r,
                            pair_epsilon(p, label_smoothing), beta=beta, loss_type=loss_type,
                            chosen_tokens=count[:, 0], rejected_tokens=count[:, 1])
    w = (batch["lengths"][:, 0] > 0).astype(jnp.float32)   # padding pairs (eval) count for nothing
    # A tie (the policy still equal to the reference) counts half: chance is 0.5.
    right = jnp.where(p >= 0.5, margin > 0, margin < 0).astype(jnp.float32)
    correct = right + 0.5 * (margin == 0).astype(jnp.float32)
    sums = {"accuracy": jnp.sum(correct * w), "margin": jnp.sum(margin * w),
            "reward_chosen": jnp.sum(beta * (logp[:, 0] - ref_c) * w),
            "reward_rejected": jnp.sum(beta * (logp[:, 1] - ref_r) * w),
            "logp_chosen": jnp.sum(logp[:, 0] * w), "logp_rejected": jnp.sum(logp[:, 1] * w)}
    return jnp.sum(jnp.where(w > 0, loss, 0.0)), jnp.sum(w), sums

  return loss_fn


# ----------------------------------------------------------------------------
# Comparison files -> rows.


def _reply_start_marker(template: ChatTemplate) -> str:
  """The text that ends a prompt: the assistant header, or (templates without one, such
  as `[INST] ... [/INST]`) the end of the user block."""
  return template.assistant_header or template.user_format.split("{message}")[-1]


def reply_ids(tokenizer: Tokenizer, template: ChatTemplate, text: str):
  """`template.encode(text)` and its reply mask (1 on the tokens after the last assistant
  header), and the number of prompt tokens. Raises ValueError when the text holds no
  assistant header or the header does not end a chunk of the encoding."""
  marker = _reply_start_marker(template)
  cut = text.rfind(marker) if marker else -1
  if cut < 0:
    raise ValueError(f"no {marker!r} in the text: a comparison text is a conversation "
                     f"rendered with the {template.name} template, ending with the reply")
  start = cut + len(marker)
  ids: list[int] = []
  mask: list[int] = []
  for begin, end, chunk in template.chunks(tokenizer, text):
    if begin < start < end:
      raise ValueError(f"the reply's first characters are encoded together with the "
                       f"{marker!r} before them ({text[begin:end]!r})")
    ids.extend(chunk)
    mask.extend([int(begin >= start)] * len(chunk))
  prompt_len = next((i for i, m in enumerate(mask) if m), len(mask))
  return ids, mask, prompt_len


def _record_lines(path: str) -> list[int]:
  """The line of each record of `path` (read only to name lines in an error)."""
  return [line for line, _ in jsonl.read_records(path)]


def tokenize_dpo_pairs(pairs, tokenizer: Tokenizer, template: ChatTemplate, *, max_seq_len: int,
                       overlong: str, path: str) -> tuple[list[dict], dict]:
  """Comparison pairs (`batching.read_comparisons`) -> examples with ids and reply masks.

  Both sides must share their prompt (the tokens before the reply). Overlong
  pairs are dropped (`overlong="drop"`) or cut to their first `max_seq_len`
  tokens (`"truncate"`: the reply's end goes); a pair with no reply token left on
  a side, or whose sides become identical, is dropped. Every drop is counted.
  """
  if overlong not in ("truncate", "drop"):
    raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
  stats = {"truncated": 0, "dropped_overlong": 0, "dropped_no_reply_left": 0,
           "dropped_identical_after_truncation": 0, "reply_tokens": 0}
  examples = []
  lines = None
  for k, pair in enumerate(pairs):
    sides = []
    for side, field in enumerate(("chosen", "rejected")):
      try:
        sides.append(reply_ids(tokenizer, template, pair[field]))
      except ValueError as e:
        lines = lines or _record_lines(path)
        raise data_error(path, lines[2 * k + side], f"field 'text': {e}") from None
    (c_ids, c_mask, c_prompt), (r_ids, r_mask, r_prompt) = sides
    if c_ids[:c_prompt] != r_ids[:r_prompt]:
      lines = lines or _record_lines(path)
      raise data_error(path, lines[2 * k + 1], f"the rejected text's prompt differs from the "
                       f"chosen text's (line {lines[2 * k]}): DPO compares two replies to one "
                       f"prompt")
    if len(c_ids) > max_seq_len or len(r_ids) > max_seq_len:
      if overlong == "drop":
        stats["dropped_overlong"] += 1
        continue
      c_ids, c_mask = c_ids[:max_seq_len], c_mask[:max_seq_len]
      r_ids, r_mask = r_ids[:max_seq_len], r_mask[:max_seq_len]
      stats["truncated"] += 1
      if not any(c_mask) or not any(r_mask):
        stats["dropped_no_reply_left"] += 1
        continue
      if c_ids == r_ids:
        stats["dropped_identical_after_truncation"] += 1
        continue
    stats["reply_tokens"] += sum(c_mask) + sum(r_mask)
    examples.append({"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids,
                     "rejected_mask": r_mask, "p_chosen": float(pair["p_chosen"])})
  return examples, stats


def pad_dpo_pairs(examples, seq_len: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """Rows `{"tokens", "response_mask": int32[2, T], "lengths": int32[2], "p_chosen": f32}`,
  chosen first, right-padded."""
  rows = []
  for example in examples:
    tokens = np.full((2, seq_len), pad_id, np.int32)
    mask = np.zeros((2, seq_len), np.int32)
    lengths = np.zeros(2, np.int32)
    for side, name in enumerate(("chosen", "rejected")):
      ids = example[f"{name}_ids"]
      tokens[side, :len(ids)] = ids
      mask[side, :len(ids)] = example[f"{name}_mask"]
      lengths[side] = len(ids)
    rows.append({"tokens": tokens, "response_mask": mask, "lengths": lengths,
                 "p_chosen": np.float32(example["p_chosen"])})
  return rows


def build_dpo_rows(path: str, tokenizer: Tokenizer, template: ChatTemplate, max_seq_len: int,
                   overlong: str, prefix: str) -> tuple[list[dict], dict]:
  """A comparison file -> padded rows (no reference columns yet) and `{prefix}_*` counts."""
  pairs, read_stats = batching.read_comparisons(path)
  examples, tok_stats = tokenize_dpo_pairs(pairs, tokenizer, template, max_seq_len=max_seq_len,
                                           overlong=overlong, path=path)
  rows = pad_dpo_pairs(examples, max_seq_len)
  stats = {f"{prefix}_{k}": v for k, v in {**read_stats, **tok_stats}.items()}
  stats[f"{prefix}_pairs"] = len(rows)
  return rows, stats


# ----------------------------------------------------------------------------
# The reference pass.


def reference_batch_size(cfg, mesh) -> int:
  """Pairs per reference forward: `dpo.ref_batch_size`, else the training micro-batch over
  all data-parallel replicas (a forward needs less memory than the train step)."""
  dp = parallel.data_parallel_size(mesh)
  size = cfg.dpo.ref_batch_size or (cfg.micro_batch_size * dp if cfg.micro_batch_size > 0
                                    else cfg.global_batch_size)
  if size % dp or size % jax.process_count():
    raise ValueError(f"config.dpo.ref_batch_size={size} must be a multiple of the data-parallel "
                     f"size {dp} and of the process count {jax.process_count()}")
  return size


def reference_logprobs(config: MistralConfig, params, param_shardings, rows: list[dict], *,
                       mesh, batch_size: int, width: int = 0) -> np.ndarray:
  """The frozen model's summed reply log-probs of every row, float32 [len(rows), 2].

  One jitted forward per global batch of `batch_size` pairs (the last one padded
  with empty pairs), sharded like the train step's batches; each process feeds
  its slice, and every process gets all the values.
  """
  if not rows:
    return np.zeros((0, 2), np.float32)
  fields = ("tokens", "response_mask", "lengths")
  stacked = {k: np.stack([r[k] for r in rows]) for k in fields}
  n = len(rows)
  pad = (-n) % batch_size
  if pad:
    stacked = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in stacked.items()}
  local = batch_size // jax.process_count()
  lo = jax.process_index() * local
  batch_sh = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in stacked.items()}
  program = jax.jit(lambda p, b: pair_logprobs(config, p, b, width)[0],
                    in_shardings=(param_shardings, batch_sh),
                    out_shardings=NamedSharding(mesh, P()))
  put_batch = common.make_put_batch(mesh)
  out = []
  for i in range(0, n + pad, batch_size):
    batch = put_batch({k: v[i + lo:i + lo + local] for k, v in stacked.items()})
    out.append(np.asarray(jax.device_get(program(params, batch)), np.float32))
  return np.concatenate(out)[:n]


def _all_processes(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def _read_reference_cache(path: str, key: str, lengths: dict) -> dict | None:
  """The cached log-probs if `path` holds this run's (same key, same rows), else None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      cached = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s): recomputing the reference log-probs", path, e)
    return None
  if str(cached.get("key")) != key or any(
      not np.array_equal(cached.get(f"{split}_lengths"), v) for split, v in lengths.items()):
    logging.warning("%s belongs to another run: recomputing the reference log-probs", path)
    return None
  return cached


def with_reference(cfg, workdir: str, *, mesh, key: str, width: int = 0):
  """`fit_supervised`'s `rows_with_model`: adds `ref_chosen` / `ref_rejected` to the rows,
  from the workdir's cache when it holds this run's values, else from one reference pass
  over the train and test pairs together (then cached); `width` as `response_logprobs`."""

  def add(config, params, param_shardings, train_rows, eval_rows):
    splits = {"train": train_rows, "test": eval_rows}
    lengths = {s: np.stack([r["lengths"] for r in rows]) if rows else np.zeros((0, 2), np.int32)
               for s, rows in splits.items()}
    path = os.path.join(workdir, REFERENCE_CACHE)
    cached = _read_reference_cache(path, key, lengths)
    if _all_processes(cached is not None):
      logging.info("reference log-probs from %s", path)
      ref = {s: cached[f"{s}_ref"] for s in splits}
    else:
      start = time.time()
      both = reference_logprobs(config, params, param_shardings, train_rows + eval_rows,
                                mesh=mesh, batch_size=reference_batch_size(cfg, mesh),
                                width=width)
      logging.info("reference log-probs of %d pairs in %.1fs", len(both), time.time() - start)
      ref = {"train": both[:len(train_rows)], "test": both[len(train_rows):]}
      for s, v in ref.items():
        if not np.all(np.isfinite(v)):
          bad = int(np.argmax(~np.all(np.isfinite(v), axis=1)))
          raise FloatingPointError(f"the reference model gives a non-finite log-prob for {s} "
                                   f"pair {bad}: check init_from")
      if jax.process_index() == 0:
        buf = io.BytesIO()
        np.savez(buf, key=np.asarray(key), **{f"{s}_ref": v for s, v in ref.items()},
                 **{f"{s}_lengths": v for s, v in lengths.items()})
        jsonl.atomic_write_bytes(path, buf.getvalue())
    return tuple([{**row, "ref_chosen": np.float32(r[0]), "ref_rejected": np.float32(r[1])}
                  for row, r in zip(splits[s], ref[s])] for s in ("train", "test"))

  return add


# ----------------------------------------------------------------------------
# The stage.


def count_pair_tokens(batch: dict) -> int:
  return int(np.asarray(batch["lengths"]).sum())


def run_dpo(cfg, workdir: str, *, mesh=None, force: bool = False) -> dict:
  """Trains (or resumes) DPO as `configs/dpo.py` describes; returns the report.

  `mesh` overrides `cfg.mesh`; `force` restarts a workdir that holds another run.
  The report holds the test metrics before training (`initial_eval`: the policy
  is the reference, so margins are 0 and accuracy 0.5) and after (`final_eval`,
  `test_accuracy`). Writes checkpoints/, metrics.jsonl, reference_logps.npz,
  model/ (orbax) and hf/ (safetensors), report.json and manifest.json.
  """
  data_files = {"train_file": cfg.train_file, "test_file": cfg.test_file}
  tokenizer, mesh = supervised.prepare(cfg, workdir, mesh, stage="dpo", data_files=data_files,
                                       force=force)
  template = get_template(cfg.template)
  train_rows, stats = build_dpo_rows(cfg.train_file, tokenizer, template, cfg.max_seq_len,
                                     cfg.overlong, "train")
  test_rows: list[dict] = []
  if cfg.test_file:
    test_rows, test_stats = build_dpo_rows(cfg.test_file, tokenizer, template, cfg.max_seq_len,
                                           cfg.overlong, "test")
    stats.update(test_stats)
  if not train_rows:
    raise DataError(f"{cfg.train_file}: no usable comparison pairs ({stats})")

  run_key = hashlib.sha256(json.dumps(identity.run_identity(
      cfg, supervised.stage_inputs(cfg, data_files)), sort_keys=True).encode()).hexdigest()
  d = cfg.dpo
  width = reply_width(train_rows + test_rows)   # one static head width for every program
  _, summary, paths, steps = supervised.fit_supervised(
      cfg, workdir, mesh=mesh, tokenizer=tokenizer, head="lm",
      make_loss=lambda config: make_dpo_loss(config, beta=d.beta, loss_type=d.loss_type,
                                             label_smoothing=d.label_smoothing,
                                             width=width),
      train_rows=train_rows, eval_rows=test_rows, count_tokens=count_pair_tokens, desc="dpo",
      rows_with_model=with_reference(cfg, workdir, mesh=mesh, key=run_key, width=width))
  paths["reference_logps"] = os.path.join(workdir, REFERENCE_CACHE)
  report = {"stage": "dpo", "data": stats, "steps": steps, **summary, "outputs": paths,
            "test_accuracy": summary.get("final_eval", {}).get("val_accuracy")}
  supervised.write_report(cfg, workdir, stage="dpo", report=report, data_files=data_files,
                          counts={"steps": steps, **stats})
  return report
