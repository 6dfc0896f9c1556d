"""The tiny pipeline end to end (slow): every stage, the report, skip-on-rerun, kill-and-resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("tokenizer", "base", "sl_cai", "sft", "hh", "rl_cai", "rm", "ppo", "evaluate")
# The embedded tiny default, shrunk so CI runs it in a few minutes.
QUICK = ["--config.base.num_epochs=4", "--config.sl_cai.limit=24", "--config.sft.num_epochs=2",
         "--config.rl_cai.limit=8", "--config.rm.num_epochs=1", "--config.ppo.iterations=3",
         "--config.ppo.eval_every=0", "--config.evaluate.limit=4"]


PROGRESS_BAR = re.compile(r"\d+%\|")          # tqdm: "SL-CAI:  50%|█████     | 12/24 [...]"


def console_lines(text: str) -> list[str]:
  """The lines a person reads: what stays on screen of each line (tqdm redraws its bar in
  place with carriage returns), progress bars left out."""
  shown = (line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n"))
  return [line for line in shown if not PROGRESS_BAR.search(line)]


def pipeline(workdir, *extra, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "launch.pipeline", f"--workdir={workdir}",
                         *QUICK, *extra], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_rerun_skips(tmp_path):
  out = pipeline(tmp_path, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  for stage in STAGES:
    manifest = json.load(open(tmp_path / stage / "manifest.json"))
    assert manifest["complete"] is True and manifest["stage"] in (stage, "sft", "process_hh", "hh")
  report = json.load(open(tmp_path / "evaluate" / "report.json"))
  assert set(report["models"]) == {"base", "sft", "ppo"}
  assert set(report["prompt_sets"]) == {"red_team", "helpful"}
  for name, per_set in report["models"].items():
    for s, m in per_set.items():
      assert m["response_length_mean"] > 0 and m["rm_score_mean"] is not None, (name, s, m)
  assert set(report["win_rates"]) == {"sft vs base", "ppo vs base", "ppo vs sft"}
  for png in ("win_rates.png", "curves_sft.png", "curves_rm.png", "curves_ppo.png"):
    assert (tmp_path / "evaluate" / png).stat().st_size > 1000
  assert (tmp_path / "evaluate" / "summary.md").read_text().startswith("# cai_jax evaluation")
  assert "cai_jax pipeline finished" in out.stdout and "report" in out.stdout
  # A console a person can read: a start and a result line per stage, the summary, and
  # warnings; the library's INFO records (orbax's checkpointing) go to each stage's log.
  lines = console_lines(out.stdout + out.stderr)
  assert len(lines) < 80, "\n".join(lines)
  assert re.search(r"\[pipeline\] sft: done in \d+s: .*final_eval\.val_loss=", out.stdout)
  assert re.search(r"\[pipeline\] ppo: done in \d+s: .*final_train\.score_mean=", out.stdout)
  ppo_log = (tmp_path / "ppo" / "run.log").read_text()
  assert re.search(r" I absl .*CheckpointManager", ppo_log)
  assert "CheckpointManager" not in out.stdout + out.stderr

  again = pipeline(tmp_path, "--verbosity=0", timeout=600)   # INFO back on the console
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in STAGES:
    assert f"[pipeline] {stage}: complete, skipped" in again.stdout, again.stdout
  assert re.search(r"^I\d{4} .*JAX .*process 0/1", again.stderr, re.M), again.stderr[-2000:]

  # The other policy stages on the same upstream outputs: only they and evaluate run.
  dpo = pipeline(tmp_path, "--config.policy_stage=dpo", timeout=900)
  assert dpo.returncode == 0, dpo.stderr[-3000:]
  assert "[pipeline] rm: complete, skipped" in dpo.stdout
  assert re.search(r"\[pipeline\] dpo: done in \d+s: .*test_accuracy=", dpo.stdout), dpo.stdout
  report = json.load(open(tmp_path / "evaluate" / "report.json"))
  assert set(report["models"]) == {"base", "sft", "dpo"}
  assert set(report["win_rates"]) == {"sft vs base", "dpo vs base", "dpo vs sft"}
  grpo = pipeline(tmp_path, "--config.ppo.ppo.advantage=grpo",
                  "--config.ppo.ppo.samples_per_prompt=2", timeout=900)
  assert grpo.returncode == 0, grpo.stderr[-3000:]
  assert "[pipeline] ppo: done" in grpo.stdout and "[pipeline] rm: complete, skipped" in grpo.stdout
  logged = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
  assert logged and not any("value_loss" in m for m in logged)      # no critic trained


@pytest.mark.slow
def test_pipeline_killed_mid_stage_resumes_without_duplicates(tmp_path):
  stages = "--stages=tokenizer,base,sl_cai"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-m", "launch.pipeline", f"--workdir={tmp_path}",
                           *QUICK, "--config.sl_cai.batch_size=4", stages], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  partial = tmp_path / "sl_cai" / "sl_cai_raw.jsonl.partial"
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None:
    if partial.exists() and len(partial.read_text().splitlines()) >= 4:
      break
    time.sleep(0.5)
  assert proc.poll() is None, "the pipeline finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before = len(partial.read_text().splitlines())
  assert 4 <= done_before < 24

  out = pipeline(tmp_path, "--config.sl_cai.batch_size=4", stages, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "[pipeline] base: complete, skipped" in out.stdout
  raw = [json.loads(l) for l in open(tmp_path / "sl_cai" / "sl_cai_raw.jsonl")]
  keys = [r["key"] for r in raw]
  assert len(keys) == len(set(keys)) == 24
  blend = [json.loads(l) for l in open(tmp_path / "sl_cai" / "sft_blend.jsonl")]
  sl = [r for r in blend if r["dataset"] == "sl_cai"]
  assert len({r["conversations"][0]["value"] for r in sl}) == len(sl)
