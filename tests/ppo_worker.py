"""Shared set-up for the PPO tests, and one process of the two-process PPO run.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python tests/ppo_worker.py --process_id=0 --num_processes=2 --port=PORT \
        --workdir=DIR --tokenizer=SP.model --train_prompts=F.jsonl

As a script: joins a `jax.distributed` cluster on 127.0.0.1 (gloo CPU
collectives) and runs `run_ppo` for one iteration on a (data 1, fsdp 2,
tensor 2) mesh whose fsdp axis spans both processes, writing into the shared
workdir. As a module: the config, prompts and synthetic reward that
tests/test_ppo.py uses, so the single-process reference is built from exactly
the same definitions.
"""

from __future__ import annotations

import argparse
import os
import sys

import loopback
from loopback import REPO
RED_TEAM = os.path.join(REPO, "data", "red_team_attempts_sample.jsonl")

# The synthetic reward: the fraction of response tokens whose id lies in
# [TARGET_LO, TARGET_HI), a quarter of the 512-token test vocabulary. A random
# tiny policy starts near 0.25-0.3; only a policy that learns to prefer those
# ids (a property of every context, so it generalises to held-out prompts) can
# raise it.
TARGET_LO, TARGET_HI = 256, 384
NUM_TRAIN = 100       # red-team prompts 0..99 train, the rest (31) are held out
NUM_LONG = 3          # over-long prompts appended to the training file


def target_fraction_reward(prompt_len: int):
  """reward_fn(seq, valid, positions, last_col) -> [B]: jittable, from seq/valid only."""
  import jax.numpy as jnp

  def reward_fn(seq, valid, positions, last_col):
    del positions, last_col
    response, mask = seq[:, prompt_len:], valid[:, prompt_len:]
    hit = (response >= TARGET_LO) & (response < TARGET_HI) & mask
    return jnp.sum(hit, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)

  return reward_fn


def write_prompt_files(out_dir: str, tokenizer_path: str, max_prompt_len: int = 64):
  """Red-team prompts (first human turn) rendered with the NeMo template as
  `{"text": ...}` records: (train path, held-out path). The train file ends with
  NUM_LONG prompts longer than `max_prompt_len` tokens, which PPO must drop."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from cai_jax.data import jsonl
  from cai_jax.data.sources import read_red_team_prompts
  from cai_jax.tokenizer import Tokenizer, get_template

  template = get_template("nemo")
  tokenizer = Tokenizer.from_file(tokenizer_path)
  prompts, _ = read_red_team_prompts(RED_TEAM)
  render = lambda p: {"text": template.render_prompt([{"from": "User", "value": p}])}
  records = [render(p) for p in prompts]
  assert all(len(template.encode(tokenizer, r["text"])) <= max_prompt_len for r in records)
  long = [render(" ".join(prompts[i:i + 6])) for i in range(NUM_LONG)]
  assert all(len(template.encode(tokenizer, r["text"])) > max_prompt_len for r in long)
  os.makedirs(out_dir, exist_ok=True)
  train = os.path.join(out_dir, "train_prompts.jsonl")
  val = os.path.join(out_dir, "val_prompts.jsonl")
  jsonl.atomic_write_jsonl(train, records[:NUM_TRAIN] + long)
  jsonl.atomic_write_jsonl(val, records[NUM_TRAIN:])
  return train, val


def make_config(tokenizer_path: str, train_prompts: str, val_prompts: str = "", **overrides):
  """The tiny preset with a random actor (actor_init=""), made small for tests.

  `overrides` use dotted names: make_config(..., **{"ppo.init_kl_coef": 5.0}).
  """
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import ppo as ppo_config
  cfg = ppo_config.get_config("tiny")
  cfg.tokenizer = tokenizer_path
  cfg.train_prompts = train_prompts
  cfg.val_prompts = val_prompts
  cfg.ppo.max_new_tokens = 8       # short responses keep the tests fast
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  cfg.iterations = 1
  cfg.rollout_batch_size = 16
  cfg.eval_every = 0
  cfg.save_every = 0
  cfg.sample_every = 1
  cfg.export_hf = False
  cfg.update_from_flattened_dict(overrides)
  return cfg


def config_from_files(tokenizer_path: str, prompt_files: tuple[str, str], **overrides):
  """`make_config` on the (train, held-out) prompt files of `write_prompt_files`;
  `train_prompts=` / `val_prompts=` in `overrides` replace either."""
  train = overrides.pop("train_prompts", prompt_files[0])
  val = overrides.pop("val_prompts", prompt_files[1])
  return make_config(tokenizer_path, train, val, **overrides)


def reward(cfg):
  """The synthetic reward the RL tests train on, for `cfg`'s prompt length."""
  return target_fraction_reward(cfg.max_prompt_len)


# Wall-clock and throughput numbers differ from run to run; everything else must not.
TIMING_KEYS = {"time", "rollout_seconds", "score_seconds", "update_seconds",
               "rollout_tokens_per_sec"}


def train_metrics(workdir: str) -> list[dict]:
  """A run's logged train records without the timing fields."""
  from cai_jax.metrics import read_metrics
  return [{k: v for k, v in m.items() if k not in TIMING_KEYS}
          for m in read_metrics(os.path.join(workdir, "metrics.jsonl"), split="train")]


def assert_metrics_close(got: dict, want: dict, tol: float = 1e-4,
                         loose: dict | None = None) -> None:
  """The same metrics, within `tol` (or `loose[name]` for the names it lists); a non-finite
  value (logged as its name) must match exactly."""
  import numpy as np
  assert set(got) == set(want)
  for k in want:
    if isinstance(want[k], str):
      assert got[k] == want[k], k
    else:
      bound = (loose or {}).get(k, tol)
      np.testing.assert_allclose(got[k], want[k], atol=bound, rtol=bound, err_msg=k)


def main(argv=None):
  parser = argparse.ArgumentParser()
  loopback.add_cluster_args(parser)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--train_prompts", required=True)
  parser.add_argument("--export_hf", type=int, default=0)
  parser.add_argument("--advantage", default="gae")
  parser.add_argument("--samples_per_prompt", type=int, default=1)
  args = parser.parse_args(argv)
  jax = loopback.join(args)
  assert jax.process_count() == args.num_processes and jax.local_device_count() == 2
  from cai_jax.train.ppo import run_ppo
  cfg = make_config(args.tokenizer, args.train_prompts, export_hf=bool(args.export_hf), **{
      "ppo.advantage": args.advantage, "ppo.samples_per_prompt": args.samples_per_prompt})
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 2, 2
  report = run_ppo(cfg, args.workdir, reward_fn=target_fraction_reward(cfg.max_prompt_len))
  print(f"SCORE {report['final_train']['score_mean']!r}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
