"""The judge's answers: letters parsed from text, soft labels from log-probs, both orders
combined (no model, no HTTP).

A verdict's `p_a` is the probability that option A is better. It is soft
when it comes from log-probabilities: the two letters' probabilities
normalised over the two (the paper's soft label), read by an in-process judge
at the answer position (`soft_from_option_logprobs`) or from the top log-probs
an API returns (`soft_label_from_top`). Otherwise it is 1 or 0 from the text
(`parse_answer`), which is strict: text that does not state one answer is
*unparseable*, never guessed. Chain-of-thought labels are clamped (the paper
found [0.4, 0.6] best: reasoning makes the judge over-confident).

`combine_verdicts` joins the two orders of a pair (A = r1, then A = r2):
P(r1 better) = (P_first(A) + P_second(B)) / 2, which cancels the judge's
position bias. Text verdicts that contradict each other (the judge picked the
same *position* both times) and unparseable ones are dropped and counted —
NeMo-Aligner's script instead swallows unparseable answers silently and
replaces a degenerate verdict with a random label, which injects pure noise
into the reward model's data.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from cai_jax.cai.judge_prompts import LETTERS

# The paper's clamp for chain-of-thought labels; a judge's own comes from its config.
COT_CLAMP = (0.4, 0.6)


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


# ----------------------------------------------------------------------------
# Letters from text.

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


# ----------------------------------------------------------------------------
# Probabilities.


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


def soft_from_option_logprobs(option_logprobs: np.ndarray) -> np.ndarray:
  """P(A) [N] from the log-probs [N, 2] of the "A" and "B" tokens, normalised over the two."""
  lps = np.asarray(option_logprobs, np.float64)
  z = np.exp(lps - lps.max(axis=1, keepdims=True))
  return z[:, 0] / z.sum(axis=1)


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


def _answer_position(tokens: Sequence[str], char_index: int) -> int | None:
  """Index of the token whose text covers `char_index` of the concatenated tokens."""
  pos = 0
  for k, tok in enumerate(tokens):
    end = pos + len(tok)
    if pos <= char_index < end:
      return k
    pos = end
  return None


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


# ----------------------------------------------------------------------------
# Verdicts.


def soft_verdict(p_a: float, option_mass: float, *, reasoning: str = "",
                 clamp: tuple[float, float] | None = None) -> Verdict:
  """A verdict from a soft label read off the model (`clamp`: the chain-of-thought bounds)."""
  p = float(p_a)
  if clamp is not None:
    p = clamp_probability(p, clamp)
  answer = "A" if p > 0.5 else "B" if p < 0.5 else None
  return Verdict(answer=answer, p_a=p, soft=True, reasoning=reasoning,
                 option_mass=float(option_mass))


def text_verdict(text: str, logprobs: Any, *, opened: str = "", chat: bool,
                 clamp: tuple[float, float] | None = None) -> Verdict:
  """A verdict from an API's reply: the letter parsed from `text`, soft when `logprobs`
  (the reply's log-prob block, chat or completions shape per `chat`) hold both letters
  at the answer position.

  `opened` is prompt text the reply continues ("(" when a completions prompt
  ends with it), read as part of the answer; `clamp` bounds a soft label (the
  chain-of-thought bounds).
  """
  shown = opened + text
  answer = parse_answer(shown)
  if answer is None:
    return Verdict(answer=None, p_a=None, soft=False, text=text)
  p_soft = None
  at = _letter_index(shown, answer)
  if isinstance(logprobs, Mapping) and at is not None and at >= len(opened):
    at -= len(opened)    # position in the returned text, which the tokens spell
    if chat:
      p_soft = _soft_from_chat_logprobs(logprobs, at)
    else:
      p_soft = _soft_from_completion_logprobs(logprobs, at)
  if p_soft is not None and (p_soft > 0.5) != (answer == "A") and p_soft != 0.5:
    # Sampled text against its own distribution (temperature > 0): trust the text.
    p_soft = None
  if p_soft is None:
    return Verdict(answer=answer, p_a=1.0 if answer == "A" else 0.0, soft=False, text=text)
  if clamp is not None:
    p_soft = clamp_probability(p_soft, clamp)
  return Verdict(answer=answer, p_a=p_soft, soft=True, text=text)


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


def pair_records(principle_names: Sequence[str], verdicts: Sequence[Verdict]) -> list[dict]:
  """One record per pair from its two verdicts (`judge_prompts.both_orders`' order).

  Each holds the principle's name, both raw verdicts (`orders[0]`: A = r1,
  `orders[1]`: A = r2) and their combination (`combine_verdicts`).
  """
  if len(verdicts) != 2 * len(principle_names):
    raise ValueError(f"{len(verdicts)} verdicts for {len(principle_names)} pairs; expected two "
                     f"per pair")
  records = []
  for k, name in enumerate(principle_names):
    first, second = verdicts[2 * k], verdicts[2 * k + 1]
    record = {"principle": name,
              "orders": [dict(first.to_json(), a="r1", b="r2"),
                         dict(second.to_json(), a="r2", b="r1")]}
    record.update(combine_verdicts(first, second))
    records.append(record)
  return records
