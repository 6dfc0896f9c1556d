"""Memory plan per stage: `python -m launch.plan --config=configs/pipeline.py:mistral_7b`.

Prints, for every training/generation stage of the pipeline config, the bytes
per device of params, gradients, optimizer state, activations and KV caches on
the given mesh, and whether it fits the device memory. No device is touched.
"""

from __future__ import annotations

import json

from absl import app, flags

from cai_jax import plan
from cai_jax.model import MistralConfig
from launch import runtime

_CONFIG = runtime.define_config("configs/pipeline.py:mistral_7b", "Pipeline config.")
_MESH = flags.DEFINE_list("mesh", ["1", "8", "1"], "data,fsdp,tensor sizes (no -1).")
_DEVICE_GB = flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one device, GiB.")
_JSON = flags.DEFINE_string("json", "", "Also write the numbers (bytes) to this file.")


def model_with(cfg, stage_cfg):
  m = MistralConfig.from_config(stage_cfg.model)
  over = {k: stage_cfg.get(k) for k in ("dtype", "param_dtype", "remat_policy")
          if stage_cfg.get(k)}
  return m.replace(**over, remat=bool(stage_cfg.get("remat", False)))


def _micro(stage_cfg, mesh: plan.Mesh) -> int:
  """Rows per data-parallel replica per micro-batch (0 in a config: the whole batch)."""
  return stage_cfg.micro_batch_size or max(stage_cfg.global_batch_size // mesh.batch_shards, 1)


def plan_pipeline(cfg, mesh: plan.Mesh) -> dict[str, dict]:
  stages: dict[str, dict] = {}
  gen_len = 0
  if "sl_cai" in cfg:
    g = cfg.sl_cai.generation
    gen_len = cfg.sft.max_seq_len
    stages["sl_cai generation"] = plan.generation_stage(
        model_with(cfg, cfg.sft), mesh, batch=cfg.sl_cai.backend.batch_size,
        total_len=min(gen_len + g.max_new_tokens, 2 * gen_len))
  s = cfg.sft
  stages["sft"] = plan.train_stage(model_with(cfg, s), mesh, micro_batch=_micro(s, mesh),
                                   seq=s.max_seq_len, remat=s.remat)
  r = cfg.rm
  stages["reward model"] = plan.train_stage(model_with(cfg, r), mesh, micro_batch=2 * _micro(r, mesh),
                                            seq=r.max_seq_len, remat=r.remat, head="scalar")
  p = cfg.ppo
  actor = model_with(cfg, p)
  responses = p.rollout_batch_size * p.ppo.samples_per_prompt
  stages[p.ppo.advantage if p.ppo.advantage != "gae" else "ppo"] = plan.ppo_stage(
      actor, actor, mesh, rollout_batch=responses, prompt_len=p.max_prompt_len,
      new_tokens=p.ppo.max_new_tokens, minibatch=responses // p.ppo.num_minibatches,
      remat=p.remat, frozen_dtype=p.frozen_dtype or None, with_critic=p.ppo.advantage == "gae")
  return stages


def main(argv):
  del argv
  sizes = [int(x) for x in _MESH.value]
  mesh = plan.Mesh(*sizes)
  stages = plan_pipeline(_CONFIG.value, mesh)
  m = MistralConfig.from_config(_CONFIG.value.sft.model)
  print(f"model: {m.num_params('lm'):,} params (LM head), {m.num_params('scalar'):,} (scalar head); "
        f"mesh data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor} ({mesh.devices} devices)")
  print(plan.format_table(stages, _DEVICE_GB.value))
  if _JSON.value:
    from cai_jax.data import jsonl
    jsonl.atomic_write_json(_JSON.value, {k: {kk: float(vv) for kk, vv in v.items()}
                                          for k, v in stages.items()})


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
