"""Text in, text out: the jitted sampler behind a tokenizer, end strings and chat templates.

`sampling.generate` works on token ids and stops on token sequences. Users
(the HTTP server, SL-CAI and RL-CAI generation, evaluation) think in strings:
"stop at `<extra_id_1>`", "stop at `\\nUser:`". `TextGenerator` bridges the two:

- An end string that is a single special token (`<extra_id_1>`, `</s>`)
  becomes a stop token; any other end string short enough becomes a stop
  *sequence* (its own tokenisation), so generation really stops there.
- Because the model may spell the same text with other tokens (or the string
  may be too long to be a stop sequence), every completion is also trimmed
  after the fact at the first place its text contains an end string, the way
  NeMo's text-based end check would have stopped.
- `</s>` always ends a completion (as in NeMo, whose generation loop always
  treats the end-of-document id as an end token) unless `stop_at_eos=False`.

Every completion keeps its tokens up to and including the one that completes
the end string, so `raw_text` (what NeMo's server returns after the prompt)
and `text` (the end string cut off, what OpenAI's API returns) are both exact.

Not thread-safe: one thread should own a generator (the server's
`BatchingWorker` does).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from cai_jax import sampling
from cai_jax import tokenizer as tokenizer_lib
from cai_jax.model import MistralConfig, param_shardings

log = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")   # SentencePiece byte-fallback tokens


@dataclasses.dataclass
class Completion:
  """One prompt's continuation.

  Token lists cover everything generated up to and including the token that
  completed the end string (or `</s>`), so `"".join(tokens) == raw_text`.
  `logprobs` and `top_logprobs` are under the raw model (temperature 1,
  nothing filtered), which is what OpenAI's and NeMo's APIs report;
  `sampled_logprobs` are under the distribution actually sampled from.
  """
  text: str                       # completion, cut before the first end string
  raw_text: str                   # completion including the end string, if one occurred
  token_ids: list[int]
  tokens: list[str]               # the text each token contributes
  logprobs: list[float]
  sampled_logprobs: list[float]
  finish_reason: str              # "stop" (end string or </s>) or "length"
  prompt_token_ids: list[int]
  prompt_tokens: list[str]
  prompt_logprobs: list[float] | None = None   # log p(prompt[t] | prompt[:t]); 0.0 at t=0
  top_logprobs: list[dict[str, float]] | None = None
  top_token_ids: list[list[tuple[int, float]]] | None = None   # the same, by token id
  stop_string: str | None = None  # the end string that ended the completion
  num_generated: int = 0          # tokens the sampler produced (before trimming)

  @property
  def num_text_tokens(self) -> int:
    """How many leading tokens make up `text` (a token straddling its end counts)."""
    offset = 0
    for k, piece in enumerate(self.tokens):
      if offset >= len(self.text):
        return k
      offset += len(piece)
    return len(self.tokens)


def _per_prompt(name: str, value: Any, n: int) -> list:
  """A scalar setting repeated n times, or a per-prompt list checked for length."""
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) != n:
      raise ValueError(f"{name}: got {len(value)} values for {n} prompts; pass one value "
                       f"or one per prompt")
    return list(value)
  return [value] * n


def _per_prompt_strings(name: str, value: Any, n: int) -> list[list[str]]:
  """End strings for every prompt (a list of str) or per prompt (a list of lists)."""
  if value is None:
    return [[] for _ in range(n)]
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"{name} must be a list of strings, got {type(value).__name__}")
  if value and all(isinstance(v, (list, tuple)) for v in value):
    if len(value) != n:
      raise ValueError(f"{name}: got {len(value)} lists for {n} prompts")
    rows = [list(v) for v in value]
  else:
    rows = [list(value)] * n
  for i, row in enumerate(rows):
    for s in row:
      if not isinstance(s, str):
        raise ValueError(f"{name} (prompt {i}): every end string must be a string, "
                         f"got {type(s).__name__}")
      if not s:
        raise ValueError(f"{name} (prompt {i}): an empty end string would end every "
                         f"completion at once; remove it")
  return rows


class TextGenerator:
  """A model, its tokenizer and a chat template, generating text from text prompts."""

  def __init__(self, config: MistralConfig, params, tokenizer: tokenizer_lib.Tokenizer, *,
               mesh=None, template: str | tokenizer_lib.ChatTemplate = "nemo"):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.template = (template if isinstance(template, tokenizer_lib.ChatTemplate)
                     else tokenizer_lib.get_template(template))
    if tokenizer.vocab_size > config.vocab_size:
      raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the "
                       f"model only {config.vocab_size}: they do not belong together")
    if tokenizer.vocab_size < config.vocab_size:
      # Padded embedding tables are common (e.g. to a multiple of 128); ids the
      # tokenizer lacks render as <unk> if an untrained model ever samples them.
      log.info("model vocab %d > tokenizer vocab %d (padded embedding table)",
               config.vocab_size, tokenizer.vocab_size)
    self._stop_cache: dict[str, list[list[int]]] = {}
    self._piece_cache: dict[int, str] = {}

  @classmethod
  def from_checkpoint(cls, model_dir: str, tokenizer_path: str, mesh=None,
                      template: str = "nemo") -> "TextGenerator":
    """Loads an HF or cai_jax model directory (placed on `mesh` if given) and a tokenizer."""
    import json
    import os

    from cai_jax import checkpoint
    shardings = None
    if mesh is not None:
      if checkpoint.is_orbax_model_dir(model_dir):
        cfg_path = os.path.join(model_dir, checkpoint.CONFIG_FILE)
        with open(cfg_path) as f:
          config = MistralConfig.from_hf_dict(json.load(f), source=cfg_path)
      else:
        config = checkpoint.read_hf_config(model_dir)
      shardings = param_shardings(config, mesh)
    config, params, head = checkpoint.load_model(model_dir, head="lm", shardings=shardings)
    if head != "lm":
      raise ValueError(f"{model_dir}: holds a {head!r}-head model; generation needs an LM head")
    tok = tokenizer_lib.Tokenizer.from_file(tokenizer_path)
    return cls(config, params, tok, mesh=mesh, template=template)

  # --- tokens and text -----------------------------------------------------------

  @property
  def max_positions(self) -> int:
    return self.config.max_position_embeddings

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """Per-token text; ids beyond the tokenizer (padded vocab) show as <unk>."""
    vocab = self.tokenizer.vocab_size
    safe = [i if 0 <= i < vocab else tokenizer_lib.UNK_ID for i in ids]
    return self.tokenizer.decode_tokens_to_pieces(safe)

  def _piece(self, token_id: int) -> str:
    """One token's text on its own, cached (top-logprob alternatives need many)."""
    piece = self._piece_cache.get(token_id)
    if piece is None:
      piece = self._piece_cache[token_id] = self.pieces([token_id])[0]
    return piece

  def token_bytes(self, token_id: int) -> bytes:
    """A token's bytes: the raw byte of a byte-fallback token (part of a UTF-8
    character, which no text piece can show), else its text in UTF-8."""
    if 0 <= token_id < self.tokenizer.vocab_size:
      match = _BYTE_PIECE.fullmatch(self.tokenizer.id_to_token(token_id))
      if match:
        return bytes([int(match.group(1), 16)])
    return self._piece(token_id).encode("utf-8")

  def encode_prompts(self, prompts: Sequence[str], add_bos: Any = False,
                     what: str = "prompt {i}") -> list[list[int]]:
    """Token ids of each prompt; errors name the prompt (`what` formats its index).

    Prompts are encoded by the chat template (`ChatTemplate.encode`), the path
    every training stage uses, so a rendered prompt gets the ids the model was
    trained on; `add_bos` never adds a second bos."""
    if isinstance(prompts, str):
      raise ValueError("prompts must be a list of strings, got one string; wrap it in a list")
    add_bos = _per_prompt("add_bos", add_bos, len(prompts))
    out = []
    for i, (p, bos) in enumerate(zip(prompts, add_bos)):
      if not isinstance(p, str):
        raise ValueError(f"{what.format(i=i)} must be a string, got {type(p).__name__}")
      ids = self.template.encode(self.tokenizer, p, add_bos=bool(bos))
      if not ids:
        raise ValueError(f"{what.format(i=i)} is empty: give it some text or add a BOS token")
      out.append(ids)
    return out

  def check_lengths(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Any,
                    what: str = "prompt {i}") -> None:
    """Raises ValueError naming the first prompt whose length + new tokens exceeds the model."""
    new = _per_prompt("max_new_tokens", max_new_tokens, len(prompt_ids))
    for i, (ids, m) in enumerate(zip(prompt_ids, new)):
      if len(ids) + int(m) > self.max_positions:
        raise ValueError(
            f"{what.format(i=i)}: {len(ids)} prompt tokens + {int(m)} new tokens = "
            f"{len(ids) + int(m)} exceeds the model's maximum of {self.max_positions} positions; "
            f"shorten the prompt or ask for fewer tokens")

  def stop_sequences(self, end_string: str) -> list[list[int]]:
    """Token sequences that end generation at `end_string`; [] means the text check only.

    A special token is its single id. A template marker (NeMo's
    `<extra_id_1>` where the vocabulary lacks it) comes first with the ids
    chat text always gives it, which are the ids the model was trained to
    write. Other strings contribute the ways they are likely spelled in
    generated text, each kept only if it decodes to exactly the string and
    fits in `sampling.MAX_STOP_LENGTH` tokens: the string's own tokenisation
    (without a SentencePiece dummy-prefix "▁"), and its tokenisation after a
    newline, i.e. in the middle of text (Mistral's tokenizer spells
    "<extra_id_1>" differently at the start of a text and after "\n"; NeMo
    finds its end tokens the same way).
    """
    if end_string in self._stop_cache:
      return self._stop_cache[end_string]
    special = self.tokenizer.special_token_ids.get(end_string)
    if special is not None:
      seqs = [[special]]
    else:
      candidates = [self.tokenizer.encode(end_string)]
      if end_string in self.template.markers:
        candidates.insert(0, self.template.marker_ids(self.tokenizer, end_string))
      own = candidates[-1]
      if own and self.pieces(own[:1]) == [" "] and not end_string.startswith(" "):
        candidates[-1] = own[1:]
      before = self.tokenizer.encode("\n")
      in_text = self.tokenizer.encode("\n" + end_string)
      if in_text[:len(before)] == before:
        candidates.append(in_text[len(before):])
      seqs = []
      for ids in candidates:
        if (ids and len(ids) <= sampling.MAX_STOP_LENGTH and ids not in seqs
            and "".join(self.pieces(ids)) == end_string):
          seqs.append(ids)
      if not seqs:
        log.debug("end string %r: no stop sequence (tokens %s); trimmed after the fact",
                  end_string, candidates)
    self._stop_cache[end_string] = seqs
    return seqs

  def _row_stops(self, end_strings: Sequence[str], stop_at_eos: bool) -> list[list[int]]:
    seqs: list[list[int]] = []
    if stop_at_eos and self.tokenizer.eos_id >= 0:
      seqs.append([self.tokenizer.eos_id])
    for s in end_strings:
      for ids in self.stop_sequences(s):
        if ids in seqs:
          continue
        if len(seqs) == sampling.MAX_STOP_SEQUENCES:
          log.debug("more than %d stop sequences: %r is trimmed after the fact only",
                    sampling.MAX_STOP_SEQUENCES, s)
          break
        seqs.append(ids)
    return seqs

  # --- generation ------------------------------------------------------------------

  def complete(self, prompts: Sequence[str], *, max_new_tokens: Any, greedy: Any = False,
               temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0,
               repetition_penalty: Any = 1.0, min_new_tokens: Any = 0,
               end_strings: Any = (), add_bos: Any = False, seed: int | Sequence[int] = 0,
               num_top_logprobs: int = 0, return_prompt_logprobs: bool = False,
               stop_at_eos: Any = True, min_batch_bucket: int = 1) -> list[Completion]:
    """Continues each text prompt; one batched, jitted sampler call.

    Every setting may be a scalar or a per-prompt list; `end_strings` is a
    list of strings for all prompts or one list per prompt. `seed` is an int
    (prompt i samples with fold_in(seed, i)) or one seed per prompt (a row's
    samples then do not depend on its batch-mates). `min_batch_bucket` pads
    the batch to at least that many rows so a server compiles few shapes.
    """
    n = len(prompts)
    if n == 0:
      return []
    prompt_ids = self.encode_prompts(prompts, add_bos)
    new_tokens = [int(m) for m in _per_prompt("max_new_tokens", max_new_tokens, n)]
    if any(m < 0 for m in new_tokens):
      raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    self.check_lengths(prompt_ids, new_tokens)
    ends = _per_prompt_strings("end_strings", end_strings, n)
    at_eos = [bool(x) for x in _per_prompt("stop_at_eos", stop_at_eos, n)]
    min_new = [int(m) for m in _per_prompt("min_new_tokens", min_new_tokens, n)]
    if isinstance(seed, (list, tuple, np.ndarray)) and len(seed) != n:
      raise ValueError(f"seed: got {len(seed)} seeds for {n} prompts")

    out = sampling.generate(
        self.config, self.params, prompt_ids, max_new_tokens=new_tokens, greedy=greedy,
        temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, min_new_tokens=min_new,
        row_stop_sequences=[self._row_stops(e, s) for e, s in zip(ends, at_eos)],
        seed=seed if isinstance(seed, (int, np.integer)) else [int(s) for s in seed],
        pad_id=self.tokenizer.pad_id, num_top_logprobs=num_top_logprobs,
        return_prompt_logprobs=return_prompt_logprobs, mesh=self.mesh,
        min_batch_bucket=min_batch_bucket, include_stop=True)

    completions = []
    for i in range(n):
      completions.append(self._finish(
          prompt_ids[i], out.tokens[i], out.model_logprobs[i], out.logprobs[i],
          out.finish_reasons[i], ends[i], at_eos[i], min_new[i],
          out.top_logprobs[i] if out.top_logprobs is not None else None,
          out.prompt_logprobs[i] if out.prompt_logprobs is not None else None,
          fresh=self.template.reply_starts_fresh(self.tokenizer, prompts[i])))
    return completions

  def _finish(self, prompt_ids, ids, logprobs, sampled, reason, end_strings, stop_at_eos,
              min_new, top, prompt_lps, fresh=False) -> Completion:
    """Cuts one row at its first end string (or </s>) and packages it.

    With `fresh` (the text after the prompt is encoded as a text of its own:
    Mistral-instruct replies with a dummy-prefix tokenizer) the first token's
    "▁" is the dummy prefix, not part of the text, as SentencePiece decodes it.
    """
    pieces = self.pieces(ids)
    if (fresh and pieces and pieces[0].startswith(" ")
        and 0 <= ids[0] < self.tokenizer.vocab_size
        and self.tokenizer.id_to_token(ids[0]).startswith("\u2581")):
      pieces[0] = pieces[0][1:]
    full = "".join(pieces)
    ends_at = np.cumsum([len(p) for p in pieces]).tolist()   # char offset after each token

    def token_completing(char_end: int) -> int:
      for k, e in enumerate(ends_at):
        if e >= char_end:
          return k
      return len(ids) - 1

    # (char offset where `text` stops, index of the last kept token, end string)
    best: tuple[int, int, str] | None = None
    for s in end_strings:
      start = 0
      while (pos := full.find(s, start)) >= 0:
        k = token_completing(pos + len(s))
        # The sampler ignores stops before min_new_tokens; so does the text check.
        if k >= min_new:
          if best is None or k < best[1] or (k == best[1] and pos < best[0]):
            best = (pos, k, s)
          break
        start = pos + 1
    if stop_at_eos and self.tokenizer.eos_id in ids:
      k = ids.index(self.tokenizer.eos_id)
      if best is None or k < best[1]:
        best = (ends_at[k] - len(pieces[k]), k, pieces[k])

    if best is not None:
      pos, k, stop_string = best
      keep, text, reason = k + 1, full[:pos], FINISH_STOP
    else:
      keep, text, stop_string = len(ids), full, None
    top_dicts = top_ids = None
    if top is not None:
      top_dicts, top_ids = [], [[(int(t), float(lp)) for t, lp in alt] for alt in top[:keep]]
      for alternatives in top[:keep]:
        d: dict[str, float] = {}
        for token_id, lp in alternatives:
          d.setdefault(self._piece(token_id), float(lp))
        top_dicts.append(d)
    return Completion(
        text=text, raw_text="".join(pieces[:keep]), token_ids=list(ids[:keep]),
        tokens=pieces[:keep], logprobs=list(logprobs[:keep]),
        sampled_logprobs=list(sampled[:keep]), finish_reason=reason,
        prompt_token_ids=list(prompt_ids), prompt_tokens=self.pieces(prompt_ids),
        prompt_logprobs=prompt_lps, top_logprobs=top_dicts, top_token_ids=top_ids,
        stop_string=stop_string,
        num_generated=len(ids))

  # --- scoring -----------------------------------------------------------------------

  def next_token_logprobs(self, prompts: Sequence[str], token_ids: Sequence[int], *,
                          add_bos: Any = False, batch_size: int = 8,
                          what: str = "prompt {i}") -> np.ndarray:
    """log p(token | prompt) of each of `token_ids` after each prompt: f32 [n_prompts, n_ids].

    Under the raw model (temperature 1, nothing filtered), from the sampler's own prompt
    pass (`sampling.next_token_logprobs_program`: only the last position goes through the
    vocabulary projection) and no decode step. Prompts go `batch_size` at a time, each batch
    padded to at least `batch_size` rows and to a power-of-two length as `complete` pads
    them, on the generator's mesh, so a run compiles one program per length bucket. (A judge
    reads its option letters with this.)
    """
    ids = tuple(int(t) for t in token_ids)
    if not ids:
      raise ValueError("token_ids is empty: name the tokens whose log-probs you want")
    outside = [t for t in ids if not 0 <= t < self.config.vocab_size]
    if outside:
      raise ValueError(f"token_ids {outside} are outside the model's vocabulary of "
                       f"{self.config.vocab_size}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(prompts) == 0:
      return np.zeros((0, len(ids)), np.float32)
    prompt_ids = self.encode_prompts(prompts, add_bos, what=what)
    self.check_lengths(prompt_ids, 0, what=what)
    fn = sampling.next_token_logprobs_program(self.config, ids, self.tokenizer.pad_id, self.mesh)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
      chunk = prompt_ids[start:start + batch_size]
      tokens, lengths = sampling.pad_prompts(chunk, self.tokenizer.pad_id, min_rows=batch_size,
                                             mesh=self.mesh)
      sp = sampling.make_sampling_params(len(chunk), tokens.shape[0], greedy=True,
                                         max_new_tokens=0)
      out.append(np.asarray(jax.device_get(fn(self.params, tokens, lengths, sp)))[:len(chunk)])
    return np.concatenate(out)

  # --- chat --------------------------------------------------------------------------

  def chat_prompt(self, conversation: Sequence[Mapping[str, Any]], system: str = "") -> str:
    """The template's rendering of a conversation, ending with the assistant header."""
    return self.template.render_prompt(conversation, system)

  def chat_reply(self, completion: Completion) -> Completion:
    """The reply as the user sees it: without the newline the template puts before end of turn."""
    if (completion.finish_reason == FINISH_STOP and self.template.reply_format.endswith("\n")
        and completion.text.endswith("\n")):
      return dataclasses.replace(completion, text=completion.text[:-1])
    return completion

  def chat(self, conversations: Sequence[Sequence[Mapping[str, Any]]], system: Any = "",
           **settings) -> list[Completion]:
    """Replies to each conversation (NeMo `from`/`value` or OpenAI `role`/`content` turns).

    Generation stops at the template's end-of-turn token; further
    `end_strings` (one list for all, or one per conversation) stop it too.
    """
    n = len(conversations)
    systems = _per_prompt("system", system, n)
    prompts = []
    for i, (conv, sys_msg) in enumerate(zip(conversations, systems)):
      try:
        prompts.append(self.chat_prompt(conv, sys_msg))
      except ValueError as e:
        raise ValueError(f"conversation {i}: {e}") from None
    extra = _per_prompt_strings("end_strings", settings.pop("end_strings", ()), n)
    eot = self.template.end_of_turn
    ends = [[eot] + [s for s in row if s != eot] for row in extra]
    completions = self.complete(prompts, end_strings=ends, **settings)
    return [self.chat_reply(c) for c in completions]
