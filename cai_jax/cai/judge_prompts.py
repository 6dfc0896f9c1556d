"""The judge's questions: what it is asked, as prompt text or chat messages (no model, no HTTP).

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
turn is opened with "The answer is: (", so the next token is the option letter;
`option_token_ids` finds that token in a tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from cai_jax import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

LETTERS = ("A", "B")
QUESTION_INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER_PREFIX = "The answer is: ("
COT_PREFIX = "Let's think step by step:"
# Reading the letter after a chain of thought: the reasoning is closed with this.
COT_ANSWER_PREFIX = "\n" + ANSWER_PREFIX
CHAT_ANSWER_INSTRUCTION = 'Reply with "The answer is: (A)" or "The answer is: (B)".'
CHAT_COT_INSTRUCTION = ('Think step by step, then finish with "The answer is: (A)" or '
                        '"The answer is: (B)".')


@dataclasses.dataclass(frozen=True)
class Question:
  """One multiple-choice question: a conversation, a principle and two options."""
  conversation: Any          # the human's prompt (str) or a list of {from, value} turns
  principle: str             # the principle's question text
  option_a: str
  option_b: str


@dataclasses.dataclass(frozen=True)
class PairQuery:
  """Which of `r1` and `r2` better answers `conversation` under `principle`."""
  conversation: Any
  r1: str
  r2: str
  principle: Any     # constitution.ComparisonPrinciple (name, question)


def both_orders(queries: Sequence[PairQuery]) -> list[Question]:
  """Two questions per pair, in order: A = r1 first, then A = r2 (2N questions for N pairs)."""
  questions = []
  for pq in queries:
    text = pq.principle.question
    questions.append(Question(pq.conversation, text, pq.r1, pq.r2))
    questions.append(Question(pq.conversation, text, pq.r2, pq.r1))
  return questions


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How questions become judge prompts.

  `chat=True` renders the question as a user turn with `template` (the worked
  examples as earlier turns); `chat=False` writes plain text for a base model.
  `few_shot` caps the number of worked examples (-1: all); `system` is the
  chat system message. Built from a `judge` config block by `from_config`;
  the defaults live in that block (configs/rl_cai.py `judge_config`).
  """
  template: tokenizer_lib.ChatTemplate
  chat: bool
  few_shot: int
  system: str

  @classmethod
  def from_config(cls, cfg, template: tokenizer_lib.ChatTemplate | None = None) -> "PromptFormat":
    """From a `judge` block's `template`, `chat`, `few_shot` and `system` (`template` overrides
    the block's template name)."""
    return cls(template=template or tokenizer_lib.get_template(cfg.template),
               chat=bool(cfg.chat), few_shot=int(cfg.few_shot), system=str(cfg.system))


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


def answer_after_reasoning(q: Question, examples: Sequence[Any], fmt: PromptFormat,
                           reasoning: str) -> str:
  """The chain-of-thought prompt, the judge's `reasoning`, then the open answer: the text
  whose next token is the letter a reasoning judge settles on."""
  reasoning = (reasoning or "").strip()
  return (judge_prompt(q, examples, fmt, cot=True) + (" " + reasoning if reasoning else "")
          + COT_ANSWER_PREFIX)


def reasoning_end_strings(fmt: PromptFormat) -> list[str]:
  """Where a chain of thought is cut: at a stated answer, a blank line, the end of the turn
  (chat) or the start of another question (plain text)."""
  ends = ["The answer is", "\n\n"]
  if fmt.chat:
    return [fmt.template.end_of_turn] + ends
  return ends + ["Human:", QUESTION_INTRO]


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
# The answer letters as tokens.


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
