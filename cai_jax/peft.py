"""LoRA adapters in Hugging Face PEFT's format: `save_adapter` writes, `load_adapter` reads.

A PEFT LoRA adapter directory holds `adapter_config.json` and `adapter_model.safetensors`,
whose tensors are named as `peft` saves them: per layer i and adapted projection,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in_features] and
`...lora_B.weight` [out_features, r] (HF's Linear computes x W^T, so A^T and B^T are our
`lora_a` [in..., r] and `lora_b` [r, out...], reshaped), and for a sequence-classification
adapter that trained the head, `base_model.model.score.weight` [1, hidden] (our
`score/kernel` [hidden, 1], transposed). Conversion is transposes and reshapes only, so a
round trip keeps every float bit for bit.

Only plain LoRA is supported: one rank and alpha for every module, every layer adapted,
no rsLoRA, DoRA or trained biases; anything else is rejected with a message naming the
file and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cai_jax.checkpoint import _to_host, publishing_dir
from cai_jax.model import lora
from cai_jax.model.config import LORA_TARGETS, MistralConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_TYPES = {"lm": "CAUSAL_LM", "scalar": "SEQ_CLS"}
LAYER_PREFIX = "base_model.model.model.layers"
SCORE_NAME = "base_model.model.score.weight"

# PEFT LoraConfig fields that change what the adapter computes or which tensors it holds,
# none of which this module implements: each must be absent, null, false or empty.
_UNSUPPORTED = ("use_rslora", "use_dora", "layers_to_transform",
                "rank_pattern", "alpha_pattern", "lora_bias", "target_parameters",
                "exclude_modules", "layer_replication", "trainable_token_indices",
                "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
                "kasa_config", "velora_config", "monteclora_config")


def _modules(config: MistralConfig) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
  """{projection: (its block, our kernel's input dims, its output dims)}."""
  D, H, K, hd, F = (config.hidden_size, config.num_attention_heads,
                    config.num_key_value_heads, config.head_dim, config.intermediate_size)
  return {
      "q_proj": ("self_attn", (D,), (H, hd)),
      "k_proj": ("self_attn", (D,), (K, hd)),
      "v_proj": ("self_attn", (D,), (K, hd)),
      "o_proj": ("self_attn", (H, hd), (D,)),
      "gate_proj": ("mlp", (D,), (F,)),
      "up_proj": ("mlp", (D,), (F,)),
      "down_proj": ("mlp", (F,), (D,)),
  }


def _specs(config: MistralConfig):
  """(our path, HF name suffix, HF shape, our shape of one layer, HF -> ours, ours -> HF) per
  adapter leaf of every target; our paths are under "layers", whose arrays add a leading L."""
  r = config.lora_rank
  for name, (block, ins, outs) in _modules(config).items():
    if name not in config.lora_targets:
      continue
    n_in, n_out = int(np.prod(ins)), int(np.prod(outs))
    yield (("layers", block, name, "lora_a"), f"{block}.{name}.lora_A.weight", (r, n_in),
           ins + (r,), lambda w, ins=ins: w.T.reshape(ins + (r,)),
           lambda a, n=n_in: a.reshape(n, r).T)
    yield (("layers", block, name, "lora_b"), f"{block}.{name}.lora_B.weight", (n_out, r),
           (r,) + outs, lambda w, outs=outs: w.T.reshape((r,) + outs),
           lambda b, n=n_out: b.reshape(r, n).T)


def _layer_name(i: int, suffix: str) -> str:
  return f"{LAYER_PREFIX}.{i}.{suffix}"


def _check_head(head: str) -> None:
  if head not in TASK_TYPES:
    raise ValueError(f"head must be one of {sorted(TASK_TYPES)}, got {head!r}")


def _get(tree, path: tuple):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _adapter_paths(params) -> set[tuple]:
  return set(traverse_util.flatten_dict(lora.split(params)[0]))


def _lora_config_json(config: MistralConfig, head: str, base_model: str,
                      with_score: bool) -> dict:
  alpha = config.lora_alpha
  return {
      "peft_type": "LORA",
      "task_type": TASK_TYPES[head],
      "base_model_name_or_path": base_model or None,
      "revision": None,
      "inference_mode": True,
      "r": config.lora_rank,
      "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
      "lora_dropout": config.lora_dropout,
      "target_modules": sorted(config.lora_targets),
      "exclude_modules": None,
      "fan_in_fan_out": False,
      "bias": "none",
      "use_rslora": False,
      "use_dora": False,
      "lora_bias": False,
      "modules_to_save": ["score"] if with_score else None,
      "init_lora_weights": True,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "target_parameters": None,
  }


def save_adapter(path: str, config: MistralConfig, params, *, head: str = "lm",
                 base_model: str = "") -> None:
  """Writes the adapters in `params` (and, for `head="scalar"`, a `score` head when params
  hold one: the head a reward model or critic trains) as a PEFT LoRA adapter directory that
  `peft.PeftModel.from_pretrained` loads onto the base (`MistralForCausalLM`, or
  `MistralForSequenceClassification` for "scalar"). Leaves other than `lora_a`/`lora_b` and
  the score head are ignored; tensors keep their dtype (our adapters are float32).

  `params`: host or sharded arrays; every target of `config` must have its adapters, of
  the shapes `config` gives. The directory appears atomically (a temporary sibling,
  renamed). Multi-host: call it on every process (sharded arrays are gathered, which is
  collective); process 0 alone writes.
  """
  _check_head(head)
  if not config.lora_rank:
    raise ValueError("save_adapter: the config has lora_rank 0 (no adapters to save)")
  params = params.get("params", params)
  L = config.num_hidden_layers
  specs = list(_specs(config))
  expected = {spec[0] for spec in specs}
  found = _adapter_paths(params)
  if found != expected:
    missing = sorted("/".join(p) for p in expected - found)
    extra = sorted("/".join(p) for p in found - expected)
    raise ValueError(f"save_adapter: params do not hold the adapters of lora_targets "
                     f"{sorted(config.lora_targets)}: missing {missing}, unexpected {extra}")
  tensors: dict[str, np.ndarray] = {}
  for flax_path, suffix, _, ours, _, to_hf in specs:
    host = _to_host(_get(params, flax_path))
    if host.shape != (L,) + ours:
      raise ValueError(f"save_adapter: {'/'.join(flax_path)} has shape {host.shape}, "
                       f"expected {(L,) + ours}")
    for i in range(L):
      tensors[_layer_name(i, suffix)] = np.ascontiguousarray(to_hf(host[i]))
  score = _get(params, ("score", "kernel")) if head == "scalar" else None
  if score is not None:
    host = _to_host(score)
    if host.shape != (config.hidden_size, 1):
      raise ValueError(f"save_adapter: score/kernel has shape {host.shape}, expected "
                       f"{(config.hidden_size, 1)}")
    tensors[SCORE_NAME] = np.ascontiguousarray(host.T)
  if jax.process_index() != 0:
    return
  meta = _lora_config_json(config, head, base_model, score is not None)
  with publishing_dir(path) as tmp:
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)


def _targets(value: Any, source: str) -> set[str]:
  """PEFT's target_modules as a set of projection names: a list, one name, or "all-linear"
  (every projection of a decoder layer); a regular expression is rejected."""
  if isinstance(value, (list, tuple)):
    return {str(v) for v in value}
  if isinstance(value, str):
    if value == "all-linear":
      return set(LORA_TARGETS)
    if value in LORA_TARGETS:
      return {value}
    raise ValueError(f"{source}: target_modules is the regular expression {value!r}; only a "
                     f"list of module names (from {', '.join(LORA_TARGETS)}) is supported")
  raise ValueError(f"{source}: target_modules is {value!r}, expected a list of module names")


def read_config(path: str, config: MistralConfig, head: str = "lm") -> dict:
  """The adapter_config.json of `path`, checked against `config` (rank, alpha, targets) and
  for unsupported PEFT features, without reading the tensors (a ValueError names the file
  and field)."""
  source = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(source):
    raise ValueError(f"{source}: missing; a PEFT adapter directory needs {CONFIG_FILE} and "
                     f"{WEIGHTS_FILE}")
  try:
    with open(source) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{source}: invalid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{source}: expected a JSON object")
  if meta.get("peft_type") != "LORA":
    raise ValueError(f"{source}: peft_type is {meta.get('peft_type')!r}, only 'LORA' is "
                     f"supported")
  task = meta.get("task_type")
  if task is not None and task != TASK_TYPES[head]:
    raise ValueError(f"{source}: task_type is {task!r}, but a {head!r}-head model takes "
                     f"{TASK_TYPES[head]!r} adapters")
  for field in _UNSUPPORTED:
    if meta.get(field):
      raise ValueError(f"{source}: {field}={meta[field]!r} is not supported (only plain LoRA "
                       f"on every layer, one rank and alpha for all modules)")
  bias = meta.get("bias", "none")
  if bias != "none":
    raise ValueError(f"{source}: bias={bias!r} is not supported, only 'none'")
  if not config.lora_rank:
    raise ValueError(f"{source}: the model config has lora_rank 0; set it to the adapter's "
                     f"r={meta.get('r')!r}")
  if meta.get("r") != config.lora_rank:
    raise ValueError(f"{source}: r is {meta.get('r')!r}, the model config has lora_rank "
                     f"{config.lora_rank}")
  alpha = meta.get("lora_alpha")
  if not isinstance(alpha, (int, float)) or float(alpha) != float(config.lora_alpha):
    raise ValueError(f"{source}: lora_alpha is {alpha!r}, the model config has lora_alpha "
                     f"{config.lora_alpha}")
  targets = _targets(meta.get("target_modules"), source)
  if targets != set(config.lora_targets):
    raise ValueError(f"{source}: target_modules is {sorted(targets)}, the model config has "
                     f"lora_targets {sorted(config.lora_targets)}")
  return meta


def load_adapter(path: str, config: MistralConfig, *, head: str = "lm") -> dict:
  """Reads a PEFT LoRA adapter directory (ours or `peft`'s `save_pretrained`) into our layout:
  {"layers": {"self_attn": {"q_proj": {"lora_a": [L, D, r], "lora_b": [L, r, H, hd]}, ...},
  "mlp": {...}}}, plus {"score": {"kernel": [D, 1]}} when a "scalar" adapter holds the head,
  as host NumPy arrays. float32 tensors are returned bit for bit, bf16/fp16 ones upcast.

  The adapter must match `config` (rank, alpha, targets, layer count and shapes); any
  mismatch or unsupported PEFT feature is a ValueError naming the file and field/tensor.
  """
  _check_head(head)
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"{path}: adapter directory does not exist")
  read_config(path, config, head)
  weights = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    other = " (it has adapter_model.bin: convert it to safetensors)" if os.path.isfile(
        os.path.join(path, "adapter_model.bin")) else ""
    raise ValueError(f"{weights}: missing{other}")
  L = config.num_hidden_layers
  out: dict = {}
  try:
    with safe_open(weights, framework="numpy") as f:
      names = set(f.keys())
      expected = set()

      def read(name: str, shape: tuple) -> np.ndarray:
        expected.add(name)
        if name not in names:
          raise ValueError(f"{weights}: tensor {name!r} is missing (expected shape {shape})")
        w = f.get_tensor(name)
        if tuple(w.shape) != tuple(shape):
          raise ValueError(f"{weights}: tensor {name!r} has shape {tuple(w.shape)}, expected "
                           f"{tuple(shape)}")
        if w.dtype != np.float32:
          if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
            raise ValueError(f"{weights}: tensor {name!r} has dtype {w.dtype}, expected a "
                             f"float")
          w = w.astype(np.float32)
        return w

      for flax_path, suffix, shape, _, to_flax, _ in _specs(config):
        layers = [to_flax(read(_layer_name(i, suffix), shape)) for i in range(L)]
        _set(out, flax_path, np.ascontiguousarray(np.stack(layers)))
      if head == "scalar" and SCORE_NAME in names:
        _set(out, ("score", "kernel"),
             np.ascontiguousarray(read(SCORE_NAME, (1, config.hidden_size)).T))
      extra = sorted(names - expected)
      if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ValueError(f"{weights}: unexpected tensor(s) {extra[:5]}{more} (layers beyond "
                         f"num_hidden_layers={L}, modules outside the targets, or trained "
                         f"modules this model does not take)")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{weights}: cannot read ({e}); the file may be truncated or "
                     f"corrupt") from None
  return out
