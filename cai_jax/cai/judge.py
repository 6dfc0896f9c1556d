"""The RL-CAI feedback model: which of two responses better follows a principle.

The judge answers the paper's multiple-choice question (`judge_prompts`: the
question, its prompt text or chat messages, the answer-letter tokens) and its
answer becomes a `Verdict` (`verdicts`: letters parsed from text, soft labels
from log-probs, the two orders combined). This module holds the judges, which
only ask and read:

* `LocalJudge` — a model in this process, through the generation engine
  (`cai_jax.engine.TextGenerator`). `TextGenerator.next_token_logprobs` reads
  the log-probabilities of the option-letter tokens after the prompt, from the
  sampler's prompt pass; normalised over the two options they are the soft
  label P(A) the paper trains on. With chain-of-thought the judge first writes
  a short reasoning ("Let's think step by step:", greedy, with the engine's
  `complete`) and then reads the letter; those labels are clamped (the paper
  found [0.4, 0.6] best: CoT makes the judge over-confident).
* `RemoteJudge` — any OpenAI-compatible endpoint (ours, vLLM, a hosted API
  with the key in an environment variable). The answer letter is parsed from
  the text, strictly: text that does not state one answer is *unparseable*,
  never guessed. When the endpoint returns `top_logprobs` that hold both
  letters at the answer position, they give a soft label too.

`judge_pairs` asks every question in both orders (A = r1 and B = r1) in one
call and combines them (`verdicts.combine_verdicts`), which cancels the
judge's position bias. `make_judge` builds a judge from a `judge` config block
(configs/rl_cai.py `judge_config`), the one place the judges' defaults live:
the constructors take `JudgeSettings` and a `PromptFormat` and default nothing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Any, Protocol, Sequence

import numpy as np

from cai_jax.cai.backends import LocalBackend, require_fields
from cai_jax.cai.judge_prompts import (COT_ANSWER_PREFIX, PairQuery, PromptFormat, Question,
                                       answer_after_reasoning, both_orders, chat_messages,
                                       judge_prompt, option_token_ids, reasoning_end_strings)
from cai_jax.cai.verdicts import (Verdict, pair_records, soft_from_option_logprobs, soft_verdict,
                                  text_verdict)

__all__ = ["Judge", "JudgeSettings", "LocalJudge", "PairQuery", "PromptFormat", "Question",
           "RemoteJudge", "Verdict", "judge_pair", "judge_pairs", "make_judge"]

log = logging.getLogger(__name__)

JUDGE_CONFIG = "configs/rl_cai.py judge_config()"
APIS = ("chat", "completions")
# The `judge` block's fields that `JudgeSettings`, `PromptFormat` and each kind's judge read.
_SETTINGS_FIELDS = ("cot", "cot_max_tokens", "clamp_low", "clamp_high", "batch_size", "seed",
                    "api", "max_tokens", "logprobs", "top_logprobs", "temperature", "concurrency")
_FORMAT_FIELDS = ("template", "chat", "few_shot", "system")
_KIND_FIELDS = {"local": ("model_dir", "tokenizer"),
                "openai": ("url", "model", "api_key_env", "timeout", "retries")}


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
  """How a judge asks and reads; built from a `judge` config block by `from_config`.

  Local judges use `batch_size`; remote ones `api`, `max_tokens`, `logprobs`,
  `top_logprobs`, `temperature` and `concurrency`; both the rest.
  """
  cot: bool                       # reason first, then answer; labels clamped to `clamp`
  cot_max_tokens: int             # the reasoning's token budget
  clamp: tuple[float, float]      # (low, high) bounds of a chain-of-thought label
  batch_size: int                 # local: questions per engine call
  seed: int
  api: str                        # remote: chat | completions
  max_tokens: int                 # remote: the answer's token budget without CoT
  logprobs: bool                  # remote: ask for top log-probs (soft labels when returned)
  top_logprobs: int
  temperature: float
  concurrency: int                # remote: requests in flight

  @classmethod
  def from_config(cls, cfg) -> "JudgeSettings":
    """From a `judge` block; a missing field is an error naming it."""
    require_fields(cfg, _SETTINGS_FIELDS, "judge", JUDGE_CONFIG)
    return cls(cot=bool(cfg.cot), cot_max_tokens=int(cfg.cot_max_tokens),
               clamp=(float(cfg.clamp_low), float(cfg.clamp_high)),
               batch_size=int(cfg.batch_size), seed=int(cfg.seed), api=str(cfg.api),
               max_tokens=int(cfg.max_tokens), logprobs=bool(cfg.logprobs),
               top_logprobs=int(cfg.top_logprobs), temperature=float(cfg.temperature),
               concurrency=int(cfg.concurrency))


class Judge(Protocol):
  name: str
  soft: bool      # True: every verdict is a soft label (never unparseable)

  def verdicts(self, questions: Sequence[Question]) -> list[Verdict]:
    ...


# ----------------------------------------------------------------------------
# In-process judge.


class LocalJudge:
  """The judge as a model in this process (a `cai_jax.engine.TextGenerator`).

  Soft labels from the engine's `next_token_logprobs`: `settings.batch_size`
  prompts per call, padded to that many rows and a power-of-two length, so a
  run compiles a handful of shapes.
  """

  soft = True

  def __init__(self, generator, examples: Sequence[Any], fmt: PromptFormat,
               settings: JudgeSettings):
    self.generator = generator
    self.examples = list(examples)
    self.fmt = fmt
    self.settings = settings
    self.option_ids = option_token_ids(generator.tokenizer)
    self.name = "local"

  def prompt(self, q: Question, reasoning: str | None = None) -> str:
    """The prompt whose next token is read; with CoT, after `reasoning`."""
    if not self.settings.cot:
      return judge_prompt(q, self.examples, self.fmt)
    return answer_after_reasoning(q, self.examples, self.fmt, reasoning or "")

  def option_logprobs(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs [N, 2] of the "A"/"B" tokens after each prompt, and P(A) [N] over the two."""
    lps = self.generator.next_token_logprobs(list(prompts), self.option_ids,
                                             batch_size=self.settings.batch_size,
                                             what="judge prompt {i}").astype(np.float64)
    return lps, soft_from_option_logprobs(lps)

  def reasoning(self, questions: Sequence[Question]) -> list[str]:
    """Chain-of-thought texts (greedy), cut at the end of turn or at a stated answer."""
    s = self.settings
    prompts = [judge_prompt(q, self.examples, self.fmt, cot=True) for q in questions]
    ends = reasoning_end_strings(self.fmt)
    out = []
    for start in range(0, len(prompts), s.batch_size):
      chunk = prompts[start:start + s.batch_size]
      completions = self.generator.complete(chunk, max_new_tokens=s.cot_max_tokens, greedy=True,
                                            end_strings=ends, seed=s.seed,
                                            min_batch_bucket=s.batch_size)
      out.extend(c.text for c in completions)
    return out

  def fits(self, q: Question) -> bool:
    """Whether the question's prompt (and the reasoning budget, with CoT) fits the model."""
    gen, s = self.generator, self.settings
    prompt = judge_prompt(q, self.examples, self.fmt, cot=s.cot)
    extra = s.cot_max_tokens + len(gen.tokenizer.encode(COT_ANSWER_PREFIX)) + 1 if s.cot else 0
    return len(gen.encode_prompts([prompt])[0]) + extra <= gen.max_positions

  def verdicts(self, questions: Sequence[Question]) -> list[Verdict]:
    """Soft verdicts; a question too long for the model gets `error="too_long"` instead."""
    fitting = [k for k, q in enumerate(questions) if self.fits(q)]
    out = [Verdict(answer=None, p_a=None, soft=True, error="too_long") for _ in questions]
    if not fitting:
      return out
    asked = [questions[k] for k in fitting]
    reasons = self.reasoning(asked) if self.settings.cot else [""] * len(asked)
    lps, p_a = self.option_logprobs([self.prompt(q, r) for q, r in zip(asked, reasons)])
    clamp = self.settings.clamp if self.settings.cot else None
    for n, (k, reason) in enumerate(zip(fitting, reasons)):
      out[k] = soft_verdict(p_a[n], np.exp(lps[n]).sum(), reasoning=reason, clamp=clamp)
    return out


# ----------------------------------------------------------------------------
# Remote judge.


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

  def __init__(self, client, examples: Sequence[Any], fmt: PromptFormat,
               settings: JudgeSettings):
    if settings.api not in APIS:
      raise ValueError(f"judge api must be 'chat' or 'completions', got {settings.api!r}")
    self.client = client
    self.examples = list(examples)
    self.fmt = fmt
    self.settings = settings
    self.api = settings.api
    self.cot = settings.cot
    self.max_tokens = settings.cot_max_tokens if settings.cot else settings.max_tokens
    self.logprobs = settings.logprobs   # turned off once the endpoint refuses log-prob fields
    self.concurrency = max(1, settings.concurrency)
    self.name = f"openai:{getattr(client, 'base_url', '?')}:{self.api}"

  def _request(self, q: Question) -> tuple[str, Any]:
    """(text, the reply's log-prob block or None) for one question; the text is what
    follows the prompt."""
    from cai_jax.serve.client import RemoteError

    s = self.settings
    body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": s.temperature,
                            "seed": s.seed}
    if self.api == "chat":
      body["messages"] = chat_messages(q, self.examples, self.fmt, cot=self.cot)
      if self.logprobs:
        body.update(logprobs=True, top_logprobs=s.top_logprobs)
      call = self.client.chat_completions
    else:
      body["prompt"] = judge_prompt(q, self.examples, self.fmt, cot=self.cot)
      if self.fmt.chat:
        body["stop"] = [self.fmt.template.end_of_turn]
      if self.logprobs:
        body["logprobs"] = s.top_logprobs
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
    return text or "", choice.get("logprobs") if self.logprobs else None

  def _verdict(self, q: Question) -> Verdict:
    text, logprobs = self._request(q)
    # A completions prompt without CoT ends with "(": the text starts after it.
    opened = "(" if (self.api == "completions" and not self.cot) else ""
    return text_verdict(text, logprobs, opened=opened, chat=self.api == "chat",
                        clamp=self.settings.clamp if self.cot else None)

  def verdicts(self, questions: Sequence[Question]) -> list[Verdict]:
    if self.concurrency == 1 or len(questions) <= 1:
      return [self._verdict(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      return list(pool.map(self._verdict, questions))


# ----------------------------------------------------------------------------
# Pairs, in both orders.


def judge_pairs(judge: Judge, queries: Sequence[PairQuery]) -> list[dict]:
  """Judges each pair in both orders (one `verdicts` call for all 2N questions).

  Each record holds the principle's name, both raw verdicts (`orders[0]`:
  A = r1, `orders[1]`: A = r2) and the combination (`verdicts.combine_verdicts`).
  """
  return pair_records([pq.principle.name for pq in queries],
                      judge.verdicts(both_orders(queries)))


def judge_pair(judge: Judge, conversation: Any, r1: str, r2: str, principle: Any) -> dict:
  """One pair in both orders; see `judge_pairs`."""
  return judge_pairs(judge, [PairQuery(conversation, r1, r2, principle)])[0]


# ----------------------------------------------------------------------------
# From config.

def make_judge(cfg, examples: Sequence[Any], *, generator=None) -> Judge:
  """A judge from a `judge` config block (configs/rl_cai.py `judge_config`, every field).

  kind "local": a model dir (or `generator`, e.g. the policy's, reused);
  kind "openai": `url`, `model`, `api_key_env` (the key is read from that
  environment variable, never from the config) and `api` (chat | completions).
  A field the block lacks is an error naming it, never a default.
  """
  require_fields(cfg, ("kind",), "judge", JUDGE_CONFIG)
  if cfg.kind not in _KIND_FIELDS:
    raise ValueError(f"judge.kind must be 'local' or 'openai', got {cfg.kind!r}")
  require_fields(cfg, _SETTINGS_FIELDS + _FORMAT_FIELDS + _KIND_FIELDS[cfg.kind], "judge",
                 JUDGE_CONFIG)
  settings = JudgeSettings.from_config(cfg)
  fmt = PromptFormat.from_config(cfg)
  if cfg.kind == "local":
    if generator is None:
      if not cfg.model_dir:
        raise ValueError("judge.model_dir: a model directory is required for kind='local'")
      generator = LocalBackend.from_model_dir(cfg.model_dir, cfg.tokenizer, template=cfg.template,
                                              batch_size=settings.batch_size).generator
    return LocalJudge(generator, examples, fmt, settings)
  import os

  from cai_jax.serve.client import OpenAIClient
  if not cfg.url:
    raise ValueError("judge.url: an OpenAI-compatible base URL is required for kind='openai'")
  key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
  if cfg.api_key_env and not key:
    raise ValueError(f"judge.api_key_env: environment variable {cfg.api_key_env} (the judge's "
                     f"API key) is not set")
  client = OpenAIClient(cfg.url, api_key=key or "", model=cfg.model or "cai_jax",
                        timeout=float(cfg.timeout), retries=int(cfg.retries))
  return RemoteJudge(client, examples, fmt, settings)
