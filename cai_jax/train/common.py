"""Set-up shared by the training stages: mesh, model loading, host->device batches."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cai_jax import checkpoint, parallel
from cai_jax.data import jsonl
from cai_jax.model import MistralConfig, init_params, lora, param_shardings


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


class Trained(NamedTuple):
  """A model as a stage trains it: `params` are the leaves the optimizer updates (all of them
  under full fine-tuning; the adapters, plus a head where the stage trains one, under LoRA)
  and `frozen` the rest ({} under full fine-tuning). `config` has the stage's LoRA fields."""
  config: MistralConfig
  params: Any
  shardings: Any
  frozen: Any
  frozen_shardings: Any
  base: dict               # where the frozen base came from (`BasePointer`), {} if nothing

  def full(self, params=None) -> tuple[Any, Any]:
    """(every leaf of the model, their shardings), with `params` for the trained ones."""
    return (lora.combine(self.params if params is None else params, self.frozen),
            lora.combine(self.shardings, self.frozen_shardings))


def lora_rank(cfg) -> int:
  return int(cfg.lora.rank) if cfg.get("lora") is not None else 0


def with_lora(config: MistralConfig, lora_cfg) -> MistralConfig:
  """`config` with the adapters a stage's `lora` block describes (rank 0: none)."""
  return config.replace(lora_rank=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha),
                        lora_dropout=float(lora_cfg.dropout), lora_targets=lora_cfg.targets)


def load_trained(cfg, mesh: Mesh, *, head: str = "lm", init_from: str | None = None,
                 seed: int = 0, allow_head_change: bool = False,
                 trained_heads: tuple[str, ...] = (), frozen_base=None) -> Trained:
  """The model a stage trains, created or restored directly on the mesh (`load_or_init`).

  With `cfg.lora.rank` 0 every param is trained. Otherwise the base is loaded in
  `cfg.lora.base_dtype` (default: the param dtype) and frozen; the adapters start fresh (A
  random, B zero: the model computes what the base does) or from the PEFT adapter
  `cfg.lora.init_adapter`, and together with `trained_heads` (e.g. ("score",)) they are
  trained, in float32. `frozen_base` = (config, params, shardings) of a base already on the
  mesh (PPO's critic on the reward model's body) is used instead of loading one.
  """
  rank = lora_rank(cfg)
  if not rank:
    config, params, shardings = load_or_init(cfg, mesh, head=head, init_from=init_from,
                                             seed=seed, allow_head_change=allow_head_change)
    return Trained(config, params, shardings, {}, {}, {})
  init_from = cfg.get("init_from", "") if init_from is None else init_from
  if frozen_base is None:
    base_cfg = cfg
    if cfg.lora.base_dtype:
      base_cfg = cfg.copy_and_resolve_references()
      with base_cfg.unlocked():
        base_cfg.param_dtype = cfg.lora.base_dtype
    frozen_base = load_or_init(base_cfg, mesh, head=head, init_from=init_from, seed=seed,
                               allow_head_change=allow_head_change)
  config, base, base_sh = frozen_base
  config = with_lora(config, cfg.lora)
  trained = lora.trainable_leaves(trained_heads)     # of the base: the heads it trains
  heads, frozen = lora.split(base, trained)
  heads_sh, frozen_sh = lora.split(base_sh, trained)
  heads = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t),
                  out_shardings=heads_sh)(heads)
  adapters, adapters_sh = lora.init_adapters(config, mesh, jax.random.PRNGKey(seed + 17),
                                             head=head)
  if cfg.lora.init_adapter:
    from cai_jax import peft
    loaded = peft.load_adapter(cfg.lora.init_adapter, config, head=head)
    loaded_adapters, loaded_heads = lora.split(loaded)
    adapters = jax.device_put(loaded_adapters, adapters_sh)
    if loaded_heads:
      heads = jax.device_put({**heads, **loaded_heads}, heads_sh)
  return Trained(config, lora.combine(adapters, heads), lora.combine(adapters_sh, heads_sh),
                 frozen, frozen_sh, base_pointer(init_from))


def training_summary(trained: Trained) -> dict:
  """How a model trains, for reports and the log: LoRA rank (0: full fine-tuning), trained and
  total parameter counts."""
  n = lora.count(trained.params)
  return {"lora_rank": trained.config.lora_rank, "trained_params": n,
          "total_params": n + lora.count(trained.frozen)}


def describe_trained(trained: Trained) -> str:
  """"full fine-tuning, N params" or "LoRA rank r: N trained of M params" (for the log)."""
  s = training_summary(trained)
  n, total = s["trained_params"], s["total_params"]
  if not s["lora_rank"]:
    return f"full fine-tuning, {n:,} params"
  return f"LoRA rank {s['lora_rank']}: {n:,} trained of {total:,} params ({100 * n / total:.2f}%)"


def base_pointer(init_from: str) -> dict:
  """What a LoRA checkpoint records of its frozen base (the weights themselves are not copied
  into every checkpoint): the directory, the SHA-256 of its config.json and a fingerprint of
  its files (names, sizes, modification times: a base written again, e.g. by a rerun SFT, is
  another base; hashing 14 GB of weights at every start would cost minutes)."""
  if not init_from:
    return {"path": "", "config_sha256": "", "files": ""}
  listing = []
  for root, dirs, names in os.walk(init_from):
    dirs.sort()
    for name in sorted(names):
      st = os.stat(os.path.join(root, name))
      listing.append(f"{os.path.relpath(os.path.join(root, name), init_from)}\0{st.st_size}"
                     f"\0{st.st_mtime_ns}")
  return {"path": os.path.abspath(init_from),
          "config_sha256": jsonl.file_sha256(os.path.join(init_from, "config.json")),
          "files": hashlib.sha256("\n".join(listing).encode()).hexdigest()}


class BasePointer:
  """Host-side state of a LoRA run for the training loop's checkpoints (`host_state`): the
  frozen base's pointer is saved with every checkpoint, and a resume refuses a base that is
  not the one the adapters were trained on."""

  def __init__(self, pointer: dict):
    self.pointer = dict(pointer)

  def state(self) -> dict:
    return self.pointer

  def restore(self, saved: dict) -> None:
    keys = ("config_sha256", "files")
    if any(saved.get(k) != self.pointer.get(k) for k in keys):
      from cai_jax.train.checkpointing import CheckpointRestoreError
      raise CheckpointRestoreError(
          f"the checkpoint's adapters were trained on the base {saved.get('path')!r} "
          f"({', '.join(f'{k} {saved.get(k)}' for k in keys)}); this run loads "
          f"{self.pointer.get('path')!r} ({', '.join(f'{k} {self.pointer.get(k)}' for k in keys)})"
          "; point init_from at the original base or use another workdir")


def host_state_of(trained: Trained) -> dict:
  """The loop's `host_state` entries a trained model adds (its base pointer under LoRA)."""
  return {"lora_base": BasePointer(trained.base)} if trained.config.lora_rank else {}


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


def export_trained(out_dir: str, trained: Trained, params: Any, *, head: str = "lm",
                   hf: bool = True, tokenizer_path: str | None = None) -> dict:
  """`export_model` of the trained model (`params`: its trained leaves). Under LoRA the model
  exported is the merge (every kernel W + scale * B A, no adapters) and the adapters alone
  are also written in Hugging Face PEFT format to `adapter/` (`cai_jax.peft`)."""
  full, _ = trained.full(params)
  if not trained.config.lora_rank:
    return export_model(out_dir, trained.config, full, head=head, hf=hf,
                        tokenizer_path=tokenizer_path)
  from cai_jax import peft
  config, merged = lora.merge(trained.config, full)
  paths = export_model(out_dir, config, merged, head=head, hf=hf, tokenizer_path=tokenizer_path)
  paths["adapter"] = os.path.join(out_dir, "adapter")
  peft.save_adapter(paths["adapter"], trained.config, params, head=head,
                    base_model=trained.base.get("path", ""))
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
