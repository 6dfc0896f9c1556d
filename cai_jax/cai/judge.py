"""The RL-CAI feedback model: which of two responses better follows a principle.

As in the Constitutional AI paper (section 4.1), the judge answers a
multiple-choice question, preceded by worked examples:

    Consider the following conversation between a human and an assistant:
    Human: [prompt]
    [principle question]
    Options:
    (A) [response A]
    (B) [response B]
    The answer is: (A)

The question goes to the judge as a chat turn rendered with the chat template
(the worked examples are earlier turns whose assistant reply is "The answer
is: (X)"), or as plain text for a base model (`chat=False`). The judge's own
turn is opened with "The answer is: (", so the next token is the option letter.

Two kinds of judge give a `Verdict` per question:

* `LocalJudge` — a model in this process. One jitted forward pass per batch
  reads the log-probabilities of the option-letter tokens at the last prompt
  position; normalised over the two options they are the soft label P(A) the
  paper trains on. With chain-of-thought it first writes a short reasoning
  ("Let's think step by step:") and then reads the letter; those probabilities
  are clamped to [0.4, 0.6], which the paper found best (CoT makes the judge
  over-confident).
* `RemoteJudge` — any OpenAI-compatible endpoint (ours, vLLM, a hosted API
  with the key in an environment variable). The answer letter is parsed from
  the text, strictly (`parse_answer`): text that does not state one answer is
  *unparseable*, never guessed. When the endpoint returns `top_logprobs` that
  hold both letters at the answer position, they give a soft label too.

`judge_pairs` asks every question in both orders (A = r1, B = r2 and the
reverse) and combines them, which cancels the judge's position bias:
P(r1 better) = (P_first(A) + P_second(B)) / 2. Text verdicts that contradict
each other (the judge picked the same *position* both times) and unparseable
verdicts are dropped and counted — NeMo-Aligner's script instead swallows
unparseable answers silently and replaces a degenerate verdict with a random
label, which injects pure noise into the reward model's data.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import re
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from cai_jax import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

LETTERS = ("A", "B")
QUESTION_INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER_PREFIX = "The answer is: ("
COT_PREFIX = "Let's think step by step:"
# Reading the letter after a chain of thought: the reasoning is closed with this.
COT_ANSWER_PREFIX = "\n" + ANSWER_PREFIX
COT_CLAMP = (0.4, 0.6)
CHAT_ANSWER_INSTRUCTION = 'Reply with "The answer is: (A)" or "The answer is: (B)".'
CHAT_COT_INSTRUCTION = ('Think step by step, then finish with "The answer is: (A)" or '
                        '"The answer is: (B)".')


# ----------------------------------------------------------------------------
# Questions.


@dataclasses.dataclass(frozen=True)
class Question:
  """One multiple-choice question: a conversation, a principle and two options."""
  conversation: Any          # the human's prompt (str) or a list of {from, value} turns
  principle: str             # the principle's question text
  option_a: str
  option_b: str


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How questions become judge prompts.

  `chat=True` renders the question as a user turn with `template` (the worked
  examples as earlier turns); `chat=False` writes plain text for a base model.
  `few_shot` caps the number of worked examples (-1: all); `system` is the
  chat system message.
  """
  template: tokenizer_lib.ChatTemplate = tokenizer_lib.NEMO
  chat: bool = True
  few_shot: int = -1
  system: str = ""


def format_conversation(conversation: Any) -> str:
  """`"Human: ..."` / `"Assistant: ..."` lines; a string is one human turn."""
  if isinstance(conversation, str):
    return f"Human: {conversation.strip()}"
  lines = []
  for k, turn in enumerate(conversation):
    role = turn.get("from", turn.get("role", ""))
    value = turn.get("value", turn.get("content"))
    if not isinstance(value, str) or str(role).lower() not in ("user", "human", "assistant"):
      raise ValueError(f"conversation turn {k}: expected a User or Assistant turn with text, "
                       f"got {turn!r}")
    name = "Human" if str(role).lower() in ("user", "human") else "Assistant"
    lines.append(f"{name}: {value.strip()}")
  if not lines:
    raise ValueError("conversation is empty")
  return "\n\n".join(lines)


def question_text(q: Question) -> str:
  """The multiple-choice question, without the answer (the paper's format)."""
  return (f"{QUESTION_INTRO}\n{format_conversation(q.conversation)}\n\n{q.principle.strip()}\n"
          f"Options:\n(A) {q.option_a.strip()}\n(B) {q.option_b.strip()}")


def _examples(examples: Sequence[Any], fmt: PromptFormat) -> list[Any]:
  return list(examples) if fmt.few_shot < 0 else list(examples)[:fmt.few_shot]


def _example_question(example) -> Question:
  return Question(example.conversation, example.question, example.option_a, example.option_b)


def judge_prompt(q: Question, examples: Sequence[Any], fmt: PromptFormat, *,
                 cot: bool = False) -> str:
  """The text a completion model continues: examples, the question, and the open answer.

  Ends with `ANSWER_PREFIX` ("The answer is: (") so the next token is the
  letter, or with `COT_PREFIX` when the judge is to reason first.
  `examples` are `constitution.JudgeExample`s (conversation, question,
  option_a, option_b, answer).
  """
  opener = COT_PREFIX if cot else ANSWER_PREFIX
  shots = _examples(examples, fmt)
  if fmt.chat:
    turns: list[dict] = []
    for ex in shots:
      turns.append({"from": "User", "value": question_text(_example_question(ex))})
      turns.append({"from": "Assistant", "value": f"{ANSWER_PREFIX}{ex.answer})"})
    turns.append({"from": "User", "value": question_text(q)})
    return fmt.template.render_prompt(turns, fmt.system) + opener
  parts = [f"{question_text(_example_question(ex))}\n{ANSWER_PREFIX}{ex.answer})\n\n"
           for ex in shots]
  return "".join(parts) + question_text(q) + "\n" + opener


def chat_messages(q: Question, examples: Sequence[Any], fmt: PromptFormat, *,
                  cot: bool = False) -> list[dict]:
  """OpenAI chat messages for a chat endpoint (its server applies its own template).

  A chat API cannot pre-fill the assistant's answer, so the last user turn
  asks for the answer format; the worked examples show it.
  """
  messages: list[dict] = []
  if fmt.system:
    messages.append({"role": "system", "content": fmt.system})
  for ex in _examples(examples, fmt):
    messages.append({"role": "user", "content": question_text(_example_question(ex))})
    messages.append({"role": "assistant", "content": f"{ANSWER_PREFIX}{ex.answer})"})
  instruction = CHAT_COT_INSTRUCTION if cot else CHAT_ANSWER_INSTRUCTION
  messages.append({"role": "user", "content": f"{question_text(q)}\n\n{instruction}"})
  return messages


# ----------------------------------------------------------------------------
# Answers and probabilities.

# "The answer is: (B)", "answer: A", "the answer is B." (the letter not followed by a word).
_STATED = re.compile(r"(?i:\banswer\b(?:\s+is)?\s*:?\s*)\(?([AB])(?![A-Za-z0-9])")
# The text starts with the letter: "(A)", "A)", "A", "A.", "B\n..." (not "A good ...").
_LEADING = re.compile(r"^\(?([AB])(?:\)|[.:;,!]|\s*$|\n)")
_PAREN = re.compile(r"\(([AB])\)")


def parse_answer(text: str) -> str | None:
  """The option letter a judge's text states, or None when it states no single answer.

  Accepted: an explicit statement (`Answer: B`, `The answer is: (B)`) — the
  last one wins, since a reasoning judge ends with its conclusion; a leading
  `(A)`, `A)`, `A`, `A.`; or exactly one distinct `(X)` mentioned anywhere.
  Everything else (empty text, both options named with no statement, prose
  that starts with the article "A") is None: a verdict the caller must count
  and drop, not guess.
  """
  if not isinstance(text, str):
    return None
  s = text.strip()
  stated = _STATED.findall(s)
  if stated:
    return stated[-1]
  m = _LEADING.match(s)
  if m:
    return m.group(1)
  mentioned = set(_PAREN.findall(s))
  return mentioned.pop() if len(mentioned) == 1 else None


def clamp_probability(p: float, bounds: tuple[float, float] = COT_CLAMP) -> float:
  """`p` limited to `[lo, hi]`; the paper clamps chain-of-thought labels to [0.4, 0.6]."""
  lo, hi = bounds
  return float(min(max(p, lo), hi))


def combine_orders(p_first_a: float, p_second_a: float) -> float:
  """P(r1 better) from the two orders: (P_first(A) + P_second(B)) / 2.

  In the first order A is r1; in the second, B is r1. Averaging the two
  makes the result symmetric: swapping r1 and r2 gives exactly 1 - P.
  """
  return 0.5 * (float(p_first_a) + (1.0 - float(p_second_a)))


def letter_of_token(token: str) -> str | None:
  """"A" for a token such as `A`, ` A`, `▁A`, `(A`, `A)`; None for anything else."""
  m = re.fullmatch(r"[\s\u2581]*\(?([AB])\)?[\s\u2581]*", token or "")
  return m.group(1) if m else None


def soft_label_from_top(alternatives: Sequence[tuple[str, float]]) -> float | None:
  """P(A) normalised over the two letters, from one position's (token, logprob) list.

  Tokens that spell the same letter (`A`, ` A`) are summed. None unless both
  letters appear: one letter alone says nothing about the other's mass.
  """
  mass = {letter: 0.0 for letter in LETTERS}
  seen = set()
  for token, lp in alternatives:
    letter = letter_of_token(token)
    if letter is None or lp is None or not math.isfinite(lp):
      continue
    if (token, letter) in seen:
      continue
    seen.add((token, letter))
    mass[letter] += math.exp(lp)
  if mass["A"] <= 0.0 or mass["B"] <= 0.0:
    return None
  return mass["A"] / (mass["A"] + mass["B"])


@dataclasses.dataclass
class Verdict:
  """A judge's answer to one question.

  `answer` is "A", "B" or None (unparseable); `p_a` is the probability that
  A is better: soft (from log-probs) when `soft`, else 1.0/0.0 from the text,
  or None when unparseable. `text` is what the judge wrote (remote) and
  `reasoning` the chain of thought, if any. `error` names why a question
  got no answer at all ("too_long": the prompt does not fit the judge).
  """
  answer: str | None
  p_a: float | None
  soft: bool
  text: str = ""
  reasoning: str = ""
  option_mass: float | None = None   # local: total probability of the two letter tokens
  error: str | None = None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class Judge(Protocol):
  name: str
  soft: bool      # True: every verdict is a soft label (never unparseable)

  def verdicts(self, questions: Sequence[Question]) -> list[Verdict]:
    ...


# ----------------------------------------------------------------------------
# In-process judge.


def letter_token_id(tokenizer: tokenizer_lib.Tokenizer, letter: str,
                    context: str = "(") -> tuple[int, bool]:
  """The id of the token that spells `letter` right after `context`, and whether it is one token.

  The answer follows "(", so the letter is encoded in that context: a
  SentencePiece model with a dummy prefix encodes a bare "A" as "▁A", which
  is not the token that follows "(". If "(" and the letter merge into one
  token, the letter's own piece is used; if the letter spans several tokens,
  the first is (with the flag False so the caller can log it).
  """
  base = tokenizer.encode(context)
  full = tokenizer.encode(context + letter)
  if len(full) > len(base) and full[:len(base)] == base:
    rest = full[len(base):]
    return rest[0], len(rest) == 1
  try:
    return tokenizer.token_to_id(letter), True
  except KeyError:
    ids = tokenizer.encode(letter)
    pieces = tokenizer.decode_tokens_to_pieces(ids)
    if len(ids) > 1 and pieces[0] == " ":
      ids = ids[1:]
    return ids[0], len(ids) == 1


def option_token_ids(tokenizer: tokenizer_lib.Tokenizer) -> tuple[int, int]:
  """Token ids of "A" and "B" as answers after "("; they must differ."""
  ids = []
  for letter in LETTERS:
    token_id, single = letter_token_id(tokenizer, letter)
    if not single:
      log.warning("option letter %r is several tokens in %s; reading its first token (id %d)",
                  letter, tokenizer.source, token_id)
    ids.append(token_id)
  if ids[0] == ids[1]:
    raise ValueError(f"tokenizer {tokenizer.source}: the option letters A and B share their "
                     f"first token (id {ids[0]}); the judge cannot tell them apart")
  return ids[0], ids[1]


def _bucket(n: int, minimum: int, cap: int) -> int:
  """Padded length for `n` tokens: a power of two (at least `minimum`), at most `cap`.

  Judge prompts vary a lot in length (two responses of any size); powers of
  two bound the number of compiled shapes by log2 of the longest.
  """
  width = max(minimum, 1 << max(n - 1, 0).bit_length())
  return max(min(width, cap), n)


@functools.lru_cache(maxsize=None)
def _option_logits_fn(config):
  """A jitted `(params, tokens, mask, last, option_ids) -> (option logits, logsumexp)`.

  Only the last real position of each row goes through the vocabulary
  projection: the module's head is skipped, so no [B, T, V] logits are formed
  (for a 7B judge over long prompts they would not fit in memory).
  """
  import jax
  import jax.numpy as jnp

  from cai_jax.model import Mistral, lm_head_kernel
  model = Mistral(config)

  def fn(params, tokens, mask, last, option_ids):
    out = model.apply({"params": params}, tokens, attention_mask=mask, apply_head=False)
    hidden = out.hidden[jnp.arange(tokens.shape[0]), last]            # [B, D]
    logits = jnp.einsum("bd,dv->bv", hidden, lm_head_kernel(config, params)).astype(jnp.float32)
    return logits[:, option_ids], jax.nn.logsumexp(logits, axis=-1)

  return jax.jit(fn)


class LocalJudge:
  """The judge as a model in this process (a `cai_jax.engine.TextGenerator`).

  Soft labels from one batched forward pass: prompts are right-padded to a
  power-of-two length (`_bucket`) and a fixed batch of `batch_size` rows, so
  a run compiles a handful of shapes.
  """

  soft = True

  def __init__(self, generator, examples: Sequence[Any], fmt: PromptFormat | None = None, *,
               cot: bool = False, cot_max_tokens: int = 64,
               clamp: tuple[float, float] = COT_CLAMP, batch_size: int = 8,
               min_length: int = 64, seed: int = 0):
    self.generator = generator
    self.examples = list(examples)
    self.fmt = fmt or PromptFormat(template=generator.template)
    self.cot = cot
    self.cot_max_tokens = cot_max_tokens
    self.clamp = tuple(clamp)
    self.batch_size = batch_size
    self.min_length = min_length
    self.seed = seed
    self.option_ids = option_token_ids(generator.tokenizer)
    self.name = "local"

  def prompt(self, q: Question, reasoning: str | None = None) -> str:
    """The prompt whose next token is read; with CoT, after `reasoning`."""
    if not self.cot:
      return judge_prompt(q, self.examples, self.fmt)
    reasoning = (reasoning or "").strip()
    return (judge_prompt(q, self.examples, self.fmt, cot=True)
            + (" " + reasoning if reasoning else "") + COT_ANSWER_PREFIX)

  def option_logprobs(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs [N, 2] of the "A"/"B" tokens after each prompt, and P(A) [N] over the two."""
    import jax.numpy as jnp

    gen = self.generator
    ids = gen.encode_prompts(list(prompts), what="judge prompt {i}")
    gen.check_lengths(ids, 0, what="judge prompt {i}")
    fn = _option_logits_fn(gen.config)
    option_ids = jnp.asarray(self.option_ids, jnp.int32)
    lps, p_a = [], []
    for start in range(0, len(ids), self.batch_size):
      chunk = ids[start:start + self.batch_size]
      width = _bucket(max(len(x) for x in chunk), self.min_length, gen.max_positions)
      rows = self.batch_size
      tokens = np.full((rows, width), gen.tokenizer.pad_id, np.int32)
      mask = np.zeros((rows, width), np.int32)
      last = np.zeros((rows,), np.int32)
      for r, x in enumerate(chunk):
        tokens[r, :len(x)] = x
        mask[r, :len(x)] = 1
        last[r] = len(x) - 1
      mask[len(chunk):, 0] = 1    # padding rows attend to one token: no empty softmax
      option_logits, lse = fn(gen.params, jnp.asarray(tokens), jnp.asarray(mask),
                              jnp.asarray(last), option_ids)
      option_logits = np.asarray(option_logits, np.float64)[:len(chunk)]
      lse = np.asarray(lse, np.float64)[:len(chunk)]
      lps.append(option_logits - lse[:, None])
      # Normalised over the two options only: the paper's soft label.
      z = option_logits - option_logits.max(axis=1, keepdims=True)
      p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
      p_a.append(p[:, 0])
    return np.concatenate(lps), np.concatenate(p_a)

  def reasoning(self, questions: Sequence[Question]) -> list[str]:
    """Chain-of-thought texts (greedy), cut at the end of turn or at a stated answer."""
    gen = self.generator
    prompts = [judge_prompt(q, self.examples, self.fmt, cot=True) for q in questions]
    ends = ["The answer is", "\n\n"]
    if self.fmt.chat:
      ends.insert(0, self.fmt.template.end_of_turn)
    else:
      ends += ["Human:", QUESTION_INTRO]
    out = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start:start + self.batch_size]
      completions = gen.complete(chunk, max_new_tokens=self.cot_max_tokens, greedy=True,
                                 end_strings=ends, seed=self.seed,
                                 min_batch_bucket=self.batch_size)
      out.extend(c.text for c in completions)
    return out

  def fits(self, q: Question) -> bool:
    """Whether the question's prompt (and the reasoning budget, with CoT) fits the model."""
    prompt = judge_prompt(q, self.examples, self.fmt, cot=self.cot)
    extra = self.cot_max_tokens + len(self.generator.tokenizer.encode(COT_ANSWER_PREFIX)) + 1 \
        if self.cot else 0
    return len(self.generator.encode_prompts([prompt])[0]) + extra <= self.generator.max_positions

  def verdicts(self, questions: Sequence[Question]) -> list[Verdict]:
    """Soft verdicts; a question too long for the model gets `error="too_long"` instead."""
    fitting = [k for k, q in enumerate(questions) if self.fits(q)]
    out = [Verdict(answer=None, p_a=None, soft=True, error="too_long") for _ in questions]
    if not fitting:
      return out
    asked = [questions[k] for k in fitting]
    reasons = self.reasoning(asked) if self.cot else [""] * len(asked)
    prompts = [self.prompt(q, r) for q, r in zip(asked, reasons)]
    lps, p_a = self.option_logprobs(prompts)
    for n, (k, reason) in enumerate(zip(fitting, reasons)):
      p = float(p_a[n])
      if self.cot:
        p = clamp_probability(p, self.clamp)
      answer = "A" if p > 0.5 else "B" if p < 0.5 else None
      out[k] = Verdict(answer=answer, p_a=p, soft=True, reasoning=reason,
                       option_mass=float(np.exp(lps[n]).sum()))
    return out


# ----------------------------------------------------------------------------
# Remote judge.


def _answer_position(tokens: Sequence[str], char_index: int) -> int | None:
  """Index of the token whose text covers `char_index` of the concatenated tokens."""
  pos = 0
  for k, tok in enumerate(tokens):
    end = pos + len(tok)
    if pos <= char_index < end:
      return k
    pos = end
  return None


def _letter_index(text: str, letter: str) -> int | None:
  """Where in `text` the stated answer letter sits (the occurrence `parse_answer` read)."""
  s = text.strip()
  offset = len(text) - len(text.lstrip())
  stated = list(_STATED.finditer(s))
  if stated:
    return offset + stated[-1].start(1)
  m = _LEADING.match(s)
  if m:
    return offset + m.start(1)
  m = _PAREN.search(s)
  return offset + m.start(1) if m else None


def _soft_from_completion_logprobs(logprobs: Mapping[str, Any], letter_at: int) -> float | None:
  """Soft P(A) from `/v1/completions` logprobs (`tokens`, `token_logprobs`, `top_logprobs`)."""
  tokens = logprobs.get("tokens") or []
  tops = logprobs.get("top_logprobs") or []
  lps = logprobs.get("token_logprobs") or []
  k = _answer_position(tokens, letter_at)
  if k is None or k >= len(tops):
    return None
  alternatives = list((tops[k] or {}).items())
  if k < len(lps):
    alternatives.append((tokens[k], lps[k]))
  return soft_label_from_top(alternatives)


def _soft_from_chat_logprobs(logprobs: Mapping[str, Any], letter_at: int) -> float | None:
  """Soft P(A) from chat logprobs (`content: [{token, logprob, top_logprobs}]`)."""
  content = logprobs.get("content") or []
  tokens = [c.get("token", "") for c in content]
  k = _answer_position(tokens, letter_at)
  if k is None:
    return None
  entry = content[k]
  alternatives = [(t.get("token", ""), t.get("logprob")) for t in entry.get("top_logprobs") or []]
  alternatives.append((entry.get("token", ""), entry.get("logprob")))
  return soft_label_from_top(alternatives)


class RemoteJudge:
  """The judge behind an OpenAI-compatible API (`cai_jax.serve.client.OpenAIClient`).

  `api="completions"` sends the same prompt text as `LocalJudge` (ending
  "The answer is: (", so the completion starts with the letter); use it with
  our server or any server of a base or chat model whose template you know.
  `api="chat"` sends chat messages and lets the server apply its template
  (hosted instruct models). Requests run `concurrency` at a time. The answer
  is parsed from the text; with `logprobs` the top log-probs at the answer
  position give a soft label when both letters are among them. An endpoint
  that rejects a request with the log-prob fields (HTTP 400) but accepts it
  without them is not asked for log-probs again.
  """

  soft = False

  def __init__(self, client, examples: Sequence[Any], fmt: PromptFormat | None = None, *,
               api: str = "chat", cot: bool = False, max_tokens: int = 16,
               cot_max_tokens: int = 256, clamp: tuple[float, float] = COT_CLAMP,
               logprobs: bool = True, top_logprobs: int = 5, temperature: float = 0.0,
               seed: int | None = 0, concurrency: int = 8):
    if api not in ("chat", "completions"):
      raise ValueError(f"judge api must be 'chat' or 'completions', got {api!r}")
    self.client = client
    self.examples = list(examples)
    self.fmt = fmt or PromptFormat()
    self.api = api
    self.cot = cot
    self.max_tokens = cot_max_tokens if cot else max_tokens
    self.clamp = tuple(clamp)
    self.logprobs = logprobs
    self.top_logprobs = top_logprobs
    self.temperature = temperature
    self.seed = seed
    self.concurrency = max(1, int(concurrency))
    self.name = f"openai:{getattr(client, 'base_url', '?')}:{api}"

  def _request(self, q: Question) -> tuple[str, float | None]:
    """(text, soft P(A) or None) for one question; the text is what follows the prompt."""
    from cai_jax.serve.client import RemoteError

    body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
    if self.seed is not None:
      body["seed"] = self.seed
    if self.api == "chat":
      body["messages"] = chat_messages(q, self.examples, self.fmt, cot=self.cot)
      if self.logprobs:
        body.update(logprobs=True, top_logprobs=self.top_logprobs)
      call = self.client.chat_completions
    else:
      body["prompt"] = judge_prompt(q, self.examples, self.fmt, cot=self.cot)
      if self.fmt.chat:
        body["stop"] = [self.fmt.template.end_of_turn]
      if self.logprobs:
        body["logprobs"] = self.top_logprobs
      call = self.client.completions
    try:
      reply = call(**body)
    except RemoteError as e:
      if not (self.logprobs and e.status == 400):
        raise
      # Many hosted endpoints reject the log-prob fields; ask once more without them.
      for field in ("logprobs", "top_logprobs"):
        body.pop(field, None)
      reply = call(**body)
      log.warning("%s rejects log-prob requests (%s); judging from the text alone", self.name, e)
      self.logprobs = False
    try:
      choice = reply["choices"][0]
      text = choice["message"]["content"] if self.api == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError) as e:
      raise RuntimeError(f"{self.name}: unexpected reply ({e!r}): {str(reply)[:300]}") from None
    text = text or ""
    lp = choice.get("logprobs") if self.logprobs else None
    return text, lp

  def _verdict(self, q: Question) -> Verdict:
    text, logprobs = self._request(q)
    # A completions prompt without CoT ends with "(": the text starts after it.
    opened = "(" if (self.api == "completions" and not self.cot) else ""
    shown = opened + text
    answer = parse_answer(shown)
    if answer is None:
      return Verdict(answer=None, p_a=None, soft=False, text=text)
    p_soft = None
    at = _letter_index(shown, answer)
    if isinstance(logprobs, Mapping) and at is not None and at >= len(opened):
      at -= len(opened)    # position in the returned text, which the tokens spell
      if self.api == "chat":
        p_soft = _soft_from_chat_logprobs(logprobs, at)
      else:
        p_soft = _soft_from_completion_logprobs(logprobs, at)
    if p_soft is not None and (p_soft > 0.5) != (answer == "A") and p_soft != 0.5:
      # Sampled text against its own distribution (temperature > 0): trust the text.
      p_soft = None
    if p_soft is None:
      return Verdict(answer=answer, p_a=1.0 if answer == "A" else 0.0, soft=False, text=text)
    if self.cot:
      p_soft = clamp_probability(p_soft, self.clamp)
    return Verdict(answer=answer, p_a=p_soft, soft=True, text=text)

  def verdicts(self, questions: Sequence[Question]) -> list[Verdict]:
    if self.concurrency == 1 or len(questions) <= 1:
      return [self._verdict(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      return list(pool.map(self._verdict, questions))


# ----------------------------------------------------------------------------
# Pairs, in both orders.


@dataclasses.dataclass(frozen=True)
class PairQuery:
  """Which of `r1` and `r2` better answers `conversation` under `principle`."""
  conversation: Any
  r1: str
  r2: str
  principle: Any     # constitution.ComparisonPrinciple (name, question)


def combine_verdicts(first: Verdict, second: Verdict) -> dict:
  """Combines the two orders (first: A = r1; second: A = r2) into one pair record.

  Returns `p_r1` (P(r1 better), or None if dropped), `verdict` ("r1", "r2",
  or None), `position_bias` (the orders disagree; None if unparseable) and
  `dropped` (None, "unparseable", "contradictory", or a verdict's `error`
  such as "too_long"). Soft labels are averaged whatever they say (their
  disagreement pulls `p_r1` to 0.5, which is the honest label); text
  verdicts must agree.
  """
  error = first.error or second.error
  if error:
    return {"p_r1": None, "verdict": None, "position_bias": None, "dropped": error}
  if first.p_a is None or second.p_a is None:
    return {"p_r1": None, "verdict": None, "position_bias": None, "dropped": "unparseable"}
  p_r1 = combine_orders(first.p_a, second.p_a)
  first_says_r1 = first.p_a > 0.5
  second_says_r1 = second.p_a < 0.5
  tie = first.p_a == 0.5 or second.p_a == 0.5
  position_bias = (not tie) and first_says_r1 != second_says_r1
  if not (first.soft and second.soft):
    # Some verdict came from text alone: the letters must name the same response.
    says = (first.answer == "A", second.answer == "B")
    if says[0] != says[1]:
      return {"p_r1": None, "verdict": None, "position_bias": True, "dropped": "contradictory"}
    if (p_r1 > 0.5) != says[0]:
      p_r1 = 1.0 if says[0] else 0.0
  verdict = "r1" if p_r1 > 0.5 else "r2" if p_r1 < 0.5 else None
  return {"p_r1": p_r1, "verdict": verdict, "position_bias": position_bias, "dropped": None}


def judge_pairs(judge: Judge, queries: Sequence[PairQuery]) -> list[dict]:
  """Judges each pair in both orders (one `verdicts` call for all 2N questions).

  Each record holds the principle's name, both raw verdicts (`orders[0]`:
  A = r1, `orders[1]`: A = r2) and the combination (`combine_verdicts`).
  """
  questions = []
  for pq in queries:
    text = pq.principle.question
    questions.append(Question(pq.conversation, text, pq.r1, pq.r2))
    questions.append(Question(pq.conversation, text, pq.r2, pq.r1))
  verdicts = judge.verdicts(questions)
  records = []
  for k, pq in enumerate(queries):
    first, second = verdicts[2 * k], verdicts[2 * k + 1]
    record = {"principle": pq.principle.name,
              "orders": [dict(first.to_json(), a="r1", b="r2"),
                         dict(second.to_json(), a="r2", b="r1")]}
    record.update(combine_verdicts(first, second))
    records.append(record)
  return records


def judge_pair(judge: Judge, conversation: Any, r1: str, r2: str, principle: Any) -> dict:
  """One pair in both orders; see `judge_pairs`."""
  return judge_pairs(judge, [PairQuery(conversation, r1, r2, principle)])[0]


# ----------------------------------------------------------------------------
# From config.


def prompt_format(cfg, template: tokenizer_lib.ChatTemplate | None = None) -> PromptFormat:
  """The `PromptFormat` of a `judge` ConfigDict (`chat`, `few_shot`, `system`, `template`)."""
  tmpl = template or tokenizer_lib.get_template(cfg.get("template", "nemo"))
  return PromptFormat(template=tmpl, chat=bool(cfg.get("chat", True)),
                      few_shot=int(cfg.get("few_shot", -1)), system=cfg.get("system", ""))


def make_judge(cfg, examples: Sequence[Any], *, generator=None) -> Judge:
  """A judge from a `judge` ConfigDict.

  kind "local": a model dir (or `generator`, e.g. the policy's, reused);
  kind "openai": `url`, `model`, `api_key_env` (the key is read from that
  environment variable, never from the config) and `api` (chat | completions).
  """
  clamp = (float(cfg.get("clamp_low", COT_CLAMP[0])), float(cfg.get("clamp_high", COT_CLAMP[1])))
  if cfg.kind == "local":
    if generator is None:
      from cai_jax.cai.backends import LocalBackend
      if not cfg.model_dir:
        raise ValueError("judge.model_dir: a model directory is required for kind='local'")
      generator = LocalBackend.from_model_dir(cfg.model_dir, cfg.get("tokenizer", ""),
                                              template=cfg.get("template", "nemo")).generator
    return LocalJudge(generator, examples, prompt_format(cfg),
                      cot=bool(cfg.get("cot", False)),
                      cot_max_tokens=int(cfg.get("cot_max_tokens", 64)), clamp=clamp,
                      batch_size=int(cfg.get("batch_size", 8)), seed=int(cfg.get("seed", 0)))
  if cfg.kind == "openai":
    import os

    from cai_jax.serve.client import OpenAIClient
    if not cfg.get("url"):
      raise ValueError("judge.url: an OpenAI-compatible base URL is required for kind='openai'")
    key_env = cfg.get("api_key_env", "")
    key = os.environ.get(key_env) if key_env else None
    if key_env and not key:
      raise ValueError(f"judge.api_key_env: environment variable {key_env} (the judge's API "
                       f"key) is not set")
    client = OpenAIClient(cfg.url, api_key=key or "", model=cfg.get("model", "") or "cai_jax",
                          timeout=float(cfg.get("timeout", 600.0)),
                          retries=int(cfg.get("retries", 3)))
    return RemoteJudge(client, examples, prompt_format(cfg), api=cfg.get("api", "chat"),
                       cot=bool(cfg.get("cot", False)),
                       max_tokens=int(cfg.get("max_tokens", 16)),
                       cot_max_tokens=int(cfg.get("cot_max_tokens", 256)), clamp=clamp,
                       logprobs=bool(cfg.get("logprobs", True)),
                       top_logprobs=int(cfg.get("top_logprobs", 5)),
                       temperature=float(cfg.get("temperature", 0.0)),
                       seed=int(cfg.get("seed", 0)),
                       concurrency=int(cfg.get("concurrency", 8)))
  raise ValueError(f"judge.kind must be 'local' or 'openai', got {cfg.kind!r}")
