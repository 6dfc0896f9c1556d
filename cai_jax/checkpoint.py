"""Checkpoints: Hugging Face safetensors in and out, orbax params.

A *model directory* is either an HF Mistral directory (`config.json` +
`model.safetensors` or a sharded `model.safetensors.index.json`) or one of ours
(`config.json` + `params/`, an orbax checkpoint of the params pytree).
`load_model` reads both.

HF tensors are read one at a time with `safetensors.safe_open` (memory-mapped)
and written straight into the stacked [layers, ...] arrays, so loading a 7B
checkpoint holds one copy of the weights on the host. With `shardings`, each
param is placed on the mesh as soon as it is complete and its host copy is freed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cai_jax.data.jsonl import atomic_write_json
from cai_jax.model import MistralConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written; the message names the file and tensor."""


# --- name mapping -------------------------------------------------------------
# Each entry: flax path (under "layers" for per-layer params), HF name pattern,
# and the functions mapping HF weight -> flax kernel and back.

def _layer_specs(cfg: MistralConfig):
  D, H, K, hd, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                    cfg.head_dim, cfg.intermediate_size)
  return [
      (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", (H * hd, D),
       lambda w: w.T.reshape(D, H, hd), lambda k: k.reshape(D, H * hd).T),
      (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", (K * hd, D),
       lambda w: w.T.reshape(D, K, hd), lambda k: k.reshape(D, K * hd).T),
      (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", (K * hd, D),
       lambda w: w.T.reshape(D, K, hd), lambda k: k.reshape(D, K * hd).T),
      (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", (D, H * hd),
       lambda w: w.T.reshape(H, hd, D), lambda k: k.reshape(H * hd, D).T),
      (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (F, D), np.transpose, np.transpose),
      (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (F, D), np.transpose, np.transpose),
      (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (D, F), np.transpose, np.transpose),
      (("input_layernorm", "scale"), "input_layernorm.weight", (D,), _same, _same),
      (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", (D,), _same, _same),
  ]


def _same(x):
  return x


def _top_specs(cfg: MistralConfig, head: str):
  D, V = cfg.hidden_size, cfg.vocab_size
  specs = [
      (("embed_tokens", "embedding"), "model.embed_tokens.weight", (V, D), _same, _same),
      (("norm", "scale"), "model.norm.weight", (D,), _same, _same),
  ]
  if head == "scalar":
    specs.append((("score", "kernel"), "score.weight", (1, D), np.transpose, np.transpose))
  elif not cfg.tie_word_embeddings:
    specs.append((("lm_head", "kernel"), "lm_head.weight", (V, D), np.transpose, np.transpose))
  return specs


def _set(tree: dict, path: tuple, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


# --- reading HF ---------------------------------------------------------------

def _read_hf_json(path: str) -> dict:
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  if not os.path.exists(cfg_path):
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
      raise CheckpointError(f"{cfg_path}: missing; {path} holds cai_jax orbax params/ but not "
                            f"the config.json written with them (an interrupted save_model?): "
                            f"re-export the model")
    raise CheckpointError(f"{cfg_path}: missing; an HF Mistral checkpoint directory needs "
                          f"config.json (and a cai_jax model directory config.json + params/)")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


def read_hf_config(path: str, **overrides) -> MistralConfig:
  raw = _read_hf_json(path)
  try:
    return MistralConfig.from_hf_dict(raw, source=os.path.join(path, CONFIG_FILE), **overrides)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def _tensor_files(path: str) -> dict[str, str]:
  """Maps every tensor name to the safetensors file that holds it."""
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
    return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
  if os.path.exists(single):
    try:
      with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{single}: cannot read safetensors header ({e})") from None
  raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


class _TensorReader:
  """Opens each shard once and reads tensors by name, checking their shapes."""

  def __init__(self, files: dict[str, str]):
    self.files = files
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stack.close()

  def read(self, name: str, shape: tuple) -> np.ndarray:
    if name not in self.files:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint "
                            f"({sorted(set(self.files.values()))})")
    fname = self.files[name]
    try:
      if fname not in self._handles:
        self._handles[fname] = self._stack.enter_context(safe_open(fname, framework="numpy"))
      tensor = self._handles[fname].get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{fname}: cannot read tensor {name!r} ({e}); "
                            "the file may be truncated or corrupt") from None
    if tuple(tensor.shape) != tuple(shape):
      raise CheckpointError(f"{fname}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(shape)} from config.json")
    return tensor


def load_hf(path: str, *, head: str = "lm", param_dtype: Any = None, dtype: Any = None,
            shardings: Any = None, config_overrides: dict | None = None):
  """Reads an HF Mistral directory. Returns `(MistralConfig, params)`.

  `param_dtype` defaults to the checkpoint's `torch_dtype` (float32 if absent);
  `dtype` (compute) defaults to `param_dtype`. `head="scalar"` reads a
  `MistralForSequenceClassification`-style `score.weight` ([1, hidden]).
  With `shardings` (a pytree of `jax.sharding.Sharding` matching the params),
  params are returned as sharded `jax.Array`s; otherwise as NumPy arrays.
  """
  raw = _read_hf_json(path)
  ckpt_dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
  param_dtype = np.dtype(param_dtype or _np_dtype(ckpt_dtype))
  overrides = dict(config_overrides or {})
  overrides.setdefault("param_dtype", param_dtype)
  overrides.setdefault("dtype", dtype or param_dtype)
  cfg = read_hf_config(path, **overrides)
  files = _tensor_files(path)
  L = cfg.num_hidden_layers

  def place(flax_path, array):
    if shardings is None:
      return array
    return jax.device_put(array, _get(shardings, flax_path))

  params: dict = {}
  with _TensorReader(files) as reader:
    for flax_path, hf_name, shape, to_flax, _ in _top_specs(cfg, head):
      _set(params, flax_path, place(flax_path, to_flax(reader.read(hf_name, shape)).astype(param_dtype)))
    for sub_path, hf_suffix, shape, to_flax, _ in _layer_specs(cfg):
      stacked = None
      for i in range(L):
        w = to_flax(reader.read(f"model.layers.{i}.{hf_suffix}", shape))
        if stacked is None:
          stacked = np.empty((L,) + w.shape, param_dtype)
        stacked[i] = w
      flax_path = ("layers",) + sub_path
      _set(params, flax_path, place(flax_path, stacked))
      del stacked
  return cfg, params


def _np_dtype(name: str):
  name = str(name).replace("torch.", "")
  return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}.get(name, np.float32)


# --- writing HF ---------------------------------------------------------------

def _param(params, path: tuple, cfg: MistralConfig, head: str):
  """The leaf at `path`; a missing one is a user error (wrong head, wrong tree), not a KeyError."""
  try:
    return _get(params, path)
  except (KeyError, TypeError):
    raise CheckpointError(
        f"params have no {'/'.join(path)!r}, which head={head!r} with tie_word_embeddings="
        f"{cfg.tie_word_embeddings} needs; pass the params of Mistral(config, head={head!r})"
    ) from None


def _hf_tensors(cfg: MistralConfig, params, head: str):
  """(HF name, HF shape, thunk producing the host array) for every tensor.

  Every param is looked up here, eagerly, so a tree with a missing key fails
  before `save_hf` has written anything.
  """
  params = params.get("params", params)
  for flax_path, hf_name, shape, _, to_hf in _top_specs(cfg, head):
    leaf = _param(params, flax_path, cfg, head)
    yield hf_name, shape, (lambda x=leaf, f=to_hf: f(_to_host(x)))
  for sub_path, hf_suffix, shape, _, to_hf in _layer_specs(cfg):
    stacked = _param(params, ("layers",) + sub_path, cfg, head)
    for i in range(cfg.num_hidden_layers):
      yield (f"model.layers.{i}.{hf_suffix}", shape,
             lambda s=stacked, i=i, f=to_hf: f(_to_host(s[i])))


def _to_host(x) -> np.ndarray:
  """The whole array on this host. An array sharded across processes is gathered,
  which is collective: every process must make the same calls in the same order."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


@contextlib.contextmanager
def publishing_dir(path: str):
  """Yields a temporary sibling directory of `path` to write into; on success it replaces
  `path` (renamed into place), on any failure it is removed and `path` is left as it was."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_" + os.path.basename(path) + "_", dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_hf(path: str, config: MistralConfig, params, *, head: str = "lm",
            max_shard_bytes: int = 5 * 2**30, dtype: Any = None) -> None:
  """Writes an HF directory that `transformers` loads (`MistralForCausalLM`, or
  `MistralForSequenceClassification` with `num_labels=1` for `head="scalar"`).

  Tensors are grouped into shards of at most `max_shard_bytes`, and only one
  shard's tensors are on the host at a time; more than one shard gets a
  `model.safetensors.index.json`. The directory appears atomically: it is
  written to a temporary sibling and renamed at the end, so a failure leaves
  nothing behind. Multi-host: call it on every process (params sharded across
  processes are gathered tensor by tensor); process 0 alone writes.
  """
  out_dtype = np.dtype(dtype or config.param_dtype)
  if jax.process_index() != 0:
    for _, _, thunk in _hf_tensors(config, params, head):
      thunk()
    return
  groups: list[list] = [[]]
  size = 0
  for name, shape, thunk in _hf_tensors(config, params, head):
    nbytes = int(np.prod(shape)) * out_dtype.itemsize
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((name, thunk))
    size += nbytes
  n = len(groups)
  with publishing_dir(path) as tmp:
    weight_map = {}
    for i, group in enumerate(groups, 1):
      fname = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
      tensors = {name: np.ascontiguousarray(thunk().astype(out_dtype)) for name, thunk in group}
      save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
      weight_map.update({name: fname for name in tensors})
      del tensors
    if n > 1:
      total = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
      with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = config.replace(param_dtype=out_dtype).to_hf_dict()
    if head == "scalar":
      hf.update(architectures=["MistralForSequenceClassification"], num_labels=1,
                id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(hf, f, indent=2)


# --- orbax --------------------------------------------------------------------

def save_params(path: str, params) -> None:
  """Saves a params pytree (host or sharded arrays) with orbax; blocks until written."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()


def restore_params(path: str, target=None):
  """Restores a params pytree saved by `save_params`.

  `target` is a pytree of `jax.ShapeDtypeStruct` (with `.sharding` to restore
  straight onto a mesh, possibly a different one from the saver's), or None to
  restore as saved on the default device.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no orbax checkpoint here")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      if target is None:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(
                m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            tree)
      return ckptr.restore(path, target)
    except (ValueError, OSError, KeyError, TypeError, FileNotFoundError) as e:
      # orbax / tensorstore errors carry kilobytes of spec: keep the first line.
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"{path}: orbax params cannot be restored (truncated or corrupt "
                            f"checkpoint?): {first}") from None


def save_model(path: str, config: MistralConfig, params, *, head: str = "lm") -> None:
  """Our model directory: HF-style config.json + orbax params/.

  Multi-host: every process takes part in the (collective) orbax write;
  config.json is written by process 0 alone, after the params, so a directory
  with a config is a complete one.
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  hf = config.to_hf_dict()
  hf["cai_jax_head"] = head
  hf["cai_jax_dtype"] = config.dtype
  save_params(os.path.join(path, PARAMS_DIR), params)
  if jax.process_index() == 0:
    atomic_write_json(os.path.join(path, CONFIG_FILE), hf)


def is_hf_dir(path: str) -> bool:
  return (os.path.exists(os.path.join(path, SINGLE_FILE))
          or os.path.exists(os.path.join(path, INDEX_FILE)))


def is_orbax_model_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, PARAMS_DIR))


def read_model_config(path: str) -> tuple[MistralConfig, str]:
  """(config, head) of an HF or cai_jax model directory, reading only config.json.

  The config's dtypes are those stored in the directory (param dtype) and, for
  ours, the compute dtype it was trained with.
  """
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: model directory does not exist")
  raw = _read_hf_json(path)
  source = os.path.join(path, CONFIG_FILE)
  stored = np.dtype(_np_dtype(raw.get("torch_dtype") or raw.get("dtype") or "float32"))
  if is_orbax_model_dir(path):
    head = raw.get("cai_jax_head", "lm")
    compute = raw.get("cai_jax_dtype", stored)
  elif is_hf_dir(path):
    arch = raw.get("architectures") or []
    head = "scalar" if any("SequenceClassification" in a for a in arch) else "lm"
    compute = stored
  else:
    raise CheckpointError(f"{path}: neither an HF checkpoint nor a cai_jax model directory "
                          f"(expected {CONFIG_FILE} with {SINGLE_FILE}/{INDEX_FILE} or {PARAMS_DIR}/)")
  try:
    cfg = MistralConfig.from_hf_dict(raw, source=source, param_dtype=stored, dtype=compute)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  return cfg, head


def load_model(path: str, *, head: str | None = None, shardings=None, param_dtype=None,
               dtype=None):
  """Loads an HF directory or one of ours; returns `(config, params, head)`.

  `shardings` (for the params of `head`) restores straight onto a mesh;
  `param_dtype` / `dtype` override the stored dtypes.
  """
  cfg, saved_head = read_model_config(path)
  if head is not None and head != saved_head:
    raise CheckpointError(f"{path}: holds a {saved_head!r}-head model, {head!r} was asked for")
  if is_hf_dir(path):
    cfg, params = load_hf(path, head=saved_head, shardings=shardings, param_dtype=param_dtype,
                          dtype=dtype)
    return cfg, params, saved_head
  cfg = cfg.replace(param_dtype=param_dtype or cfg.param_dtype, dtype=dtype or cfg.dtype)
  abstract = abstract_params(cfg, saved_head)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, abstract)
  # Orbax casts to the target dtype while restoring.
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  params = restore_params(os.path.join(path, PARAMS_DIR), target)
  return cfg, params, saved_head


def abstract_params(config: MistralConfig, head: str = "lm"):
  """ShapeDtypeStructs of the params pytree, computed without allocating."""
  import flax.linen as nn
  import jax.numpy as jnp
  from cai_jax.model import Mistral
  shapes = jax.eval_shape(
      lambda: Mistral(config, head=head).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.unbox(shapes)["params"]
