"""SL-CAI: exact prompt layout, determinism, resume after SIGKILL, real model and servers, bad input."""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from cai_jax.cai import sl_cai
from cai_jax.cai.backends import GenerationSettings, LocalBackend, make_backend
from cai_jax.cai.constitution import CritiqueRevision, FewShotExample
from cai_jax.data import DataError, read_chat_records, read_red_team_prompts
from cai_jax.serve.client import RemoteError
from configs.sl_cai import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
RED_TEAM = str(REPO / "data" / "red_team_attempts_sample.jsonl")
HELPFUL = str(REPO / "data" / "sft_datablend_sample.jsonl")

FEW_SHOT = [FewShotExample("FS prompt", "FS response", "FS critique request", "FS critique",
                           "FS revision request", "FS revision")]
PRINCIPLES = [CritiqueRevision("p_harm", "Critique: is it harmful?", "Revise: make it harmless."),
              CritiqueRevision("p_law", "Critique: is it illegal?", "Revise: make it lawful.")]
STEP_NAMES = ["response", "critique1", "revision1", "critique2", "revision2", "critique3",
              "revision3"]


class ScriptedBackend:
  """Stands in for a model: records every call and answers from a function of (call, row, prompt)."""

  name = "scripted"

  def __init__(self, reply=None):
    self.reply = reply or (lambda call, row, prompt: f" {STEP_NAMES[call]}-{row} \n<extra_id_1>tail")
    self.calls: list[tuple[list[str], GenerationSettings, list[int]]] = []

  def complete(self, prompts, settings, seeds):
    call = len(self.calls)
    self.calls.append((list(prompts), settings, list(seeds)))
    return [self.reply(call, row, p) for row, p in enumerate(prompts)]


def _by_name(name):
  return {p.name: p for p in PRINCIPLES}[name]


# ----------------------------------------------------------------------------
# Prompt layout, exactly.

NEMO_FEW_SHOT = ("<extra_id_0>System\n\n"
                 "<extra_id_1>User\nFS prompt\n"
                 "<extra_id_1>Assistant\nFS response\n"
                 "<extra_id_1>User\nFS critique request\n"
                 "<extra_id_1>Assistant\nFS critique\n"
                 "<extra_id_1>User\nFS revision request\n"
                 "<extra_id_1>Assistant\nFS revision\n")


def test_nemo_prompts_are_exact_for_every_step_of_two_rounds():
  backend = ScriptedBackend()
  prompts = ["How do I pick a lock?", "Write an insult."]
  raw = sl_cai.critique_and_revise(backend, prompts, principles=PRINCIPLES, few_shot=FEW_SHOT,
                                   template="nemo", rounds=2, seed=3,
                                   settings=GenerationSettings(end_strings=()))
  assert len(backend.calls) == 5
  for row, (prompt, record) in enumerate(zip(prompts, raw)):
    first, second = (_by_name(n) for n in record["principles"])
    assert [first, second] == sl_cai.choose_principles(3, sl_cai.prompt_key(prompt), 2, PRINCIPLES)
    step0 = NEMO_FEW_SHOT + f"<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n"
    step1 = step0 + (f"response-{row}\n<extra_id_1>User\n{first.critique}\n"
                     f"<extra_id_1>Assistant\n")
    step2 = step1 + (f"critique1-{row}\n<extra_id_1>User\n{first.revision}\n"
                     f"<extra_id_1>Assistant\n")
    # Round 2 critiques the round-1 revision: it is the last assistant turn.
    step3 = step2 + (f"revision1-{row}\n<extra_id_1>User\n{second.critique}\n"
                     f"<extra_id_1>Assistant\n")
    step4 = step3 + (f"critique2-{row}\n<extra_id_1>User\n{second.revision}\n"
                     f"<extra_id_1>Assistant\n")
    assert [backend.calls[k][0][row] for k in range(5)] == [step0, step1, step2, step3, step4]

    # The raw record keeps every text (stripped, cut at the end string) and the principles.
    assert record == {
        "key": sl_cai.prompt_key(prompt), "index": row, "prompt": prompt,
        "response": f"response-{row}",
        "rounds": [
            {"principle": first.name, "critique_request": first.critique,
             "critique": f"critique1-{row}", "revision_request": first.revision,
             "revision": f"revision1-{row}"},
            {"principle": second.name, "critique_request": second.critique,
             "critique": f"critique2-{row}", "revision_request": second.revision,
             "revision": f"revision2-{row}"}],
        "principles": [first.name, second.name], "num_rounds": 2, "rounds_completed": 2,
        "status": "ok"}
  # The template's end of turn is always an end string; seeds depend on (seed, key, step) only.
  for k, (_, settings, seeds) in enumerate(backend.calls):
    assert settings.end_strings == ("<extra_id_1>",)
    assert seeds == [sl_cai.step_seed(3, sl_cai.prompt_key(p), k) for p in prompts]


def test_mistral_inst_prompts_are_exact():
  backend = ScriptedBackend(lambda call, row, p: ["R", "C", "V"][call] + "</s>")
  [record] = sl_cai.critique_and_revise(
      backend, ["Tell me a secret."], principles=PRINCIPLES, few_shot=FEW_SHOT,
      template="mistral_inst", rounds=1, settings=GenerationSettings(end_strings=("</s>",)))
  p = _by_name(record["principles"][0])
  step0 = ("<s>[INST] FS prompt [/INST]FS response</s>[INST] FS critique request [/INST]"
           "FS critique</s>[INST] FS revision request [/INST]FS revision</s>"
           "[INST] Tell me a secret. [/INST]")
  step1 = step0 + f"R</s>[INST] {p.critique} [/INST]"
  step2 = step1 + f"C</s>[INST] {p.revision} [/INST]"
  assert [c[0][0] for c in backend.calls] == [step0, step1, step2]
  assert backend.calls[0][1].end_strings == ("</s>",)
  assert (record["response"], record["rounds"][0]["critique"],
          record["rounds"][0]["revision"]) == ("R", "C", "V")


def test_every_round_chains_the_previous_prompt_and_the_last_revision():
  backend = ScriptedBackend()
  [record] = sl_cai.critique_and_revise(backend, ["Q?"], principles=PRINCIPLES, few_shot=[],
                                        rounds=3)
  prompts = [c[0][0] for c in backend.calls]
  replies = ["response-0", "critique1-0", "revision1-0", "critique2-0", "revision2-0",
             "critique3-0"]
  assert prompts[0] == "<extra_id_0>System\n\n<extra_id_1>User\nQ?\n<extra_id_1>Assistant\n"
  for k in range(1, 7):
    p = _by_name(record["principles"][(k - 1) // 2])
    request = p.critique if k % 2 else p.revision
    assert prompts[k] == (prompts[k - 1] + f"{replies[k - 1]}\n<extra_id_1>User\n{request}\n"
                          f"<extra_id_1>Assistant\n")
  assert record["rounds_completed"] == 3 and record["rounds"][-1]["revision"] == "revision3-0"


def test_principles_are_uniform_and_do_not_depend_on_batching():
  counts = collections.Counter(sl_cai.principle_index(0, f"k{i}", 0, 16) for i in range(3200))
  assert set(counts) == set(range(16)) and min(counts.values()) > 120
  assert sl_cai.principle_index(0, "k", 0, 16) == sl_cai.principle_index(0, "k", 0, 16)
  assert len({sl_cai.principle_index(s, "k", r, 16) for s in range(5) for r in range(4)}) > 5

  def seeded(call, row, prompt):  # output depends on the prompt and its seed, not the row
    return hashlib.sha256(prompt.encode()).hexdigest()[:6] + str(backend.calls[-1][2][row])

  prompts = [f"prompt {i}" for i in range(7)]
  backend = ScriptedBackend(seeded)
  whole = sl_cai.critique_and_revise(backend, prompts, principles=PRINCIPLES, few_shot=FEW_SHOT,
                                     rounds=2, seed=5)
  backend = ScriptedBackend(seeded)
  parts = []
  for start in (0, 3, 5):
    stop = {0: 3, 3: 5, 5: 7}[start]
    parts += sl_cai.critique_and_revise(backend, prompts[start:stop], principles=PRINCIPLES,
                                        few_shot=FEW_SHOT, rounds=2, seed=5,
                                        indices=range(start, stop))
  assert parts == whole


def test_empty_generations_are_recorded_counted_and_never_trained_on():
  def reply(call, row, prompt):
    if call == 0 and "EMPTY-RESPONSE" in prompt:
      return "  \n<extra_id_1>"
    if call == 2 and "EMPTY-REVISION" in prompt:
      return ""
    return f"{STEP_NAMES[call]}-{row}"

  backend = ScriptedBackend(reply)
  raw = sl_cai.critique_and_revise(backend, ["fine", "EMPTY-RESPONSE", "EMPTY-REVISION"],
                                   principles=PRINCIPLES, few_shot=[], rounds=1)
  assert [r["status"] for r in raw] == ["ok", "empty_response", "empty_revision"]
  # A prompt that failed is not sent on to later steps.
  assert [len(c[0]) for c in backend.calls] == [3, 2, 2]
  assert raw[2]["rounds_completed"] == 0 and raw[2]["rounds"][0]["critique"] == "critique1-1"
  assert sl_cai.sft_records(raw) == [sl_cai.sft_record("fine", "revision1-0")]


def test_sft_records_blend_and_one_record_per_round():
  raw = [{"prompt": f"p{i}", "status": "ok",
          "rounds": [{"revision": f"v{i}.1"}, {"revision": f"v{i}.2"}]} for i in range(4)]
  raw.append({"prompt": "p4", "status": "empty_revision",
              "rounds": [{"revision": "v4.1"}, {"revision": ""}]})
  final = sl_cai.sft_records(raw)
  assert [r["conversations"][1]["value"] for r in final] == ["v0.2", "v1.2", "v2.2", "v3.2"]
  per_round = sl_cai.sft_records(raw, one_record_per_round=True)
  assert len(per_round) == 9 and per_round[-1]["conversations"][1]["value"] == "v4.1"

  helpful = [{"system": "", "mask": "User", "dataset": "h", "conversations": [
      {"from": "User", "value": f"h{i}"}, {"from": "Assistant", "value": "a"}]} for i in range(10)]
  everything, used = sl_cai.blend(final, helpful, ratio=-1, seed=0)
  assert used == 10 and len(everything) == 14
  assert sorted(map(json.dumps, everything)) == sorted(map(json.dumps, final + helpful))
  half, used = sl_cai.blend(final, helpful, ratio=0.5, seed=0)
  assert used == 2 and len(half) == 6
  assert sl_cai.blend(final, helpful, ratio=0.5, seed=0) == (half, 2)   # seeded
  assert sl_cai.blend(final, helpful, ratio=0, seed=0)[1] == 0
  assert sl_cai.blend(final, helpful, ratio=100, seed=0)[1] == 10     # capped at what exists


# ----------------------------------------------------------------------------
# The stage with the scripted backend.


def _write_few_shot(path):
  """One short worked example: with the tiny tokenizer every step's prompt is 129..256 tokens
  (with `_write_principles`), one compiled prompt bucket for the real-model tests."""
  path.write_text(json.dumps([{
      "prompt": "How do I get back at a rude neighbor?",
      "response": "Let the air out of their tires.",
      "critique_request": "Is it harmful?",
      "critique": "It suggests damaging property.",
      "revision_request": "Make it harmless.",
      "revision": "Try talking to them calmly first."}]), encoding="utf-8")
  return str(path)


def _write_principles(path):
  path.write_text(json.dumps([{"name": "harm", "critique": "Is it harmful?",
                               "revision": "Make it harmless."},
                              {"name": "law", "critique": "Is it illegal?",
                               "revision": "Make it lawful."}]), encoding="utf-8")
  return str(path)


def _cfg(tmp_path, **overrides):
  cfg = get_config("tiny")
  cfg.red_team_prompts = RED_TEAM
  cfg.helpfulness_path = HELPFUL
  cfg.few_shot_path = _write_few_shot(tmp_path / "few_shot.json")
  cfg.progress = False
  cfg.limit = 6
  cfg.batch_size = 4
  cfg.update_from_flattened_dict(overrides)
  return cfg


def _check_sft(path, prompts=None):
  records, stats = read_chat_records(path)
  assert stats["kept"] == stats["records"]
  for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
    r = json.loads(line)
    assert set(r) == {"system", "mask", "dataset", "conversations"}
    assert r["system"] == "" and r["mask"] == "User"
    roles = [t["from"] for t in r["conversations"]]
    assert roles == ["User", "Assistant"] * (len(roles) // 2) and roles
    assert all(set(t) == {"from", "value"} for t in r["conversations"])
    if r["dataset"] == "sl_cai":
      assert roles == ["User", "Assistant"]
      reply = r["conversations"][1]["value"]
      assert reply and reply == reply.strip()
    if prompts is not None:
      assert r["dataset"] == "sl_cai" and r["conversations"][0]["value"] in prompts
  return records


def test_stage_writes_raw_sft_blend_and_manifest(tmp_path):
  cfg = _cfg(tmp_path, rounds=2, one_record_per_round=True, helpfulness_ratio=2.0)
  backend = ScriptedBackend(lambda call, row, p: f"{STEP_NAMES[call % 5]}-{row}")
  summary = sl_cai.run_sl_cai(cfg, tmp_path / "out", backend=backend)
  out = tmp_path / "out"
  prompts, _ = read_red_team_prompts(RED_TEAM, limit=6)
  raw = [json.loads(x) for x in (out / sl_cai.RAW_FILE).read_text().splitlines()]
  assert [r["prompt"] for r in raw] == prompts
  assert all(len(r["principles"]) == 2 and r["status"] == "ok" for r in raw)
  assert len(_check_sft(out / sl_cai.SFT_FILE, set(prompts))) == 12   # 2 revisions each
  blend = _check_sft(out / sl_cai.BLEND_FILE)
  assert len(blend) == 12 + 24 and summary["helpfulness"]["used"] == 24
  assert summary["status"]["ok"] == 6 and summary["generated_now"] == 6
  assert summary["mean_chars"]["final_revision"] == len("revision2-0")
  assert sum(summary["principles_used"].values()) == 12
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["complete"] and manifest["stage"] == "sl_cai"
  assert set(manifest["inputs"]) == {"red_team_prompts", "critique_revision", "few_shot",
                                     "helpfulness"}
  assert all(len(v["sha256"]) == 64 for v in manifest["inputs"].values())
  assert manifest["counts"]["blend_records"] == 36
  assert not list(out.glob("*.partial*"))
  # A rerun (the pipeline decides whether to skip it via the manifest) and a run killed
  # after publishing the raw file but before the manifest both reuse every record on disk
  # and give the same files.
  first = _sft_text(out), (out / sl_cai.BLEND_FILE).read_text()
  again = sl_cai.run_sl_cai(cfg, out, backend=ScriptedBackend(backend.reply))
  assert again["generated_now"] == 0 and again["resumed"] == 6
  os.remove(out / "manifest.json")
  for name in (sl_cai.SFT_FILE, sl_cai.BLEND_FILE):
    os.remove(out / name)
  silent = ScriptedBackend(lambda *a: pytest.fail("regenerated a record that was on disk"))
  killed = sl_cai.run_sl_cai(cfg, out, backend=silent)
  assert killed["generated_now"] == 0 and not silent.calls
  assert (_sft_text(out), (out / sl_cai.BLEND_FILE).read_text()) == first
  # Other generation settings are another raw file: regenerated, never mixed.
  other = sl_cai.run_sl_cai(_cfg(tmp_path, rounds=1, helpfulness_ratio=2.0), out,
                            backend=ScriptedBackend(backend.reply))
  assert other["generated_now"] == 6


def _sft_text(out):
  return (out / sl_cai.SFT_FILE).read_text()


def test_a_partial_raw_file_of_another_seed_derivation_is_regenerated(tmp_path, monkeypatch):
  """Seeds and principles once derived from "\\0"-joined parts: a raw file begun then is
  discarded, never continued with seeds drawn the new way."""
  out = tmp_path / "out"

  def dies_in_the_second_batch(call, row, prompt):
    if call >= 3:                                 # rounds=1: 3 calls per batch of 4 prompts
      raise RuntimeError("killed")
    return f" {STEP_NAMES[call]}-{row} "

  monkeypatch.setattr(sl_cai, "DERIVATION", "parts joined by NUL")
  with pytest.raises(RuntimeError, match="killed"):
    sl_cai.run_sl_cai(_cfg(tmp_path), out, backend=ScriptedBackend(dies_in_the_second_batch))
  assert len((out / (sl_cai.RAW_FILE + ".partial")).read_text().splitlines()) == 4
  monkeypatch.undo()
  summary = sl_cai.run_sl_cai(_cfg(tmp_path), out, backend=ScriptedBackend())
  assert summary["discarded_stale_partial"] and summary["resumed"] == 0
  assert summary["generated_now"] == 6


# ----------------------------------------------------------------------------
# Bad input.


def test_malformed_red_team_line_names_file_and_line(tmp_path):
  path = tmp_path / "red.jsonl"
  path.write_text('{"transcript": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n{"transcript": oops}\n')
  backend = ScriptedBackend()
  with pytest.raises(DataError, match=rf"^{path}:2: malformed JSON"):
    sl_cai.run_sl_cai(_cfg(tmp_path, red_team_prompts=str(path)), tmp_path / "out",
                      backend=backend)
  assert backend.calls == []


def test_transcripts_without_a_human_turn_are_skipped_and_counted(tmp_path):
  path = tmp_path / "red.jsonl"
  rows = ["\n\nHuman: first question?\n\nAssistant: a", "\n\nAssistant: no human here",
          "\n\nHuman: second question?\n\nAssistant: b", "\n\nAssistant: a\n\nAssistant: b",
          "\n\nHuman:   \n\nAssistant: empty prompt", "no turns at all"]
  path.write_text("".join(json.dumps({"transcript": t}) + "\n" for t in rows))
  summary = sl_cai.run_sl_cai(_cfg(tmp_path, red_team_prompts=str(path)), tmp_path / "out",
                              backend=ScriptedBackend(lambda call, row, p: "text"))
  assert summary["prompts"]["no_human_turn"] == 2 and summary["prompts"]["empty_prompt"] == 1
  assert summary["prompts"]["malformed"] == 1 and summary["prompts"]["records"] == 6
  assert summary["generated_now"] == 2 and summary["sl_cai_records"] == 2


def test_plain_prompt_files_and_no_helpfulness_blend(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["one?", " two? ", "one?"]))
  summary = sl_cai.run_sl_cai(_cfg(tmp_path, red_team_prompts=str(path), helpfulness_path=""),
                              tmp_path / "out", backend=ScriptedBackend(lambda c, r, p: "ok"))
  assert summary["prompts"]["duplicates"] == 1 and summary["sl_cai_records"] == 2
  assert summary["blend_records"] == 2 and summary["helpfulness"] == {"used": 0}
  prompts = [r["conversations"][0]["value"] for r in _check_sft(tmp_path / "out" / sl_cai.BLEND_FILE)]
  assert sorted(prompts) == ["one?", "two?"]


def test_helpfulness_record_missing_a_field_names_file_line_and_field(tmp_path):
  path = tmp_path / "help.jsonl"
  good = {"conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a"}]}
  path.write_text(json.dumps(good) + "\n" + json.dumps({"conversations": [{"from": "User"}]}) + "\n")
  backend = ScriptedBackend()
  with pytest.raises(DataError, match=rf"^{path}:2: field 'conversations\[0\]\.value' missing"):
    sl_cai.run_sl_cai(_cfg(tmp_path, helpfulness_path=str(path)), tmp_path / "out",
                      backend=backend)
  assert backend.calls == []   # found before any generation


def test_constitution_entry_missing_a_key_names_file_and_entry(tmp_path):
  path = tmp_path / "cr.json"
  path.write_text(json.dumps([{"name": "a", "critique": "c", "revision": "r"},
                              {"name": "b", "critique": "c"}]))
  with pytest.raises(DataError, match=rf"^{path}: entry 1: field 'revision' missing"):
    sl_cai.run_sl_cai(_cfg(tmp_path, critique_revision_path=str(path)), tmp_path / "out",
                      backend=ScriptedBackend())


class FakeNemo:
  """A scripted NeMo `PUT /generate` server: deterministic replies, optional delay, 500s, hangs."""

  def __init__(self, delay=0.0, fail_after=None, hang=0.0):
    self.delay, self.fail_after, self.hang = delay, fail_after, hang
    self.requests = 0
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_PUT(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fake.requests += 1
        if fake.hang:
          time.sleep(fake.hang)
        time.sleep(fake.delay)
        if fake.fail_after is not None and fake.requests > fake.fail_after:
          status, reply = 500, {"error": "internal failure"}
        else:
          status, reply = 200, {"sentences": [s + FakeNemo.completion(s) for s in body["sentences"]]}
        data = json.dumps(reply).encode()
        try:
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except OSError:   # the client gave up (timeout test)
          pass

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

  @staticmethod
  def completion(prompt: str) -> str:
    return f" gen{hashlib.sha256(prompt.encode()).hexdigest()[:8]} \n<extra_id_1>"

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def fake_nemo():
  servers = []

  def make(**kwargs):
    servers.append(FakeNemo(**kwargs))
    return servers[-1]

  yield make
  for s in servers:
    s.close()


def _remote(tmp_path, url, **overrides):
  return _cfg(tmp_path, **{"backend.kind": "nemo", "backend.url": url, "backend.backoff": 0.01,
                           "backend.timeout": 5.0, "batch_size": 2, **overrides})


def _partial_records(out):
  path = out / (sl_cai.RAW_FILE + ".partial")
  return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_server_500_is_retried_then_fails_clearly_and_keeps_finished_records(tmp_path, fake_nemo):
  server = fake_nemo(fail_after=3)      # the first batch (3 steps) succeeds, then only 500s
  out = tmp_path / "out"
  cfg = _remote(tmp_path, server.url, **{"backend.retries": 2})
  with pytest.raises(RemoteError, match=r"after 3 attempt\(s\): HTTP 500: internal failure") as err:
    sl_cai.run_sl_cai(cfg, out)
  assert f"{server.url}/generate" in str(err.value)
  assert server.requests == 3 + 3                       # one failing request, tried 3 times
  assert len(_partial_records(out)) == 2                # the finished batch is kept
  assert not (out / sl_cai.RAW_FILE).exists() and not (out / "manifest.json").exists()

  server.fail_after, server.requests = None, 0          # the server recovers: resume
  summary = sl_cai.run_sl_cai(cfg, out)
  assert summary["resumed"] == 2 and summary["generated_now"] == 4
  assert server.requests == 2 * 3                       # nothing finished is generated again
  raw = [json.loads(x) for x in (out / sl_cai.RAW_FILE).read_text().splitlines()]
  assert len({r["key"] for r in raw}) == len(raw) == 6


def test_server_timeout_is_retried_then_fails_clearly(tmp_path, fake_nemo):
  server = fake_nemo(hang=1.0)
  cfg = _remote(tmp_path, server.url, **{"backend.timeout": 0.2, "backend.retries": 1})
  with pytest.raises(RemoteError, match=r"after 2 attempt\(s\): .*Timeout"):
    sl_cai.run_sl_cai(cfg, tmp_path / "out")
  assert server.requests == 2
  assert _partial_records(tmp_path / "out") == []


# ----------------------------------------------------------------------------
# Resume after SIGKILL, through the command line.


def _cli(workdir, url, few_shot, *extra):
  return [sys.executable, "-m", "launch.generate_sl_cai", "--config=configs/sl_cai.py:tiny",
          f"--workdir={workdir}", "--config.backend.kind=nemo", f"--config.backend.url={url}",
          "--config.backend.backoff=0.01", "--config.batch_size=2", "--config.limit=40",
          f"--config.few_shot_path={few_shot}", f"--config.red_team_prompts={RED_TEAM}",
          f"--config.helpfulness_path={HELPFUL}", "--config.progress=False",
          "--config.fsync_every=1", *extra]


def test_sigkill_mid_run_then_restart_gives_every_prompt_exactly_once(tmp_path, fake_nemo):
  server = fake_nemo(delay=0.05)
  few_shot = _write_few_shot(tmp_path / "few_shot.json")
  out = tmp_path / "out"
  partial = out / (sl_cai.RAW_FILE + ".partial")
  proc = subprocess.Popen(_cli(out, server.url, few_shot), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  deadline = time.monotonic() + 60
  try:
    while not (partial.exists() and partial.read_bytes().count(b"\n") >= 6):
      assert proc.poll() is None, proc.communicate()
      assert time.monotonic() < deadline, "no progress"
      time.sleep(0.01)
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  kept = partial.read_bytes().count(b"\n")
  assert 6 <= kept < 40 and not (out / sl_cai.RAW_FILE).exists()

  server.delay = 0.0
  done = subprocess.run(_cli(out, server.url, few_shot), cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert "resumed" in done.stdout and "40 SL-CAI records" in done.stdout
  prompts, _ = read_red_team_prompts(RED_TEAM, limit=40)
  raw = [json.loads(x) for x in (out / sl_cai.RAW_FILE).read_text().splitlines()]
  keys = [r["key"] for r in raw]
  assert len(keys) == len(set(keys)) == 40
  assert set(keys) == {sl_cai.prompt_key(p) for p in prompts}
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["extra"]["summary"]["resumed"] == kept   # a torn last line is redone
  assert not partial.exists()

  # Killed and resumed == never interrupted.
  reference = tmp_path / "reference"
  cfg = _remote(tmp_path, server.url, limit=40, few_shot_path=few_shot)
  sl_cai.run_sl_cai(cfg, reference)
  assert _sft_text(out) == _sft_text(reference)
  assert (out / sl_cai.BLEND_FILE).read_text() == (reference / sl_cai.BLEND_FILE).read_text()


def test_cli_reports_a_failing_server_and_exits_nonzero(tmp_path, fake_nemo):
  server = fake_nemo(fail_after=0)
  few_shot = _write_few_shot(tmp_path / "few_shot.json")
  done = subprocess.run(_cli(tmp_path / "out", server.url, few_shot, "--config.backend.retries=0"),
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 1
  assert "error: PUT" in done.stderr and "HTTP 500: internal failure" in done.stderr
  assert "rerun" in done.stderr


# ----------------------------------------------------------------------------
# The tiny real model: in-process, and through our server on loopback.


def _real_cfg(tmp_path, **overrides):
  # 8 prompts, 8 new tokens, batches of 32 rows (the server fixture's padding too): every
  # step of every test below shares one compiled shape.
  return _cfg(tmp_path, **{"limit": 8, "batch_size": 8, "generation.max_new_tokens": 8,
                           "generation.greedy": False, "generation.min_new_tokens": 1,
                           "critique_revision_path": _write_principles(tmp_path / "cr.json"),
                           **overrides})


def _check_real_run(summary, out):
  prompts, _ = read_red_team_prompts(RED_TEAM, limit=8)
  raw = [json.loads(x) for x in (out / sl_cai.RAW_FILE).read_text().splitlines()]
  assert sorted(r["prompt"] for r in raw) == sorted(prompts)
  assert summary["status"]["ok"] + summary["dropped_empty"] == 8
  assert summary["sl_cai_records"] == summary["status"]["ok"] >= 4
  sft = _check_sft(out / sl_cai.SFT_FILE, set(prompts))
  assert len(sft) == summary["sl_cai_records"]
  assert len(_check_sft(out / sl_cai.BLEND_FILE)) == len(sft) + 124


def test_tiny_model_in_process(tmp_path, sl_cai_model_dir, sp_model_path):
  cfg = _real_cfg(tmp_path, **{"backend.kind": "local", "backend.model_dir": sl_cai_model_dir,
                               "backend.tokenizer": sp_model_path, "backend.batch_size": 32})
  # Built here without a mesh, like `sl_cai_server`'s generator, so that all three tests
  # share one compiled program (run_sl_cai itself would shard over config.mesh).
  backend = make_backend(cfg.backend)
  assert isinstance(backend, LocalBackend)
  summary = sl_cai.run_sl_cai(cfg, tmp_path / "out", backend=backend)
  _check_real_run(summary, tmp_path / "out")


@pytest.fixture(scope="module")
def sl_cai_server(sl_cai_model_dir, sp_model_path):
  """Our server over the saved model, on a free loopback port, uvicorn in a thread.

  Its generator is loaded the way `make_backend` loads one and its batches are
  padded to 32 rows like `LocalBackend`'s, so the in-process test and both server
  tests run one compiled program.
  """
  import socket

  import uvicorn

  from cai_jax.engine import TextGenerator
  from cai_jax.serve.server import create_app
  generator = TextGenerator.from_checkpoint(sl_cai_model_dir, sp_model_path)
  app = create_app(generator, max_batch_rows=32, min_batch_rows=32, batch_window_ms=5)
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
    time.sleep(0.01)
  yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  server.should_exit = True
  thread.join(timeout=30)
  sock.close()


@pytest.mark.parametrize("kind", ["nemo", "openai"])
def test_tiny_model_through_our_server(tmp_path, sl_cai_server, kind):
  url = sl_cai_server if kind == "nemo" else f"{sl_cai_server}/v1"
  cfg = _real_cfg(tmp_path, **{"backend.kind": kind, "backend.url": url, "backend.timeout": 60.0,
                               "backend.retries": 0})
  summary = sl_cai.run_sl_cai(cfg, tmp_path / "out")
  _check_real_run(summary, tmp_path / "out")


@pytest.mark.parametrize("overlong", ["error", "drop", "truncate"])
def test_over_long_prompts_follow_config_overlong(tmp_path, sl_cai_model_dir, sp_model_path,
                                                 overlong):
  """A prompt longer than the model (1024 positions) among normal ones: an error naming its
  file and line, a drop counted in the raw file, or a truncation that fits."""
  prompts, _ = read_red_team_prompts(RED_TEAM, limit=7)
  long_prompt = ("Tell me everything about " + "bread and butter " * 800).strip()
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": p}) + "\n"
                          for p in prompts[:3] + [long_prompt] + prompts[3:]))
  cfg = _real_cfg(tmp_path, red_team_prompts=str(path), overlong=overlong, rounds=1,
                  **{"backend.kind": "local", "backend.model_dir": sl_cai_model_dir,
                     "backend.tokenizer": sp_model_path, "backend.batch_size": 32})
  backend = make_backend(cfg.backend)
  if overlong == "error":
    with pytest.raises(DataError, match=rf"prompts\.jsonl:4: the prompt is \d+ tokens"):
      sl_cai.run_sl_cai(cfg, tmp_path / "out", backend=backend)
    return
  summary = sl_cai.run_sl_cai(cfg, tmp_path / "out", backend=backend)
  raw = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / sl_cai.RAW_FILE)
                                  .read_text().splitlines())}
  record = raw[sl_cai.prompt_key(long_prompt)]
  if overlong == "drop":
    assert record["status"] == sl_cai.STATUS_TOO_LONG and record["prompt"] == long_prompt
    assert summary["status"][sl_cai.STATUS_TOO_LONG] >= 1
  else:
    assert long_prompt.startswith(record["prompt"]) and len(record["prompt"]) < len(long_prompt)
    assert record["response"] or record["status"] != "ok"
  assert len(raw) == 8 and sum(r["status"] == "ok" for r in raw.values()) >= 4
