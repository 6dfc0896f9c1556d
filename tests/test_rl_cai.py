"""RL-CAI preference data (`cai_jax.cai.rl_cai`, `launch.generate_rl_cai`).

Scripted policy/judge stand-ins test the bookkeeping (pairing, drops by
reason, position bias, labels); the tiny model runs the real stage in process,
resumes it after a SIGKILL of the command-line entrypoint, and blends it with
`process_hh` output.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cai_jax.cai import hh, rl_cai
from cai_jax.cai import verdicts as J
from cai_jax.data import DataError, read_comparisons, read_records
from configs import process_hh as process_hh_config
from configs import rl_cai as rl_cai_config

REPO = pathlib.Path(__file__).resolve().parents[1]
RED_TEAM = REPO / "data" / "red_team_attempts_sample.jsonl"
HEADER = "<extra_id_0>System\n\n<extra_id_1>User\n"
END = "\n<extra_id_1>"


def _texts(path) -> list[str]:
  return [r["text"] for _, r in read_records(path)]


def _pairs(path) -> list[dict]:
  """The comparison pairs of a file; a split with no kept pair is an empty file."""
  return read_comparisons(path)[0] if os.path.getsize(path) else []


class ScriptedBackend:
  """Response k (sampled at `temperatures[k]`) of a prompt is `script(prompt, k)`."""

  name = "scripted"

  def __init__(self, script, temperatures=(0.01, 1.01)):
    self.script = script
    self.temperatures = list(temperatures)

  def complete(self, prompts, settings, seeds):
    k = self.temperatures.index(settings.temperature)
    return [self.script(p, k) for p in prompts]


class ScriptedJudge:
  """Text verdicts by keyword: GOOD wins; BIASED always says A; GARBAGE is unparseable; SOFT
  gives soft labels of 0.7 for the good option; TIE gives 0.5 both ways."""

  name = "scripted-judge"
  soft = False

  def __init__(self):
    self.questions = 0

  def verdicts(self, questions):
    out = []
    for q in questions:
      self.questions += 1
      both = q.option_a + q.option_b
      letter = "A" if "GOOD" in q.option_a else "B"
      if "GARBAGE" in both:
        out.append(J.Verdict(None, None, False, text="I like turtles"))
      elif "BIASED" in both:
        out.append(J.Verdict("A", 1.0, False, text="(A)"))
      elif "TIE" in both:
        out.append(J.Verdict("A", 0.5, True))
      elif "SOFT" in both:
        out.append(J.Verdict(letter, 0.7 if letter == "A" else 0.3, True))
      else:
        out.append(J.Verdict(letter, 1.0 if letter == "A" else 0.0, False, text=f"({letter})"))
    return out


def _config(tmp_path, **overrides):
  cfg = rl_cai_config.get_config("tiny")
  cfg.red_team = str(RED_TEAM)
  cfg.update(overrides)
  return cfg


# ----------------------------------------------------------------------------
# Pure pieces.


def test_pairing_and_seeds():
  assert rl_cai.candidate_pairs(4, "adjacent") == [(0, 1), (2, 3)]
  assert rl_cai.candidate_pairs(5, "adjacent") == [(0, 1), (2, 3)]
  assert rl_cai.candidate_pairs(3, "all") == [(0, 1), (0, 2), (1, 2)]
  assert rl_cai.candidate_pairs(3, "best_vs_worst") == [(0, 1), (0, 2), (1, 2)]
  with pytest.raises(ValueError, match="pairing"):
    rl_cai.candidate_pairs(3, "random")
  key = rl_cai.prompt_key("hello")
  assert rl_cai.sample_seed(0, key, 1) == rl_cai.sample_seed(0, key, 1)
  assert len({rl_cai.sample_seed(s, key, k) for s in (0, 1) for k in range(4)}) == 8
  assert rl_cai.temperature_of((0.01, 0.51), 3) == 0.51
  pairs = [{"i": 0, "j": 1, "p_r1": 0.2}, {"i": 0, "j": 2, "p_r1": 0.6},
           {"i": 1, "j": 2, "p_r1": 0.9}, {"i": 1, "j": 2, "dropped": "unparseable"}]
  assert rl_cai.best_vs_worst(3, pairs) == (1, 2)
  assert rl_cai.best_vs_worst(2, [{"i": 0, "j": 1, "p_r1": 0.5}]) is None


def test_bookkeeping_with_scripted_policy_and_judge(tmp_path):
  """Each prompt gets one kind of response pair; every drop reason is counted, none guessed."""
  kinds = ["plain", "soft", "biased", "garbage", "identical", "empty", "tie", "plain2"]

  def script(prompt, k):
    kind = kinds[hash_index[prompt]]
    if kind == "identical":
      return "same answer\n"
    if kind == "empty":
      return "  \n" if k == 0 else "GOOD"
    tag = {"soft": " SOFT", "biased": " BIASED", "garbage": " GARBAGE", "tie": " TIE"}.get(kind, "")
    return (f"GOOD{tag} reply" if k == 1 else f"bad{tag} reply") + "\n"

  cfg = _config(tmp_path, limit=8, test_fraction=0.25, prompts_per_step=3)
  prompts, _ = rl_cai.sources.read_red_team_prompts(str(RED_TEAM), limit=8, shuffle=True, seed=0)
  template = rl_cai.tokenizer_lib.NEMO
  hash_index = {template.render_prompt([{"from": "User", "value": p}]): n
                for n, p in enumerate(prompts)}
  judge = ScriptedJudge()
  report = rl_cai.run_rl_cai(cfg, str(tmp_path / "w"), backend=ScriptedBackend(script),
                             judge=judge)
  s = report["summary"]
  assert s["prompts"] == 8 and s["candidates"] == 16 and s["pairs_considered"] == 8
  assert s["dropped"] == {"identical": 1, "empty_response": 1, "unparseable": 1,
                          "contradictory": 1, "low_confidence": 1, "too_long": 0,
                          "no_preference": 0}
  assert s["pairs_kept"] == 3
  assert judge.questions == 2 * 6           # identical and empty pairs are never sent
  # plain, plain2 and soft agree; biased contradicts; tie is soft both ways (0.5 = no bias).
  assert s["pairs_judged"] == 5 and s["position_bias_pairs"] == 1
  assert s["position_bias_rate"] == pytest.approx(1 / 5)
  assert s["p_chosen_histogram"]["[0.9,1.0]"] == 2 and s["p_chosen_histogram"]["[0.7,0.8)"] == 1
  kept = [p for split in ("train", "test") for p in _pairs(report["outputs"][split]["comparisons"])]
  assert sorted(p["p_chosen"] for p in kept) == pytest.approx([0.7, 1.0, 1.0])
  for p in kept:
    assert "GOOD" in p["chosen"] and "bad" in p["rejected"]
    assert p["chosen"].endswith(" reply" + END) and p["rejected"].startswith(HEADER)
  raw = [r for _, r in read_records(report["outputs"]["raw"])]
  assert sorted(r["index"] for r in raw) == list(range(8))
  for r in raw:
    kind = kinds[r["index"]]
    pair = r["pairs"][0]
    assert pair["principle"] in {p.name for p in rl_cai.constitution.load_comparison_principles()}
    if kind in ("identical", "empty"):
      assert "orders" not in pair
    else:
      assert [o["a"] for o in pair["orders"]] == ["r1", "r2"]
    if kind == "garbage":
      assert pair["dropped"] == "unparseable" and pair["orders"][0]["text"] == "I like turtles"
  # Outputs derive from the raw judgments: a stricter threshold reuses them (no generation).
  strict = rl_cai.run_rl_cai(_config(tmp_path, limit=8, test_fraction=0.25, min_confidence=0.3),
                             str(tmp_path / "w"), backend=ScriptedBackend(None), judge=judge)
  assert strict["summary"]["resumed_prompts"] == 8 and judge.questions == 12
  assert strict["summary"]["pairs_kept"] == 2
  assert strict["summary"]["dropped"]["low_confidence"] == 2
  # The same config again: the manifest matches, nothing is redone.
  assert "skipped" in rl_cai.run_rl_cai(
      _config(tmp_path, limit=8, test_fraction=0.25, min_confidence=0.3), str(tmp_path / "w"))


def test_killed_between_raw_file_and_manifest_resumes_without_regenerating(tmp_path):
  """The raw judgments are published, then the run dies before its manifest: every judgment
  on disk is reused (with a hosted judge at 7B scale, the whole stage's cost)."""
  script = lambda prompt, k: ("GOOD reply" if k else "bad reply") + "\n"
  judge = ScriptedJudge()
  cfg = _config(tmp_path, limit=6)
  workdir = tmp_path / "w"
  first = rl_cai.run_rl_cai(cfg, str(workdir), backend=ScriptedBackend(script), judge=judge)
  asked = judge.questions
  assert asked > 0 and first["summary"]["resumed_prompts"] == 0
  for name in ("manifest.json", rl_cai.REPORT_NAME):        # the kill's window
    os.remove(workdir / name)
  for path in workdir.glob("*comparisons*"):
    os.remove(path)
  calls = []

  def no_generation(prompt, k):
    calls.append(prompt)
    raise AssertionError("regenerated a response that was on disk")

  again = rl_cai.run_rl_cai(cfg, str(workdir), backend=ScriptedBackend(no_generation), judge=judge)
  assert not calls and judge.questions == asked
  assert again["summary"]["resumed_prompts"] == 6
  assert again["summary"]["pairs_kept"] == first["summary"]["pairs_kept"]
  assert (open(again["outputs"]["train"]["comparisons"]).read()
          == open(first["outputs"]["train"]["comparisons"]).read())
  # Another generation setting is another raw file: nothing stale is reused.
  changed = rl_cai.run_rl_cai(_config(tmp_path, limit=6, seed=3), str(workdir),
                              backend=ScriptedBackend(script), judge=judge)
  assert changed["summary"]["resumed_prompts"] == 0


def test_best_vs_worst_pairing(tmp_path):
  quality = ["meh", "GOOD", "bad", "okay"]

  def script(prompt, k):
    return f"{quality[k]} response {k}"

  class RankJudge(ScriptedJudge):
    def verdicts(self, questions):
      rank = {"bad": 0, "meh": 1, "okay": 2, "GOOD": 3}
      first = lambda text: rank[text.split()[0]]
      return [J.Verdict("A", 1.0, False) if first(q.option_a) > first(q.option_b)
              else J.Verdict("B", 0.0, False) for q in questions]

  cfg = _config(tmp_path, limit=2, num_responses=4, temperatures=(0.01, 0.51, 1.01, 1.51),
                pairing="best_vs_worst", test_fraction=0.0)
  report = rl_cai.run_rl_cai(cfg, str(tmp_path / "w"),
                             backend=ScriptedBackend(script, cfg.temperatures), judge=RankJudge())
  pairs, _ = read_comparisons(report["outputs"]["train"]["comparisons"])
  assert len(pairs) == 2
  for p in pairs:
    assert "GOOD response 1" + END in p["chosen"] and "bad response 2" + END in p["rejected"]
  raw = [r for _, r in read_records(report["outputs"]["raw"])]
  assert all(len(r["pairs"]) == 6 and r["best_vs_worst"] == [1, 2] for r in raw)
  assert report["summary"]["pairs_considered"] == 2 and report["summary"]["pairs_judged"] == 12


def test_bad_input(tmp_path):
  bad = tmp_path / "red_team.jsonl"
  bad.write_text('{"transcript": "\\n\\nHuman: hi\\n\\nAssistant: hello"}\n{"transcript": \n')
  with pytest.raises(DataError, match=r"red_team\.jsonl:2: malformed JSON"):
    rl_cai.run_rl_cai(_config(tmp_path, red_team=str(bad)), str(tmp_path / "w"),
                      backend=ScriptedBackend(None), judge=ScriptedJudge())
  bad.write_text('{"transcript": "hi"}\n{"text": "no transcript"}\n')
  with pytest.raises(DataError, match=r"red_team\.jsonl:2: field 'transcript' missing"):
    rl_cai.run_rl_cai(_config(tmp_path, red_team=str(bad)), str(tmp_path / "w"),
                      backend=ScriptedBackend(None), judge=ScriptedJudge())
  with pytest.raises(ValueError, match="num_responses"):
    rl_cai.run_rl_cai(_config(tmp_path, num_responses=1), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="min_confidence"):
    rl_cai.run_rl_cai(_config(tmp_path, min_confidence=0.5), str(tmp_path / "w"))
  # A blend source rendered the way NeMo renders its CAI texts ("reply<extra_id_1>", no newline).
  hh_dir = tmp_path / "hh"
  hh.process_hh(_hh_config(), str(hh_dir))
  name = "anthropic_helpful_only_test_comparisons_with_chat_prompt.jsonl"
  lines = (hh_dir / name).read_text().splitlines()
  record = json.loads(lines[2])
  record["text"] = record["text"][:-len(END)] + "<extra_id_1>"
  lines[2] = json.dumps(record)
  (hh_dir / name).write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=rf"{name}:3: field 'text' does not end with exactly"):
    rl_cai.run_rl_cai(_config(tmp_path, limit=2, blend_with=str(hh_dir)), str(tmp_path / "w2"),
                      backend=ScriptedBackend(lambda p, k: f"reply {k}"), judge=ScriptedJudge())
  assert not (tmp_path / "w2" / "manifest.json").exists()
  assert not (tmp_path / "w2" / "raw_judgments.jsonl.partial").exists()   # failed before generating


def _hh_config():
  cfg = process_hh_config.get_config("tiny")
  cfg.source = str(REPO / "data" / "hh_rlhf_helpful_sample")
  return cfg


# ----------------------------------------------------------------------------
# The tiny model, in process and from the command line.


def _tiny(tmp_path, model_dir, **overrides):
  cfg = _config(tmp_path, limit=6, test_fraction=0.34, prompts_per_step=2)
  cfg.policy.model_dir = model_dir
  cfg.generation.max_new_tokens = 8
  cfg.judge.few_shot = 0                 # short judge prompts: one length bucket
  cfg.update(overrides)
  return cfg


CLI_OVERRIDES = ["--config.limit=6", "--config.test_fraction=0.34", "--config.prompts_per_step=1",
                 "--config.generation.max_new_tokens=8", "--config.judge.few_shot=0"]


def test_blend_with_hh_renders_both_sources_identically(tmp_path, rl_cai_model_dir):
  hh_dir = tmp_path / "hh"
  hh.process_hh(_hh_config(), str(hh_dir))
  cfg = _tiny(tmp_path, rl_cai_model_dir, blend_with=str(hh_dir))
  report = rl_cai.run_rl_cai(cfg, str(tmp_path / "w"))
  out = tmp_path / "w"
  names = set(os.listdir(out))
  for split in ("train", "test"):
    for kind in ("prompts", "comparisons"):
      assert f"cai_rlaif_{split}_{kind}_with_chat_prompt.jsonl" in names
      assert f"cai_preference_dataset_{split}_{kind}_with_chat_prompt.jsonl" in names
  assert {"raw_judgments.jsonl", "report.json", "manifest.json"} <= names
  s = report["summary"]
  assert s["prompts"] == 6 and s["candidates"] == 12
  assert s["pairs_kept"] + s["dropped_total"] == s["pairs_considered"] == 6
  assert s["dropped"]["unparseable"] == 0 and s["dropped"]["contradictory"] == 0  # soft labels
  assert json.loads((out / "report.json").read_text())["summary"] == s

  for split in ("train", "test"):
    cai_pairs = _pairs(report["outputs"][split]["comparisons"])
    hh_pairs, _ = read_comparisons(
        hh_dir / f"anthropic_helpful_only_{split}_comparisons_with_chat_prompt.jsonl")
    blended, stats = read_comparisons(
        out / f"cai_preference_dataset_{split}_comparisons_with_chat_prompt.jsonl")
    assert len(blended) == len(cai_pairs) + len(hh_pairs)
    key = lambda p: (p["chosen"], p["rejected"])
    assert sorted(map(key, blended)) == sorted(map(key, cai_pairs + hh_pairs))
    cai_keys = set(map(key, cai_pairs))
    for p in blended:
      source = "cai" if key(p) in cai_keys else "hh"
      for text in (p["chosen"], p["rejected"]):
        # One template, one ending, for both sources: no surface cue.
        assert text.startswith(HEADER), source
        assert text.endswith(END) and not text.endswith("\n" + END), source
        assert text.count("<extra_id_1>Assistant\n") >= 1
      cut = lambda t: t[:t.rindex("<extra_id_1>Assistant\n")]
      assert cut(p["chosen"]) == cut(p["rejected"]), source
      assert 0.5 < p["p_chosen"] <= 1.0 if source == "cai" else p["p_chosen"] == 1.0
    prompts = _texts(out / f"cai_preference_dataset_{split}_prompts_with_chat_prompt.jsonl")
    cai_prompts = _texts(report["outputs"][split]["prompts"])
    assert len(prompts) == len(cai_prompts) + len(_texts(
        hh_dir / f"anthropic_helpful_only_{split}_prompts_with_chat_prompt.jsonl"))
    assert all(t.startswith(HEADER) and t.endswith("\n<extra_id_1>Assistant\n") for t in prompts)
  # The held-out red-team prompts are exactly the test prompts.
  train_p = set(_texts(report["outputs"]["train"]["prompts"]))
  test_p = set(_texts(report["outputs"]["test"]["prompts"]))
  assert len(train_p) + len(test_p) == 6 and not train_p & test_p and len(test_p) == 2

  raw = [r for _, r in read_records(report["outputs"]["raw"])]
  for r in raw:
    assert [c["temperature"] for c in r["candidates"]] == [0.01, 1.01]
    assert r["candidates"][0]["seed"] == rl_cai.sample_seed(0, r["key"], 0)
    for pair in r["pairs"]:
      if "orders" in pair:
        assert all(o["soft"] and 0.0 <= o["p_a"] <= 1.0 for o in pair["orders"])
        assert pair["p_r1"] == pytest.approx(
            J.combine_orders(pair["orders"][0]["p_a"], pair["orders"][1]["p_a"]))


def test_resume_after_sigkill(tmp_path, rl_cai_model_dir):
  """Kill the command-line run after its first records; the rerun completes it exactly."""
  work = tmp_path / "killed"
  partial = work / "raw_judgments.jsonl.partial"
  cmd = [sys.executable, "-m", "launch.generate_rl_cai", "--config=configs/rl_cai.py:tiny",
         f"--workdir={work}", f"--config.policy.model_dir={rl_cai_model_dir}",
         f"--config.red_team={RED_TEAM}"] + CLI_OVERRIDES
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
      if partial.exists() and partial.read_bytes().count(b"\n") >= 1:
        break
      time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  assert not (work / "raw_judgments.jsonl").exists() and not (work / "manifest.json").exists()
  done_before = [json.loads(l)["key"] for l in partial.read_text().splitlines() if l.strip()]
  assert 1 <= len(done_before) < 6

  cfg = _tiny(tmp_path, rl_cai_model_dir, prompts_per_step=1)
  resumed = rl_cai.run_rl_cai(cfg, str(work))
  assert resumed["summary"]["resumed_prompts"] == len(done_before)
  keys = [r["key"] for _, r in read_records(work / "raw_judgments.jsonl")]
  assert keys[:len(done_before)] == done_before
  assert len(keys) == len(set(keys)) == 6                       # no duplicates, no gaps
  assert not partial.exists()

  fresh = rl_cai.run_rl_cai(cfg, str(tmp_path / "fresh"))
  for split in ("train", "test"):
    for kind in ("prompts", "comparisons"):
      assert (pathlib.Path(resumed["outputs"][split][kind]).read_bytes()
              == pathlib.Path(fresh["outputs"][split][kind]).read_bytes())


def test_stage_with_a_remote_judge(tmp_path, monkeypatch, rl_cai_serve):
  """judge.kind=openai: the key from the named env var, the answer parsed from the text."""
  app = FastAPI()
  auth = []

  async def chat(request: Request):
    auth.append(request.headers.get("authorization"))
    if auth[-1] != "Bearer sk-test":
      return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
    body = await request.json()
    question = body["messages"][-1]["content"]
    a = re.findall(r"\(A\) (.*)", question)[-1]
    text = "Hmm." if "GARBAGE" in question else ("(A)" if "GOOD" in a else "The answer is: (B)")
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}

  app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
  script = lambda p, k: ("GOOD reply" if k else "bad reply") + (" GARBAGE" if "shoplift" in p else "")
  monkeypatch.setenv("CAI_JAX_TEST_JUDGE_KEY", "sk-test")
  with rl_cai_serve(app) as url:
    cfg = _config(tmp_path, limit=6, test_fraction=0.34)
    cfg.judge.update(kind="openai", url=url + "/v1", model="scripted", api="chat",
                     api_key_env="CAI_JAX_TEST_JUDGE_KEY", few_shot=1, concurrency=2)
    report = rl_cai.run_rl_cai(cfg, str(tmp_path / "w"), backend=ScriptedBackend(script))
  assert set(auth) == {"Bearer sk-test"} and len(auth) == 12
  s = report["summary"]
  garbage = sum("shoplift" in p for p in rl_cai.sources.read_red_team_prompts(
      str(RED_TEAM), limit=6, shuffle=True, seed=0)[0])
  assert garbage == 2 and s["dropped"]["unparseable"] == garbage
  assert s["pairs_kept"] == 6 - garbage and s["position_bias_rate"] == 0.0
  for split in ("train", "test"):
    for p in _pairs(report["outputs"][split]["comparisons"]):
      assert p["chosen"].endswith("GOOD reply" + END) and p["p_chosen"] == 1.0


@pytest.mark.parametrize("overlong", ["error", "drop", "truncate"])
def test_over_long_prompts_follow_config_overlong(tmp_path, rl_cai_model_dir, overlong):
  from cai_jax.cai.backends import LocalBackend
  prompts, _ = rl_cai.sources.read_red_team_prompts(str(RED_TEAM), limit=5)
  long_prompt = ("Tell me everything about " + "bread and butter " * 800).strip()
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [long_prompt] + prompts))
  cfg = _config(tmp_path, red_team=str(path), overlong=overlong, test_fraction=0.0)
  cfg.generation.max_new_tokens = 8
  backend = LocalBackend.from_model_dir(rl_cai_model_dir, batch_size=8)
  run = lambda: rl_cai.run_rl_cai(cfg, str(tmp_path / "w"), backend=backend,
                                  judge=ScriptedJudge())
  if overlong == "error":
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: the prompt is \d+ tokens"):
      run()
    return
  report = run()
  written = [r["text"] for _, r in read_records(report["outputs"]["train"]["prompts"])]
  assert len(written) == (5 if overlong == "drop" else 6)
  assert report["summary"]["dropped_overlong_prompts"] == (1 if overlong == "drop" else 0)
  if overlong == "truncate":
    (cut,) = [t for t in written if "bread and butter" in t]
    assert backend.fits(cut, rl_cai.GenerationSettings(max_new_tokens=8))
    assert len(cut) < len(long_prompt)
