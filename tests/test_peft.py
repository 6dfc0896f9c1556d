"""Hugging Face PEFT LoRA adapters (`cai_jax.peft`) against the `peft` library itself.

Our export loads with `peft.PeftModel.from_pretrained` onto the transformers base and gives
our logits (and the merged model's); an adapter `peft` wrote loads into our layout, computes
peft's logits and saves back bit for bit; our own round trip is bitwise; a bad adapter fails
with a ValueError naming the file and the field or tensor. The adapters' B are random (fresh
B is zero, which would hide any layout error) and large enough to move the logits by O(1).
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import hf_utils
from cai_jax import checkpoint, peft
from cai_jax.model import Mistral, MistralConfig, lora
from cai_jax.model.config import LORA_TARGETS

RANK, ALPHA = 4, 8.0
SUBSET = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
CLASSES = {"lm": "MistralForCausalLM", "scalar": "MistralForSequenceClassification"}


def _lora_config(base: MistralConfig, targets=LORA_TARGETS) -> MistralConfig:
  return base.replace(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=tuple(targets))


def _random_adapters(cfg: MistralConfig, seed: int, head: str = "lm") -> dict:
  """Adapters of the shapes Mistral(cfg) gives them: A ~ U(+-1/sqrt(fan_in)) as it draws it,
  B ~ N(0, 0.3) (not zero)."""
  abstract = jax.eval_shape(lambda: Mistral(cfg, head=head).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  adapters, _ = lora.split(nn.unbox(abstract)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if path[-1] == "lora_a":
      bound = 1 / np.sqrt(np.prod(x.shape[1:-1]))
      return rng.uniform(-bound, bound, x.shape).astype(np.float32)
    return rng.normal(0.0, 0.3, x.shape).astype(np.float32)

  flat = traverse_util.flatten_dict(adapters)
  return traverse_util.unflatten_dict({k: draw(k, v) for k, v in flat.items()})


def _with(base: dict, *updates: dict) -> dict:
  """`base` with the leaves of `updates` added or replacing its own."""
  flat = traverse_util.flatten_dict(base)
  for u in updates:
    flat.update(traverse_util.flatten_dict(u))
  return traverse_util.unflatten_dict(flat)


def _ours(cfg, params, tokens, head="lm") -> np.ndarray:
  return np.asarray(Mistral(cfg, head=head).apply({"params": params}, jnp.asarray(tokens)))


def _torch_out(model, tokens, head: str) -> np.ndarray:
  """Logits [B, T, V], or the scalar head's per-position values [B, T] (the score module's
  output, captured before MistralForSequenceClassification pools it at the last token)."""
  if head == "lm":
    return hf_utils.torch_logits(model, tokens)
  captured = []
  handle = _score_module(model).register_forward_hook(lambda m, i, o: captured.append(o.detach()))
  try:
    hf_utils.torch_logits(model, tokens)
  finally:
    handle.remove()
  return captured[0][..., 0].float().numpy()


def _score_module(model):
  """The (outermost) module named score: under peft, the wrapper that picks the adapter's."""
  for name, module in model.named_modules():
    if name.split(".")[-1] == "score":
      return module
  raise AssertionError("no score module")


def _assert_same_tree(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), f"{'/'.join(k)} differs"


def _assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _tokens(cfg, seed=0):
  return hf_utils.random_tokens(seed, 2, 9, cfg.vocab_size)


# --- our export in peft ----------------------------------------------------------

@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_export_loads_in_peft(tmp_path, head):
  import peft as hf_peft
  _, base_dir = hf_utils.make_hf_dir(tmp_path / "base", seed=3, cls=CLASSES[head])
  base_cfg, base = checkpoint.load_hf(base_dir, head=head)
  cfg = _lora_config(base_cfg)
  trained = _random_adapters(cfg, seed=4, head=head)
  if head == "scalar":
    trained["score"] = {"kernel": np.random.default_rng(5).normal(
        0.0, 1.0, (cfg.hidden_size, 1)).astype(np.float32)}
  # Leaves other than the adapters and the head (here the frozen base) are ignored.
  adapter_dir = str(tmp_path / "adapter")
  peft.save_adapter(adapter_dir, cfg, _with(base, trained), head=head, base_model=base_dir)

  meta = _read_json(os.path.join(adapter_dir, peft.CONFIG_FILE))
  assert meta["peft_type"] == "LORA" and meta["r"] == RANK and meta["lora_alpha"] == ALPHA
  assert meta["target_modules"] == sorted(LORA_TARGETS)
  assert meta["task_type"] == {"lm": "CAUSAL_LM", "scalar": "SEQ_CLS"}[head]
  assert meta["modules_to_save"] == (["score"] if head == "scalar" else None)
  assert meta["base_model_name_or_path"] == base_dir

  torch_model = hf_peft.PeftModel.from_pretrained(
      hf_utils.load_torch(base_dir, CLASSES[head]), adapter_dir).eval()
  tokens = _tokens(cfg)
  ref = _torch_out(torch_model, tokens, head)
  params = _with(base, trained)
  got = _ours(cfg, params, tokens, head)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  # The adapters (and the trained head) matter: without them the output is far off.
  assert np.abs(_ours(base_cfg, base, tokens, head) - ref).max() > 0.1
  merged_cfg, merged = lora.merge(cfg, params)
  np.testing.assert_allclose(_ours(merged_cfg, merged, tokens, head), ref, atol=1e-4, rtol=0)


# --- peft's adapter in ours --------------------------------------------------------

@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_peft_adapter_loads_and_saves_back_bitwise(tmp_path, head):
  import peft as hf_peft
  import torch
  hf_model = hf_utils.make_hf_model(6, cls=CLASSES[head])
  base_dir = hf_utils.save_hf_model(hf_model, tmp_path / "base")
  torch.manual_seed(7)
  task = {"lm": "CAUSAL_LM", "scalar": "SEQ_CLS"}[head]
  pm = hf_peft.get_peft_model(hf_model, hf_peft.LoraConfig(
      r=RANK, lora_alpha=int(ALPHA), target_modules=list(SUBSET), init_lora_weights=False,
      task_type=task))
  if head == "scalar":  # peft trains a copy of the head: make it differ from the base's
    with torch.no_grad():
      pm.base_model.model.score.modules_to_save["default"].weight.normal_()
  pm.eval()
  peft_dir = str(tmp_path / "peft")
  pm.save_pretrained(peft_dir)
  peft_tensors = load_file(os.path.join(peft_dir, peft.WEIGHTS_FILE))
  assert ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_tensors)
  assert (peft.SCORE_NAME in peft_tensors) == (head == "scalar")

  base_cfg, base = checkpoint.load_hf(base_dir, head=head)
  cfg = _lora_config(base_cfg, SUBSET)
  loaded = peft.load_adapter(peft_dir, cfg, head=head)
  assert loaded["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 32, RANK)
  assert loaded["layers"]["self_attn"]["o_proj"]["lora_a"].shape == (2, 4, 8, RANK)
  assert loaded["layers"]["self_attn"]["v_proj"]["lora_b"].shape == (2, RANK, 2, 8)
  assert ("score" in loaded) == (head == "scalar")
  ours_dir = str(tmp_path / "ours")
  peft.save_adapter(ours_dir, cfg, loaded, head=head)
  _assert_same_tensors(load_file(os.path.join(ours_dir, peft.WEIGHTS_FILE)), peft_tensors)
  theirs, mine = (_read_json(os.path.join(d, peft.CONFIG_FILE)) for d in (peft_dir, ours_dir))
  for field in ("peft_type", "task_type", "r", "lora_alpha", "bias", "use_rslora", "use_dora",
                "fan_in_fan_out", "layers_to_transform", "lora_dropout"):
    assert mine[field] == theirs[field], field
  assert sorted(mine["target_modules"]) == sorted(theirs["target_modules"])
  assert ("score" in (mine["modules_to_save"] or [])) == (head == "scalar")
  assert ("score" in (theirs["modules_to_save"] or [])) == (head == "scalar")

  tokens = _tokens(cfg, seed=1)
  ref = _torch_out(pm, tokens, head)
  np.testing.assert_allclose(_ours(cfg, _with(base, loaded), tokens, head), ref,
                             atol=1e-4, rtol=0)
  assert np.abs(_ours(base_cfg, base, tokens, head) - ref).max() > 0.1


# --- ours -> ours, dtypes, bad adapters --------------------------------------------

TINY = MistralConfig(**hf_utils.TINY)


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_round_trip_is_bitwise(tmp_path, head):
  cfg = _lora_config(TINY, ("k_proj", "o_proj", "gate_proj"))
  trained = _random_adapters(cfg, seed=8, head=head)
  if head == "scalar":
    trained["score"] = {"kernel": np.random.default_rng(9).normal(
        size=(cfg.hidden_size, 1)).astype(np.float32)}
  sharded = jax.device_put(trained)  # jax arrays are gathered to the host
  peft.save_adapter(tmp_path / "a", cfg, sharded, head=head)
  loaded = peft.load_adapter(tmp_path / "a", cfg, head=head)
  _assert_same_tree(loaded, trained)
  peft.save_adapter(tmp_path / "a", cfg, loaded, head=head)  # overwrites in place
  _assert_same_tree(peft.load_adapter(tmp_path / "a", cfg, head=head), trained)
  assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary directory left behind


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_files_upcast(tmp_path, dtype):
  cfg = _lora_config(TINY, ("q_proj",))
  peft.save_adapter(tmp_path / "a", cfg, _random_adapters(cfg, seed=10))
  weights = os.path.join(tmp_path, "a", peft.WEIGHTS_FILE)
  half = {k: v.astype(dtype) for k, v in load_file(weights).items()}
  save_file(half, weights)
  got = peft.load_adapter(tmp_path / "a", cfg)["layers"]["self_attn"]["q_proj"]
  want = half["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
  assert got["lora_a"].dtype == np.float32
  np.testing.assert_array_equal(got["lora_a"][1], want.astype(np.float32).T)


def _edit_config(**changes):
  def edit(d):
    path = os.path.join(d, peft.CONFIG_FILE)
    meta = _read_json(path)
    meta.update(changes)
    with open(path, "w") as f:
      json.dump(meta, f)
  return edit


def _edit_tensors(fn):
  def edit(d):
    path = os.path.join(d, peft.WEIGHTS_FILE)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)
  return edit


_LAST_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
_BAD = {
    "r": (_edit_config(r=8), r"adapter_config\.json: r is 8"),
    "alpha": (_edit_config(lora_alpha=16), r"adapter_config\.json: lora_alpha is 16"),
    "targets": (_edit_config(target_modules=["q_proj", "v_proj"]),
                r"adapter_config\.json: target_modules is \['q_proj', 'v_proj'\]"),
    "regex": (_edit_config(target_modules=r".*\.(q|v)_proj"),
              r"adapter_config\.json: target_modules is the regular expression"),
    "peft_type": (_edit_config(peft_type="IA3"), r"adapter_config\.json: peft_type is 'IA3'"),
    "task_type": (_edit_config(task_type="SEQ_CLS"), r"adapter_config\.json: task_type"),
    "rslora": (_edit_config(use_rslora=True), r"adapter_config\.json: use_rslora=True"),
    "dora": (_edit_config(use_dora=True), r"adapter_config\.json: use_dora=True"),
    "layers": (_edit_config(layers_to_transform=[0]),
               r"adapter_config\.json: layers_to_transform=\[0\]"),
    "rank_pattern": (_edit_config(rank_pattern={"q_proj": 8}), r"rank_pattern"),
    "bias": (_edit_config(bias="lora_only"), r"adapter_config\.json: bias='lora_only'"),
    "missing_tensor": (_edit_tensors(lambda t: t.pop(_LAST_B)),
                       rf"adapter_model\.safetensors: tensor '{_LAST_B}' is missing "
                       r"\(expected shape \(32, 4\)\)"),
    "bad_shape": (_edit_tensors(lambda t: t.update({_LAST_B: np.zeros((4, 32), np.float32)})),
                  rf"adapter_model\.safetensors: tensor '{_LAST_B}' has shape \(4, 32\), "
                  r"expected \(32, 4\)"),
    "extra_tensor": (_edit_tensors(lambda t: t.update(
        {"base_model.model.model.layers.2.mlp.down_proj.lora_B.weight": t[_LAST_B]})),
                     r"adapter_model\.safetensors: unexpected tensor\(s\) "
                     r"\['base_model\.model\.model\.layers\.2\.mlp\.down_proj"),
    "no_config": (lambda d: os.remove(os.path.join(d, peft.CONFIG_FILE)),
                  r"adapter_config\.json: missing"),
    "no_weights": (lambda d: os.remove(os.path.join(d, peft.WEIGHTS_FILE)),
                   r"adapter_model\.safetensors: missing"),
    "corrupt": (lambda d: open(os.path.join(d, peft.WEIGHTS_FILE), "wb").write(b"\0" * 16),
                r"adapter_model\.safetensors: cannot read"),
}


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
  cfg = _lora_config(TINY, ("q_proj", "down_proj"))
  path = str(tmp_path_factory.mktemp("good") / "adapter")
  peft.save_adapter(path, cfg, _random_adapters(cfg, seed=11))
  return cfg, path


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_adapters_are_rejected(tmp_path, good_adapter, case):
  cfg, good = good_adapter
  path = str(tmp_path / "adapter")
  shutil.copytree(good, path)
  edit, message = _BAD[case]
  edit(path)
  with pytest.raises(ValueError, match=message):
    peft.load_adapter(path, cfg)


def test_config_mismatch_is_rejected(good_adapter):
  cfg, path = good_adapter
  with pytest.raises(ValueError, match=r"adapter_config\.json: r is 4, the model config has "
                                       r"lora_rank 8"):
    peft.load_adapter(path, cfg.replace(lora_rank=8))
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor .*layers\.2\."):
    peft.load_adapter(path, cfg.replace(num_hidden_layers=3))
  with pytest.raises(ValueError, match=r"save_adapter: params do not hold the adapters"):
    peft.save_adapter(os.path.dirname(path) + "/other", cfg.replace(
        lora_targets=("q_proj", "k_proj", "down_proj")), peft.load_adapter(path, cfg))
