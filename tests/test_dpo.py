"""DPO: the loss against its formula and TRL's, reply masks, the reference pass, learning,
exact resume, bad input, export.

References are independent of the code under test: the loss is checked against a
plain per-pair NumPy loop of the formulas and against TRL's `DPOTrainer` loss (a
test-only dependency) run on a `transformers` model; the reference pass against
each pair's log-probs computed alone with `transformers`; resume against an
uninterrupted run of the same config, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if __name__ == "__main__":   # a two-process test's worker: the repo root first
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_utils
import loopback
import train_worker
from cai_jax import checkpoint, parallel, preflight
from cai_jax.data import DataError
from cai_jax.model import param_shardings
from cai_jax.tokenizer import get_template
from cai_jax.train import dpo
from cai_jax.train.dpo import (REFERENCE_CACHE, build_dpo_rows, dpo_loss, make_dpo_loss,
                               pad_dpo_pairs, reference_logprobs, reply_ids, run_dpo,
                               tokenize_dpo_pairs)

pytestmark = pytest.mark.usefixtures("train_compile_cache")

REPO = train_worker.REPO


def _mesh1():
  return parallel.create_mesh((1, 1, 1), jax.devices()[:1])


def dpo_config(tokenizer_path: str, train_file: str, test_file: str = "", **overrides):
  """The tiny DPO preset for tests: 96-token rows, 8 pairs per step."""
  return train_worker.pair_stage_config("dpo", tokenizer_path, train_file, test_file, **overrides)


def _pairs(n: int, seed: int, p_chosen=None):
  out = [{"chosen": c, "rejected": r, "p_chosen": 1.0}
         for c, r in train_worker.synthetic_pairs(n, seed=seed)]
  for pair, p in zip(out, p_chosen or []):
    pair["p_chosen"] = p
  return out


def _rows(tokenizer, pairs, seq_len=96):
  examples, _ = tokenize_dpo_pairs(pairs, tokenizer, get_template("nemo"), max_seq_len=seq_len,
                                   overlong="truncate", path="<test>")
  return pad_dpo_pairs(examples, seq_len)


# ---- the loss: its formula --------------------------------------------------------------------

def _formula(pc, pr, rc, rr, p, nc, nr, *, beta, loss_type, label_smoothing):
  """The loss of each pair, one at a time, as the module docstring writes it."""
  log_sigmoid = lambda x: -np.log1p(np.exp(-x)) if x > 0 else x - np.log1p(np.exp(x))
  out = []
  for i in range(len(pc)):
    eps = 1.0 - p[i] if p[i] < 1.0 else label_smoothing
    if loss_type == "sigmoid":
      m = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
      out.append(-((1 - eps) * log_sigmoid(m) + eps * log_sigmoid(-m)))
    else:
      h = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
      out.append((1 - eps) * (h - 1 / (2 * beta)) ** 2 + eps * (h + 1 / (2 * beta)) ** 2)
  return np.array(out)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("labels, label_smoothing", [("hard", 0.0), ("soft", 0.0),
                                                     ("hard", 0.2), ("mixed", 0.1)])
def test_dpo_loss_equals_its_formula(loss_type, labels, label_smoothing):
  rng = np.random.default_rng(0)
  n, beta = 24, 0.3
  pc, pr, rc, rr = (rng.normal(-60, 20, n) for _ in range(4))
  pc[:3], rc[:3] = rc[:3] + [80.0, -80.0, 0.0], rc[:3] + [0.0, 0.0, 0.0]   # saturated, tied
  nc, nr = (rng.integers(1, 40, n).astype(np.float64) for _ in range(2))
  p = {"hard": np.ones(n), "soft": rng.uniform(0, 1, n),
       "mixed": np.where(rng.random(n) < 0.5, 1.0, rng.uniform(0.5, 1, n))}[labels]
  loss, margin = dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
                          dpo.pair_epsilon(jnp.asarray(p, jnp.float32), label_smoothing),
                          beta=beta, loss_type=loss_type, chosen_tokens=jnp.asarray(nc),
                          rejected_tokens=jnp.asarray(nr))
  expected = _formula(pc, pr, rc, rr, p, nc, nr, beta=beta, loss_type=loss_type,
                      label_smoothing=label_smoothing)
  assert np.all(np.isfinite(np.asarray(loss)))
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(margin), beta * ((pc - rc) - (pr - rr)), rtol=1e-5,
                             atol=1e-4)


def test_sigmoid_loss_is_minus_log_sigmoid_and_smoothing_moves_its_minimum():
  m = np.linspace(-30, 30, 61)
  loss, margin = dpo_loss(jnp.asarray(m), 0.0, 0.0, 0.0, 0.0, beta=1.0)
  np.testing.assert_allclose(np.asarray(loss), np.logaddexp(0.0, -m), rtol=1e-6)
  # Conservative DPO: d loss / d m = sigmoid(m) - (1 - eps), so the margin is pulled to
  # logit(1 - eps) rather than to infinity.
  eps = 0.1
  grad = jax.grad(lambda x: jnp.sum(dpo_loss(x, 0.0, 0.0, 0.0, eps, beta=1.0)[0]))(
      jnp.asarray(m, jnp.float32))
  np.testing.assert_allclose(np.asarray(grad), 1 / (1 + np.exp(-m)) - (1 - eps), atol=1e-6)


# ---- the loss: TRL's --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_policy_and_reference(tmp_path_factory, tokenizer):
  """Two random HF Mistral models over the test vocab: the policy and the reference."""
  d = tmp_path_factory.mktemp("dpo_hf")
  out = {}
  for name, seed in (("policy", 1), ("reference", 2)):
    model = hf_utils.make_hf_model(seed, vocab_size=tokenizer.vocab_size, sliding_window=24)
    path = hf_utils.save_hf_model(model, d / name)
    config, params = checkpoint.load_hf(path)
    out[name] = (model, config, params)
  return out


def _trl_loss(policy, batch, ref, *, beta, loss_type, label_smoothing=0.0):
  """TRL's `DPOTrainer._compute_loss` on a `transformers` policy, with given reference
  log-probs (TRL's `precompute_ref_log_probs` path); a stub stands in for the trainer's
  state (accelerator, metrics), which the loss itself does not depend on."""
  import collections

  import torch
  from trl.trainer.dpo_trainer import DPOTrainer
  accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                      gather_for_metrics=lambda x: x)
  trainer = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), accelerator=accelerator,
      aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
      f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
      label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0,
      _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
  B, _, T = batch["tokens"].shape
  # TRL's batch is [chosen rows; rejected rows].
  stack = lambda x: torch.as_tensor(np.concatenate([x[:, 0], x[:, 1]]).astype(np.int64))
  attention = (np.arange(T)[None, None] < batch["lengths"][..., None]).astype(np.int64)
  inputs = {"input_ids": stack(batch["tokens"]), "attention_mask": stack(attention),
            "completion_mask": stack(batch["response_mask"]),
            "ref_chosen_logps": torch.as_tensor(ref[:, 0], dtype=torch.float32),
            "ref_rejected_logps": torch.as_tensor(ref[:, 1], dtype=torch.float32)}
  with torch.no_grad():
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  return float(loss), metrics


@pytest.mark.parametrize("loss_type, labels", [("sigmoid", "hard"), ("sigmoid", "soft"),
                                               ("ipo", "hard")])
def test_dpo_loss_equals_trls_on_the_same_logprobs(hf_policy_and_reference, tokenizer,
                                                   loss_type, labels):
  """The whole loss function (one forward of both sides, reply masks, sums, the loss) on
  our Mistral against TRL's loss on transformers' Mistral with the same weights.

  TRL 1.x's `sigmoid` loss has no label smoothing (conservative DPO left it); its `aot`
  loss is exactly the label-smoothed sigmoid on a batch of one pair (AOT sorts the
  log-ratios over the batch, and one value sorts to itself), so soft labels are checked
  pair by pair with TRL's `aot` and `label_smoothing = 1 - p`.
  """
  policy_hf, config, params = hf_policy_and_reference["policy"]
  _, ref_config, ref_params = hf_policy_and_reference["reference"]
  p = [1.0] * 6 if labels == "hard" else [0.9, 0.75, 0.6, 1.0, 0.55, 0.8]
  rows = _rows(tokenizer, _pairs(6, seed=3, p_chosen=p))
  mesh = _mesh1()
  ref = reference_logprobs(ref_config, ref_params, param_shardings(ref_config, mesh, "lm"), rows,
                           mesh=mesh, batch_size=6)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["ref_chosen"], batch["ref_rejected"] = ref[:, 0], ref[:, 1]
  beta = 0.1
  num, den, sums = jax.jit(make_dpo_loss(config, beta=beta, loss_type=loss_type))(
      params, batch, None)
  ours = float(num) / float(den)
  if labels == "hard":
    theirs, metrics = _trl_loss(policy_hf, batch, ref, beta=beta, loss_type=loss_type)
    np.testing.assert_allclose(float(sums["margin"]) / 6, metrics["rewards/margins"], rtol=1e-4)
    np.testing.assert_allclose(float(sums["reward_chosen"]) / 6, metrics["rewards/chosen"],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(sums["accuracy"]) / 6, metrics["rewards/accuracies"])
  else:
    per_pair = [_trl_loss(policy_hf, {k: v[i:i + 1] for k, v in batch.items()}, ref[i:i + 1],
                          beta=beta, loss_type="aot", label_smoothing=1.0 - p[i])[0]
                for i in range(6)]
    theirs = float(np.mean(per_pair))
  print(f"{loss_type}/{labels}: ours {ours:.6f} TRL {theirs:.6f}")
  assert float(den) == 6 and np.isfinite(ours)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4)


# ---- reply masks -------------------------------------------------------------------------------

@pytest.mark.parametrize("template_name", ["nemo", "mistral_inst"])
def test_the_reply_mask_is_the_sft_mask_of_the_last_reply(tokenizer, template_name):
  template = get_template(template_name)
  turns = [{"from": "User", "value": "How do I bake bread?"},
           {"from": "Assistant", "value": "Mix flour and water."},
           {"from": "User", "value": "And then?"},
           {"from": "Assistant", "value": "Bake it for an hour."}]
  for conversation in (turns[:2], turns):
    text = template.render_text(conversation)
    ids, mask, prompt_len = reply_ids(tokenizer, template, text)
    sft_ids, sft_mask = template.render_ids(tokenizer, conversation)
    assert ids == sft_ids == template.encode(tokenizer, text)
    # The SFT mask's last run of ones (the last reply and its end of turn) is the reply.
    last = max(i for i, m in enumerate(sft_mask) if m)
    first = last
    while first > 0 and sft_mask[first - 1]:
      first -= 1
    assert mask == [int(i >= first) for i in range(len(ids))] and prompt_len == first
    assert tokenizer.decode(ids[first:]).startswith(conversation[-1]["value"][:4])


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comparison_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("dpo_comparisons")
  train = train_worker.write_comparisons(d / "train.jsonl",
                                         train_worker.synthetic_pairs(64, seed=0, noise=0.1))
  test = train_worker.write_comparisons(d / "test.jsonl", train_worker.synthetic_pairs(16, seed=1))
  return train, test


def _bad_file(tmp_path, comparison_files, n_lines, edit=None):
  lines = open(comparison_files[0]).read().splitlines()[:n_lines]
  if edit:
    edit(lines)
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_odd_number_of_comparison_lines_names_file_and_line(sp_model_path, comparison_files,
                                                            tmp_path):
  path = _bad_file(tmp_path, comparison_files, 7)
  with pytest.raises(DataError, match=f"{re.escape(path)}:7: odd number of records"):
    run_dpo(dpo_config(sp_model_path, path), str(tmp_path / "work"), mesh=_mesh1())


@pytest.mark.parametrize("bad, message", [
    ({"txt": "typo"}, ":4: field 'text' missing"),
    ({"text": 5}, ":4: field 'text' must be a string"),
    ({"text": "no header here"}, ":4: field 'text': no '<extra_id_1>Assistant\\\\n' in the text"),
])
def test_a_bad_text_field_names_file_and_line(sp_model_path, comparison_files, tmp_path, bad,
                                              message):
  def edit(lines):
    lines[3] = json.dumps(bad)
  path = _bad_file(tmp_path, comparison_files, 8, edit)
  with pytest.raises(DataError, match=re.escape(path) + message):
    run_dpo(dpo_config(sp_model_path, path), str(tmp_path / "work"), mesh=_mesh1())


def test_a_pair_with_two_prompts_names_file_and_line(sp_model_path, comparison_files, tmp_path):
  def edit(lines):
    lines[5] = json.dumps({"text": train_worker.chat_text("Another prompt?", "A reply.")})
  path = _bad_file(tmp_path, comparison_files, 8, edit)
  with pytest.raises(DataError, match=re.escape(path) + r":6: the rejected text's prompt "
                     r"differs from the chosen text's \(line 5\)"):
    run_dpo(dpo_config(sp_model_path, path), str(tmp_path / "work"), mesh=_mesh1())


def test_overlong_pairs_are_truncated_or_dropped_and_counted(tokenizer, comparison_files):
  template = get_template("nemo")
  rows, stats = build_dpo_rows(comparison_files[0], tokenizer, template, 40, "drop", "train")
  assert stats["train_dropped_overlong"] > 0
  assert stats["train_pairs"] + stats["train_dropped_overlong"] == 64 == len(rows) + \
      stats["train_dropped_overlong"]
  rows, stats = build_dpo_rows(comparison_files[0], tokenizer, template, 40, "truncate", "train")
  assert stats["train_truncated"] > 0 and stats["train_dropped_overlong"] == 0
  kept = stats["train_pairs"] + stats["train_dropped_no_reply_left"] + \
      stats["train_dropped_identical_after_truncation"]
  assert kept == 64
  for row in rows:
    assert row["tokens"].shape == (2, 40) and np.all(row["response_mask"].sum(1) > 0)
    assert np.all(row["lengths"] <= 40)


def test_preflight_names_the_dpo_fields(sp_model_path, tmp_path):
  cfg = dpo_config(sp_model_path, str(tmp_path / "none.jsonl"),
                   **{"dpo.beta": 0.0, "dpo.loss_type": "hinge", "dpo.label_smoothing": 0.7,
                      "num_epochs": 0, "max_steps": 0})
  problems = preflight.stage_problems("dpo", cfg)
  joined = "\n".join(problems)
  assert "config.dpo.beta=0.0: must be > 0.0" in joined
  assert "config.dpo.loss_type='hinge': must be one of 'sigmoid', 'ipo'" in joined
  assert "config.dpo.label_smoothing=0.7: must be in [0.0, 0.5]" in joined
  assert "nothing would be trained" in joined
  assert f"config.train_file={str(tmp_path / 'none.jsonl')!r}: no such file" in joined
  from configs.dpo import get_config
  for preset in ("tiny", "mistral_7b"):
    assert preflight.value_problems("dpo", get_config(preset)) == []


def test_train_dpo_cli_fails_before_work_on_a_bad_config(sp_model_path, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  done = subprocess.run([sys.executable, "-m", "launch.train_dpo", "--config=configs/dpo.py:tiny",
                         f"--workdir={tmp_path / 'dpo'}", f"--config.tokenizer={sp_model_path}",
                         "--config.train_file=nope.jsonl", "--config.dpo.loss_type=hinge"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert "config.train_file='nope.jsonl': no such file" in done.stderr, done.stderr[-2000:]
  assert "config.dpo.loss_type='hinge'" in done.stderr and "Traceback" not in done.stderr
  written = os.listdir(tmp_path / "dpo") if (tmp_path / "dpo").exists() else []
  assert set(written) <= {"run.log"}   # the log of the refusal, nothing of a run


# ---- the reference pass ------------------------------------------------------------------------

def _torch_reply_logprobs(model, rows) -> np.ndarray:
  """Each side's summed reply log-prob, one sequence at a time, unpadded, in float64."""
  import torch
  out = np.zeros((len(rows), 2))
  for i, row in enumerate(rows):
    for s in range(2):
      n = int(row["lengths"][s])
      ids = torch.as_tensor(row["tokens"][s, :n], dtype=torch.long)[None]
      with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
      out[i, s] = sum(float(logp[t - 1, row["tokens"][s, t]]) for t in range(1, n)
                      if row["response_mask"][s, t])
  return out


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_reference_logprobs_equal_each_sequence_alone(hf_policy_and_reference, tokenizer, shape):
  """Padded batches (the last one filled with empty pairs), on one device and on a mesh."""
  model, config, params = hf_policy_and_reference["reference"]
  rows = _rows(tokenizer, _pairs(5, seed=4), seq_len=80)
  mesh = _mesh1() if shape == (1, 1, 1) else parallel.create_mesh(shape)
  sh = param_shardings(config, mesh, "lm")
  params = jax.device_put(params, sh)
  got = reference_logprobs(config, params, sh, rows, mesh=mesh, batch_size=4)
  assert got.shape == (5, 2) and got.dtype == np.float32
  np.testing.assert_allclose(got, _torch_reply_logprobs(model, rows), rtol=2e-5, atol=2e-3)


# ---- learning ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["sigmoid", pytest.param("ipo", marks=pytest.mark.slow)])
def test_dpo_learns_a_synthetic_preference(sp_model_path, tmp_path, loss_type):
  """Chosen replies carry a marker phrase, rejected ones a same-length decoy; 10% of the
  train labels are flipped. Held-out accuracy starts at chance (the policy is the
  reference: every margin is 0) and must rise well above it."""
  train = train_worker.write_comparisons(tmp_path / "train.jsonl",
                                         train_worker.synthetic_pairs(256, seed=10, noise=0.1))
  test = train_worker.write_comparisons(tmp_path / "test.jsonl",
                                        train_worker.synthetic_pairs(128, seed=11))
  cfg = dpo_config(sp_model_path, train, test, max_steps=40, global_batch_size=16,
                   micro_batch_size=16, save_every=0, eval_every=20,
                   **{"dpo.loss_type": loss_type})
  report = run_dpo(cfg, str(tmp_path / "work"), mesh=_mesh1())
  before, after = report["initial_eval"], report["final_eval"]
  print(f"{loss_type}: held-out accuracy {before['val_accuracy']:.3f} -> "
        f"{after['val_accuracy']:.3f}; margin {before['val_margin']:.3f} -> "
        f"{after['val_margin']:.3f}; loss {before['val_loss']:.3f} -> {after['val_loss']:.3f}")
  assert report["data"]["train_pairs"] == 256 and report["data"]["test_pairs"] == 128
  assert before["val_accuracy"] == 0.5 and before["val_margin"] == 0.0
  assert after["val_accuracy"] >= 0.9 and after["val_margin"] > 0
  assert after["val_reward_chosen"] > after["val_reward_rejected"]
  assert after["val_loss"] < before["val_loss"]
  with open(tmp_path / "work" / "report.json") as f:
    assert json.load(f)["test_accuracy"] == report["test_accuracy"] == after["val_accuracy"]


# ---- exact resume and export -------------------------------------------------------------------

RESUME_STEPS = 8


def _resume_config(sp_model_path, files, **overrides):
  # Constant lr: the cosine horizon is max_steps, so a run configured for N steps and
  # then extended to 2N has another schedule by design.
  return dpo_config(sp_model_path, *files, save_every=2, keep_checkpoints=2, export_hf=True,
                    **{"optim.schedule": "constant", **overrides})


@pytest.fixture(scope="module")
def dpo_run(sp_model_path, comparison_files, tmp_path_factory):
  """An uninterrupted 8-step run with HF export (also the model the export test reads)."""
  workdir = tmp_path_factory.mktemp("dpo_run")
  report = run_dpo(_resume_config(sp_model_path, comparison_files, max_steps=RESUME_STEPS),
                   str(workdir), mesh=_mesh1())
  return workdir, report


def _assert_same_tensors(a_dir, b_dir):
  a, b = hf_utils.read_safetensors_dir(a_dir), hf_utils.read_safetensors_dir(b_dir)
  assert sorted(a) == sorted(b) and "lm_head.weight" in a
  for name in a:
    assert a[name].tobytes() == b[name].tobytes(), name


def test_stop_at_n_then_resume_to_2n_is_bit_exact(sp_model_path, comparison_files, dpo_run,
                                                  tmp_path, monkeypatch):
  reference, ref_report = dpo_run
  half = run_dpo(_resume_config(sp_model_path, comparison_files, max_steps=RESUME_STEPS // 2),
                 str(tmp_path), mesh=_mesh1())
  assert half["resumed_from"] == 0 and (tmp_path / REFERENCE_CACHE).exists()

  def no_second_reference_pass(*args, **kwargs):
    raise AssertionError("the reference log-probs were recomputed instead of read back")

  monkeypatch.setattr(dpo, "reference_logprobs", no_second_reference_pass)
  report = run_dpo(_resume_config(sp_model_path, comparison_files, max_steps=RESUME_STEPS),
                   str(tmp_path), mesh=_mesh1())
  assert report["resumed_from"] == RESUME_STEPS // 2
  assert train_worker.train_losses(str(tmp_path)) == train_worker.train_losses(str(reference))
  _assert_same_tensors(tmp_path / "hf", reference / "hf")
  assert report["initial_eval"] == ref_report["initial_eval"] == half["initial_eval"]
  assert report["test_accuracy"] == ref_report["test_accuracy"]


def test_a_cache_of_another_run_is_not_used(sp_model_path, comparison_files, dpo_run, tmp_path):
  """A workdir whose reference cache another config wrote (here: another beta, values
  tampered with) recomputes the reference log-probs instead of reading them."""
  reference, _ = dpo_run
  workdir = tmp_path / "work"
  os.makedirs(workdir)
  with np.load(reference / REFERENCE_CACHE) as f:
    other = {k: f[k] for k in f.files}
  np.savez(workdir / REFERENCE_CACHE, **{**other, "train_ref": other["train_ref"] - 100.0})
  cfg = _resume_config(sp_model_path, comparison_files, max_steps=1, **{"dpo.beta": 0.2})
  report = run_dpo(cfg, str(workdir), mesh=_mesh1())
  with np.load(workdir / REFERENCE_CACHE) as f:
    assert str(f["key"]) != str(other["key"])
    np.testing.assert_array_equal(f["train_ref"], other["train_ref"])
    np.testing.assert_array_equal(f["test_ref"], other["test_ref"])
  assert report["initial_eval"]["val_margin"] == 0.0


def test_export_loads_and_reproduces_the_reported_test_accuracy(sp_model_path, comparison_files,
                                                                dpo_run, tokenizer):
  """model/ (orbax) and hf/ hold the same trained weights; scoring the test pairs with them
  against the cached reference gives the accuracy the report states."""
  workdir, report = dpo_run
  config, params, head = checkpoint.load_model(str(workdir / "model"))
  hf_config, hf_params = checkpoint.load_hf(str(workdir / "hf"))
  assert head == "lm" and hf_config.vocab_size == config.vocab_size == 512
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(hf_params)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert os.path.isfile(workdir / "model" / "tokenizer.model")
  rows, _ = build_dpo_rows(comparison_files[1], tokenizer, get_template("nemo"), 96, "truncate",
                           "test")
  mesh = _mesh1()
  logp = reference_logprobs(config, params, param_shardings(config, mesh, "lm"), rows, mesh=mesh,
                            batch_size=8)
  with np.load(workdir / REFERENCE_CACHE) as f:
    ref = f["test_ref"]
  margin = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
  assert np.all(margin != 0)
  np.testing.assert_allclose(float(np.mean(margin > 0)), report["test_accuracy"], atol=1e-6)
  with open(workdir / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["stage"] == "dpo" and manifest["counts"]["steps"] == RESUME_STEPS


# ---- sharded and multi-process ---------------------------------------------------------------

SHARD_STEPS = 3


def _shard_config(sp_model_path, files, micro_batch_size, steps=SHARD_STEPS):
  return dpo_config(sp_model_path, *files, max_steps=steps, save_every=0,
                    micro_batch_size=micro_batch_size)


@pytest.fixture(scope="module")
def single_device_run(sp_model_path, comparison_files, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dpo_single")
  report = run_dpo(_shard_config(sp_model_path, comparison_files, 8), str(workdir), mesh=_mesh1())
  with np.load(workdir / REFERENCE_CACHE) as f:
    ref = {k: f[k] for k in ("train_ref", "test_ref")}
  return train_worker.train_losses(str(workdir)), report, ref


def _assert_matches_single_device(workdir, single_device_run):
  losses, _, ref = single_device_run
  np.testing.assert_allclose(train_worker.train_losses(str(workdir)), losses, rtol=0, atol=1e-5)
  with np.load(os.path.join(workdir, REFERENCE_CACHE)) as f:
    for k, v in ref.items():
      np.testing.assert_allclose(f[k], v, rtol=1e-6, atol=1e-4)


def test_dpo_on_a_mesh_matches_one_device(sp_model_path, comparison_files, single_device_run,
                                          tmp_path):
  mesh = parallel.create_mesh((2, 2, 2))
  cfg = _shard_config(sp_model_path, comparison_files, 8 // parallel.data_parallel_size(mesh))
  report = run_dpo(cfg, str(tmp_path), mesh=mesh)
  _assert_matches_single_device(tmp_path, single_device_run)
  np.testing.assert_allclose(report["test_accuracy"], single_device_run[1]["test_accuracy"])


@pytest.mark.slow
def test_two_processes_match_one_device_and_share_the_cache(sp_model_path, comparison_files,
                                                            single_device_run, tmp_path,
                                                            train_compile_cache):
  """Two `jax.distributed` processes (this file is the worker): the reference pass and the
  first steps, then a resumed run whose processes all read the cached reference values."""
  args = [f"--workdir={tmp_path}", f"--tokenizer={sp_model_path}",
          f"--train_file={comparison_files[0]}", f"--test_file={comparison_files[1]}"]
  env = {"JAX_COMPILATION_CACHE_DIR": train_compile_cache,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  loopback.run_workers(os.path.abspath(__file__), args + ["--max_steps=2"], env=env)
  outs = loopback.run_workers(os.path.abspath(__file__), args + [f"--max_steps={SHARD_STEPS}"],
                              env=env)
  for out in outs:
    report = json.loads(out.split("REPORT ", 1)[1])
    assert report["resumed_from"] == 2 and report["used_cache"]
  _assert_matches_single_device(tmp_path, single_device_run)


def _worker(argv=None):
  """One process of `test_two_processes_match_one_device_and_share_the_cache`."""
  import argparse
  parser = argparse.ArgumentParser()
  loopback.add_cluster_args(parser)
  for name in ("workdir", "tokenizer", "train_file", "test_file"):
    parser.add_argument(f"--{name}", required=True)
  parser.add_argument("--max_steps", type=int, required=True)
  args = parser.parse_args(argv)
  jax_module = loopback.join(args)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  computed = []
  original = dpo.reference_logprobs
  dpo.reference_logprobs = lambda *a, **k: computed.append(1) or original(*a, **k)
  mesh = parallel.create_mesh(train_worker.MESH_SHAPE)
  cfg = _shard_config(args.tokenizer, (args.train_file, args.test_file), micro_batch_size=2,
                      steps=args.max_steps)
  report = run_dpo(cfg, args.workdir, mesh=mesh)
  print("REPORT " + json.dumps({"resumed_from": report["resumed_from"],
                                "used_cache": not computed}), flush=True)
  jax_module.distributed.shutdown()


# ---- a killed CLI run --------------------------------------------------------------------------

KILL_STEPS = 120


def _cli_args(sp_model_path, files, workdir):
  overrides = dict(tokenizer=sp_model_path, train_file=files[0], test_file=files[1],
                   max_seq_len=96, global_batch_size=8, micro_batch_size=8, max_steps=KILL_STEPS,
                   log_every=1, eval_every=0, save_every=5, keep_checkpoints=2, export_hf=True)
  return ([sys.executable, "-m", "launch.train_dpo", "--config=configs/dpo.py:tiny",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_exact(sp_model_path, comparison_files, tmp_path,
                                                  train_compile_cache):
  """A real `kill -9` of `python -m launch.train_dpo`, then the same command again; the
  reference is the same command run uninterrupted in the same (one-device) environment."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": train_compile_cache,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  reference = tmp_path / "reference"
  done = subprocess.run(_cli_args(sp_model_path, comparison_files, reference), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "stage=dpo" in done.stdout and "final_eval.val_accuracy=" in done.stdout

  workdir = tmp_path / "killed"
  args = _cli_args(sp_model_path, comparison_files, workdir)
  returncode = train_worker.run_until_checkpoint_then_kill(
      args, cwd=REPO, env=env, workdir=workdir, min_step=10, log_path=tmp_path / "killed.log")
  assert returncode == -signal.SIGKILL
  assert not (workdir / "report.json").exists()   # it really died mid-run
  assert 10 <= train_worker.read_metrics(str(workdir))[-1]["step"] < KILL_STEPS

  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  with open(workdir / "report.json") as f:
    assert json.load(f)["resumed_from"] >= 10
  assert train_worker.train_losses(str(workdir)) == train_worker.train_losses(str(reference))
  _assert_same_tensors(workdir / "hf", reference / "hf")


if __name__ == "__main__":
  _worker()


def test_the_vocab_head_on_reply_positions_only_gives_the_same_log_probs_and_gradients():
  """`width` (the widest reply) sends only each row's reply positions through the vocab head:
  the summed log-probs, the counts and the gradient equal the head over every position."""
  from cai_jax.model import MistralConfig, init_params
  from cai_jax.train.dpo import pair_logprobs, reply_width
  config = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, sliding_window=None, max_position_embeddings=64)
  mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
  params, _ = init_params(config, mesh, jax.random.PRNGKey(3))
  rng = np.random.default_rng(0)
  B, T = 3, 24
  lengths = np.array([[24, 17], [9, 20], [0, 0]], np.int32)     # the last pair is padding
  starts = np.array([[10, 6], [5, 12], [0, 0]])
  tokens = rng.integers(1, 97, (B, 2, T)).astype(np.int32)
  mask = np.zeros((B, 2, T), np.int32)
  for b in range(B):
    for s in range(2):
      tokens[b, s, lengths[b, s]:] = 0
      mask[b, s, starts[b, s]:lengths[b, s]] = 1
  rows = [{"response_mask": mask[b]} for b in range(B)]
  width = reply_width(rows)
  assert width == 14 < T
  batch = {"tokens": jnp.asarray(tokens), "response_mask": jnp.asarray(mask),
           "lengths": jnp.asarray(lengths)}
  full = jax.jit(lambda p: pair_logprobs(config, p, batch))(params)
  narrow = jax.jit(lambda p: pair_logprobs(config, p, batch, width))(params)
  np.testing.assert_allclose(narrow[0], full[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(narrow[1], full[1])
  np.testing.assert_array_equal(np.asarray(full[1]), mask.sum(-1))
  grad = lambda w: jax.grad(lambda p: pair_logprobs(config, p, batch, w)[0].sum())(params)
  for g_full, g_narrow in zip(jax.tree_util.tree_leaves(grad(0)),
                              jax.tree_util.tree_leaves(grad(width))):
    np.testing.assert_allclose(g_narrow, g_full, rtol=1e-4, atol=1e-6)
