"""SentencePiece tokenizer, chat special tokens and chat templates.

One wrapper serves both the tiny tokenizers this project trains for tests and
the CPU pipeline (`train_sentencepiece`) and real Mistral `tokenizer.model`
files. Chat special tokens (`<extra_id_1>`, `[INST]`, ...) are split out of the
text before SentencePiece sees it, so each is always exactly one id when the
vocabulary has it as a single piece, whatever the model's own handling of
user-defined or control symbols.

Chat templates render a conversation as text segments, each flagged with
whether the SFT loss applies to it, and own the one way chat text becomes ids
(`ChatTemplate.encode`): the text is cut into chunks at fixed places (special
strings, the template's markers, and after the template's `chunk_after`
strings such as "\n"), and every chunk is encoded on its own. Every segment
boundary is a chunk boundary, so encoding a conversation segment by segment
(`render_ids`, which needs the boundaries for the loss mask) gives exactly the
ids of encoding its whole text, and a prompt prefix gives exactly the first
ids of the full conversation. That holds for any SentencePiece model: with or
without a dummy prefix ("▁" before a text, as Mistral's has), with or without
the chat markers as pieces (Mistral's tokenizer spells `<extra_id_1>` with 7
tokens). Whether a chunk starts like a new text (dummy prefix) or continues
the one before is the template's choice: NeMo's continues (as NeMo encodes the
whole string), Mistral-instruct's starts each message afresh (as
mistral_common encodes each message).
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import itertools
import os
import re
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import sentencepiece as spm

from cai_jax.data.jsonl import atomic_write_bytes

# NeMo's chat tokens (system turn start, turn start, label start) and
# Mistral-instruct's instruction brackets.
CHAT_SPECIAL_TOKENS = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "[INST]", "[/INST]")

# Newline is a user-defined symbol in the tokenizers we train: no learned piece
# can then span a line break, which makes "encode(a + b) == encode(a) +
# encode(b)" hold whenever `a` ends with "\n" (chat headers end with one).
DEFAULT_USER_SYMBOLS = CHAT_SPECIAL_TOKENS + ("\n",)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def _training_lines(texts: Iterable[str], out_path: str) -> list[str]:
  """Splits texts into lines that keep their "\\n" so the newline symbol is seen in context."""
  if isinstance(texts, str):
    # A bare string would otherwise be iterated character by character.
    texts = [texts]
  lines = []
  for k, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(
          f"train_sentencepiece({out_path}): text {k} is {type(text).__name__}, expected str")
    parts = text.split("\n")
    for j, part in enumerate(parts):
      line = part + "\n" if j < len(parts) - 1 else part
      if line:
        lines.append(line)
  return lines


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str,
    vocab_size: int = 512,
    *,
    model_type: str = "bpe",
    pad_id: int = PAD_ID,
    user_defined_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
    control_symbols: Sequence[str] = (),
    split_digits: bool = True,
    max_sentence_length: int = 1 << 16,
) -> str:
  """Trains a Mistral-compatible SentencePiece model and returns the `.model` path.

  Ids follow Mistral (unk=0, `<s>`=1, `</s>`=2) plus `<pad>`=3 (pass
  `pad_id=-1` for a Mistral-like model without pad). Normalisation is the
  identity and no dummy prefix or whitespace folding is applied, so decoding
  reproduces the text exactly; byte fallback means no character is ever `<unk>`.
  Training is deterministic (one thread, no sentence sampling): the same texts
  give byte-identical models. `control_symbols` (never produced by
  SentencePiece from text) mimic tokenizers such as Mistral v0.3's, where
  `[INST]` is a control piece.

  `out_prefix + ".model"` is written through a temporary file and a rename, so
  an interrupted run never leaves a half-written model behind.
  """
  out_path = os.fspath(out_prefix) + ".model"
  sentences = _training_lines(texts, out_path)
  if not sentences:
    raise ValueError(f"train_sentencepiece({out_path}): no training text given")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=pad_id,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        user_defined_symbols=list(user_defined_symbols),
        control_symbols=list(control_symbols),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=split_digits,
        max_sentence_length=max_sentence_length,
        num_threads=1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"training sentencepiece model {out_path} failed: {e}") from e
  data = model.getvalue()
  # Check the ids the rest of the code relies on before publishing the file.
  check = spm.SentencePieceProcessor(model_proto=data)
  got = (check.unk_id(), check.bos_id(), check.eos_id(), check.pad_id())
  if got != (UNK_ID, BOS_ID, EOS_ID, pad_id):
    raise RuntimeError(f"trained {out_path} has unk/bos/eos/pad ids {got}, expected "
                       f"{(UNK_ID, BOS_ID, EOS_ID, pad_id)}")
  atomic_write_bytes(out_path, data)
  return out_path


def add_pieces(model_path: str, pieces: Sequence[str], out_path: str) -> list[str]:
  """Writes a copy of a SentencePiece model with `pieces` appended as user-defined symbols.

  Each new piece gets the next free id (existing ids do not move, so a model's
  embedding only grows at the end) and is always one token in text, as NeMo and
  HF users add chat markers. Pieces the model already has are left alone.
  Written through a temporary file and a rename. Returns the pieces added.
  """
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf (a requirement)
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, "rb") as f:
    proto.ParseFromString(f.read())
  have = {p.piece for p in proto.pieces}
  added = []
  for piece in pieces:
    if piece not in have:
      proto.pieces.add(piece=piece, score=0.0,
                       type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
      have.add(piece)
      added.append(piece)
  data = proto.SerializeToString()
  spm.SentencePieceProcessor(model_proto=data)   # refuse to publish a model that does not load
  atomic_write_bytes(out_path, data)
  return added


def _without_dummy_prefix(processor: spm.SentencePieceProcessor):
  """(processor that adds no dummy prefix, whether `processor` adds one)."""
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf (a requirement)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(processor.serialized_model_proto())
  if not proto.normalizer_spec.add_dummy_prefix:
    return processor, False
  proto.normalizer_spec.add_dummy_prefix = False
  return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), True


class Tokenizer:
  """A SentencePiece model with chat special tokens handled as single ids.

  Construct with `Tokenizer.from_file(path)`. Special strings are the chat
  tokens (`CHAT_SPECIAL_TOKENS`) plus the bos/eos pieces (`<s>`, `</s>`), each
  only if the vocabulary holds it as a single piece; `special_token_ids` maps
  exactly those. Templates such as Mistral-instruct's write `<s>`/`</s>` into
  the text, so these must become the bos/eos ids when the text is encoded.
  """

  def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
    self._sp = processor
    self.source = source
    n = processor.get_piece_size()
    self._pieces = [processor.id_to_piece(i) for i in range(n)]
    self._is_byte = [processor.is_byte(i) for i in range(n)]
    unk = processor.unk_id()

    def single_piece(s: str) -> int | None:
      i = processor.piece_to_id(s)
      return i if 0 <= i < n and i != unk and self._pieces[i] == s else None

    specials: dict[str, int] = {}
    for s in CHAT_SPECIAL_TOKENS:
      if (i := single_piece(s)) is not None:
        specials[s] = i
    for i in (processor.bos_id(), processor.eos_id()):
      if 0 <= i < n:
        specials[self._pieces[i]] = i
    self._special_token_ids = specials
    # Longest first so that no special string is cut by a shorter one it contains.
    alternatives = sorted(specials, key=len, reverse=True)
    self._split_re = (re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
                      if alternatives else None)
    self._has_pad = 0 <= processor.pad_id() < n
    # The same model without its dummy prefix, for text that continues other
    # text (SentencePiece has no per-call switch for it).
    self._sp_continue, self._dummy_prefix = _without_dummy_prefix(processor)
    # Ids decoded as their literal piece text: the special strings and every
    # control symbol (SentencePiece itself would decode these to "").
    self._literal_ids = frozenset(specials.values()) | frozenset(
        i for i in range(n) if processor.is_control(i))

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads a SentencePiece `.model` file (or a directory holding `tokenizer.model`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      candidate = os.path.join(path, "tokenizer.model")
      if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"tokenizer directory {path} has no tokenizer.model (a SentencePiece model file)")
      path = candidate
    if not os.path.isfile(path):
      raise FileNotFoundError(f"sentencepiece model file {path} does not exist")
    processor = spm.SentencePieceProcessor()
    try:
      processor.Load(path)
    except (RuntimeError, OSError) as e:
      raise ValueError(
          f"{path} is not a SentencePiece model ({e}); pass a tokenizer.model file, "
          f"e.g. one written by train_sentencepiece or shipped with a Mistral checkpoint") from e
    return cls(processor, source=path)

  def __repr__(self) -> str:
    return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  @property
  def add_dummy_prefix(self) -> bool:
    """Whether SentencePiece puts "▁" before each text it encodes (Mistral's model does)."""
    return self._dummy_prefix

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The pad id, or eos where the model has none (Mistral's own tokenizer has no pad)."""
    return self._sp.pad_id() if self._has_pad else self.eos_id

  @property
  def special_token_ids(self) -> dict[str, int]:
    """Chat tokens and `<s>`/`</s>` that exist as single pieces, by their text."""
    return dict(self._special_token_ids)

  def token_to_id(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    if not 0 <= i < self.vocab_size or self._pieces[i] != piece:
      raise KeyError(f"{piece!r} is not a piece of the vocabulary of {self.source}")
    return i

  def id_to_token(self, token_id: int) -> str:
    return self._pieces[self._check_id(token_id)]

  def _check_id(self, token_id: Any) -> int:
    i = int(token_id)
    if not 0 <= i < self.vocab_size:
      raise ValueError(
          f"token id {i} is out of range for {self.source} (vocab_size={self.vocab_size})")
    return i

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Text to ids; special strings become their single id.

    The text is split on the special strings and the chunks between them go
    to SentencePiece one by one (a special string the vocabulary lacks stays
    plain text). Text that contains a special string, user text included,
    gets its id: as with HF tokenizers, turn markers in data are not escaped.

    This is SentencePiece's own encoding between special strings: each chunk
    gets the model's dummy prefix, if it has one. Chat text goes through
    `ChatTemplate.encode` instead, which every stage and the server use.
    `add_bos` never doubles a bos the text already starts with. As in
    SentencePiece, a literal "▁" (U+2581) in the text decodes as a space.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    ids: list[int] = []
    if self._split_re is not None:
      # re.split with one group puts the separators at odd positions.
      for k, chunk in enumerate(self._split_re.split(text)):
        if k % 2:
          ids.append(self._special_token_ids[chunk])
        elif chunk:
          ids.extend(self._sp.encode(chunk))
    elif text:
      ids.extend(self._sp.encode(text))
    if add_bos:
      ids = self.with_bos(ids)
    if add_eos:
      if self.eos_id < 0:
        raise ValueError(f"add_eos=True but {self.source} has no eos token")
      ids.append(self.eos_id)
    return ids

  def with_bos(self, ids: list[int]) -> list[int]:
    """`ids` starting with bos: prepended unless already there (never two)."""
    if self.bos_id < 0:
      raise ValueError(f"add_bos=True but {self.source} has no bos token")
    return ids if ids[:1] == [self.bos_id] else [self.bos_id] + ids

  def encode_chunks(self, chunks: Sequence[str], fresh: Sequence[bool]) -> list[list[int]]:
    """Plain text chunks (no special strings) to ids, one SentencePiece call per kind.

    A `fresh` chunk is encoded as a text of its own (with the model's dummy
    prefix, if it has one); any other as text continuing what precedes it
    (no dummy prefix). For models without a dummy prefix the two are the same.
    """
    out: list[list[int]] = [[] for _ in chunks]
    for processor, want in ((self._sp, True), (self._sp_continue, False)):
      index = [k for k, (c, f) in enumerate(zip(chunks, fresh)) if bool(f) == want and c]
      # Bounded batches: SentencePiece holds Python's GIL while it builds a batch's result
      # lists, and a server tokenizing a huge request must not starve its other threads.
      for start in range(0, len(index), 256):
        part = index[start:start + 256]
        for k, ids in zip(part, processor.encode([chunks[k] for k in part])):
          out[k] = list(ids)
    return out

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Ids to text; special and control tokens come back as their literal text.

    Pad ids are always dropped (only where the model has a real pad: a pad
    that falls back to eos is still eos). With `skip_special_tokens=True` the
    special and control tokens are dropped too.
    """
    pad = self._sp.pad_id() if self._has_pad else None
    out: list[str] = []
    run: list[int] = []
    for token_id in ids:
      i = self._check_id(token_id)
      if i == pad:
        continue
      if i in self._literal_ids:
        if run:
          out.append(self._sp.decode(run))
          run = []
        if not skip_special_tokens:
          out.append(self._pieces[i])
      else:
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def decode_tokens_to_pieces(self, ids: Iterable[int]) -> list[str]:
    """The text each token contributes, one string per id.

    For per-token displays such as OpenAI `top_logprobs`. "▁" becomes a space;
    special and control tokens (pad included) are their literal piece.
    Byte-fallback tokens of one UTF-8 character yield "" until its last byte,
    which carries the whole character, so for our models
    `"".join(pieces) == decode(ids)` when `ids` holds no pad.
    """
    pieces: list[str] = []
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    pending = False
    for token_id in ids:
      i = self._check_id(token_id)
      piece = self._pieces[i]
      if self._is_byte[i]:
        pieces.append(utf8.decode(bytes([int(piece[3:-1], 16)])))
        pending = True
        continue
      if pending:
        # An unfinished character ends here: its replacement char goes to its last byte.
        pieces[-1] += utf8.decode(b"", final=True)
        utf8.reset()
        pending = False
      if i in self._literal_ids:
        pieces.append(piece)
      elif self._sp.is_unknown(i):
        pieces.append(" \u2047 ")  # SentencePiece's surface for <unk>
      else:
        pieces.append(piece.replace("\u2581", " "))
    if pending:
      pieces[-1] += utf8.decode(b"", final=True)
    return pieces


# ----------------------------------------------------------------------------
# Chat templates.

_ROLES = ("user", "assistant")


def _parse_conversation(conversation: Sequence[Mapping[str, Any]],
                        system: str) -> tuple[str, list[tuple[str, str]]]:
  """Validates turns in NeMo (`from`/`value`) or OpenAI (`role`/`content`) form.

  Returns the system message (an OpenAI-style leading system turn is moved
  there) and `(role, text)` pairs with role "user" or "assistant".
  """
  if not isinstance(system, str):
    raise ValueError(f"system message must be a string, got {type(system).__name__}")
  if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
    raise ValueError(
        f"conversation must be a list of turns like {{'from': 'User', 'value': ...}}, "
        f"got {type(conversation).__name__}")
  if not conversation:
    raise ValueError("conversation is empty: it needs at least one User turn")
  turns: list[tuple[str, str]] = []
  for index, turn in enumerate(conversation):
    where = f"conversation turn {index}"
    if not isinstance(turn, Mapping):
      raise ValueError(f"{where}: expected a dict with 'from'/'value' (NeMo) or "
                       f"'role'/'content' (OpenAI), got {type(turn).__name__}")
    if "from" in turn:
      role_field, value_field = "from", "value"
    elif "role" in turn:
      role_field, value_field = "role", "content"
    else:
      raise ValueError(f"{where}: missing field 'from' (NeMo) or 'role' (OpenAI)")
    role = turn[role_field]
    if not isinstance(role, str) or role.lower() not in _ROLES + ("system",):
      raise ValueError(f"{where}: field '{role_field}' is {role!r}; "
                       f"expected 'User' or 'Assistant' (or a leading 'system')")
    if value_field not in turn:
      raise ValueError(f"{where}: missing field '{value_field}'")
    value = turn[value_field]
    if not isinstance(value, str):
      raise ValueError(f"{where}: field '{value_field}' must be a string, "
                       f"got {type(value).__name__}")
    role = role.lower()
    if role == "system":
      if index != 0:
        raise ValueError(f"{where}: a system message is only allowed as the first turn")
      if system:
        raise ValueError(f"{where}: system message given twice (as the first turn and "
                         f"as the system argument)")
      system = value
      continue
    expected = _ROLES[len(turns) % 2]
    if role != expected:
      raise ValueError(
          f"{where}: field '{role_field}' is {turn[role_field]!r} but turns must alternate "
          f"User/Assistant starting with User; expected {expected.capitalize()}")
    turns.append((role, value))
  if not turns:
    raise ValueError("conversation has only a system message: it needs at least one User turn")
  return system, turns


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How a conversation becomes text and ids, and which of it the SFT loss covers.

  Formats take `{system}` / `{message}`. The loss covers each assistant reply
  (`reply_format`, which adds the reply's trailing newline where the template
  has one) and the `end_of_turn` string after it, and nothing else — NeMo's
  answer-only loss, where learning to emit the end of turn is what teaches the
  model to stop. With `end_of_turn_starts_next_turn` the end-of-turn string is
  also the start of the next turn's header (NeMo's `<extra_id_1>`), so that
  header is not repeated.

  Encoding (`encode`): the text is cut before and after every special string
  of the tokenizer and every `markers` string (a marker the vocabulary lacks
  is then spelled by the same tokens wherever it stands, `marker_ids`, except
  at the very start of a text, where a dummy-prefix tokenizer adds "▁"), and after
  every `chunk_after` string. With `fresh_chunks` every chunk is encoded as a
  text of its own (SentencePiece's dummy prefix applies to each, as
  mistral_common encodes each message); otherwise only a chunk at the start of
  the text is, and the rest continue it (as NeMo encodes a whole conversation
  string).
  """

  name: str
  begin: str
  system_format: str
  first_user_with_system: str | None
  user_format: str
  assistant_header: str
  reply_format: str
  end_of_turn: str
  end_of_turn_starts_next_turn: bool
  markers: tuple[str, ...] = ()
  chunk_after: tuple[str, ...] = ()
  fresh_chunks: bool = False

  def __post_init__(self):
    if self.end_of_turn_starts_next_turn and not self.user_format.startswith(self.end_of_turn):
      raise ValueError(f"template {self.name}: user_format must start with end_of_turn "
                       f"{self.end_of_turn!r} when end_of_turn_starts_next_turn is set")
    if self.end_of_turn not in self.markers:
      raise ValueError(f"template {self.name}: end_of_turn {self.end_of_turn!r} must be one of "
                       f"its markers, so that it is always encoded the same way")

  # --- text ---------------------------------------------------------------------

  def render_segments(self, conversation: Sequence[Mapping[str, Any]], system: str = "",
                      add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The conversation as `(text, is_trained_on)` segments, adjacent like-flagged text merged.

    Every segment boundary is a chunk boundary of `encode` (checked by
    `render_ids`), so encoding segment by segment equals encoding the whole
    text. With `add_generation_prompt` the text ends with the assistant
    header, ready for the model to write the reply; the conversation must
    then end with a User turn.
    """
    system, turns = _parse_conversation(conversation, system)
    if add_generation_prompt and turns[-1][0] != "user":
      raise ValueError(f"conversation turn {len(conversation) - 1}: add_generation_prompt "
                       f"needs the conversation to end with a User turn")
    segments: list[tuple[str, bool]] = []

    def add(text: str, loss: bool) -> None:
      if not text:
        return
      if segments and segments[-1][1] == loss:
        segments[-1] = (segments[-1][0] + text, loss)
      else:
        segments.append((text, loss))

    add(self.begin, False)
    add(self.system_format.format(system=system), False)
    after_reply = False
    for k, (role, text) in enumerate(turns):
      if role == "user":
        message = text
        if k == 0 and system and self.first_user_with_system is not None:
          message = self.first_user_with_system.format(system=system, message=text)
        block = self.user_format.format(message=message)
        if after_reply and self.end_of_turn_starts_next_turn:
          block = block[len(self.end_of_turn):]
        add(block, False)
        add(self.assistant_header if k + 1 < len(turns) else "", False)
      else:
        add(self.reply_format.format(message=text) + self.end_of_turn, True)
      after_reply = role == "assistant"
    if add_generation_prompt:
      add(self.assistant_header, False)
    return segments

  def render_text(self, conversation: Sequence[Mapping[str, Any]], system: str = "",
                  add_generation_prompt: bool = False) -> str:
    return "".join(text for text, _ in self.render_segments(
        conversation, system, add_generation_prompt))

  def render_prompt(self, messages: Sequence[Mapping[str, Any]], system: str = "") -> str:
    """Text ending in the assistant header: a PPO prompt record's `text`, or a generation prompt."""
    return self.render_text(messages, system, add_generation_prompt=True)

  # --- ids ----------------------------------------------------------------------

  def _split_pattern(self, tokenizer: Tokenizer) -> re.Pattern:
    key = ("chunks", self)
    cache = tokenizer.__dict__.setdefault("_template_cache", {})
    if key not in cache:
      separators = sorted(set(tokenizer.special_token_ids) | set(self.markers), key=len,
                          reverse=True)
      parts = []
      if separators:
        parts.append("(?P<sep>" + "|".join(map(re.escape, separators)) + ")")
      if self.chunk_after:
        after = sorted(self.chunk_after, key=len, reverse=True)
        parts.append("(?P<after>" + "|".join(map(re.escape, after)) + ")")
      cache[key] = re.compile("|".join(parts)) if parts else None
    return cache[key]

  def chunks(self, tokenizer: Tokenizer, text: str) -> list[tuple[int, int, list[int]]]:
    """`(start, end, ids)` of each chunk of `text`, in order; the ids concatenate to `encode`."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    spans: list[tuple[int, int]] = []
    pattern = self._split_pattern(tokenizer)
    pos = 0
    for m in (pattern.finditer(text) if pattern is not None else ()):
      if m.lastgroup == "sep":
        if m.start() > pos:
          spans.append((pos, m.start()))
        spans.append((m.start(), m.end()))
      else:
        spans.append((pos, m.end()))
      pos = m.end()
    if pos < len(text):
      spans.append((pos, len(text)))
    specials = tokenizer.special_token_ids
    texts, fresh, where = [], [], []
    out: list[tuple[int, int, list[int]]] = []
    for start, end in spans:
      piece = text[start:end]
      if piece in specials:
        out.append((start, end, [specials[piece]]))
        continue
      where.append(len(out))
      texts.append(piece)
      # Only the text's own start is fresh in continuing templates, even after a special
      # piece: adding the markers as pieces then changes the markers' ids and nothing else.
      fresh.append(self.fresh_chunks or start == 0)
      out.append((start, end, []))
    for k, ids in zip(where, tokenizer.encode_chunks(texts, fresh)):
      out[k] = (out[k][0], out[k][1], ids)
    return out

  def encode(self, tokenizer: Tokenizer, text: str, add_bos: bool = False) -> list[int]:
    """Chat text (a whole conversation, a prompt, a comparison) to ids: the one path.

    `add_bos` prepends bos unless the text already starts with it (the
    Mistral-instruct template writes `<s>` itself); never two.
    """
    ids = [i for _, _, chunk in self.chunks(tokenizer, text) for i in chunk]
    return tokenizer.with_bos(ids) if add_bos else ids

  def render_ids(self, tokenizer: Tokenizer, conversation: Sequence[Mapping[str, Any]],
                 system: str = "", add_bos: bool = False,
                 add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """`encode` of the rendered conversation and its loss mask (1 = a training target).

    NeMo's chat SFT adds no bos, hence the default; MISTRAL_INST writes `<s>`
    into the text itself.
    """
    segments = self.render_segments(conversation, system, add_generation_prompt)
    text = "".join(t for t, _ in segments)
    ends = list(itertools.accumulate(len(t) for t, _ in segments))
    ids: list[int] = []
    mask: list[int] = []
    k = 0
    for start, end, chunk in self.chunks(tokenizer, text):
      while ends[k] <= start:
        k += 1
      if end > ends[k]:
        raise ValueError(f"template {self.name}: {text[start:end]!r} crosses the boundary "
                         f"between a trained and an untrained part; the template must end "
                         f"each part with a marker or a chunk_after string")
      ids.extend(chunk)
      mask.extend([int(segments[k][1])] * len(chunk))
    if add_bos and ids[:1] != [tokenizer.bos_id]:
      ids, mask = tokenizer.with_bos(ids), [0] + mask
    return ids, mask

  def marker_ids(self, tokenizer: Tokenizer, marker: str) -> list[int]:
    """The ids a marker (or special string) always has inside chat text."""
    if marker in tokenizer.special_token_ids:
      return [tokenizer.special_token_ids[marker]]
    if marker not in self.markers:
      raise ValueError(f"template {self.name}: {marker!r} is not one of its markers")
    return tokenizer.encode_chunks([marker], [self.fresh_chunks])[0]

  def end_of_turn_ids(self, tokenizer: Tokenizer) -> list[int]:
    """The token sequence that ends an assistant turn: the stop sequence for generation,
    one id when the vocabulary has the marker as a piece."""
    return self.marker_ids(tokenizer, self.end_of_turn)

  def reply_starts_fresh(self, tokenizer: Tokenizer, prompt: str) -> bool:
    """Whether a reply written after `prompt` is encoded as a text of its own, so that
    the dummy-prefix space of its first token is not part of the reply's text."""
    if not tokenizer.add_dummy_prefix:
      return False
    if not prompt:
      return True
    if not self.fresh_chunks:
      return False
    ends = set(tokenizer.special_token_ids) | set(self.markers) | set(self.chunk_after)
    return any(prompt.endswith(e) for e in ends)

  def check(self, tokenizer: Tokenizer, max_marker_tokens: int | None = None) -> list[str]:
    """Problems of using this template with `tokenizer`, one sentence each ([] = none)."""
    problems = []
    specials = tokenizer.special_token_ids
    for piece, what in (("<s>", "bos"), ("</s>", "eos")):
      used = any(piece in s for s in (self.begin, self.user_format, self.reply_format,
                                      self.end_of_turn))
      if used and piece not in specials:
        problems.append(f"template {self.name} writes {piece!r} but tokenizer "
                        f"{tokenizer.source} has no {what} piece {piece!r}")
    eot = self.end_of_turn_ids(tokenizer) if not problems else []
    if not problems and tokenizer.decode(eot) != self.end_of_turn:
      problems.append(f"template {self.name}: tokenizer {tokenizer.source} cannot spell the "
                      f"end of turn {self.end_of_turn!r} (its ids {eot} decode to "
                      f"{tokenizer.decode(eot)!r})")
    if max_marker_tokens is not None and len(eot) > max_marker_tokens:
      problems.append(f"template {self.name}: end of turn {self.end_of_turn!r} is {len(eot)} "
                      f"tokens in tokenizer {tokenizer.source}, more than the "
                      f"{max_marker_tokens} a stop sequence may have; add the markers to the "
                      f"tokenizer (add_chat_tokens) or use another template")
    return problems


# NeMo-Aligner's SFT chat format:
# <extra_id_0>System\n{sys}\n<extra_id_1>User\n{msg}\n<extra_id_1>Assistant\n{reply}\n<extra_id_1>
# Encoded as NeMo encodes the whole string: the text's first chunk only gets a dummy prefix.
NEMO = ChatTemplate(
    name="nemo",
    begin="",
    system_format="<extra_id_0>System\n{system}\n",
    first_user_with_system=None,
    user_format="<extra_id_1>User\n{message}\n",
    assistant_header="<extra_id_1>Assistant\n",
    reply_format="{message}\n",
    end_of_turn="<extra_id_1>",
    end_of_turn_starts_next_turn=True,
    markers=("<extra_id_0>", "<extra_id_1>", "<extra_id_2>"),
    chunk_after=("\n",),
    fresh_chunks=False,
)

# Mistral-instruct: <s>[INST] {user} [/INST]{reply}</s>[INST] {user} [/INST]{reply}</s>
# (one <s> per conversation, as HF's template); the system message opens the first user
# message. Each "[INST] ... [/INST]" block and each reply is encoded on its own, with the
# dummy prefix, exactly as mistral_common's v1 instruct tokenizer does.
MISTRAL_INST = ChatTemplate(
    name="mistral_inst",
    begin="<s>",
    system_format="",
    first_user_with_system="{system}\n\n{message}",
    user_format="[INST] {message} [/INST]",
    assistant_header="",
    reply_format="{message}",
    end_of_turn="</s>",
    end_of_turn_starts_next_turn=False,
    markers=("<s>", "</s>"),
    chunk_after=("[/INST]",),
    fresh_chunks=True,
)

TEMPLATES = {t.name: t for t in (NEMO, MISTRAL_INST)}


def get_template(name: str) -> ChatTemplate:
  try:
    return TEMPLATES[name]
  except KeyError:
    raise ValueError(f"unknown chat template {name!r}; valid names: "
                     f"{', '.join(sorted(TEMPLATES))}") from None
