"""Scores texts with a trained reward model.

    python -m launch.score_rm --model=RM_WORKDIR/model --input=texts.jsonl --output=scores.jsonl

`--model` is a reward-model directory written by `launch.train_rm` (its
`model/` orbax dir or its `hf/` safetensors dir; the tokenizer is read from the
`tokenizer.model` next to the weights unless `--tokenizer` says otherwise).
Each input line is a JSON object with the text under `--field` (default
`text`, as in the comparison files); each output line is that object with
`"score"` added, in input order. The output appears atomically, complete or
not at all. Texts are encoded as in training (`--template`'s chat encoding) and
read at their last token, so they should end with the template's end-of-turn
marker.
"""

from __future__ import annotations

import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "Reward model directory (cai_jax or HF).",
                             required=True)
_INPUT = flags.DEFINE_string("input", None, "JSON Lines file of records with a text field.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the scored records (JSON Lines).",
                              required=True)
_FIELD = flags.DEFINE_string("field", "text", "The record field holding the text to score.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "SentencePiece model; default: MODEL/tokenizer.model.")
_TEMPLATE = flags.DEFINE_enum("template", "nemo", ["nemo", "mistral_inst"],
                              "Chat template the texts were rendered with (the RM's training one).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Texts per forward pass.")
_MAX_LEN = flags.DEFINE_integer("max_seq_len", 4096,
                                "Longer texts keep their first tokens and their end-of-turn "
                                "marker (where the reward is read), as in training.")


def score_file(model: str, input_path: str, output_path: str, *, field: str = "text",
               tokenizer: str | None = None, batch_size: int = 16,
               max_seq_len: int = 4096, template: str = "nemo") -> int:
  """Scores every record of `input_path` into `output_path`; returns the count."""
  from cai_jax.data import jsonl
  from cai_jax.scoring import RewardScorer
  records, texts = [], []
  for line, record in jsonl.read_records(input_path):
    texts.append(jsonl.require(record, field, str, input_path, line))
    records.append(record)
  scorer = RewardScorer(model, tokenizer, max_seq_len=max_seq_len, batch_size=batch_size,
                        template=template)
  scores = scorer.score(texts)
  return jsonl.atomic_write_jsonl(output_path,
                                  ({**r, "score": s} for r, s in zip(records, scores)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from launch import runtime
  runtime.quiet_console()         # orbax logs every file it touches at INFO
  from cai_jax.checkpoint import CheckpointError
  from cai_jax.data.jsonl import DataError
  try:
    n = score_file(_MODEL.value, _INPUT.value, _OUTPUT.value, field=_FIELD.value,
                   tokenizer=_TOKENIZER.value, batch_size=_BATCH.value,
                   max_seq_len=_MAX_LEN.value, template=_TEMPLATE.value)
  except (CheckpointError, DataError, ValueError, OSError) as e:
    print(f"score_rm: error: {e}", file=sys.stderr)
    return 1
  print(f"scored {n} texts from {_INPUT.value} with {_MODEL.value} -> {_OUTPUT.value}")
  return 0


if __name__ == "__main__":
  app.run(main)
