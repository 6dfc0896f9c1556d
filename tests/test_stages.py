"""Whether a pipeline stage is skipped, restarted or resumed (`cai_jax.stages`), and the
tokenizer stage (`cai_jax.tokenizer_stages.train_tokenizer`)."""

from __future__ import annotations

import json

import ml_collections
import pytest

from cai_jax import stages
from cai_jax.data import DataError, write_manifest
from cai_jax.tokenizer import Tokenizer
from cai_jax.tokenizer_stages import train_tokenizer

CONFIG = {"lr": 1e-3, "epochs": 2}


def _complete_stage(stage_dir, source, config=CONFIG, result=None):
  """A stage directory as a finished stage leaves it: outputs, manifest, then the result."""
  stage_dir.mkdir(parents=True, exist_ok=True)
  (stage_dir / "out.jsonl").write_text("{}\n")
  write_manifest(stage_dir, stage="x", config=config, inputs={"data": source}, counts={},
                 seed=0)
  return stages.write_result(str(stage_dir), result or {"outputs": {"out": "out.jsonl"}}, 1.5)


@pytest.fixture
def source(tmp_path):
  path = tmp_path / "input.jsonl"
  path.write_text('{"text": "a"}\n')
  return path


def _decide(stage_dir, config=CONFIG, forced=False, upstream_ran=False):
  return stages.decide(str(stage_dir), config, forced=forced, upstream_ran=upstream_ran)


def test_a_complete_stage_is_skipped_with_its_recorded_result(tmp_path, source):
  recorded = _complete_stage(tmp_path / "s", source)
  assert recorded == {"outputs": {"out": "out.jsonl"}, "seconds": 1.5}
  assert stages.is_complete(str(tmp_path / "s"), CONFIG)
  assert _decide(tmp_path / "s") == stages.SKIP
  assert stages.read_result(str(tmp_path / "s")) == recorded
  # The workdir may move: inputs are compared by content, at the paths the manifest names.
  assert _decide(tmp_path / "s", dict(reversed(list(CONFIG.items())))) == stages.SKIP


@pytest.mark.parametrize("change", ["config", "input", "forced", "upstream_ran",
                                    "manifest_incomplete", "no_result", "input_gone"])
def test_a_completed_stage_restarts_when_anything_it_depends_on_changed(tmp_path, source,
                                                                       change):
  stage_dir = tmp_path / "s"
  _complete_stage(stage_dir, source)
  config, forced, upstream_ran = dict(CONFIG), False, False
  if change == "config":
    config["lr"] = 2e-3
  elif change == "input":
    source.write_text('{"text": "b"}\n')
  elif change == "forced":
    forced = True
  elif change == "upstream_ran":
    upstream_ran = True
  elif change == "manifest_incomplete":
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    (stage_dir / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
  elif change == "no_result":          # killed between the manifest and the result
    (stage_dir / stages.RESULT_FILE).unlink()
  elif change == "input_gone":
    source.unlink()
  assert _decide(stage_dir, config, forced, upstream_ran) == stages.RESTART
  stages.prepare(str(stage_dir), stages.RESTART)
  assert stage_dir.is_dir() and not list(stage_dir.iterdir())


def test_a_stage_that_never_completed_resumes_in_place(tmp_path):
  stage_dir = tmp_path / "s"
  assert _decide(stage_dir) == stages.RESUME             # no directory at all
  stages.prepare(str(stage_dir), stages.RESUME)
  (stage_dir / "raw.jsonl.partial").write_text('{"key": "a"}\n')
  assert _decide(stage_dir) == stages.RESUME             # partial output, no manifest
  assert _decide(stage_dir, upstream_ran=True) == stages.RESUME
  stages.prepare(str(stage_dir), stages.RESUME)
  assert (stage_dir / "raw.jsonl.partial").read_text() == '{"key": "a"}\n'
  assert _decide(stage_dir, forced=True) == stages.RESTART
  assert stages.read_result(str(stage_dir)) is None
  with pytest.raises(ValueError, match="not on 'skip'"):
    stages.prepare(str(stage_dir), stages.SKIP)


def test_a_malformed_manifest_never_skips(tmp_path, source):
  stage_dir = tmp_path / "s"
  _complete_stage(stage_dir, source)
  manifest = json.loads((stage_dir / "manifest.json").read_text())
  manifest["inputs"]["data"] = "not an entry"
  (stage_dir / "manifest.json").write_text(json.dumps(manifest))
  assert _decide(stage_dir) == stages.RESTART


def test_results_are_json_data(tmp_path):
  stage_dir = tmp_path / "s"
  stage_dir.mkdir()
  record = stages.write_result(str(stage_dir), {"path": tmp_path, "n": 3}, 2.0)
  assert record == {"path": str(tmp_path), "n": 3, "seconds": 2.0}
  assert stages.write_result(str(stage_dir), None, 0.5) == {"seconds": 0.5}
  assert stages.read_result(str(stage_dir)) == {"seconds": 0.5}
  (stage_dir / stages.RESULT_FILE).write_text("{")
  with pytest.raises(DataError, match=stages.RESULT_FILE):
    stages.read_result(str(stage_dir))


def test_tokenizer_stage_trains_a_model_with_the_chat_markers(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 40 +
                    "a stitch in time saves nine, said the assistant\n" * 40)
  cfg = ml_collections.ConfigDict({"corpus": str(corpus), "vocab_size": 320})
  result = train_tokenizer(cfg, str(tmp_path / "tok"))
  path = result["outputs"]["tokenizer"]
  assert result["stage"] == "tokenizer" and path == str(tmp_path / "tok" / "tokenizer.model")
  tok = Tokenizer.from_file(path)
  assert tok.vocab_size == 320 and tok.token_to_id("<extra_id_1>") > 0
  manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
  assert manifest["stage"] == "tokenizer" and manifest["counts"] == {"vocab_size": 320}
  assert stages.is_complete(str(tmp_path / "tok"), cfg) is False   # no result recorded yet
  stages.write_result(str(tmp_path / "tok"), result, 1.0)
  assert stages.is_complete(str(tmp_path / "tok"), cfg)
  with pytest.raises(ValueError, match="tokenizer_corpus"):
    train_tokenizer(ml_collections.ConfigDict({"corpus": "", "vocab_size": 320}),
                    str(tmp_path / "none"))
