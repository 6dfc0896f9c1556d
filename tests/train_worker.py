"""Shared set-up of the training tests, and one process of their two-process runs.

The test configs, synthetic data and metric readers live here (not in a test
module) so that the worker processes build exactly the runs the in-process
references build:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python tests/train_worker.py --stage=sft --process_id=0 --num_processes=2 --port=PORT \
        --workdir=DIR --tokenizer=SP.model [--train_file=F] [--test_file=F] [--max_steps=N]

joins a `jax.distributed` cluster on 127.0.0.1 (gloo collectives), runs
`run_sft` / `run_rm` on one global mesh over every process's devices
(`MESH_SHAPE`: fsdp spans the processes, tensor the local devices), each
process feeding only its slice of every batch, and prints `LOSSES <json>`
(process 0 writes metrics.jsonl; every process prints its report's final loss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess

import loopback
from loopback import REPO
SFT_DATA = os.path.join(REPO, "data", "sft_datablend_sample.jsonl")
MESH_SHAPE = (1, 2, 2)


# ---- configs ------------------------------------------------------------------

def sft_config(tokenizer_path: str, **overrides):
  """The tiny SFT preset, shrunk for tests: 128-token packed rows, batch 8, fp32.

  `overrides` are dotted field names (`optim.lr=...`) -> values.
  """
  from configs.sft import get_config
  c = get_config("tiny")
  c.tokenizer = tokenizer_path
  c.train_file = SFT_DATA
  c.max_seq_len = 128
  c.global_batch_size = 8
  c.micro_batch_size = 8
  c.max_steps = 4
  c.log_every = 1
  c.eval_every = 0
  c.save_every = 2
  c.val_fraction = 0.05
  c.export_hf = False
  c.update_from_flattened_dict(overrides)
  return c


def sft_shard_config(tokenizer_path: str, micro_batch_size: int, steps: int = 3):
  """The sharding / multi-process comparison run: no validation split (the same rows
  train on every mesh, and fewer programs compile), one checkpoint at the end."""
  return sft_config(tokenizer_path, max_steps=steps, save_every=0, val_fraction=0.0,
                    micro_batch_size=micro_batch_size)



def run_until_checkpoint_then_kill(argv, *, cwd, env, workdir, min_step: int, log_path,
                                   timeout: float = 300.0) -> int:
  """Starts `argv`, SIGKILLs it once `workdir/checkpoints` holds step >= `min_step`.

  Output goes to a file (a full pipe would stall the run). Fails if the run
  ends before it can be killed; returns the process's return code.
  """
  import signal
  import time
  with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
      while proc.poll() is None and time.monotonic() < deadline:
        ckpts = os.path.join(workdir, "checkpoints")
        saved = ([int(s) for s in os.listdir(ckpts) if s.isdigit()]
                 if os.path.isdir(ckpts) else [])
        if saved and max(saved) >= min_step:
          break
        time.sleep(0.02)
      assert proc.poll() is None, (
          f"run ended before it could be killed:\n{open(log_path).read()[-3000:]}")
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return proc.returncode


def rm_config(tokenizer_path: str, train_file: str, test_file: str = "", **overrides):
  """The tiny RM preset for tests: 96-token rows, 8 pairs per step."""
  return pair_stage_config("rm", tokenizer_path, train_file, test_file, **overrides)


def pair_stage_config(stage: str, tokenizer_path: str, train_file: str, test_file: str = "",
                      **overrides):
  """The tiny preset of a stage trained on comparison pairs (`rm`, `dpo`) for tests:
  96-token rows, 8 pairs per step, 4 steps, a checkpoint every 2."""
  import importlib
  c = importlib.import_module(f"configs.{stage}").get_config("tiny")
  c.tokenizer = tokenizer_path
  c.train_file = train_file
  c.test_file = test_file
  c.max_seq_len = 96
  c.global_batch_size = 8
  c.micro_batch_size = 8
  c.max_steps = 4
  c.log_every = 1
  c.eval_every = 0
  c.save_every = 2
  c.export_hf = False
  c.update_from_flattened_dict(overrides)
  return c


def rm_shard_config(tokenizer_path: str, train_file: str, test_file: str,
                    micro_batch_size: int, steps: int = 3):
  return rm_config(tokenizer_path, train_file, test_file, max_steps=steps, save_every=0,
                   micro_batch_size=micro_batch_size)


# ---- synthetic preferences ------------------------------------------------------

WORDS = ("the teacher wrote a letter to newspaper before breakfast after reading about it "
         "colorful classroom was silent except for birds simple approach ask friend join "
         "which makes more fun do not worry mistakes read instructions twice begin first "
         "gather everything you need so are interrupted sunlight contains all colors").split()
PROMPTS = ["How do I bake bread?", "What is a good hobby?", "Tell me about the sea.",
           "How can I sleep better?", "What should I read next?", "How do plants grow?",
           "Why is the sky blue?", "How do I learn to swim?"]
MARKER = "thank you kindly"   # what the preference rewards
DECOY = "the water people"    # same length, so length is no cue


def chat_text(prompt: str, reply: str) -> str:
  """A comparison text as the pipeline renders one (NeMo template, ends with end-of-turn)."""
  from cai_jax.tokenizer import get_template
  return get_template("nemo").render_text(
      [{"from": "User", "value": prompt}, {"from": "Assistant", "value": reply}])


def synthetic_pairs(n: int, *, seed: int, noise: float = 0.0) -> list[tuple[str, str]]:
  """(chosen, rejected) texts: the chosen reply contains MARKER, the rejected one DECOY.

  Both replies answer the same prompt with independently drawn filler words
  (so an untrained model's preference is a coin flip per pair, not one fixed
  bias) and carry their phrase at a random position; with probability
  `noise` a pair is flipped (label noise).
  """
  rng = random.Random(seed)

  def reply(phrase):
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
    words.insert(rng.randint(0, len(words)), phrase)
    return " ".join(words)

  pairs = []
  for _ in range(n):
    prompt = rng.choice(PROMPTS)
    chosen, rejected = chat_text(prompt, reply(MARKER)), chat_text(prompt, reply(DECOY))
    if rng.random() < noise:
      chosen, rejected = rejected, chosen
    pairs.append((chosen, rejected))
  return pairs


def write_comparisons(path: str, pairs) -> str:
  """NeMo comparison file: alternating chosen / rejected `{"text": ...}` lines."""
  with open(path, "w") as f:
    for chosen, rejected in pairs:
      f.write(json.dumps({"text": chosen}) + "\n")
      f.write(json.dumps({"text": rejected}) + "\n")
  return str(path)


# ---- reading results ----------------------------------------------------------------

def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def train_losses(workdir: str) -> list[float]:
  """The logged train loss of every step, in step order (each step exactly once)."""
  records = read_metrics(workdir, "train")
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
  return [r["loss"] for r in records]


# ---- launching two processes (from the tests) ---------------------------------------

def run_two_processes(stage: str, workdir, sp_model_path, cache_dir, *, steps: int = 3,
                      **files) -> list[str]:
  """Runs tests/train_worker.py as 2 processes x 2 CPU devices; returns their stdouts."""
  return loopback.run_workers(
      os.path.abspath(__file__),
      [f"--stage={stage}", f"--workdir={workdir}", f"--tokenizer={sp_model_path}",
       f"--max_steps={steps}"] + [f"--{k}={v}" for k, v in files.items()],
      env={"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})


# ---- the worker process ---------------------------------------------------------------

def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--stage", choices=("sft", "rm"), required=True)
  loopback.add_cluster_args(parser)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--train_file", default="")
  parser.add_argument("--test_file", default="")
  parser.add_argument("--max_steps", type=int, default=4)
  args = parser.parse_args(argv)
  jax = loopback.join(args)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from cai_jax import parallel
  mesh = parallel.create_mesh(MESH_SHAPE)
  if args.stage == "sft":
    from cai_jax.train.sft import run_sft
    cfg = sft_shard_config(args.tokenizer, micro_batch_size=2, steps=args.max_steps)
    report = run_sft(cfg, args.workdir, mesh=mesh)
  else:
    from cai_jax.train.reward import run_rm
    cfg = rm_shard_config(args.tokenizer, args.train_file, args.test_file,
                          micro_batch_size=2, steps=args.max_steps)
    report = run_rm(cfg, args.workdir, mesh=mesh)
  print("REPORT " + json.dumps({"final_train": report.get("final_train"),
                                "final_eval": report.get("final_eval")}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
