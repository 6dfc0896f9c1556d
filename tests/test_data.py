"""cai_jax.data: jsonl I/O, resumable output, manifests, dataset readers, SFT/RM batching.

Readers run on the samples shipped in data/ (same schemas as the hub datasets)
and on small hand-made files for every kind of bad input. Hub loading is
exercised with a stand-in `datasets` module, since tests have no internet.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import types

import numpy as np
import pytest

from cai_jax.data import (HH_SUBSETS, BatchIterator, DataError, ResumableWriter,
                          atomic_write_json, atomic_write_jsonl, config_fingerprint, file_sha256,
                          keys, manifest_matches, pack_examples, pad_examples, pad_pairs,
                          parse_hh_transcript, read_chat_records, read_comparisons, read_hh_pairs,
                          read_manifest, read_records, read_red_team_prompts, require,
                          tokenize_conversations, tokenize_pairs, write_manifest)
from cai_jax.tokenizer import NEMO

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
RED_TEAM = DATA / "red_team_attempts_sample.jsonl"
SFT_BLEND = DATA / "sft_datablend_sample.jsonl"
HH_DIR = DATA / "hh_rlhf_helpful_sample"


def _write_lines(path: pathlib.Path, lines: list[str]) -> str:
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _jsonl(path: pathlib.Path, records: list) -> str:
  return _write_lines(path, [json.dumps(r) for r in records])


# ----------------------------------------------------------------------------
# read_records and require.


def test_read_records_numbers_lines_and_skips_blanks(tmp_path):
  path = _write_lines(tmp_path / "a.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}'])
  assert list(read_records(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_malformed_json_names_file_and_line(tmp_path):
  path = _write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', '{"a": 2}', '{"a": 3'])
  with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: "
                     r"malformed JSON"):
    list(read_records(path))


def test_non_object_line_is_an_error(tmp_path):
  path = _write_lines(tmp_path / "list.jsonl", ['{"a": 1}', "[1, 2]"])
  with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, got list"):
    list(read_records(path))


def test_missing_and_empty_files(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(DataError, match=r"nope\.jsonl: file does not exist"):
    list(read_records(missing))
  for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name}: no records"):
      list(read_records(str(tmp_path / name)))


def test_json_array_file_with_element_lines(tmp_path):
  path = tmp_path / "arr.json"
  path.write_text('[\n  {"a": 1},\n\n  {"a": 2}\n]\n')
  assert list(read_records(str(path))) == [(2, {"a": 1}), (4, {"a": 2})]
  path.write_text('[\n  {"a": 1},\n  "x"\n]\n')
  with pytest.raises(DataError, match=r"arr\.json:3: array element must be a JSON object"):
    list(read_records(str(path)))
  path.write_text("[]")
  with pytest.raises(DataError, match="no records"):
    list(read_records(str(path)))


def test_reads_hf_to_json_output(tmp_path):
  datasets = pytest.importorskip("datasets")
  rows = [{"transcript": "\n\nHuman: Hi\n\nAssistant: Hello", "rating": 1.0},
          {"transcript": "\n\nHuman: Café?\n\nAssistant: Oui", "rating": 2.0}]
  path = str(tmp_path / "hf.json")
  datasets.Dataset.from_list(rows).to_json(path)
  assert [r for _, r in read_records(path)] == rows


def test_require_messages():
  record = {"conversations": "oops", "n": True, "turn": {"from": 3}}
  with pytest.raises(DataError, match=r"^f\.jsonl:12: field 'system' missing$"):
    require(record, "system", str, "f.jsonl", 12)
  with pytest.raises(DataError, match=r"f\.jsonl:12: field 'conversations' must be a list, "
                     r"got str"):
    require(record, "conversations", list, "f.jsonl", 12)
  with pytest.raises(DataError, match="must be an integer or a number, got bool"):
    require(record, "n", (int, float), "f.jsonl", 12)
  with pytest.raises(DataError, match=r"field 'conversations\[0\]\.from' must be a string"):
    require(record["turn"], "from", str, "f.jsonl", 12, context="conversations[0].")
  assert require({"x": 1.5}, "x", (int, float), "f", 1) == 1.5


# ----------------------------------------------------------------------------
# Atomic and resumable writes.


def test_atomic_write_jsonl_leaves_nothing_half_written(tmp_path):
  path = tmp_path / "out.jsonl"
  assert atomic_write_jsonl(path, [{"k": 1}, {"k": "é"}]) == 2
  assert [r for _, r in read_records(str(path))] == [{"k": 1}, {"k": "é"}]

  def failing():
    yield {"k": 3}
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError):
    atomic_write_jsonl(path, failing())
  # The old file is intact and no temporary file is left behind.
  assert [r for _, r in read_records(str(path))] == [{"k": 1}, {"k": "é"}]
  assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]
  atomic_write_json(tmp_path / "c.json", {"a": [1, 2]})
  assert json.loads((tmp_path / "c.json").read_text()) == {"a": [1, 2]}


def test_resumable_writer_survives_a_crash(tmp_path):
  path = str(tmp_path / "gen.jsonl")
  inputs = [f"prompt {i}" for i in range(10)]

  writer = ResumableWriter(path, "id", fsync_every=2)
  for i in range(4):
    writer.write({"id": i, "text": inputs[i]})
  with pytest.raises(ValueError, match="already written"):
    writer.write({"id": 2, "text": "again"})
  with pytest.raises(ValueError, match="must be a string or an integer"):
    writer.write({"id": [5], "text": "list keys do not survive a resume"})
  # Killed mid-write: the process dies while appending record 4.
  writer._file.write(b'{"id": 4, "te')
  writer._file.flush()
  writer._file.close()
  assert not os.path.exists(path)

  writer = ResumableWriter(path, "id")
  assert writer.dropped_incomplete_line and not writer.discarded_stale
  assert writer.done_keys == {0, 1, 2, 3}
  for i, text in enumerate(inputs):
    if i not in writer.done_keys:
      writer.write({"id": i, "text": text})
  assert [r["id"] for r in writer.records()] == list(range(10))
  assert writer.finalize() == path
  assert not os.path.exists(path + ".partial")
  assert not os.path.exists(path + ".partial.meta.json")
  records = [r for _, r in read_records(path)]
  assert records == [{"id": i, "text": inputs[i]} for i in range(10)]  # no duplicates, no gaps


def test_resumable_writer_fingerprint_restart_and_lock(tmp_path):
  path = str(tmp_path / "gen.jsonl")
  with ResumableWriter(path, "key", fingerprint="cfg-a") as writer:
    writer.write({"key": "a"})
    with pytest.raises(DataError, match="another process is writing"):
      ResumableWriter(path, "key", fingerprint="cfg-a")
  assert not os.path.exists(path)  # leaving the block does not publish

  assert ResumableWriter(path, "key", fingerprint="cfg-a").done_keys == {"a"}
  stale = ResumableWriter(path, "key", fingerprint="cfg-b")  # config changed: start over
  assert stale.discarded_stale and stale.done_keys == frozenset()
  stale.write({"key": "b"})
  stale.close()
  assert ResumableWriter(path, "key", fingerprint="cfg-b", restart=True).done_keys == frozenset()


def test_resumable_writer_rejects_corrupt_partial(tmp_path):
  path = str(tmp_path / "gen.jsonl")
  _write_lines(tmp_path / "gen.jsonl.partial", ['{"id": 1}', "garbage", '{"id": 2}'])
  with pytest.raises(DataError, match=r"gen\.jsonl\.partial:2: corrupt record"):
    ResumableWriter(path, "id")


# ----------------------------------------------------------------------------
# Manifests.


def test_manifest_write_match_and_mismatch(tmp_path):
  ml_collections = pytest.importorskip("ml_collections")
  config = ml_collections.ConfigDict({"seed": 1, "sampling": {"temperature": 0.7}, "n": (1, 2)})
  src = tmp_path / "in.jsonl"
  _jsonl(src, [{"a": 1}])
  out = tmp_path / "stage"
  inputs = {"prompts": str(src), "hub": "Anthropic/hh-rlhf"}
  assert not manifest_matches(out, config=config, inputs=inputs)  # nothing there yet

  write_manifest(out, stage="sl_cai", config=config, inputs=inputs,
                 counts={"records": np.int64(1), "lengths": np.arange(2)}, seed=1,
                 extra={"note": "x"})
  manifest = read_manifest(out)
  assert manifest["complete"] is True and manifest["stage"] == "sl_cai"
  assert manifest["counts"] == {"records": 1, "lengths": [0, 1]}
  assert manifest["config"] == {"n": [1, 2], "sampling": {"temperature": 0.7}, "seed": 1}
  assert manifest["inputs"]["prompts"]["sha256"] == file_sha256(src)
  assert manifest["inputs"]["hub"] == {"path": "Anthropic/hh-rlhf", "sha256": None, "hub": True}
  assert manifest["code_version"]["cai_jax"]
  assert "git_commit" in manifest["code_version"]
  assert manifest_matches(out, config=config, inputs=inputs)
  assert manifest_matches(out, config=config.to_dict(), inputs=inputs)

  changed = ml_collections.ConfigDict(config.to_dict())
  changed.sampling.temperature = 0.8
  assert not manifest_matches(out, config=changed, inputs=inputs)
  assert not manifest_matches(out, config=config, inputs={"prompts": str(src)})
  _jsonl(src, [{"a": 2}])  # same path, new content
  assert not manifest_matches(out, config=config, inputs=inputs)
  os.unlink(src)
  assert not manifest_matches(out, config=config, inputs=inputs)


def test_file_sha256_of_directory_and_fingerprint(tmp_path):
  (tmp_path / "d" / "sub").mkdir(parents=True)
  (tmp_path / "d" / "a.txt").write_text("a")
  (tmp_path / "d" / "sub" / "b.txt").write_text("b")
  before = file_sha256(tmp_path / "d")
  (tmp_path / "d" / "sub" / "b.txt").write_text("B")
  assert file_sha256(tmp_path / "d") != before
  assert config_fingerprint({"a": 1, "b": [1]}) == config_fingerprint({"b": (1,), "a": 1})
  assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 2})


def test_prompt_keys_and_derived_ints_are_pinned():
  # Resumable raw files of SL-CAI and RL-CAI are keyed by these values and hold samples drawn
  # with these seeds: a change here makes every partial run resume wrongly. (RL-CAI's values
  # from before the stages shared the functions; SL-CAI's fingerprint names `DERIVATION`.)
  assert keys.prompt_key("hello") == "2cf24dba5fb0a30e"
  assert keys.prompt_key("h\u00e9") == keys.prompt_key("h\u00e9") != keys.prompt_key("he")
  assert keys.derived_int("sample", 0, "2cf24dba5fb0a30e", 1) == 4313150685906449502
  assert keys.derived_int("principle", 3, "2cf24dba5fb0a30e", 0, 1) == 14110942238236577765
  assert keys.derived_int("a", 1) != keys.derived_int("a1") != keys.derived_int("a", "1", "")


# ----------------------------------------------------------------------------
# Sources.


def test_parse_hh_transcript():
  text = "\n\nHuman:  Hi there \n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you."
  assert parse_hh_transcript(text) == [
      {"from": "User", "value": "Hi there"}, {"from": "Assistant", "value": "Hello!"},
      {"from": "User", "value": "Bye"}, {"from": "Assistant", "value": "See you."}]
  assert parse_hh_transcript("Human: Hi\n\nAssistant: Yo") == [
      {"from": "User", "value": "Hi"}, {"from": "Assistant", "value": "Yo"}]
  for bad in ("no turns at all", "\n\nAssistant: only me", "preamble\n\nHuman: hi",
              "\n\nHuman: hi\n\nAssistant: ", "\n\nHuman: a\n\nHuman: b"):
    assert parse_hh_transcript(bad) is None, bad


def _first_human_turn_by_hand(transcript: str) -> str:
  return transcript.split("\n\nHuman:", 1)[1].split("\n\nAssistant:", 1)[0].split(
      "\n\nHuman:", 1)[0].strip()


def test_red_team_prompts_from_sample():
  raw = [r for _, r in read_records(RED_TEAM)]
  prompts, stats = read_red_team_prompts(RED_TEAM)
  assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
  assert prompts == [_first_human_turn_by_hand(r["transcript"]) for r in raw]
  assert stats["records"] == len(raw) and stats["duplicates"] == 0

  shuffled, _ = read_red_team_prompts(RED_TEAM, shuffle=True, seed=3, limit=20)
  again, stats = read_red_team_prompts(RED_TEAM, shuffle=True, seed=3, limit=20)
  other, _ = read_red_team_prompts(RED_TEAM, shuffle=True, seed=4, limit=20)
  assert shuffled == again and shuffled != other and stats["prompts"] == 20
  assert set(shuffled) <= set(prompts) and shuffled != prompts[:20]
  assert read_red_team_prompts(RED_TEAM, limit=5)[0] == prompts[:5]


def test_red_team_dedupe_and_drops_counted(tmp_path):
  path = _jsonl(tmp_path / "rt.jsonl", [
      {"transcript": "\n\nHuman: How do I do X?\n\nAssistant: No."},
      {"transcript": "\n\nAssistant: I speak first and alone."},
      {"transcript": "\n\nHuman:   \n\nAssistant: ?"},
      {"transcript": "\n\nHuman: How do I do X? \n\nAssistant: Still no."},
      {"transcript": "\n\nHuman: Second prompt\n\nAssistant: ok"},
  ])
  prompts, stats = read_red_team_prompts(path)
  assert prompts == ["How do I do X?", "Second prompt"]
  assert (stats["no_human_turn"], stats["empty_prompt"], stats["duplicates"]) == (1, 1, 1)
  bad = _jsonl(tmp_path / "bad.jsonl", [{"transcript": "\n\nHuman: a"}, {"text": "?"}])
  with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'transcript' missing"):
    read_red_team_prompts(bad)
  bad = _jsonl(tmp_path / "bad2.jsonl", [{"transcript": 7}])
  with pytest.raises(DataError, match=r"bad2\.jsonl:1: field 'transcript' must be a string"):
    read_red_team_prompts(bad)


def test_plain_prompt_file(tmp_path):
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": " one "}, {"prompt": "two"},
                                       {"prompt": "one"}, {"prompt": ""}])
  prompts, stats = read_red_team_prompts(path)
  assert prompts == ["one", "two"]
  assert stats["duplicates"] == 1 and stats["empty_prompt"] == 1


def test_chat_records_from_sample():
  records, stats = read_chat_records(SFT_BLEND)
  assert len(records) == stats["kept"] == 124
  assert sum(len(r["conversations"]) > 2 for r in records) == 22
  first = records[0]
  assert set(first) == {"system", "mask", "dataset", "conversations"}
  assert first["mask"] == "User" and first["dataset"] == "cai_jax_helpful"
  assert first["conversations"][0] == {"from": "User",
                                       "value": "What is the derivative of x squared?"}
  assert len(read_chat_records(SFT_BLEND, limit=7)[0]) == 7


def test_chat_records_bad_input(tmp_path):
  ok = {"conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a"}]}
  path = _jsonl(tmp_path / "c.jsonl", [
      ok, {"system": "", "conversations": [{"from": "User", "value": "only a question"}]}, ok])
  records, stats = read_chat_records(path)
  assert len(records) == 2 and stats["no_assistant_turn"] == 1
  cases = [
      ({"system": ""}, r"c2\.jsonl:2: field 'conversations' missing"),
      ({"conversations": "hi"}, r"c2\.jsonl:2: field 'conversations' must be a list, got str"),
      ({"conversations": [{"from": "User"}]}, r"c2\.jsonl:2: field 'conversations\[0\]\.value'"),
      ({"conversations": [{"from": "Bot", "value": "x"}]}, r"c2\.jsonl:2: .*'Bot'"),
  ]
  for bad, pattern in cases:
    path = _jsonl(tmp_path / "c2.jsonl", [ok, bad])
    with pytest.raises(DataError, match=pattern):
      read_chat_records(path)


def test_hh_pairs_from_sample_dir():
  pairs, stats = read_hh_pairs(HH_DIR)
  assert len(pairs) == stats["pairs"] == 120 and stats["dropped_total"] == 0
  assert set(stats["subsets"]) == {"helpful-base", "helpful-online", "helpful-rejection-sampled"}
  assert all(s == {"records": 40, "pairs": 40} for s in stats["subsets"].values())
  assert sum(len(p["prompt"]) > 1 for p in pairs) == 30
  for pair in pairs:
    assert set(pair) == {"prompt", "chosen", "rejected"}
    assert pair["prompt"][-1]["from"] == "User" and len(pair["prompt"]) % 2 == 1
    assert pair["chosen"] != pair["rejected"]
  all_pairs, _ = read_hh_pairs(HH_DIR, subsets=HH_SUBSETS)
  assert len(all_pairs) == 160
  single, _ = read_hh_pairs(HH_DIR / "helpful-base.jsonl")
  assert single == pairs[:40]


def test_hh_pairs_drops_are_counted(tmp_path):
  h = "\n\nHuman: "
  a = "\n\nAssistant: "
  path = _jsonl(tmp_path / "hh.jsonl", [
      {"chosen": f"{h}Q{a}good", "rejected": f"{h}Q{a}bad"},
      {"chosen": f"{h}Q1{a}good", "rejected": f"{h}Q2{a}bad"},
      {"chosen": f"{h}Q{a}A{h}more?", "rejected": f"{h}Q{a}A{h}more?"},
      {"chosen": f"{h}Q{a}same", "rejected": f"{h}Q{a}same"},
      {"chosen": f"{h}Q{a}good", "rejected": f"garbage{h}Q{a}bad"},
  ])
  pairs, stats = read_hh_pairs(path)
  assert pairs == [{"prompt": [{"from": "User", "value": "Q"}], "chosen": "good",
                    "rejected": "bad"}]
  assert stats["dropped"] == {"prompt_mismatch": 1, "no_final_assistant_turn": 1,
                              "identical_replies": 1,
                              "malformed_rejected_text_before_first_turn": 1}
  bad = _jsonl(tmp_path / "bad.jsonl", [{"chosen": f"{h}Q{a}x", "rejected": f"{h}Q{a}y"},
                                        {"chosen": f"{h}Q{a}x"}])
  with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'rejected' missing"):
    read_hh_pairs(bad)
  with pytest.raises(DataError, match="no file for hh-rlhf subset 'harmless-base'"):
    read_hh_pairs(tmp_path, subsets=["harmless-base"])


def test_hub_sources_call_load_dataset(monkeypatch):
  calls = []
  rows = {
      "red-team-attempts": [{"transcript": "\n\nHuman: hub prompt\n\nAssistant: no"}],
      "helpful-base": [{"chosen": "\n\nHuman: q\n\nAssistant: yes",
                        "rejected": "\n\nHuman: q\n\nAssistant: no"}],
      None: [{"conversations": [{"from": "User", "value": "q"},
                                {"from": "Assistant", "value": "a"}]}],
  }

  def load_dataset(name, split, data_dir=None):
    calls.append((name, data_dir, split))
    if name == "nobody/missing":
      raise ConnectionError("offline")
    return rows[data_dir]

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  assert read_red_team_prompts("Anthropic/hh-rlhf")[0] == ["hub prompt"]
  assert len(read_hh_pairs(["helpful-base"], split="test")[0]) == 1
  assert len(read_hh_pairs("helpful-base")[0]) == 1
  assert len(read_chat_records("nvidia/sft_datablend_v1")[0]) == 1
  with pytest.raises(DataError, match=r"nobody/missing\[train\]: could not load .*offline"):
    read_chat_records("nobody/missing")
  with pytest.raises(DataError, match=r"local/missing\.jsonl: file does not exist"):
    read_chat_records("local/missing.jsonl")  # a path, not a hub name
  assert calls[-1] == ("nobody/missing", None, "train")
  calls.pop()
  assert calls == [("Anthropic/hh-rlhf", "red-team-attempts", "train"),
                   ("Anthropic/hh-rlhf", "helpful-base", "test"),
                   ("Anthropic/hh-rlhf", "helpful-base", "train"),
                   ("nvidia/sft_datablend_v1", None, "train")]


# ----------------------------------------------------------------------------
# SFT tokenisation, packing, padding.


@pytest.fixture(scope="module")
def chat_records():
  return read_chat_records(SFT_BLEND, limit=40)[0]


def _assistant_text(record) -> str:
  return "".join(t["value"] + "\n<extra_id_1>" for t in record["conversations"]
                 if t["from"] == "Assistant")


def test_tokenize_loss_mask_covers_only_assistant_tokens(tokenizer, chat_records):
  examples, stats = tokenize_conversations(chat_records, tokenizer, NEMO, max_seq_len=4096)
  assert len(examples) == stats["examples"] == len(chat_records)
  assert stats["truncated"] == stats["dropped_overlong"] == stats["dropped_no_loss"] == 0
  for record, ex in zip(chat_records, examples):
    assert ex["ids"].dtype == np.int32 and ex["loss_mask"].dtype == np.int32
    # NeMo's template writes no <s>, and NeMo's chat SFT adds none: the row is the text.
    assert ex["loss_mask"][0] == 0 and tokenizer.bos_id not in ex["ids"].tolist()
    assert tokenizer.decode(ex["ids"][ex["loss_mask"] == 1]) == _assistant_text(record)
    full, _ = NEMO.render_ids(tokenizer, record["conversations"])
    assert ex["ids"].tolist() == full == NEMO.encode(tokenizer, NEMO.render_text(
        record["conversations"]))


def test_tokenize_overlong_truncate_and_drop(tokenizer, chat_records):
  lengths = [len(e["ids"]) for e in tokenize_conversations(
      chat_records, tokenizer, NEMO, max_seq_len=4096)[0]]
  limit = sorted(lengths)[len(lengths) // 2]
  over = sum(n > limit for n in lengths)
  dropped, stats = tokenize_conversations(chat_records, tokenizer, NEMO, max_seq_len=limit,
                                          overlong="drop")
  assert stats["dropped_overlong"] == over and len(dropped) == len(lengths) - over
  cut, stats = tokenize_conversations(chat_records, tokenizer, NEMO, max_seq_len=limit)
  assert stats["truncated"] == over and len(cut) + stats["dropped_no_loss"] == len(lengths)
  assert all(len(e["ids"]) <= limit for e in cut)
  # A limit that stops inside the first user turn leaves nothing to learn.
  _, stats = tokenize_conversations(chat_records[:3], tokenizer, NEMO, max_seq_len=4)
  assert stats["dropped_no_loss"] == 3 and stats["examples"] == 0
  with pytest.raises(DataError, match="chat record 1"):
    tokenize_conversations([chat_records[0], {"conversations": []}], tokenizer, NEMO,
                           max_seq_len=64)


def test_pack_examples(tokenizer, chat_records):
  examples, _ = tokenize_conversations(chat_records, tokenizer, NEMO, max_seq_len=128,
                                       overlong="drop")
  seq_len = 160
  rows = pack_examples(examples, seq_len, pad_id=tokenizer.pad_id)
  again = pack_examples(examples, seq_len, pad_id=tokenizer.pad_id)
  assert len(again) == len(rows) and all(
      np.array_equal(a[k], b[k]) for a, b in zip(rows, again) for k in a)  # deterministic
  assert len(rows) < len(examples)  # packing really packs
  recovered = []
  for row in rows:
    assert set(row) == {"tokens", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (seq_len,) and v.dtype == np.int32 for v in row.values())
    seg = row["segment_ids"]
    n_seg = seg.max()
    used = int((seg > 0).sum())
    assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0)  # padding only at the end
    assert np.all(np.diff(seg[:used]) >= 0) and set(seg[:used]) == set(range(1, n_seg + 1))
    assert np.all(row["loss_mask"][used:] == 0) and np.all(row["tokens"][used:] ==
                                                           tokenizer.pad_id)
    for s in range(1, n_seg + 1):
      where = np.flatnonzero(seg == s)
      assert np.array_equal(row["positions"][where], np.arange(len(where)))
      recovered.append((row["tokens"][where].tolist(), row["loss_mask"][where].tolist()))
  expected = [(e["ids"].tolist(), e["loss_mask"].tolist()) for e in examples]
  assert sorted(recovered) == sorted(expected)  # every token of every example, exactly once
  assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == sum(map(len, (
      e["ids"] for e in examples)))


def test_pack_and_pad_small_cases():
  ex = lambda n, first_loss=0: {"ids": np.arange(1, n + 1, dtype=np.int32),
                                "loss_mask": np.array([first_loss] + [1] * (n - 1), np.int32)}
  rows = pack_examples([ex(3), ex(6), ex(4), ex(2)], 8)
  assert [r["segment_ids"].tolist() for r in rows] == [
      [1, 1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2, 2, 0]]
  assert rows[0]["positions"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
  # A segment's first token is never a target, even where the example says so.
  rows = pad_examples([ex(3, first_loss=1)], 5, pad_id=9)
  assert rows[0]["tokens"].tolist() == [1, 2, 3, 9, 9]
  assert rows[0]["loss_mask"].tolist() == [0, 1, 1, 0, 0]
  assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 0, 0]
  assert rows[0]["positions"].tolist() == [0, 1, 2, 0, 0]
  with pytest.raises(ValueError, match="example 0 has 6 tokens > seq_len 5"):
    pack_examples([ex(6)], 5)


# ----------------------------------------------------------------------------
# BatchIterator.


def _rows(n: int, t: int = 4) -> list[dict]:
  return [{"tokens": np.full(t, i, np.int32), "loss_mask": np.ones(t, np.int32)}
          for i in range(n)]


def _ids(batch) -> list[int]:
  return batch["tokens"][:, 0].tolist()


def test_batch_iterator_is_deterministic_and_epochs_differ():
  rows = _rows(22)
  it = BatchIterator(rows, 4, seed=7)
  assert it.steps_per_epoch == 5
  first = [_ids(next(it)) for _ in range(10)]
  again = BatchIterator(rows, 4, seed=7)
  assert [_ids(next(again)) for _ in range(10)] == first
  epoch0, epoch1 = sum(first[:5], []), sum(first[5:], [])
  assert len(set(epoch0)) == 20 and len(set(epoch1)) == 20  # no row twice in an epoch
  assert epoch0 != epoch1
  assert it.state() == {"epoch": 2, "step_in_epoch": 0}
  other = BatchIterator(rows, 4, seed=8)
  assert [_ids(next(other)) for _ in range(5)] != first[:5]
  ordered = BatchIterator(rows, 4, seed=0, shuffle=False)
  assert _ids(next(ordered)) == [0, 1, 2, 3]
  batch = next(BatchIterator(rows, 4, seed=0))
  assert batch["tokens"].shape == (4, 4) and batch["tokens"].dtype == np.int32


def test_batch_iterator_exact_resume():
  rows = _rows(13)
  straight = BatchIterator(rows, 4, seed=1)
  expected = [_ids(next(straight)) for _ in range(12)]
  it = BatchIterator(rows, 4, seed=1)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.state()))  # as saved with a checkpoint
  resumed = BatchIterator(rows, 4, seed=1)
  resumed.restore(state)
  assert [_ids(next(resumed)) for _ in range(5)] == expected[7:]
  with pytest.raises(ValueError, match="out of range"):
    resumed.restore({"epoch": 0, "step_in_epoch": 3})


def test_batch_iterator_process_slices_concatenate_to_global_batch():
  rows = _rows(24)
  whole = BatchIterator(rows, 8, seed=5)
  parts = [BatchIterator(rows, 8, seed=5, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(6):
    expected = next(whole)
    got = [next(p) for p in parts]
    assert all(g["tokens"].shape == (4, 4) for g in got)
    for key in expected:
      assert np.array_equal(np.concatenate([g[key] for g in got]), expected[key])
  with pytest.raises(ValueError, match="multiple of the process count"):
    BatchIterator(rows, 6, seed=0, process_count=4)


def test_batch_iterator_keep_remainder_and_pair_rows():
  it = BatchIterator(_rows(10), 4, seed=0, shuffle=False, drop_remainder=False)
  batches = [next(it) for _ in range(3)]
  assert [b["valid"].tolist() for b in batches] == [[1, 1, 1, 1]] * 2 + [[1, 1, 0, 0]]
  assert _ids(batches[2]) == [8, 9, 0, 0] and np.all(batches[2]["loss_mask"][2:] == 0)
  with pytest.raises(ValueError, match="only 3 rows"):
    BatchIterator(_rows(3), 4, seed=0)
  pair_rows = pad_pairs([{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 4], "p_chosen": 0.7}] * 4,
                        5)
  batch = next(BatchIterator(pair_rows, 2, seed=0))
  assert batch["tokens"].shape == (2, 2, 5) and batch["lengths"].shape == (2, 2)
  assert batch["p_chosen"].dtype == np.float32 and batch["p_chosen"].shape == (2,)


# ----------------------------------------------------------------------------
# Reward-model comparisons.


def test_read_comparisons(tmp_path):
  path = _jsonl(tmp_path / "cmp.jsonl", [
      {"text": "good 1"}, {"text": "bad 1"}, {"text": "good 2", "p_chosen": 0.75},
      {"text": "bad 2"}])
  pairs, stats = read_comparisons(path)
  assert pairs == [{"chosen": "good 1", "rejected": "bad 1", "p_chosen": 1.0},
                   {"chosen": "good 2", "rejected": "bad 2", "p_chosen": 0.75}]
  assert stats == {"records": 4, "pairs": 2, "soft_labels": 1}
  odd = _jsonl(tmp_path / "odd.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
  with pytest.raises(DataError, match=r"odd\.jsonl:3: odd number of records \(3\)"):
    read_comparisons(odd)
  missing = _jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"txt": "b"}])
  with pytest.raises(DataError, match=r"m\.jsonl:2: field 'text' missing"):
    read_comparisons(missing)
  bad_p = _jsonl(tmp_path / "p.jsonl", [{"text": "a", "p_chosen": 1.5}, {"text": "b"}])
  with pytest.raises(DataError, match=r"p\.jsonl:1: field 'p_chosen' must be a probability"):
    read_comparisons(bad_p)


def test_tokenize_and_pad_pairs(tokenizer):
  prompt = NEMO.render_prompt([{"from": "User", "value": "How do I bake bread?"}])
  chosen = prompt + "Mix flour, water, yeast and salt, knead, let it rise, then bake.\n<extra_id_1>"
  rejected = prompt + "No idea.\n<extra_id_1>"
  pairs = [{"chosen": chosen, "rejected": rejected, "p_chosen": 0.9}]
  examples, stats = tokenize_pairs(pairs, tokenizer, NEMO, max_seq_len=512)
  assert stats["examples"] == 1
  ex = examples[0]
  assert ex["chosen_ids"].tolist() == NEMO.encode(tokenizer, chosen)
  assert ex["p_chosen"] == 0.9
  n_chosen, n_rejected = len(ex["chosen_ids"]), len(ex["rejected_ids"])
  assert n_chosen > n_rejected

  limit = n_chosen - 3
  _, stats = tokenize_pairs(pairs, tokenizer, NEMO, max_seq_len=limit)
  assert stats["dropped_overlong"] == 1 and stats["examples"] == 0
  cut, stats = tokenize_pairs(pairs, tokenizer, NEMO, max_seq_len=limit, overlong="truncate")
  assert stats["truncated"] == 1
  ids = cut[0]["chosen_ids"].tolist()
  assert len(ids) == limit and [ids[-1]] == NEMO.end_of_turn_ids(tokenizer)
  assert ids[:-1] == ex["chosen_ids"].tolist()[:limit - 1]
  assert cut[0]["rejected_ids"].tolist() == ex["rejected_ids"].tolist()

  rows = pad_pairs(examples, 64, pad_id=tokenizer.pad_id)
  row = rows[0]
  assert row["tokens"].shape == (2, 64) and row["tokens"].dtype == np.int32
  assert row["lengths"].tolist() == [n_chosen, n_rejected]
  assert row["tokens"][0, :n_chosen].tolist() == ex["chosen_ids"].tolist()
  assert row["tokens"][1, :n_rejected].tolist() == ex["rejected_ids"].tolist()
  assert np.all(row["tokens"][1, n_rejected:] == tokenizer.pad_id)
  assert row["p_chosen"] == np.float32(0.9)
  with pytest.raises(ValueError, match="chosen_ids has"):
    pad_pairs(examples, n_chosen - 1)
