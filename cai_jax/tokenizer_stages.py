"""The pipeline's tokenizer stages: `tokenizer` (train one) and `chat_tokens` (add the markers).

Each is a stage like the others, `stage(cfg, out_dir) -> result`, writing its
outputs and then its manifest in `out_dir`.
"""

from __future__ import annotations

import os
import shutil

from cai_jax import checkpoint
from cai_jax.data import jsonl
from cai_jax.model import grow_vocab
from cai_jax.tokenizer import Tokenizer, add_pieces, train_sentencepiece


def train_tokenizer(tcfg, out_dir: str) -> dict:
  """The `tokenizer` stage: a SentencePiece model of `tcfg.vocab_size` pieces (with the chat
  markers as pieces) trained on the text file `tcfg.corpus`, in `out_dir/tokenizer.model`."""
  if not tcfg.corpus:
    raise ValueError("config.tokenizer (a sentencepiece model) or config.tokenizer_corpus "
                     "is needed")
  with open(tcfg.corpus, encoding="utf-8") as f:
    text = f.read()
  path = train_sentencepiece([text], os.path.join(out_dir, "tokenizer"), vocab_size=tcfg.vocab_size)
  jsonl.write_manifest(out_dir, stage="tokenizer", config=tcfg, inputs={"corpus": tcfg.corpus},
                       counts={"vocab_size": tcfg.vocab_size}, seed=0)
  return {"stage": "tokenizer", "outputs": {"tokenizer": path}}


def add_chat_tokens(ccfg, out_dir: str) -> dict:
  """The `chat_tokens` stage: `ccfg.tokenizer` with `ccfg.pieces` (chat markers) added as
  single pieces, in `out_dir/tokenizer.model`; given `ccfg.base_model`, that model with room
  for them in `out_dir/model` (new embedding rows and LM-head columns are the mean ones,
  `model.grow_vocab`). Both directories record what was added in `added_tokens.json`."""
  tok_path = os.path.join(out_dir, "tokenizer.model")
  added = add_pieces(ccfg.tokenizer, list(ccfg.pieces), tok_path)
  tok = Tokenizer.from_file(tok_path)
  record = {"source_tokenizer": ccfg.tokenizer, "added_pieces": {p: tok.token_to_id(p)
                                                                 for p in added},
            "vocab_size": tok.vocab_size, "init": "mean of the existing embedding rows"}
  outputs = {"tokenizer": tok_path}
  if ccfg.base_model:
    config, params, head = checkpoint.load_model(ccfg.base_model)
    grown, params = grow_vocab(config, params, max(config.vocab_size, tok.vocab_size))
    model_dir = os.path.join(out_dir, "model")
    checkpoint.save_model(model_dir, grown, params, head=head)
    shutil.copy(tok_path, os.path.join(model_dir, "tokenizer.model"))
    record.update(source_model=ccfg.base_model, model_vocab_before=config.vocab_size,
                  model_vocab_after=grown.vocab_size)
    jsonl.atomic_write_json(os.path.join(model_dir, "added_tokens.json"), record)
    outputs["model"] = model_dir
  jsonl.atomic_write_json(os.path.join(out_dir, "added_tokens.json"), record)
  jsonl.write_manifest(out_dir, stage="chat_tokens", config=ccfg,
                       inputs={"tokenizer": ccfg.tokenizer}, counts={"added": len(added)}, seed=0)
  return {"stage": "chat_tokens", "added": record["added_pieces"], "outputs": outputs}
