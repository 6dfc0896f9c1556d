"""SentencePiece training, the Tokenizer wrapper, and chat templates with loss masks.

The `tokenizer` fixture (tests/conftest.py) is a vocab-512 BPE model trained on
data/tokenizer_corpus.txt. The extra models here mimic Mistral's own
tokenizers: one without a pad piece, one without the chat tokens, one where the
chat tokens are control pieces that SentencePiece never produces from text.
"""

from __future__ import annotations

import os
import random

import pytest
import sentencepiece as spm

from cai_jax.tokenizer import (CHAT_SPECIAL_TOKENS, MISTRAL_INST, NEMO, Tokenizer, get_template,
                               train_sentencepiece)

VARIED_TEXTS = [
    "Hello, world!",
    " leading space and  two spaces and trailing space ",
    "line one\nline two\n\n\nafter blank lines\n",
    "Numbers: 3.14159, $1,299.00, 42%, -7 and 2024-06-11.",
    "Tabs\tand\r\ncarriage returns",
    "Unicode: café, naïve, Zürich, 日本語, Ελληνικά, emoji 👋🏽 and 🇮🇹.",
    "<extra_id_0>System\n\n<extra_id_1>User\nHi there\n<extra_id_1>Assistant\nHello!\n<extra_id_1>",
    "<s>[INST] What is 2+2? [/INST]Four.</s>",
    "<extra_id_ almost special [INST without bracket <extra_id_1 and <extra_id_9>",
    "",
]


def _corpus_lines() -> list[str]:
  path = os.path.join(os.path.dirname(__file__), os.pardir, "data", "tokenizer_corpus.txt")
  with open(path, encoding="utf-8") as f:
    return f.read().split("\n\n")


@pytest.fixture(scope="module")
def corpus_text() -> str:
  return "\n\n".join(_corpus_lines())


@pytest.fixture(scope="module")
def no_pad_tokenizer(tmp_path_factory, corpus_text) -> Tokenizer:
  """Like Mistral's tokenizer.model: unk/bos/eos only, no pad, no chat pieces."""
  prefix = tmp_path_factory.mktemp("nopad") / "sp"
  path = train_sentencepiece([corpus_text], str(prefix), vocab_size=400, pad_id=-1,
                             user_defined_symbols=("\n",))
  return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def control_tokenizer(tmp_path_factory, corpus_text) -> tuple[str, Tokenizer]:
  """Chat tokens as control pieces (Mistral v0.3 style): plain SentencePiece splits them."""
  prefix = tmp_path_factory.mktemp("control") / "sp"
  path = train_sentencepiece([corpus_text], str(prefix), vocab_size=400,
                             user_defined_symbols=("\n",), control_symbols=CHAT_SPECIAL_TOKENS)
  return path, Tokenizer.from_file(path)


# --- training and special ids ----------------------------------------------------

def test_ids_follow_mistral_plus_pad(tokenizer):
  assert tokenizer.vocab_size == 512
  assert (tokenizer.token_to_id("<unk>"), tokenizer.bos_id, tokenizer.eos_id,
          tokenizer.pad_id) == (0, 1, 2, 3)
  assert [tokenizer.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]


@pytest.mark.parametrize("special", CHAT_SPECIAL_TOKENS + ("\n",))
def test_special_tokens_are_single_ids(tokenizer, special):
  (token_id,) = tokenizer.encode(special)
  assert tokenizer.id_to_token(token_id) == special
  assert tokenizer.token_to_id(special) == token_id
  # Also inside running text, glued to neighbouring characters.
  assert token_id in tokenizer.encode(f"abc{special}def")
  assert tokenizer.decode([token_id]) == special
  if special != "\n":
    assert tokenizer.special_token_ids[special] == token_id


def test_special_token_ids_cover_chat_tokens_and_bos_eos(tokenizer):
  assert set(tokenizer.special_token_ids) == set(CHAT_SPECIAL_TOKENS) | {"<s>", "</s>"}
  assert tokenizer.encode("<s>x</s>") == [1] + tokenizer.encode("x") + [2]


def test_training_is_deterministic_and_atomic(tmp_path, corpus_text, sp_model_path):
  path = train_sentencepiece([corpus_text], str(tmp_path / "again"), vocab_size=512)
  assert path == str(tmp_path / "again.model")
  with open(path, "rb") as a, open(sp_model_path, "rb") as b:
    assert a.read() == b.read()
  assert os.listdir(tmp_path) == ["again.model"]  # no temp files left behind


def test_training_errors_name_the_output(tmp_path):
  with pytest.raises(ValueError, match="no training text"):
    train_sentencepiece(["", ""], str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="tiny.model"):
    train_sentencepiece(["just a few words\n"], str(tmp_path / "tiny"), vocab_size=5000)
  assert os.listdir(tmp_path) == []


# --- encode / decode ---------------------------------------------------------------

@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  # Per-token pieces concatenate back to the same text (byte-fallback chars included).
  pieces = tokenizer.decode_tokens_to_pieces(ids)
  assert len(pieces) == len(ids)
  assert "".join(pieces) == text


def test_unicode_uses_byte_fallback_not_unk(tokenizer):
  ids = tokenizer.encode("日本語 👋")
  assert 0 not in ids
  assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids)
  pieces = tokenizer.decode_tokens_to_pieces(ids)
  assert "日" in pieces and "👋" in pieces


def test_bos_eos_pad_handling(tokenizer):
  ids = tokenizer.encode("hi", add_bos=True, add_eos=True)
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  assert tokenizer.decode(ids) == "<s>hi</s>"
  assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
  assert tokenizer.decode(ids + [tokenizer.pad_id] * 3) == "<s>hi</s>"
  with pytest.raises(ValueError, match="out of range"):
    tokenizer.decode([tokenizer.vocab_size])
  with pytest.raises(KeyError, match="not a piece"):
    tokenizer.token_to_id("no-such-piece")


def test_concatenation_invariant(tokenizer):
  """encode(a + b) == encode(a) + encode(b) whenever a ends with "\\n" or a special token."""
  boundaries = ["\n"] + list(CHAT_SPECIAL_TOKENS) + ["<s>", "</s>"]
  # Every line break of every corpus paragraph.
  for para in _corpus_lines():
    for k, ch in enumerate(para):
      if ch == "\n":
        a, b = para[:k + 1], para[k + 1:]
        assert tokenizer.encode(a + b) == tokenizer.encode(a) + tokenizer.encode(b), (a, b)
  # Random strings built to tempt merges across the boundary.
  rng = random.Random(0)
  alphabet = (list("abcdefghij ABC .,!?'\n\t0123456789éü日👋") + boundaries +
              ["the ", "ing", "Assistant", "User", "<extra_id_", "[INST", "/INST]", "  "])
  for _ in range(1500):
    a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) + rng.choice(boundaries)
    b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
    assert tokenizer.encode(a + b) == tokenizer.encode(a) + tokenizer.encode(b), (a, b)


# --- Mistral-like tokenizers ---------------------------------------------------

def test_no_pad_falls_back_to_eos(no_pad_tokenizer):
  tok = no_pad_tokenizer
  assert tok.pad_id == tok.eos_id == 2
  # A pad that is really eos must not vanish from decoded text.
  assert tok.decode(tok.encode("ok", add_eos=True)) == "ok</s>"


def test_missing_special_tokens_are_plain_text(no_pad_tokenizer):
  tok = no_pad_tokenizer
  assert set(tok.special_token_ids) == {"<s>", "</s>"}
  ids = tok.encode("<extra_id_1>User\n")
  assert len(ids) > 3
  assert tok.decode(ids) == "<extra_id_1>User\n"
  # The marker is then a token sequence, the same wherever it stands in chat text.
  eot = NEMO.end_of_turn_ids(tok)
  assert len(eot) > 1 and tok.decode(eot) == "<extra_id_1>"
  assert NEMO.encode(tok, "hi\n<extra_id_1>")[-len(eot):] == eot
  assert MISTRAL_INST.end_of_turn_ids(tok) == [tok.eos_id]


def test_control_special_tokens_are_still_single_ids(control_tokenizer):
  path, tok = control_tokenizer
  raw = spm.SentencePieceProcessor(model_file=path)
  assert len(raw.encode("<extra_id_1>")) > 1  # SentencePiece alone splits it
  (token_id,) = tok.encode("<extra_id_1>")
  assert raw.is_control(token_id)
  text = "<extra_id_1>User\nhi\n[INST] x [/INST]"
  assert tok.decode(tok.encode(text)) == text


# --- from_file errors ----------------------------------------------------------------

def test_from_file_missing_path(tmp_path):
  path = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match=str(path)):
    Tokenizer.from_file(path)


def test_from_file_not_a_model(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text('{"version": "1.0"}')
  with pytest.raises(ValueError, match=f"{path} is not a SentencePiece model"):
    Tokenizer.from_file(path)


def test_from_file_directory(tmp_path, sp_model_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
    Tokenizer.from_file(tmp_path)
  with open(sp_model_path, "rb") as src, open(tmp_path / "tokenizer.model", "wb") as dst:
    dst.write(src.read())
  assert Tokenizer.from_file(tmp_path).vocab_size == 512


# --- chat templates ----------------------------------------------------------------

SYSTEM = "You are a helpful assistant."
REPLY1 = "Paris."
REPLY2 = "Rome.\nIt is lovely — ciao 👋"
CONVERSATION = [
    {"from": "User", "value": "What is the capital of France?"},
    {"from": "Assistant", "value": REPLY1},
    {"from": "User", "value": "And of Italy?"},
    {"from": "Assistant", "value": REPLY2},
]


def _split_by_mask(tokenizer, ids, mask):
  """(decoded trained-on runs, decoded context runs), each run decoded separately."""
  runs = {0: [], 1: []}
  start = 0
  for k in range(1, len(ids) + 1):
    if k == len(ids) or mask[k] != mask[start]:
      runs[mask[start]].append(tokenizer.decode(ids[start:k]))
      start = k
  return runs[1], runs[0]


def test_nemo_two_exchanges_text_and_loss_mask(tokenizer):
  expected = ("<extra_id_0>System\nYou are a helpful assistant.\n"
              "<extra_id_1>User\nWhat is the capital of France?\n"
              f"<extra_id_1>Assistant\n{REPLY1}\n"
              "<extra_id_1>User\nAnd of Italy?\n"
              f"<extra_id_1>Assistant\n{REPLY2}\n"
              "<extra_id_1>")
  assert NEMO.render_text(CONVERSATION, system=SYSTEM) == expected
  assert NEMO.render_segments(CONVERSATION, system=SYSTEM) == [
      ("<extra_id_0>System\nYou are a helpful assistant.\n<extra_id_1>User\n"
       "What is the capital of France?\n<extra_id_1>Assistant\n", False),
      (f"{REPLY1}\n<extra_id_1>", True),
      ("User\nAnd of Italy?\n<extra_id_1>Assistant\n", False),
      (f"{REPLY2}\n<extra_id_1>", True),
  ]
  ids, mask = NEMO.render_ids(tokenizer, CONVERSATION, system=SYSTEM)
  assert ids == tokenizer.encode(expected)  # segment-wise == whole-string encoding
  assert len(mask) == len(ids)
  trained = [i for i, m in zip(ids, mask) if m]
  assert tokenizer.decode(trained) == f"{REPLY1}\n<extra_id_1>{REPLY2}\n<extra_id_1>"
  trained_runs, context_runs = _split_by_mask(tokenizer, ids, mask)
  assert trained_runs == [f"{REPLY1}\n<extra_id_1>", f"{REPLY2}\n<extra_id_1>"]
  assert context_runs == [
      "<extra_id_0>System\nYou are a helpful assistant.\n<extra_id_1>User\n"
      "What is the capital of France?\n<extra_id_1>Assistant\n",
      "User\nAnd of Italy?\n<extra_id_1>Assistant\n"]
  # The last trained token is the end-of-turn token: that is how the model learns to stop.
  assert [ids[-1]] == NEMO.end_of_turn_ids(tokenizer) == [
      tokenizer.special_token_ids["<extra_id_1>"]]
  assert mask[-1] == 1


def test_mistral_two_exchanges_text_and_loss_mask(tokenizer):
  expected = ("<s>[INST] You are a helpful assistant.\n\nWhat is the capital of France? [/INST]"
              f"{REPLY1}</s>[INST] And of Italy? [/INST]{REPLY2}</s>")
  assert MISTRAL_INST.render_text(CONVERSATION, system=SYSTEM) == expected
  ids, mask = MISTRAL_INST.render_ids(tokenizer, CONVERSATION, system=SYSTEM)
  assert ids == tokenizer.encode(expected)
  assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
  trained = [i for i, m in zip(ids, mask) if m]
  assert tokenizer.decode(trained) == f"{REPLY1}</s>{REPLY2}</s>"
  trained_runs, context_runs = _split_by_mask(tokenizer, ids, mask)
  assert trained_runs == [f"{REPLY1}</s>", f"{REPLY2}</s>"]
  assert context_runs == [
      "<s>[INST] You are a helpful assistant.\n\nWhat is the capital of France? [/INST]",
      "[INST] And of Italy? [/INST]"]
  assert [ids[-1]] == MISTRAL_INST.end_of_turn_ids(tokenizer) == [tokenizer.eos_id]


def test_openai_style_messages_render_the_same():
  messages = [{"role": "system", "content": SYSTEM}] + [
      {"role": t["from"].lower(), "content": t["value"]} for t in CONVERSATION]
  for template in (NEMO, MISTRAL_INST):
    assert (template.render_segments(messages) ==
            template.render_segments(CONVERSATION, system=SYSTEM))


def test_generation_prompt_ends_with_assistant_header(tokenizer):
  one = [{"from": "User", "value": "How do I bake bread?"}]
  assert NEMO.render_prompt(one) == (
      "<extra_id_0>System\n\n<extra_id_1>User\nHow do I bake bread?\n<extra_id_1>Assistant\n")
  assert MISTRAL_INST.render_prompt(one) == "<s>[INST] How do I bake bread? [/INST]"
  follow_up = CONVERSATION + [{"from": "User", "value": "Thanks!"}]
  prompt = NEMO.render_prompt(follow_up, system=SYSTEM)
  assert prompt.endswith(f"{REPLY2}\n<extra_id_1>User\nThanks!\n<extra_id_1>Assistant\n")
  assert MISTRAL_INST.render_prompt(follow_up).endswith(f"{REPLY2}</s>[INST] Thanks! [/INST]")
  # A prompt has nothing to train on, and the full conversation extends it token for token.
  ids, mask = NEMO.render_ids(tokenizer, one, add_generation_prompt=True)
  assert not any(mask)
  full_ids, _ = NEMO.render_ids(tokenizer, one + [{"from": "Assistant", "value": "Knead."}])
  assert full_ids[:len(ids)] == ids
  with pytest.raises(ValueError, match="turn 3.*end with a User turn"):
    NEMO.render_prompt(CONVERSATION)


@pytest.mark.parametrize("conversation, match", [
    ([], "empty"),
    ("User: hi", "list of turns"),
    ([{"from": "Human", "value": "hi"}], r"turn 0: field 'from' is 'Human'"),
    ([{"from": "User", "value": "hi"}, {"role": "bot", "content": "x"}],
     r"turn 1: field 'role' is 'bot'"),
    ([{"from": "User", "value": "hi"}, {"from": "User", "value": "again"}],
     r"turn 1: field 'from' is 'User'.*alternate.*expected Assistant"),
    ([{"from": "Assistant", "value": "hi"}], r"turn 0: .*expected User"),
    ([{"from": "User", "value": 3}], r"turn 0: field 'value' must be a string"),
    ([{"from": "User"}], r"turn 0: missing field 'value'"),
    ([{"text": "hi"}], r"turn 0: missing field 'from'"),
    (["hi"], r"turn 0: expected a dict"),
    ([{"from": "User", "value": "a"}, {"role": "system", "content": "s"}],
     r"turn 1: a system message is only allowed as the first turn"),
    ([{"role": "system", "content": "s"}], "only a system message"),
])
def test_bad_conversations_name_turn_and_field(conversation, match):
  for template in (NEMO, MISTRAL_INST):
    with pytest.raises(ValueError, match=match):
      template.render_segments(conversation)


def test_get_template():
  assert get_template("nemo") is NEMO
  assert get_template("mistral_inst") is MISTRAL_INST
  with pytest.raises(ValueError, match="valid names: mistral_inst, nemo"):
    get_template("chatml")
