"""Set-up shared by the training stages: mesh, model loading, host->device batches."""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from cai_jax import checkpoint, parallel
from cai_jax.data import jsonl
from cai_jax.model import MistralConfig, init_params, param_shardings


def model_config_from(cfg) -> MistralConfig:
  """The stage's `config.model` block as a MistralConfig."""
  return MistralConfig.from_config(cfg.model)


def _overrides(cfg) -> dict:
  return {k: v for k, v in dict(dtype=cfg.get("dtype", None) or None,
                                param_dtype=cfg.get("param_dtype", None) or None,
                                remat=cfg.get("remat", None),
                                remat_policy=cfg.get("remat_policy", None) or None,
                                attention_impl=cfg.get("attention_impl", None) or None).items()
          if v is not None}


def load_or_init(cfg, mesh: Mesh, *, head: str = "lm", init_from: str | None = None,
                 seed: int = 0, allow_head_change: bool = False):
  """Params for a stage, created or restored directly on the mesh.

  From `init_from` (an HF or cai_jax model dir) or, if empty, random
  `config.model`. `cfg.dtype` / `cfg.param_dtype` / `cfg.remat` / `cfg.remat_policy` (if set)
  override the checkpoint's. With `allow_head_change`, an LM checkpoint
  initialises a scalar-head model (the reward model from the SFT model): the
  body is loaded and the scalar head starts random.
  Returns (MistralConfig, params, param shardings).
  """
  init_from = cfg.get("init_from", "") if init_from is None else init_from
  rng = jax.random.PRNGKey(seed)
  if not init_from:
    config = model_config_from(cfg).replace(**_overrides(cfg))
    params, shardings = init_params(config, mesh, rng, head=head)
    return config, params, shardings

  config, saved_head = checkpoint.read_model_config(init_from)
  config = config.replace(**_overrides(cfg))
  if saved_head != head and not allow_head_change:
    raise ValueError(f"{init_from}: holds a {saved_head!r}-head model; this stage needs {head!r}")
  _, params, _ = checkpoint.load_model(
      init_from, head=saved_head, shardings=param_shardings(config, mesh, saved_head),
      param_dtype=config.param_dtype)
  shardings = param_shardings(config, mesh, head)
  if saved_head != head:
    fresh, _ = init_params(config, mesh, rng, head=head)
    params = {k: v for k, v in params.items() if k not in ("lm_head", "score")}
    params.update({k: fresh[k] for k in ("lm_head", "score") if k in fresh})
  return config, params, shardings


def make_put_batch(mesh: Mesh):
  """Host batch (this process's rows) -> global arrays sharded over ('data', 'fsdp')."""

  def put(batch: dict) -> dict:
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      sharding = parallel.batch_sharding(mesh, v.ndim)
      global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
      out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out

  return put


def batch_shardings_for(mesh: Mesh, example_batch: dict) -> dict:
  return {k: parallel.batch_sharding(mesh, np.asarray(v).ndim) for k, v in example_batch.items()}


def accumulation_steps(global_batch: int, micro_batch: int, mesh: Mesh) -> int:
  """NeMo semantics: micro_batch_size is per data-parallel replica; 0 = no accumulation."""
  dp = parallel.data_parallel_size(mesh)
  if micro_batch <= 0:
    if global_batch % dp:
      raise ValueError(f"global_batch_size={global_batch} is not a multiple of the "
                       f"data-parallel size {dp}")
    return 1
  per_step = micro_batch * dp
  if global_batch % per_step:
    raise ValueError(f"global_batch_size={global_batch} is not a multiple of micro_batch_size="
                     f"{micro_batch} x data-parallel size {dp}")
  return global_batch // per_step


def export_model(out_dir: str, config: MistralConfig, params: Any, *, head: str = "lm",
                 hf: bool = True, tokenizer_path: str | None = None) -> dict:
  """Final model as a cai_jax dir (orbax) and, optionally, HF safetensors.

  The tokenizer is copied next to the weights as `tokenizer.model` (HF's
  convention), so the next stage needs only the model directory.
  """
  paths = {"model": os.path.join(out_dir, "model")}
  checkpoint.save_model(paths["model"], config, params, head=head)
  if hf:
    paths["hf"] = os.path.join(out_dir, "hf")
    checkpoint.save_hf(paths["hf"], config, params, head=head)
  if tokenizer_path and jax.process_index() == 0:
    for p in paths.values():
      shutil.copyfile(tokenizer_path, os.path.join(p, "tokenizer.model"))
    if hf:
      _set_hf_pad_token(paths["hf"], tokenizer_path)
  return paths


def _set_hf_pad_token(hf_dir: str, tokenizer_path: str) -> None:
  """Records the tokenizer's pad id in the HF config.json.

  `MistralForSequenceClassification` finds each row's last real token by
  looking for `pad_token_id` and refuses batches of more than one row without
  it, so an exported reward model would not score right-padded batches in
  `transformers` the way it was trained (reward at the last non-pad token).
  """
  from cai_jax.tokenizer import Tokenizer
  path = os.path.join(hf_dir, "config.json")
  hf_config = jsonl.read_json(path)
  hf_config["pad_token_id"] = int(Tokenizer.from_file(tokenizer_path).pad_id)
  jsonl.atomic_write_json(path, hf_config)
