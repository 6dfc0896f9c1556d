"""Smoke tests of the benchmark harness (`launch.benchmark`).

Every mode runs on the tiny preset, one repetition, with small shapes: this
checks that both sides run on the same weights and that the table and JSON
keep their shape, so the benchmark never rots between real measurements. It
says nothing about speed (the numbers of a loaded test machine are noise).
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

from launch.benchmark import MODES, suite  # noqa: E402
from launch.benchmark import report as report_lib  # noqa: E402
from launch.benchmark.hardware import decode_step_floor  # noqa: E402
from launch.benchmark.workload import Shapes  # noqa: E402

SHAPES = Shapes(model_batch=2, model_seq=16, gen_batches=(2,), gen_prompt=8, gen_new=4,
                sft_batch=2, sft_seq=16, ppo_batch=2, ppo_prompt=8, ppo_new=4, grpo_prompts=2,
                grpo_group=2, grpo_prompt=8, grpo_new=4, dpo_batch=2, dpo_prompt=8, dpo_reply=8)
EXPECTED = {
    "model": ["forward tokens/s", "forward GFLOP/s", "fwd+bwd tokens/s", "fwd+bwd GFLOP/s"],
    "attention": ["xla forward ms", "xla forward+backward ms"],
    "generate": ["decode tok/s b2", "TTFT ms b2"],
    "sft": ["train tokens/s", "MFU %"],
    "ppo": ["rollout s", "score s", "update s", "iteration s", "rollout tok/s"],
    "grpo": ["rollout s", "score s", "update s", "iteration s"],
    "dpo": ["step s"],
    "lora": ["train tokens/s", "MFU %"],
}
# The modes `test_every_mode_on_tiny` runs; the preference-training modes have their own test.
FIRST_MODES = ["model", "attention", "generate", "sft", "ppo"]
# The GPU mode's code path on this CPU: tiny model, two decode batches, an extra SFT shape.
GPU_SHAPES = Shapes(model_batch=2, model_seq=32, gen_batches=(1, 2), gen_prompt=8, gen_new=4,
                    sft_batch=2, sft_seq=16, sft_extra=((1, 32),), ppo_batch=2, ppo_prompt=8,
                    ppo_new=4, grpo_prompts=2, grpo_group=2, grpo_prompt=8, grpo_new=4,
                    dpo_batch=2, dpo_prompt=8, dpo_reply=8)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_rows(rows, modes, expected=EXPECTED, no_reference=()):
  assert [(r["mode"], r["metric"]) for r in rows] == [(m, k) for m in modes for k in expected[m]]
  for r in rows:
    if (r["mode"], r["metric"]) in no_reference:
      assert r["reference"] is None and r["speedup"] is None
      continue
    for key in ("cai_jax", "reference", "speedup"):
      assert math.isfinite(r[key]) and r[key] > 0, (r["metric"], key, r[key])
    ratio = r["cai_jax"] / r["reference"]
    assert r["speedup"] == pytest.approx(ratio if r["higher_is_better"] else 1 / ratio)
    assert (r["target"] is None) == (r["target_met"] is None)
    if r["floor"]:
      assert r["of_floor"] == pytest.approx(r["cai_jax"] / r["floor"] if r["higher_is_better"]
                                            else r["floor"] / r["cai_jax"])


def test_every_mode_on_tiny(tmp_path):
  assert MODES == (*FIRST_MODES, "grpo", "dpo", "lora")  # "all"
  report = suite.run(FIRST_MODES, preset="tiny", reps=1, shapes=SHAPES,
                     workdir=str(tmp_path / "work"))
  _check_rows(report["rows"], FIRST_MODES)

  settings = report["settings"]
  assert set(settings["presets"].values()) == {"tiny"} and settings["reps"] == 1
  assert settings["device"] == "cpu" and settings["dtype"] == "float32"
  ceilings = settings["ceilings"]
  assert ceilings["matmul_flops"] > 1e9 and ceilings["read_bytes_per_s"] > 1e8
  assert settings["peak_flops"] == ceilings["matmul_flops"]   # no datasheet for a CPU
  assert settings["machine"]["cpu"]["isa"] in ("AVX-512", "AVX-512 + AMX", "AVX2", "no AVX2",
                                               "unknown")
  assert settings["versions"]["jax"] and settings["versions"]["torch"]
  assert settings["versions"]["trl"] == "1.9.2"
  assert settings["threads"]["torch_num_threads"] >= 1
  assert settings["shapes"]["gen_new"] == SHAPES.gen_new

  gen = report["results"]["generate"]["seconds"]
  # Same weights on both sides: greedy decoding agrees token for token.
  assert all(gen[f"b{b}"]["greedy_token_agreement"] == 1.0 for b in SHAPES.gen_batches)
  ppo = report["results"]["ppo"]["iterations"]
  assert len(ppo["cai_jax"]) == len(ppo["trl"]) == 2  # warm-up + 1 timed iteration

  table = report_lib.markdown_table(report)
  body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  assert body[0].startswith("| mode | metric | cai_jax | reference | speed-up")
  assert len(body) == 1 + len(report["rows"])
  assert "| ppo (TRL) | iteration s |" in table
  assert "| ppo (cai_jax generate) | rollout tok/s |" in table
  assert f"CPU: {settings['machine']['cpu']['model']}" in table
  assert "matmul" in table.splitlines()[2]

  out = tmp_path / "bench.json"
  report_lib.write_json(report, str(out))
  loaded = json.loads(out.read_text())
  assert loaded["rows"] == json.loads(json.dumps(report["rows"]))
  assert set(loaded["results"]) == set(FIRST_MODES)


def test_grpo_and_dpo_on_tiny(tmp_path):
  """Both preference-training modes against TRL on one shared tiny model: the same ids on
  both sides (the modes check TRL's generations, reward-model inputs and tokenized pairs
  themselves and raise otherwise), the same reference log-probs, rows and table."""
  report = suite.run(["grpo", "dpo"], preset="tiny", reps=1, shapes=SHAPES, device="cpu",
                     workdir=str(tmp_path / "work"))
  _check_rows(report["rows"], ["grpo", "dpo"])
  rows = {(r["mode"], r["metric"]): r for r in report["rows"]}
  assert rows["grpo", "iteration s"]["target"] == ">=2x"
  assert rows["dpo", "step s"]["target"] == ">=1.5x"
  for r in report["rows"]:
    assert r["floor"] > 0 and 0 < r["of_floor"] < 1

  grpo = report["results"]["grpo"]
  assert (grpo["prompts"], grpo["group"], grpo["responses"]) == (2, 2, 4)
  assert len(grpo["iterations"]["cai_jax"]) == len(grpo["iterations"]["trl"]) == 2
  for it in grpo["iterations"]["cai_jax"] + grpo["iterations"]["trl"]:
    assert set(it) == {"rollout", "score", "update"} and all(v > 0 for v in it.values())
  trl = grpo["trl"]
  assert trl["beta"] == grpo["hyperparameters"]["beta"] > 0 and trl["reference_model"]
  assert trl["loss_type"] == "dapo" and trl["generation_batch_size"] == 4
  assert not trl["gradient_checkpointing"] and not trl["bf16"]

  dpo = report["results"]["dpo"]
  assert (dpo["pairs"], dpo["seq_len"], dpo["rejected_reply_len"]) == (2, 16, 6)
  assert len(dpo["seconds"]["cai_jax"]) == 1 and len(dpo["seconds"]["trl"]) == 2
  assert dpo["trl"]["precompute_ref_log_probs"] and not dpo["trl"]["reference_model_in_step"]
  # Same weights, same ids: the two reference passes agree to float32 rounding.
  ref = dpo["reference_logps"]
  assert ref["cai_jax"].shape == ref["trl"].shape == (2, 2)
  assert ref["max_abs_difference"] < 1e-3 and abs(ref["cai_jax"]).min() > 1.0

  table = report_lib.markdown_table(report)
  assert "| grpo (TRL) | iteration s |" in table and "| dpo (TRL) | step s |" in table


@pytest.mark.slow
def test_command_line(tmp_path):
  """The entry point itself: flags, table on stdout, JSON file (model mode, real shapes;
  slow only because a fresh process imports and compiles everything again)."""
  out = tmp_path / "model.json"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.benchmark", "--what=model", "--preset=tiny", "--reps=1",
       f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| model (torch) | fwd+bwd tokens/s |" in proc.stdout
  assert "[benchmark" not in proc.stdout  # progress goes to stderr
  report = json.loads(out.read_text())
  _check_rows(report["rows"], ["model"])
  assert report["results"]["model"]["batch"] == 8 and report["results"]["model"]["seq_len"] == 256


def test_lora_mode_on_tiny(tmp_path):
  """The lora mode: the sft step with rank-r adapters on both sides (ours through the frozen
  split, peft's on the torch model), its own rows and reference name."""
  report = suite.run(["lora"], preset="tiny", reps=1, shapes=SHAPES, device="cpu",
                     workdir=str(tmp_path / "work"))
  _check_rows(report["rows"], ["lora"])
  res = report["results"]["lora"]
  assert res["lora"] == {"rank": 16, "alpha": 32.0, "targets": [
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
  assert res["runs"][0]["train_flops_per_token"] < report["settings"]["models"]["lora"][
      "num_params"] * 6    # no weight gradients for the frozen base
  assert "| lora (transformers+peft) | train tokens/s |" in report_lib.markdown_table(report)


@pytest.mark.slow
def test_gpu_mode_code_path_on_cpu(tmp_path):
  """`device="gpu"`: bf16, the extra SFT shape, decode rows against the roofline, PPO,
  GRPO and DPO without TRL, the attention implementations; on this CPU only its code
  path runs."""
  modes = ["attention", "generate", "sft", "ppo", "grpo", "dpo"]
  report = suite.run(modes, preset="tiny", reps=1, shapes=GPU_SHAPES, device="gpu",
                     workdir=str(tmp_path / "work"))
  expected = {**EXPECTED, "generate": ["decode tok/s b1", "TTFT ms b1", "decode tok/s b2",
                                       "TTFT ms b2"],
              "sft": ["train tokens/s", "MFU %", "train tokens/s B1xT32", "MFU % B1xT32"]}
  no_ref = {(m, k) for m in ("ppo", "grpo") for k in ("rollout s", "score s", "update s",
                                                      "iteration s")}
  no_ref.add(("dpo", "step s"))
  _check_rows(report["rows"], modes, expected, no_ref)
  s = report["settings"]
  assert s["device"] == "gpu" and s["dtype"] == "bfloat16 compute"
  models = s["models"]
  assert models["generate"]["config"]["param_dtype"] == "bfloat16"
  assert models["sft"]["config"]["param_dtype"] == "float32"
  assert all(m["config"]["dtype"] == "bfloat16" for m in models.values())
  assert report["results"]["ppo"]["trl"] is None and report["results"]["ppo"]["dtype"] == \
      "bfloat16"
  assert report["results"]["grpo"]["trl"] is None and report["results"]["dpo"]["trl"] is None
  assert models["dpo"]["config"]["param_dtype"] == "float32"
  for b in (1, 2):
    r = report["results"]["generate"]["seconds"][f"b{b}"]
    assert r["floor_ms_per_step"] > 0 and "greedy_token_agreement" not in r
  decode = [r for r in report["rows"] if r["metric"].startswith("decode tok/s")]
  assert all(r["target"] for r in decode if r["metric"] == "decode tok/s b1")
  table = report_lib.markdown_table(report)
  assert "gpu mode (bfloat16 compute)" in table and "| ppo (no reference) | update s |" in table


def test_profile_dir_gets_one_trace_per_measured_call(tmp_path):
  shapes = Shapes(gen_batches=(2,), gen_prompt=8, gen_new=4, sft_batch=2, sft_seq=16)
  report = suite.run(["generate", "sft"], preset="tiny", reps=1, shapes=shapes, device="cpu",
                     workdir=str(tmp_path / "work"), profile_dir=str(tmp_path / "prof"))
  assert [r["metric"] for r in report["rows"]][:1] == ["decode tok/s b2"]
  for name in ("generate_b2", "sft_B2xT16"):
    traces = list((tmp_path / "prof" / name).rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0, name


def test_decode_floor_counts_weights_and_cache():
  from cai_jax.model import MistralConfig
  from configs.models import get_config as model_preset
  cfg = MistralConfig.from_config(model_preset("mistral_7b"), dtype="bfloat16",
                                  param_dtype="bfloat16")
  ceilings = {"datasheet_flops": 989e12, "datasheet_bytes_per_s": 4.8e12,
              "matmul_flops": 6e14, "read_bytes_per_s": 4e12}
  weights = cfg.num_params("lm") * 2
  kv = 2 * 32 * 8 * 128 * 2 * 256     # one row, 256 columns
  assert decode_step_floor(cfg, 1, 256, ceilings) == pytest.approx((weights + kv) / 4.8e12)
  # Past the window the cache stops growing.
  assert decode_step_floor(cfg, 1, 10**6, ceilings) == pytest.approx(
      (weights + kv * 4096 / 256) / 4.8e12)
  # At a large enough batch the step is compute-bound.
  big = 4096
  assert decode_step_floor(cfg, big, 1, ceilings) == pytest.approx(max(
      (weights + kv / 256 * big) / 4.8e12,
      2 * (cfg.num_params("lm") - cfg.vocab_size * cfg.hidden_size) * big / 989e12))


def test_model_overrides_are_typed_and_checked():
  from absl import app

  from launch.benchmark import __main__ as cli
  assert cli._overrides(["attention_impl=xla", "remat=true", "attention_query_block=64"]) == {
      "attention_impl": "xla", "remat": True, "attention_query_block": 64}
  for bad in ("hidden_size=64", "remat=maybe", "attention_impl=flash", "attention_query_block=x",
              "decode_loop"):
    with pytest.raises(app.UsageError, match="--model_override"):
      cli._overrides([bad])


def test_bad_mode():
  with pytest.raises(ValueError, match="unknown benchmark mode"):
    suite.run("decode", preset="tiny")
