"""Memory plan per stage: `python -m launch.plan --config=configs/pipeline.py:mistral_7b`.

Prints, for every training/generation stage of the pipeline config, the bytes
per device of params, gradients, optimizer state, activations and KV caches on
the given mesh, and whether it fits the device memory. No device is touched.

The RL stage is planned phase by phase (`cai_jax.plan.total`): its models plus the largest
of the rollout's KV cache, the score's forwards and the update's activations, each for the
micro-batch its `ppo.*micro_batch_size` knob sets (rows per data-parallel replica).

A trained stage (sft, rm, ppo) with `lora.rank > 0` is planned as LoRA: frozen base in
`lora.base_dtype` (else PPO's `frozen_dtype`, else `param_dtype`) plus trained adapters. A
pipeline-level `lora` block with rank > 0 applies to every stage whose own rank is 0 (as
`launch.pipeline` does), so `--config.lora.rank=16` plans every stage with LoRA and
`--config.ppo.lora.rank=16` only PPO.
"""

from __future__ import annotations

import json

from absl import app, flags

from cai_jax import plan
from cai_jax.model import MistralConfig
from cai_jax.model.config import LORA_TARGETS
from configs.pipeline import apply_lora
from launch import runtime

_CONFIG = runtime.define_config("configs/pipeline.py:mistral_7b", "Pipeline config.")
_MESH = flags.DEFINE_list("mesh", ["1", "8", "1"], "data,fsdp,tensor sizes (no -1).")
_DEVICE_GB = flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one device, GiB.")
_JSON = flags.DEFINE_string("json", "", "Also write the numbers (bytes) to this file.")


def stage_lora(stage_cfg):
  """The `lora` block a stage trains with, or None (full fine-tuning)."""
  block = stage_cfg.get("lora")
  return block if block is not None and int(block.get("rank", 0)) > 0 else None


def model_with(stage_cfg):
  """The stage's model config: its dtype, remat and LoRA settings over its `model` block."""
  m = MistralConfig.from_config(stage_cfg.model)
  over = {k: stage_cfg.get(k) for k in ("dtype", "param_dtype", "remat_policy")
          if stage_cfg.get(k)}
  lora = stage_lora(stage_cfg)
  if lora is not None:
    over["lora_rank"] = int(lora.rank)
    if lora.get("targets"):
      over["lora_targets"] = lora.targets
  return m.replace(**over, remat=bool(stage_cfg.get("remat", False)))


def _base_dtype(stage_cfg) -> str | None:
  """A LoRA stage's `lora.base_dtype`, or None (the stage's default)."""
  lora = stage_lora(stage_cfg)
  return (lora.get("base_dtype") or None) if lora is not None else None


def describe(stage_cfg, model: MistralConfig, default_base: str) -> str:
  """How a trained stage trains, for the table: full fine-tuning or LoRA's rank, targets,
  adapter count and base dtype."""
  if not model.lora_rank:
    return f"full fine-tuning, {model.param_dtype} params"
  base = _base_dtype(stage_cfg) or default_base
  targets = ("all projections" if set(model.lora_targets) == set(LORA_TARGETS)
             else ",".join(model.lora_targets))
  return (f"LoRA rank {model.lora_rank} on {targets}: "
          f"{plan.lora_params(model):,} adapter params, {base} frozen base")


def _micro(stage_cfg, mesh: plan.Mesh) -> int:
  """Rows per data-parallel replica per micro-batch (0 in a config: the whole batch)."""
  return stage_cfg.micro_batch_size or max(stage_cfg.global_batch_size // mesh.batch_shards, 1)


def plan_pipeline(cfg, mesh: plan.Mesh, notes: dict | None = None) -> dict[str, dict]:
  """{stage: {component: bytes per device}}; `notes`, if given, receives {stage: how it
  trains} for the trained stages."""
  stages: dict[str, dict] = {}
  notes = {} if notes is None else notes
  cfg = cfg.copy_and_resolve_references()
  apply_lora(cfg)              # the pipeline's lora block, as launch.pipeline applies it
  gen_len = 0
  if "sl_cai" in cfg:
    g = cfg.sl_cai.generation
    gen_len = cfg.sft.max_seq_len
    stages["sl_cai generation"] = plan.generation_stage(
        model_with(cfg.sft), mesh, batch=cfg.sl_cai.backend.batch_size,
        total_len=min(gen_len + g.max_new_tokens, 2 * gen_len))
  s = cfg.sft
  m = model_with(s)
  stages["sft"] = plan.train_stage(m, mesh, micro_batch=_micro(s, mesh), seq=s.max_seq_len,
                                   remat=s.remat, base_dtype=_base_dtype(s))
  notes["sft"] = describe(s, m, m.param_dtype)
  r = cfg.rm
  m = model_with(r)
  stages["reward model"] = plan.train_stage(m, mesh, micro_batch=2 * _micro(r, mesh),
                                            seq=r.max_seq_len, remat=r.remat, head="scalar",
                                            base_dtype=_base_dtype(r))
  notes["reward model"] = describe(r, m, m.param_dtype)
  p = cfg.ppo
  actor = model_with(p)
  responses = p.rollout_batch_size * p.ppo.samples_per_prompt
  name = p.ppo.advantage if p.ppo.advantage != "gae" else "ppo"
  stages[name] = plan.ppo_stage(
      actor, actor, mesh, rollout_batch=responses, prompt_len=p.max_prompt_len,
      new_tokens=p.ppo.max_new_tokens, minibatch=responses // p.ppo.num_minibatches,
      remat=p.remat, frozen_dtype=p.frozen_dtype or None, with_critic=p.ppo.advantage == "gae",
      base_dtype=_base_dtype(p),
      rollout_micro_batch=p.ppo.get("rollout_micro_batch_size", 0),
      forward_micro_batch=p.ppo.get("forward_micro_batch_size", 0),
      micro_batch=p.ppo.get("micro_batch_size", 0))
  notes[name] = describe(p, actor, p.frozen_dtype or actor.param_dtype)
  return stages


def main(argv):
  del argv
  sizes = [int(x) for x in _MESH.value]
  mesh = plan.Mesh(*sizes)
  notes: dict[str, str] = {}
  stages = plan_pipeline(_CONFIG.value, mesh, notes)
  m = MistralConfig.from_config(_CONFIG.value.sft.model)
  print(f"model: {m.num_params('lm'):,} params (LM head), {m.num_params('scalar'):,} "
        f"(scalar head); mesh data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor} "
        f"({mesh.devices} devices)")
  print(plan.format_table(stages, _DEVICE_GB.value, notes))
  if _JSON.value:
    from cai_jax.data import jsonl
    jsonl.atomic_write_json(_JSON.value, {k: {kk: float(vv) for kk, vv in v.items()}
                                          for k, v in stages.items()})


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
