"""Reward model: Bradley-Terry loss parity, where the score is read, learning, resume, export.

The loss is checked against a torch implementation of the same formula on the
same scores (values and gradients); the score position against a plain
NumPy gather and against each sequence scored alone; the exported HF
directory against `transformers.MistralForSequenceClassification`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_utils
import train_worker
from cai_jax import checkpoint, parallel
from cai_jax.data import DataError, batching
from cai_jax.model import Mistral, init_params
from cai_jax.scoring import RewardScorer, last_token_scores, rm_scores, segment_last_scores
from cai_jax.tokenizer import NEMO
from cai_jax.train import common
from cai_jax.train.reward import make_rm_loss, pair_loss, run_rm

pytestmark = pytest.mark.usefixtures("train_compile_cache")

REPO = train_worker.REPO


def _mesh1():
  return parallel.create_mesh((1, 1, 1), jax.devices()[:1])


# ---- the loss ------------------------------------------------------------------------------

def _torch_pair_loss(rc, rr, p, margin, center_coef):
  """The RM loss as the issue writes it, in torch: mean over pairs."""
  import torch
  F = torch.nn.functional
  d = rc - rr - margin
  loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
  return (loss + center_coef * (rc + rr) ** 2).mean()


@pytest.mark.parametrize("labels, margin, center_coef", [
    ("hard", 0.0, 0.0), ("soft", 0.0, 0.0), ("hard", 0.7, 0.0), ("soft", 0.3, 0.05),
])
def test_pair_loss_and_gradients_match_torch(labels, margin, center_coef):
  import torch
  rng = np.random.default_rng(0)
  n = 32
  rc, rr = (rng.normal(0, 3, n).astype(np.float32) for _ in range(2))
  rc[:4] = [40.0, -40.0, 0.0, 1e-3]    # saturated and tied pairs too
  rr[:4] = [-40.0, 40.0, 0.0, 0.0]
  p = np.ones(n, np.float32) if labels == "hard" else rng.uniform(0, 1, n).astype(np.float32)

  def ours(rc, rr):
    return jnp.mean(pair_loss(rc, rr, p, margin, center_coef))

  loss, (g_c, g_r) = jax.value_and_grad(ours, argnums=(0, 1))(rc, rr)
  t_c = torch.tensor(rc, dtype=torch.float64, requires_grad=True)
  t_r = torch.tensor(rr, dtype=torch.float64, requires_grad=True)
  t_loss = _torch_pair_loss(t_c, t_r, torch.tensor(p, dtype=torch.float64), margin, center_coef)
  t_loss.backward()
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_c), t_c.grad.numpy(), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(g_r), t_r.grad.numpy(), rtol=1e-5, atol=1e-8)
  if labels == "hard" and margin == 0:   # the plain Bradley-Terry loss
    expected = -torch.nn.functional.logsigmoid(t_c - t_r).mean()
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-6)


# ---- where the score is read ------------------------------------------------------------------

def test_last_token_scores_match_a_manual_gather():
  rng = np.random.default_rng(1)
  values = rng.normal(size=(6, 11)).astype(np.float32)
  lengths = np.array([11, 1, 5, 7, 2, 10], np.int32)
  expected = np.array([values[i, lengths[i] - 1] for i in range(6)])
  np.testing.assert_array_equal(np.asarray(last_token_scores(values, lengths)), expected)


def test_segment_last_scores_match_a_manual_gather():
  rng = np.random.default_rng(2)
  examples = [{"ids": rng.integers(3, 50, n).astype(np.int32),
               "loss_mask": np.zeros(n, np.int32)} for n in (7, 3, 9, 4, 2, 5, 6)]
  rows = batching.pack_examples(examples, 12)
  seg = np.stack([r["segment_ids"] for r in rows])
  values = rng.normal(size=seg.shape).astype(np.float32)
  K = 4
  got = np.asarray(segment_last_scores(values, seg, K))
  for b in range(seg.shape[0]):
    for k in range(1, K + 1):
      where = np.nonzero(seg[b] == k)[0]
      assert got[b, k - 1] == (values[b, where[-1]] if len(where) else 0.0), (b, k)
  assert (got == 0).any() and (got != 0).any()   # rows with fewer segments than K exist


@pytest.fixture(scope="module")
def scalar_model():
  from cai_jax.model import MistralConfig
  from configs.models import get_config as model_preset
  config = MistralConfig.from_config(model_preset("tiny"), vocab_size=101, sliding_window=5)
  params, _ = init_params(config, _mesh1(), jax.random.PRNGKey(0), head="scalar")
  params = jax.device_get(params)
  # std-0.02 init scores everything ~0; scaled up, each position's score differs.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 10.0, params)
  return config, params


def _alone(config, params, seqs, T: int = 16) -> np.ndarray:
  """Each sequence's score at its last token, as if scored alone.

  The model is causal, so position n - 1 sees only the sequence itself: each
  row is the sequence followed by random (unmasked) tokens, with no padding
  mask at all. Padding and packing must not change these values.
  """
  rng = np.random.default_rng(99)
  tokens = rng.integers(3, config.vocab_size, (len(seqs), T)).astype(np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
  values = jax.jit(lambda p, t: Mistral(config, head="scalar").apply({"params": p}, t))(
      params, tokens)
  return np.array([float(values[i, len(s) - 1]) for i, s in enumerate(seqs)])


def test_scores_of_right_padded_and_packed_rows_equal_each_sequence_alone(scalar_model):
  config, params = scalar_model
  rng = np.random.default_rng(3)
  seqs = [rng.integers(3, config.vocab_size, n).astype(np.int32) for n in (9, 4, 12, 6, 1, 8)]
  alone = _alone(config, params, seqs)
  assert np.std(alone) > 0.1

  T = 12   # right-padded (pad id 0, not attended to), read at lengths - 1
  tokens = np.zeros((len(seqs), T), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
  lengths = np.array([len(s) for s in seqs], np.int32)
  padded = np.asarray(jax.jit(lambda p, t, l: rm_scores(config, p, t, l))(params, tokens, lengths))
  np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=0)

  rows = batching.pack_examples([{"ids": s, "loss_mask": np.zeros(len(s), np.int32)}
                                 for s in seqs], 16)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  values = jax.jit(lambda p, b: Mistral(config, head="scalar").apply(
      {"params": p}, b["tokens"], positions=b["positions"], attention_mask=b["segment_ids"] > 0,
      segment_ids=b["segment_ids"]))(params, batch)
  packed = np.asarray(segment_last_scores(values, batch["segment_ids"], 4))
  # pack_examples places longest first; map each (row, segment) back to its sequence.
  got = {}
  for b, row in enumerate(rows):
    for k in range(1, row["segment_ids"].max() + 1):
      ids = tuple(row["tokens"][row["segment_ids"] == k])
      got[ids] = packed[b, k - 1]
  assert len(got) == len(seqs)
  np.testing.assert_allclose([got[tuple(s)] for s in seqs], alone, atol=1e-5, rtol=0)


def test_rm_loss_is_the_mean_pair_loss_over_real_pairs(scalar_model):
  """make_rm_loss: one forward for both sides, padding pairs (lengths 0) count for nothing."""
  config, params = scalar_model
  rng = np.random.default_rng(4)
  B, T = 4, 10
  tokens = rng.integers(3, config.vocab_size, (B, 2, T)).astype(np.int32)
  lengths = np.array([[10, 7], [3, 9], [5, 5], [0, 0]], np.int32)   # pair 3 is padding
  p = np.array([1.0, 0.25, 0.9, 1.0], np.float32)
  num, den, sums = jax.jit(make_rm_loss(config, margin=0.5, center_coef=0.1))(
      params, {"tokens": tokens, "lengths": lengths, "p_chosen": p}, None)
  scores = _alone(config, params, [tokens[b, s, :lengths[b, s]] for b in range(3)
                                   for s in range(2)]).reshape(3, 2)
  expected = pair_loss(scores[:, 0], scores[:, 1], p[:3], 0.5, 0.1)
  assert float(den) == 3.0
  np.testing.assert_allclose(float(num), float(np.sum(expected)), rtol=1e-5)
  correct = [(scores[b, 0] > scores[b, 1]) == (p[b] >= 0.5) for b in range(3)]
  assert float(sums["accuracy"]) == sum(correct)


# ---- data files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comparison_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("comparisons")
  train = train_worker.write_comparisons(d / "train.jsonl",
                                         train_worker.synthetic_pairs(64, seed=0, noise=0.1))
  test = train_worker.write_comparisons(d / "test.jsonl", train_worker.synthetic_pairs(16, seed=1))
  return train, test


# ---- learning -------------------------------------------------------------------------------

@pytest.mark.slow
def test_reward_model_learns_a_synthetic_preference(sp_model_path, tmp_path):
  """Chosen replies carry a marker phrase, rejected ones a decoy; 10% of train labels flipped."""
  train = train_worker.write_comparisons(tmp_path / "train.jsonl",
                                         train_worker.synthetic_pairs(400, seed=10, noise=0.1))
  test = train_worker.write_comparisons(tmp_path / "test.jsonl",
                                        train_worker.synthetic_pairs(128, seed=11))
  cfg = train_worker.rm_config(sp_model_path, train, test, max_steps=150, global_batch_size=16,
                               micro_batch_size=16, save_every=0, eval_every=50,
                               **{"optim.lr": 3e-3, "optim.min_lr": 3e-4})
  report = run_rm(cfg, str(tmp_path / "work"), mesh=_mesh1())
  before = report["initial_eval"]["val_accuracy"]
  after = report["test_accuracy"]
  print(f"held-out accuracy {before:.3f} -> {after:.3f}; margin "
        f"{report['initial_eval']['val_margin']:.3f} -> {report['final_eval']['val_margin']:.3f}")
  assert report["data"]["train_pairs"] == 400 and report["data"]["test_pairs"] == 128
  assert 0.3 <= before <= 0.7
  assert after >= 0.9
  with open(tmp_path / "work" / "report.json") as f:
    assert json.load(f)["test_accuracy"] == after


# ---- exact resume ------------------------------------------------------------------------------

RESUME_STEPS = 8


def _resume_config(sp_model_path, files, **overrides):
  return train_worker.rm_config(sp_model_path, *files, save_every=2, keep_checkpoints=2,
                                export_hf=True, **{"optim.schedule": "constant", **overrides})


@pytest.fixture(scope="module")
def rm_run(sp_model_path, comparison_files, tmp_path_factory):
  """An uninterrupted 8-step RM run with HF export (also the model the export tests use)."""
  workdir = tmp_path_factory.mktemp("rm_run")
  report = run_rm(_resume_config(sp_model_path, comparison_files, max_steps=RESUME_STEPS),
                  str(workdir), mesh=_mesh1())
  return workdir, report


def test_rm_stop_at_n_then_resume_to_2n_is_bit_exact(sp_model_path, comparison_files, rm_run,
                                                     tmp_path):
  reference, ref_report = rm_run
  run_rm(_resume_config(sp_model_path, comparison_files, max_steps=RESUME_STEPS // 2),
         str(tmp_path), mesh=_mesh1())
  report = run_rm(_resume_config(sp_model_path, comparison_files, max_steps=RESUME_STEPS),
                  str(tmp_path), mesh=_mesh1())
  assert report["resumed_from"] == RESUME_STEPS // 2
  assert train_worker.train_losses(str(tmp_path)) == train_worker.train_losses(str(reference))
  ours = hf_utils.read_safetensors_dir(tmp_path / "hf")
  ref = hf_utils.read_safetensors_dir(reference / "hf")
  assert sorted(ours) == sorted(ref) and "score.weight" in ours
  for name in ours:
    assert ours[name].tobytes() == ref[name].tobytes(), name
  assert report["test_accuracy"] == ref_report["test_accuracy"]
  assert report["initial_eval"] == ref_report["initial_eval"]


# ---- sharded and multi-process ----------------------------------------------------------------

@pytest.fixture(scope="module")
def rm_single_device_losses(sp_model_path, comparison_files, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rm_single")
  run_rm(train_worker.rm_shard_config(sp_model_path, *comparison_files, micro_batch_size=8),
         str(workdir), mesh=_mesh1())
  return train_worker.train_losses(str(workdir))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_rm_sharded_losses_match_one_device(sp_model_path, comparison_files,
                                            rm_single_device_losses, tmp_path, shape):
  mesh = parallel.create_mesh(shape)
  cfg = train_worker.rm_shard_config(sp_model_path, *comparison_files,
                                     micro_batch_size=8 // parallel.data_parallel_size(mesh))
  run_rm(cfg, str(tmp_path), mesh=mesh)
  np.testing.assert_allclose(train_worker.train_losses(str(tmp_path)), rm_single_device_losses,
                             rtol=0, atol=1e-5)


def test_rm_two_processes_match_one_device(sp_model_path, comparison_files,
                                           rm_single_device_losses, tmp_path,
                                           train_compile_cache):
  train, test = comparison_files
  train_worker.run_two_processes("rm", tmp_path, sp_model_path, train_compile_cache, train_file=train,
                    test_file=test)
  np.testing.assert_allclose(train_worker.train_losses(str(tmp_path)), rm_single_device_losses,
                             rtol=0, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------

def test_odd_number_of_comparison_lines_names_file_and_line(sp_model_path, comparison_files,
                                                            tmp_path):
  lines = open(comparison_files[0]).read().splitlines()[:7]
  path = tmp_path / "odd.jsonl"
  path.write_text("\n".join(lines) + "\n")
  cfg = train_worker.rm_config(sp_model_path, str(path))
  with pytest.raises(DataError, match=f"{re.escape(str(path))}:7: odd number of records"):
    run_rm(cfg, str(tmp_path / "work"), mesh=_mesh1())


@pytest.mark.parametrize("bad, message", [
    ({"txt": "typo"}, ":4: field 'text' missing"),
    ({"text": 5}, ":4: field 'text' must be a string"),
])
def test_missing_text_field_names_file_and_line(sp_model_path, comparison_files, tmp_path, bad,
                                                message):
  lines = open(comparison_files[0]).read().splitlines()[:8]
  lines[3] = json.dumps(bad)
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  cfg = train_worker.rm_config(sp_model_path, str(path))
  with pytest.raises(DataError, match=re.escape(str(path)) + message):
    run_rm(cfg, str(tmp_path / "work"), mesh=_mesh1())


def test_overlong_pairs_are_dropped_and_counted(sp_model_path, comparison_files, tmp_path):
  cfg = train_worker.rm_config(sp_model_path, comparison_files[0], max_seq_len=60, max_steps=1,
                               save_every=0)
  report = run_rm(cfg, str(tmp_path), mesh=_mesh1())
  data = report["data"]
  assert data["train_dropped_overlong"] > 0
  assert data["train_pairs"] + data["train_dropped_overlong"] == 64


# ---- initialisation from the SFT model ----------------------------------------------------------

@pytest.fixture(scope="module")
def sft_model_dirs(tmp_path_factory, tokenizer):
  """An LM-head model saved as our model dir and as HF, with non-trivial weights."""
  from cai_jax.model import MistralConfig
  from configs.models import get_config as model_preset
  config = MistralConfig.from_config(model_preset("tiny"), vocab_size=tokenizer.vocab_size)
  params, _ = init_params(config, _mesh1(), jax.random.PRNGKey(7))
  params = jax.device_get(params)
  d = tmp_path_factory.mktemp("sft_model")
  checkpoint.save_model(str(d / "model"), config, params, head="lm")
  checkpoint.save_hf(str(d / "hf"), config, params, head="lm")
  return params, {"orbax": str(d / "model"), "hf": str(d / "hf")}


@pytest.mark.parametrize("source", ["orbax", "hf"])
def test_rm_from_sft_model_keeps_the_body_and_gets_a_fresh_scalar_head(
    sp_model_path, comparison_files, sft_model_dirs, tmp_path, source):
  sft_params, dirs = sft_model_dirs
  cfg = train_worker.rm_config(sp_model_path, *comparison_files, init_from=dirs[source])
  config, params, _ = common.load_or_init(cfg, _mesh1(), head="scalar", seed=cfg.seed,
                                          allow_head_change=True)
  params = jax.device_get(params)
  assert "lm_head" not in params and params["score"]["kernel"].shape == (config.hidden_size, 1)
  assert np.abs(params["score"]["kernel"]).max() > 0
  body = {k: v for k, v in sft_params.items() if k != "lm_head"}
  ours = {k: v for k, v in params.items() if k != "score"}
  assert jax.tree_util.tree_structure(body) == jax.tree_util.tree_structure(ours)
  for a, b in zip(jax.tree_util.tree_leaves(body), jax.tree_util.tree_leaves(ours)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

  cfg.max_steps = 1
  report = run_rm(cfg, str(tmp_path), mesh=_mesh1())
  assert np.isfinite(report["final_train"]["loss"])


def test_rm_refuses_an_lm_checkpoint_without_head_change(sp_model_path, comparison_files,
                                                         sft_model_dirs):
  cfg = train_worker.rm_config(sp_model_path, *comparison_files,
                               init_from=sft_model_dirs[1]["orbax"])
  with pytest.raises(ValueError, match="holds a 'lm'-head model; this stage needs 'scalar'"):
    common.load_or_init(cfg, _mesh1(), head="scalar")


# ---- export and scoring ----------------------------------------------------------------------------

def _texts(n=6):
  pairs = train_worker.synthetic_pairs(n // 2, seed=5)
  return [t for pair in pairs for t in pair]


def test_hf_export_is_a_sequence_classifier_with_the_same_scores(rm_run, tokenizer):
  workdir, report = rm_run
  import torch
  texts = _texts()
  ours = RewardScorer(str(workdir / "model")).score(texts)
  model = hf_utils.load_torch(workdir / "hf", cls="MistralForSequenceClassification")
  assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_id
  ids = [NEMO.encode(tokenizer, t) for t in texts]
  T = max(map(len, ids))
  tokens = np.full((len(ids), T), tokenizer.pad_id, np.int64)
  mask = np.zeros((len(ids), T), np.int64)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
    mask[i, :len(x)] = 1
  assert len(set(map(len, ids))) > 1   # really right-padded
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask)).logits[:, 0]
  np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4, rtol=0)
  # The HF directory scores the same through our loader too.
  np.testing.assert_allclose(RewardScorer(str(workdir / "hf")).score(texts), ours, atol=1e-5)
  assert np.std(ours) > 0


def test_train_rm_cli_then_scoring_cli(sp_model_path, comparison_files, tmp_path):
  """`launch.train_rm` trains and reports held-out accuracy; `launch.score_rm` scores with it."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  workdir = tmp_path / "rm"
  train, test = comparison_files
  overrides = dict(tokenizer=sp_model_path, train_file=train, test_file=test, max_seq_len=96,
                   global_batch_size=8, micro_batch_size=8, max_steps=2, export_hf=False)
  done = subprocess.run([sys.executable, "-m", "launch.train_rm", "--config=configs/rm.py:tiny",
                         f"--workdir={workdir}"] + [f"--config.{k}={v}"
                                                    for k, v in overrides.items()],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "stage=rm" in done.stdout and "final_eval.val_accuracy=" in done.stdout
  with open(workdir / "report.json") as f:
    report = json.load(f)
  assert report["steps"] == 2 and 0.0 <= report["test_accuracy"] <= 1.0
  assert report["data"]["test_pairs"] == 16

  texts = _texts()
  inp = tmp_path / "texts.jsonl"
  inp.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
  out = tmp_path / "scores.jsonl"
  cmd = [sys.executable, "-m", "launch.score_rm", f"--model={workdir / 'model'}",
         f"--input={inp}", f"--output={out}", "--batch_size=4"]
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"scored {len(texts)} texts" in done.stdout
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in records] == list(range(len(texts)))
  assert [r["text"] for r in records] == texts
  expected = RewardScorer(str(workdir / "model"), batch_size=4).score(texts)
  np.testing.assert_allclose([r["score"] for r in records], expected, atol=1e-5, rtol=0)

  inp.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
  bad = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and not out.read_text() == ""   # the old output is untouched
  assert f"{inp}:2: field 'text' missing" in bad.stderr
