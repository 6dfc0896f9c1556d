"""The shared training loop: exact accumulation, masked batches, NaN guard, checkpoints.

What every stage (SFT, reward model, PPO) relies on, tested on the parts
directly: `make_train_step` with 4 micro-batches must give the update of one
batch (the loss is a ratio of sums, so only summed numerators and
denominators make that exact); a batch with nothing to learn must be a
no-op, not a NaN; a diverging run must stop before it saves; a corrupt
checkpoint must cost one checkpoint, not the run.
"""

from __future__ import annotations

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_worker
from cai_jax import parallel
from cai_jax.model import MistralConfig, init_params, param_shardings
from cai_jax.train import common, optim
from cai_jax.train.checkpointing import Checkpointer, CheckpointRestoreError
from cai_jax.train.lm import make_lm_loss, vocab_logprobs
from cai_jax.train.loop import TrainingDivergedError, check_workdir_writable, truncate_metrics
from cai_jax.train.state import (accumulate_gradients, create_state, make_eval_step,
                                 make_train_step)

pytestmark = pytest.mark.usefixtures("train_compile_cache")

CFG = MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
                    max_position_embeddings=64)
B, T = 8, 16


def _mesh1():
  return parallel.create_mesh((1, 1, 1), jax.devices()[:1])


def _batch(seed: int = 0) -> dict:
  """8 rows in the SFT row format, packed and padded, with very unequal target counts.

  Row i holds i + 1 targets (so each micro-batch of an interleaved split has a
  different token count, and a mean of micro-batch means would be wrong);
  row 5 packs two segments; row 7 ends in padding.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  seg[5, 9:] = 2
  pos[5, 9:] = np.arange(T - 9)
  seg[7, 10:] = 0
  pos[7, 10:] = 0
  mask = np.zeros((B, T), np.int32)
  for i in range(B):
    allowed = [t for t in range(1, T) if seg[i, t] > 0 and seg[i, t] == seg[i, t - 1]]
    for t in rng.permutation(allowed)[:i + 1]:
      mask[i, t] = 1
  return {"tokens": tokens, "loss_mask": mask, "segment_ids": seg, "positions": pos}


@pytest.fixture(scope="module")
def host_params():
  params, _ = init_params(CFG, _mesh1(), jax.random.PRNGKey(0))
  return jax.device_get(params)


def _one_step(host_params, optimizer, schedule, accum: int, batch: dict, steps: int = 1):
  mesh = _mesh1()
  shardings = param_shardings(CFG, mesh)
  params = jax.device_put(host_params, shardings)
  state, state_sh = create_state(params, optimizer, shardings, mesh, seed=0)
  batch_sh = common.batch_shardings_for(mesh, batch)
  step = make_train_step(make_lm_loss(CFG), optimizer, schedule, accum_steps=accum,
                         shardings=state_sh, batch_shardings=batch_sh, mesh=mesh)
  metrics = []
  for _ in range(steps):
    state, m = step(state, common.make_put_batch(mesh)(batch))
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ---- compiler options ------------------------------------------------------------------

def test_gradient_program_options_change_speed_not_gradients(host_params):
  from cai_jax.compile_options import gradient_program_options
  opts = gradient_program_options()
  assert opts and all(k.startswith("xla_cpu_") for k in opts)   # the tests run on CPU
  loss = make_lm_loss(CFG)
  grad = jax.grad(lambda p, b: loss(p, b, None)[0])
  batch = _batch(3)
  tuned = jax.jit(grad, compiler_options=opts)(host_params, batch)
  plain = jax.jit(grad)(host_params, batch)
  assert _max_abs_diff(tuned, plain) <= 1e-5


@pytest.mark.parametrize("dtype, tol, temperature, with_entropy", [
    (jnp.float32, 1e-5, 1.0, False), (jnp.float32, 1e-5, 0.7, True),
    (jnp.bfloat16, 2e-2, 1.0, False), (jnp.bfloat16, 2e-2, 1.3, True)])
def test_vocab_logprobs_matches_autodiff_of_log_softmax(dtype, tol, temperature, with_entropy):
  """The hand-written gradient of the fused vocab head + log-softmax against autodiff of
  optax's cross-entropy (and of the entropy) on the logits. Random weights give each
  position its own upstream gradient (and weight 0 a position that must get none)."""
  k = jax.random.split(jax.random.PRNGKey(4), 5)
  hidden = jax.random.normal(k[0], (3, 5, 16)).astype(dtype)
  kernel = (jax.random.normal(k[1], (16, 37)) * 0.5).astype(dtype)
  logits = jnp.einsum("btd,dv->btv", hidden, kernel).astype(jnp.float32)
  # Row 1 predicts its highest logit, the others random tokens: both outcomes of `is_top`.
  targets = jax.random.randint(k[2], (3, 5), 0, 37).at[1].set(jnp.argmax(logits[1], -1))
  w_logp = jax.random.normal(k[3], (3, 5)).at[0, 0].set(0.0)
  w_ent = jax.random.normal(k[4], (3, 5)) if with_entropy else jnp.zeros((3, 5))

  def reference(h, w):
    z = jnp.einsum("btd,dv->btv", h, w).astype(jnp.float32) / temperature
    logp = -optax.softmax_cross_entropy_with_integer_labels(z, targets)
    entropy = -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), axis=-1)
    return jnp.sum(logp * w_logp) + jnp.sum(entropy * w_ent)

  def fused(h, w):
    out = vocab_logprobs(h, w, targets, temperature, with_entropy)
    assert (out.entropy is None) == (not with_entropy)
    return jnp.sum(out.logp * w_logp) + (jnp.sum(out.entropy * w_ent) if with_entropy else 0.0)

  ref_val, ref_grads = jax.jit(jax.value_and_grad(reference, (0, 1)))(hidden, kernel)
  val, grads = jax.jit(jax.value_and_grad(fused, (0, 1)))(hidden, kernel)
  np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    assert g.dtype == r.dtype == dtype
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.abs(g - r).max() <= tol * np.abs(r).max()
  is_top = vocab_logprobs(hidden, kernel, targets, temperature).is_top
  expected = np.asarray(jnp.argmax(logits, -1) == targets, np.float32)
  assert 0 < expected.sum() < expected.size
  np.testing.assert_array_equal(np.asarray(is_top), expected)


# ---- gradient accumulation ------------------------------------------------------------

def test_microbatches_have_unequal_token_counts():
  """Guards the accumulation test: with equal counts a mean of means would also pass."""
  mask = _batch()["loss_mask"][:, 1:]
  counts = [int(mask[i::4].sum()) for i in range(4)]  # micro-batch i = rows i, i+4
  assert len(set(counts)) == 4, counts


def test_accumulation_matches_one_big_batch_sgd(host_params):
  """4 micro-batches of 2 == one batch of 8: plain SGD shows any gradient difference as is."""
  sgd = optax.sgd(1.0)
  schedule = optax.constant_schedule(1.0)
  full, (m_full,) = _one_step(host_params, sgd, schedule, 1, _batch())
  accum, (m_acc,) = _one_step(host_params, sgd, schedule, 4, _batch())
  assert _max_abs_diff(full, host_params) > 1e-3   # the step really moved the params
  assert _max_abs_diff(accum, full) <= 1e-6
  assert m_acc["denominator"] == m_full["denominator"] == _batch()["loss_mask"][:, 1:].sum()
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)


def test_accumulation_matches_one_big_batch_adamw(host_params):
  """The same with the stages' optimizer (AdamW, clipping, decay mask), over 2 steps.

  Compared at 1e-5, not 1e-6: Adam's update is g / (|g| + eps) per entry, so a
  float-rounding difference in an entry with |g| ~ eps = 1e-8 becomes a
  learning-rate-sized difference (the SGD test above pins the gradient itself).
  """
  cfg = train_worker.sft_config("unused").optim
  cfg.warmup_steps = 0
  cfg.grad_clip = 0.05   # small enough to clip, so the clipping sees the accumulated norm
  opt, schedule = optim.make_optimizer(cfg, total_steps=10)
  full, m_full = _one_step(host_params, opt, schedule, 1, _batch(), steps=2)
  accum, m_acc = _one_step(host_params, opt, schedule, 4, _batch(), steps=2)
  assert m_full[0]["grad_norm"] > cfg.grad_clip   # clipping really happened
  assert _max_abs_diff(full, host_params) > 1e-3
  assert _max_abs_diff(accum, full) <= 1e-5
  np.testing.assert_allclose([m["loss"] for m in m_acc], [m["loss"] for m in m_full], rtol=1e-6)


def test_accumulation_steps_follow_nemo_semantics():
  """micro_batch_size is per data-parallel replica: global = micro x dp x accumulation."""
  assert common.accumulation_steps(8, 2, _mesh1()) == 4
  mesh = parallel.create_mesh((2, 2, 2))
  assert common.accumulation_steps(8, 2, mesh) == 1
  assert common.accumulation_steps(16, 1, mesh) == 4
  with pytest.raises(ValueError, match="not a multiple"):
    common.accumulation_steps(8, 3, mesh)


# ---- batches with nothing to learn -------------------------------------------------------

def test_all_masked_batch_has_zero_loss_and_zero_grads(host_params):
  batch = _batch()
  batch["loss_mask"][:] = 0
  batch["segment_ids"][6] = 0  # and one row that is all padding
  num, den, metrics, grads = jax.jit(lambda p, b: accumulate_gradients(
      make_lm_loss(CFG), p, b, jax.random.PRNGKey(0), 1))(host_params, batch)
  assert float(num) == 0.0 and float(den) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads))

  sgd = optax.sgd(1.0)
  params, (m,) = _one_step(host_params, sgd, optax.constant_schedule(1.0), 2, batch)
  assert m["loss"] == 0.0 and m["grad_norm"] == 0.0 and m["accuracy"] == 0.0
  assert _max_abs_diff(params, host_params) == 0.0   # nothing to learn: nothing moves
  assert np.isfinite(m["param_norm"])

  mesh = _mesh1()
  shardings = param_shardings(CFG, mesh)
  eval_step = make_eval_step(make_lm_loss(CFG), param_shardings=shardings,
                             batch_shardings=common.batch_shardings_for(mesh, batch), mesh=mesh)
  e_num, e_den, _ = jax.device_get(eval_step(jax.device_put(host_params, shardings), batch))
  assert float(e_num) == 0.0 and float(e_den) == 0.0


# ---- NaN / Inf guard (through the SFT stage, the loop's simplest user) ---------------------

def _ls(path):
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_infinite_learning_rate_stops_at_step_one_and_saves_nothing(sp_model_path, tmp_path):
  from cai_jax.preflight import PreflightError
  from cai_jax.train.sft import run_sft
  cfg = train_worker.sft_config(sp_model_path, max_steps=4, **{"optim.lr": float("inf")})
  with pytest.raises(PreflightError, match=r"config.optim.lr=inf: must be a finite number"):
    run_sft(cfg, str(tmp_path), mesh=_mesh1())      # refused before any work
  assert _ls(tmp_path) == []
  # A finite rate so large that the updated params overflow float32 stops at run time.
  cfg = train_worker.sft_config(sp_model_path, max_steps=4,
                                **{"optim.lr": 1e30, "optim.warmup_steps": 0})
  with pytest.raises(TrainingDivergedError) as err:
    run_sft(cfg, str(tmp_path), mesh=_mesh1())
  msg = str(err.value)
  assert "step 1:" in msg and "param_norm" in msg, msg
  assert "last good checkpoint is none" in msg, msg
  assert [s for s in _ls(tmp_path / "checkpoints") if s.isdigit()] == []
  assert not (tmp_path / "model").exists() and not (tmp_path / "report.json").exists()


def test_divergence_at_a_save_step_keeps_the_last_good_checkpoint(sp_model_path, tmp_path,
                                                                   monkeypatch):
  """The update of step 4 (a save step) blows up while its loss and gradient are still finite.

  A guard that looked only at the loss would checkpoint the NaN params of step
  4; the run must instead stop naming step 4 and checkpoint 2, and leave
  nothing newer than step 2 behind.
  """
  from cai_jax.train import sft, supervised

  def exploding_optimizer(optim_cfg, total_steps):
    opt, schedule = optim.make_optimizer(optim_cfg, total_steps)
    return optax.chain(opt, optax.scale_by_schedule(
        lambda count: jnp.where(count >= 3, jnp.inf, 1.0))), schedule

  monkeypatch.setattr(supervised, "make_optimizer", exploding_optimizer)
  cfg = train_worker.sft_config(sp_model_path, max_steps=6, save_every=2)
  with pytest.raises(TrainingDivergedError) as err:
    sft.run_sft(cfg, str(tmp_path), mesh=_mesh1())
  msg = str(err.value)
  assert "step 4:" in msg and "last good checkpoint is step 2" in msg, msg
  assert [s for s in _ls(tmp_path / "checkpoints") if s.isdigit()] == ["2"]
  assert [r["step"] for r in train_worker.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert not (tmp_path / "model").exists()


# ---- checkpoints ------------------------------------------------------------------------

def _tiny_state(value: float):
  return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)


def test_checkpointer_keeps_the_last_k_and_the_best(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, best_metric="val_loss")
  val_losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0}
  for step, loss in val_losses.items():
    ckpt.save(step, _tiny_state(step), {"step": step}, {"val_loss": loss})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 5, 6]   # best (2) + last two
  state, data, step = ckpt.restore(_abstract(_tiny_state(0)))
  assert step == 6 and data == {"step": 6} and float(state["w"][0, 0]) == 6.0
  ckpt.close()


def _corrupt(step_dir) -> int:
  """Overwrites every array data file of a checkpoint step with garbage."""
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if os.sep + "d" in root or name.endswith(".ocdbt"):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"not a checkpoint")
        n += 1
  assert n, f"nothing to corrupt under {step_dir}"
  return n


def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory, keep=3, best_metric=None)
  for step in (1, 2, 3):
    ckpt.save(step, _tiny_state(step), {"step": step})
  ckpt.close()
  _corrupt(os.path.join(directory, "3"))

  ckpt = Checkpointer(directory, keep=3, best_metric=None)
  with caplog.at_level("WARNING"):
    state, data, step = ckpt.restore(_abstract(_tiny_state(0)))
  assert step == 2 and data == {"step": 2} and float(state["w"][0, 0]) == 2.0
  logged = caplog.text
  assert f"checkpoint {os.path.join(directory, '3')} is unreadable" in logged, logged
  assert "resumed from older checkpoint step 2" in logged, logged
  # The corrupt step is kept for inspection, out of the way of the resumed run's save.
  assert os.path.isdir(directory + ".unreadable/3") and ckpt.all_steps() == [1, 2]
  ckpt.save(3, _tiny_state(3.5), {"step": 3})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2, 3]
  ckpt.close()


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory, keep=2, best_metric=None)
  ckpt.save(1, _tiny_state(1), {"step": 1})
  ckpt.close()
  _corrupt(os.path.join(directory, "1"))
  with pytest.raises(CheckpointRestoreError, match="no readable checkpoint in .*ckpt"):
    Checkpointer(directory, keep=2, best_metric=None).restore(_abstract(_tiny_state(0)))


# ---- workdir and metrics -------------------------------------------------------------------

def _unwritable_dirs(tmp_path):
  """Directories this process cannot create files in, whatever its privileges."""
  under_a_file = tmp_path / "a_file"
  under_a_file.write_text("x")
  out = [str(under_a_file / "workdir")]
  locked = tmp_path / "locked"
  locked.mkdir()
  if os.geteuid() != 0:
    locked.chmod(0o500)
    out.append(str(locked / "workdir"))
  elif subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0:
    out.append(str(locked / "workdir"))   # root ignores modes, not the immutable flag
  return out, locked


def test_unwritable_workdir_is_a_clear_permission_error(sp_model_path, tmp_path):
  from cai_jax.train.sft import run_sft
  dirs, locked = _unwritable_dirs(tmp_path)
  try:
    for workdir in dirs:
      with pytest.raises(PermissionError, match="not writable.*--workdir"):
        check_workdir_writable(workdir)
      with pytest.raises(PermissionError, match=f"workdir '{workdir}' is not writable"):
        run_sft(train_worker.sft_config(sp_model_path), workdir, mesh=_mesh1())
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
    locked.chmod(0o700)


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    for step in range(1, 6):
      f.write(json.dumps({"step": step, "split": "train", "loss": float(step)}) + "\n")
    f.write('{"step": 6, "split": "tra')   # the line a SIGKILL cut short
  truncate_metrics(path, 3)
  with open(path) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


# ---- optimizer --------------------------------------------------------------------------

def test_weight_decay_skips_norms_and_schedule_warms_up_then_decays(host_params):
  mask = optim.decay_mask(host_params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat and all(m == ("norm" not in k) for k, m in flat.items()), flat
  sched = optim.learning_rate_schedule(lr=1e-3, total_steps=20, warmup_steps=5, min_lr=1e-4)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 20)], [0.0, 1e-3, 1e-4], rtol=1e-6)
  assert float(sched(12)) < 1e-3
  const = optim.learning_rate_schedule(lr=1e-3, total_steps=20, schedule="constant")
  assert float(const(0)) == float(const(19)) == 1e-3
  with pytest.raises(ValueError, match="cosine' or 'constant"):
    optim.learning_rate_schedule(lr=1e-3, total_steps=20, schedule="linear")
