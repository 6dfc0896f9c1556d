"""HF safetensors import/export, orbax model dirs, the converter CLI, and bad input.

The round trips are checked bit for bit: conversion is transposes and
reshapes only, so any change to a float is a bug. Bad checkpoints must fail
with a `CheckpointError` that names the file (and tensor) to look at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_utils
from cai_jax import checkpoint, parallel
from cai_jax.checkpoint import CheckpointError
from cai_jax.model import Mistral, MistralConfig, init_params, param_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].shape == b[name].shape, name
    # Bitwise: compare the raw bytes so -0.0 / NaN payloads count too.
    assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def _assert_same_params(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _logits(cfg, params, tokens, head="lm"):
  return np.asarray(Mistral(cfg, head=head).apply({"params": params}, tokens))


# --- round trips ------------------------------------------------------------------

def test_hf_round_trip_loads_in_transformers(tmp_path):
  # A non-default rope_theta and a window catch config.json fields transformers would ignore.
  torch_model, src = hf_utils.make_hf_dir(tmp_path / "src", seed=1, sliding_window=5,
                                          rope_theta=500.0, num_key_value_heads=1)
  cfg, params = checkpoint.load_hf(src)
  assert cfg.rope_theta == 500.0
  dst = str(tmp_path / "dst")
  checkpoint.save_hf(dst, cfg, params)
  _assert_same_tensors(hf_utils.read_safetensors_dir(src), hf_utils.read_safetensors_dir(dst))

  reloaded = hf_utils.load_torch(dst)
  assert reloaded.config.sliding_window == 5
  tokens = hf_utils.random_tokens(0, 2, 11, cfg.vocab_size)
  ref = hf_utils.torch_logits(torch_model, tokens)
  np.testing.assert_array_equal(hf_utils.torch_logits(reloaded, tokens), ref)
  np.testing.assert_allclose(_logits(cfg, params, tokens), ref, atol=1e-4, rtol=0)


def test_sharded_checkpoints_read_and_written(tmp_path):
  torch_model, single = hf_utils.make_hf_dir(tmp_path / "single", seed=2)
  sharded = hf_utils.save_hf_model(torch_model, tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(os.path.join(sharded, checkpoint.INDEX_FILE))
  assert not os.path.exists(os.path.join(sharded, checkpoint.SINGLE_FILE))
  cfg, from_single = checkpoint.load_hf(single)
  _, from_sharded = checkpoint.load_hf(sharded)
  _assert_same_params(from_single, from_sharded)

  ours = str(tmp_path / "ours")
  checkpoint.save_hf(ours, cfg, from_sharded, max_shard_bytes=16 * 1024)
  with open(os.path.join(ours, checkpoint.INDEX_FILE)) as f:
    index = json.load(f)
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2
  assert sorted(f for f in os.listdir(ours) if f.endswith(".safetensors")) == shards
  for shard in shards:  # every shard respects the limit unless it holds a single tensor
    tensors = load_file(os.path.join(ours, shard))
    assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 16 * 1024
  assert set(index["weight_map"]) == set(hf_utils.read_safetensors_dir(single))
  _, again = checkpoint.load_hf(ours)
  _assert_same_params(from_single, again)
  tokens = hf_utils.random_tokens(1, 1, 7, cfg.vocab_size)
  np.testing.assert_array_equal(hf_utils.torch_logits(hf_utils.load_torch(ours), tokens),
                                hf_utils.torch_logits(torch_model, tokens))


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
  import torch
  model = hf_utils.make_hf_model(3).to(torch.bfloat16)
  src = hf_utils.save_hf_model(model, tmp_path / "bf16")
  cfg, params = checkpoint.load_hf(src)
  assert cfg.param_dtype == "bfloat16"
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(params)}
  assert dtypes == {np.dtype(ml_dtypes.bfloat16)}
  # bf16 -> bf16 export is bit-identical too.
  dst = str(tmp_path / "out")
  checkpoint.save_hf(dst, cfg, params)
  _assert_same_tensors(hf_utils.read_safetensors_dir(src), hf_utils.read_safetensors_dir(dst))


def test_hf_to_orbax_to_hf_is_bit_identical(tmp_path):
  _, src = hf_utils.make_hf_dir(tmp_path / "src", seed=4, sliding_window=6)
  cfg, params = checkpoint.load_hf(src)
  ours = str(tmp_path / "ours")
  checkpoint.save_model(ours, cfg, params)
  assert checkpoint.is_orbax_model_dir(ours) and not checkpoint.is_hf_dir(ours)
  cfg2, params2, head = checkpoint.load_model(ours)
  assert head == "lm" and cfg2 == cfg
  _assert_same_params(params, params2)
  dst = str(tmp_path / "dst")
  checkpoint.save_hf(dst, cfg2, params2)
  _assert_same_tensors(hf_utils.read_safetensors_dir(src), hf_utils.read_safetensors_dir(dst))


def test_orbax_restore_onto_a_different_mesh(tmp_path):
  cfg = MistralConfig(**{**hf_utils.TINY, "hidden_size": 64, "intermediate_size": 128})
  saver_mesh = parallel.create_mesh((8, 1, 1))
  params, _ = init_params(cfg, saver_mesh, jax.random.PRNGKey(0))
  path = str(tmp_path / "params")
  checkpoint.save_params(path, params)

  mesh = parallel.create_mesh((1, 4, 2))
  shardings = param_shardings(cfg, mesh)
  target = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
  restored = checkpoint.restore_params(path, target)
  _assert_same_params(params, restored)
  for x, s in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(shardings)):
    assert x.sharding == s
  q = restored["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  # Without a target: everything comes back on one device, unchanged.
  _assert_same_params(params, checkpoint.restore_params(path))


def test_scalar_head_round_trip(tmp_path):
  cfg = MistralConfig(**{**hf_utils.TINY, "sliding_window": 5})
  model = Mistral(cfg, head="scalar")
  import flax.linen as nn
  params = nn.unbox(model.init(jax.random.PRNGKey(1), np.zeros((1, 1), np.int32)))["params"]
  hf_dir = str(tmp_path / "hf")
  checkpoint.save_hf(hf_dir, cfg, params, head="scalar")

  torch_rm = hf_utils.load_torch(hf_dir, cls="MistralForSequenceClassification")
  np.testing.assert_array_equal(torch_rm.score.weight.detach().numpy(),
                                np.asarray(params["score"]["kernel"]).T)
  # HF pools the score at the last token: ours at position -1 must agree.
  tokens = hf_utils.random_tokens(2, 1, 9, cfg.vocab_size)
  ours = _logits(cfg, params, tokens, head="scalar")
  np.testing.assert_allclose(hf_utils.torch_logits(torch_rm, tokens)[:, 0], ours[:, -1],
                             atol=1e-5, rtol=0)

  cfg2, params2, head = checkpoint.load_model(hf_dir)  # head detected from architectures
  assert head == "scalar"
  _assert_same_params(params, params2)
  ours_dir = str(tmp_path / "ours")
  checkpoint.save_model(ours_dir, cfg2, params2, head="scalar")
  cfg3, params3, head3 = checkpoint.load_model(ours_dir)
  assert head3 == "scalar" and cfg3 == cfg2
  _assert_same_params(params, params3)
  with pytest.raises(CheckpointError, match="'scalar'-head"):
    checkpoint.load_model(ours_dir, head="lm")


def test_config_json_round_trip_keeps_every_field():
  cfg = MistralConfig(**{**hf_utils.TINY, "sliding_window": 7, "rope_theta": 500.0,
                         "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 5})
  back = MistralConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
  assert back == cfg  # bos_token_id=0 once came back as 1 (`or 1` treated 0 as missing)


# --- the converter CLI ------------------------------------------------------------

def _convert(*args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run([sys.executable, "-m", "launch.convert_checkpoint", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  return proc


def test_convert_checkpoint_cli_round_trip(tmp_path):
  _, src = hf_utils.make_hf_dir(tmp_path / "src", seed=5, sliding_window=5)
  ours, back = str(tmp_path / "ours"), str(tmp_path / "back")
  proc = _convert(f"--src={src}", f"--dst={ours}")
  assert proc.returncode == 0, proc.stderr
  assert "(hf) ->" in proc.stdout and "(orbax)" in proc.stdout and "head=lm" in proc.stdout
  assert checkpoint.is_orbax_model_dir(ours)
  proc = _convert(f"--src={ours}", f"--dst={back}")  # --to=hf is implied for our format
  assert proc.returncode == 0, proc.stderr
  assert "(hf): head=lm" in proc.stdout
  _assert_same_tensors(hf_utils.read_safetensors_dir(src), hf_utils.read_safetensors_dir(back))

  bf16 = str(tmp_path / "bf16")
  proc = _convert(f"--src={src}", f"--dst={bf16}", "--to=hf", "--dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr
  cfg, params = checkpoint.load_hf(bf16)
  assert cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}

  rm = hf_utils.save_hf_model(hf_utils.make_hf_model(6, cls="MistralForSequenceClassification"),
                              tmp_path / "rm")
  proc = _convert(f"--src={rm}", f"--dst={tmp_path / 'rm_ours'}")
  assert proc.returncode == 0, proc.stderr
  assert "head=scalar" in proc.stdout
  assert checkpoint.load_model(str(tmp_path / "rm_ours"))[2] == "scalar"

  proc = _convert(f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'x'}")
  assert proc.returncode != 0 and "nope" in proc.stderr


# --- bad input --------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
  return hf_utils.make_hf_dir(tmp_path / "hf", seed=6)[1]


def test_error_directory_without_config(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(CheckpointError, match=r"config\.json") as e:
    checkpoint.load_hf(str(empty))
  assert str(empty) in str(e.value)


def test_error_wrong_model_type(hf_dir):
  cfg_path = os.path.join(hf_dir, "config.json")
  with open(cfg_path) as f:
    raw = json.load(f)
  raw["model_type"] = "gpt2"
  with open(cfg_path, "w") as f:
    json.dump(raw, f)
  with pytest.raises(CheckpointError, match="gpt2") as e:
    checkpoint.load_hf(hf_dir)
  assert cfg_path in str(e.value)


def _rewrite_safetensors(path, edit):
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_error_missing_tensor(hf_dir):
  st = os.path.join(hf_dir, checkpoint.SINGLE_FILE)
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite_safetensors(st, lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=name) as e:
    checkpoint.load_hf(hf_dir)
  assert st in str(e.value)


def test_error_wrong_shaped_tensor(hf_dir):
  st = os.path.join(hf_dir, checkpoint.SINGLE_FILE)
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite_safetensors(st, lambda t: t.update({name: t[name][:8]}))
  with pytest.raises(CheckpointError, match=name) as e:
    checkpoint.load_hf(hf_dir)
  assert st in str(e.value) and "(8, 32)" in str(e.value)


@pytest.mark.parametrize("sharded", [False, True])
def test_error_truncated_safetensors(tmp_path, sharded):
  model = hf_utils.make_hf_model(7)
  kwargs = {"max_shard_size": "20KB"} if sharded else {}
  path = hf_utils.save_hf_model(model, tmp_path / "hf", **kwargs)
  names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  victim = os.path.join(path, names[-1])
  size = os.path.getsize(victim)
  with open(victim, "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_hf(path)
  assert victim in str(e.value)


def test_save_hf_bad_params_leave_nothing_behind(tmp_path):
  cfg, params = checkpoint.load_hf(hf_utils.make_hf_dir(tmp_path / "hf", seed=8)[1])
  out_parent = tmp_path / "out"
  out_parent.mkdir()
  del params["layers"]["mlp"]["down_proj"]
  with pytest.raises(CheckpointError, match="down_proj"):
    checkpoint.save_hf(str(out_parent / "model"), cfg, params)
  assert os.listdir(out_parent) == []


def test_save_hf_failing_midway_leaves_nothing_behind(tmp_path, monkeypatch):
  cfg, params = checkpoint.load_hf(hf_utils.make_hf_dir(tmp_path / "hf", seed=9)[1])
  out_parent = tmp_path / "out"
  out_parent.mkdir()
  # An existing export at the target must survive a failed overwrite untouched.
  checkpoint.save_hf(str(out_parent / "model"), cfg, params)
  before = hf_utils.read_safetensors_dir(out_parent / "model")

  calls = []
  real_save_file = checkpoint.save_file

  def flaky_save_file(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 3:
      raise OSError(28, "No space left on device")
    real_save_file(tensors, filename, metadata=metadata)

  monkeypatch.setattr(checkpoint, "save_file", flaky_save_file)
  with pytest.raises(OSError, match="No space"):
    checkpoint.save_hf(str(out_parent / "model"), cfg, params, max_shard_bytes=16 * 1024)
  assert len(calls) == 3  # two shards were written before the failure
  assert os.listdir(out_parent) == ["model"]
  _assert_same_tensors(before, hf_utils.read_safetensors_dir(out_parent / "model"))


def test_broken_model_dirs_get_short_messages_that_say_what_they_are(tmp_path):
  import glob

  from cai_jax import parallel
  from configs.models import get_config as model_preset
  cfg = MistralConfig.from_config(model_preset("tiny"))
  mesh = parallel.create_mesh([1, 1, 1], devices=jax.devices()[:1])
  params, _ = init_params(cfg, mesh, jax.random.PRNGKey(0))
  path = str(tmp_path / "model")
  checkpoint.save_model(path, cfg, params)
  for f in glob.glob(path + "/params/**/manifest.ocdbt", recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(10)                     # a copy cut short
  with pytest.raises(checkpoint.CheckpointError) as err:
    checkpoint.load_model(path)
  msg = str(err.value)
  assert "orbax params cannot be restored (truncated or corrupt checkpoint?)" in msg
  assert len(msg) < 600 and "\n" not in msg
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(checkpoint.CheckpointError, match="holds cai_jax orbax params/ but not"):
    checkpoint.load_model(path)
