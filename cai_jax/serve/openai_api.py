"""OpenAI's protocol (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) as pure functions.

Requests and replies follow OpenAI's API, so the `openai` package, and judges
written against it, work unchanged; vLLM's extension fields (`top_k`,
`repetition_penalty`, `min_tokens`, `add_bos`) are accepted too. Parsers turn a
decoded JSON body into a request object holding the worker's settings, or
raise a `RequestError` naming the field; renderers turn completions into the
reply's JSON. No HTTP objects and no model here: the server renders chat
prompts, tokenises, checks lengths and generates, and passes token lookups in.
(Not named `openai.py`: that would shadow the `openai` package.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from cai_jax.engine import Completion
from cai_jax.serve.protocol import (MAX_SENTENCES, SEED_MAX, RequestError, bos_added, get_bool,
                                    get_int, get_number, reject_unsupported, text_offsets,
                                    type_name)
from cai_jax.serve.worker import row_seeds

# OpenAI's limits: `logprobs` on completions, `top_logprobs` on chat, `stop` strings.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512           # OpenAI: "up to the context"; capped so N stays small


# --- request fields both endpoints share ------------------------------------------------

def parse_stop(body: dict, name: str = "stop") -> list[str]:
  """`stop`: a string or up to 4 strings; empty ones are dropped, as OpenAI does."""
  value = body.get(name)
  if value is None:
    return []
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
    raise RequestError(f"{name} must be a string or a list of strings (got {value!r})",
                       param=name)
  if len(value) > MAX_STOP_STRINGS:
    raise RequestError(f"{name} takes at most {MAX_STOP_STRINGS} strings (got {len(value)})",
                       param=name)
  return [s for s in value if s]


def _common_settings(body: dict, default_max_tokens: int | None, n_prompts: int
                     ) -> tuple[dict[str, Any], int, int | None, int | None]:
  """Fields shared by completions and chat: (settings, n, seed, max_tokens)."""
  reject_unsupported(body, {
      "stream": lambda v: v in (None, False),
      "presence_penalty": lambda v: v in (None, 0, 0.0),
      "frequency_penalty": lambda v: v in (None, 0, 0.0),
      "logit_bias": lambda v: v in (None, {}),
      "suffix": lambda v: v in (None, ""),
  })
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise RequestError(f"model must be a string (got {type_name(model)})", param="model")
  n = get_int(body, "n", 1, "n must be an integer between 1 and 128", minimum=1,
              maximum=MAX_SENTENCES)
  if n * n_prompts > MAX_SENTENCES:
    raise RequestError(f"n x prompts = {n * n_prompts} completions; the limit is {MAX_SENTENCES}",
                       param="n")
  best_of = body.get("best_of")
  if best_of is not None and best_of != n:
    raise RequestError("best_of is not supported (leave it unset or equal to n)",
                       param="best_of", code="unsupported_parameter")
  temperature = get_number(body, "temperature", 1.0,
                           "temperature must be a number between 0 and 2",
                           minimum=0.0, maximum=2.0)
  top_p = get_number(body, "top_p", 1.0, "top_p must be a number in (0, 1]",
                     minimum=0.0, maximum=1.0, exclusive_minimum=True)
  # Extensions (vLLM's names): top_k, repetition_penalty, min_tokens, add_bos.
  top_k = get_int(body, "top_k", 0, "top_k must be an integer no less than -1 (0 or -1 = off)",
                  minimum=-1)
  if top_k == -1:   # vLLM's "off"
    top_k = 0
  repetition_penalty = get_number(body, "repetition_penalty", 1.0,
                                  "repetition_penalty must be a positive number",
                                  minimum=0.0, exclusive_minimum=True)
  min_tokens = get_int(body, "min_tokens", 0, "min_tokens must be an integer no less than 0",
                       minimum=0)
  add_bos = get_bool(body, "add_bos", False)
  seed = get_int(body, "seed", None, "seed must be an integer", minimum=-SEED_MAX - 1,
                 maximum=SEED_MAX)
  greedy = temperature == 0.0
  if greedy:   # temperature 0 means argmax, as in OpenAI's API
    temperature, top_p, top_k = 1.0, 1.0, 0
  max_tokens = body.get("max_completion_tokens")
  field = "max_completion_tokens" if max_tokens is not None else "max_tokens"
  max_tokens = get_int(body, field, default_max_tokens,
                       f"{field} must be an integer no less than 0", minimum=0)
  settings = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, min_new_tokens=min_tokens,
                  add_bos=add_bos, stop_at_eos=True)
  return settings, n, seed, max_tokens


def usage(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion]) -> dict:
  """Token counts; each prompt counts once however many choices it has (`n`)."""
  prompt = sum(len(p) for p in prompt_ids)
  completion = sum(len(c.token_ids) for c in completions)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


# --- /v1/completions ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompletionRequest:
  """A checked `/v1/completions` request; the rows are each prompt `n` times."""
  prompts: list[str]
  rows: list[str]
  settings: dict[str, Any]      # `BatchingWorker.submit` settings; one seed per row
  logprobs: int | None          # how many top alternatives per token; None: no logprobs
  echo: bool                    # the reply's text (and logprobs) start with the prompt

  @property
  def add_bos(self) -> bool:
    return self.settings["add_bos"]

  @property
  def max_tokens(self) -> int:
    return self.settings["max_new_tokens"]

  @property
  def num_top_logprobs(self) -> int:
    return self.logprobs or 0

  @property
  def return_prompt_logprobs(self) -> bool:
    return self.echo and self.logprobs is not None


def parse_completion_request(body: dict) -> CompletionRequest:
  """The request's prompts and settings, with OpenAI's defaults."""
  prompt = body.get("prompt")
  if isinstance(prompt, str):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    prompts = list(prompt)
  else:
    raise RequestError("prompt must be a string or a non-empty list of strings "
                       "(token-id prompts are not supported)", param="prompt")
  settings, n, seed, max_tokens = _common_settings(body, DEFAULT_COMPLETION_MAX_TOKENS,
                                                   len(prompts))
  logprobs = get_int(body, "logprobs", None,
                     f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}",
                     minimum=0, maximum=MAX_COMPLETION_LOGPROBS)
  echo = get_bool(body, "echo", False)
  stop = parse_stop(body)
  rows = [p for p in prompts for _ in range(n)]
  settings.update(max_new_tokens=max_tokens, end_strings=stop, seed=row_seeds(seed, len(rows)))
  return CompletionRequest(prompts=prompts, rows=rows, settings=settings, logprobs=logprobs,
                           echo=echo)


def _top_list(top: dict[str, float] | None, count: int, chosen: str, chosen_lp: float
              ) -> dict[str, float]:
  """The `count` most likely alternatives, plus the sampled token (as OpenAI does)."""
  items = dict(list((top or {}).items())[:count])
  items.setdefault(chosen, chosen_lp)
  return items


def _completion_logprobs(request: CompletionRequest, row_prompt: str, c: Completion,
                         bos_text: str | None) -> dict[str, list]:
  """A choice's `logprobs`: tokens of its text, their logprobs, alternatives, offsets."""
  m = c.num_text_tokens
  tokens = c.tokens[:m]
  token_lps: list[float | None] = list(c.logprobs[:m])
  tops: list[dict | None] = [_top_list(t, request.num_top_logprobs, tok, lp) for t, tok, lp in zip(
      c.top_logprobs or [None] * m, tokens, token_lps)]
  if request.echo:
    silent = [0] if bos_added(request.add_bos, row_prompt, bos_text) else []
    offsets = text_offsets(c.prompt_tokens + tokens, 0, silent)
    tokens = c.prompt_tokens + tokens
    token_lps = [None] + list(c.prompt_logprobs[1:]) + token_lps
    tops = [None] * len(c.prompt_tokens) + tops
  else:
    offsets = text_offsets(tokens, len(row_prompt))
  return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
          "text_offset": offsets}


def render_completion(request: CompletionRequest, completions: Sequence[Completion],
                      prompt_ids: Sequence[Sequence[int]], *, model_name: str, response_id: str,
                      created: int, bos_text: str | None) -> dict[str, Any]:
  """OpenAI's `text_completion` object: one choice per row, usage over the prompts.

  `prompt_ids` are the ids of `request.prompts` (not of the rows); `bos_text` is
  the bos token's text (None without one), which an added bos does not contribute."""
  choices = []
  for index, (row_prompt, c) in enumerate(zip(request.rows, completions)):
    text = row_prompt + c.text if request.echo else c.text
    choice_logprobs = None
    if request.logprobs is not None:
      choice_logprobs = _completion_logprobs(request, row_prompt, c, bos_text)
    choices.append({"index": index, "text": text, "logprobs": choice_logprobs,
                    "finish_reason": c.finish_reason})
  return {"id": response_id, "object": "text_completion", "created": created,
          "model": model_name, "choices": choices, "usage": usage(prompt_ids, completions)}


# --- /v1/chat/completions ----------------------------------------------------------------

def parse_chat_messages(body: dict) -> list[dict[str, str]]:
  """The `messages` as {role, content} strings (content parts joined; `developer` is the
  system role). Checked before anything else, since the prompt is rendered from them."""
  reject_unsupported(body, {
      "tools": lambda v: not v, "functions": lambda v: not v,
      "tool_choice": lambda v: v in (None, "none"),
      "response_format": lambda v: v is None or (isinstance(v, dict)
                                                 and v.get("type") == "text"),
  })
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError("messages must be a non-empty list of {role, content} objects",
                       param="messages")
  out = []
  for k, m in enumerate(messages):
    if not isinstance(m, dict):
      raise RequestError(f"messages[{k}] must be an object with role and content "
                         f"(got {type_name(m)})", param="messages")
    role, content = m.get("role"), m.get("content")
    if role == "developer":   # OpenAI's newer name for the system message
      role = "system"
    if isinstance(content, list):   # content parts: only text can be rendered
      texts = []
      for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
            part.get("text"), str):
          raise RequestError(f"messages[{k}].content: only text parts are supported",
                             param="messages")
        texts.append(part["text"])
      content = "".join(texts)
    if not isinstance(role, str) or not isinstance(content, str):
      raise RequestError(f"messages[{k}] needs a string role and string content "
                         f"(got role={role!r}, content of type {type_name(content)})",
                         param="messages")
    out.append({"role": role, "content": content})
  return out


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A checked `/v1/chat/completions` request, less its messages (the server renders
  them into one prompt) and the two settings that need the prompt (`chat_settings`)."""
  n: int
  settings: dict[str, Any]      # `BatchingWorker.submit` settings; one seed per choice
  max_tokens: int | None        # None: as many as fit, up to DEFAULT_CHAT_MAX_TOKENS
  logprobs: bool
  top_logprobs: int | None
  stop: list[str]

  @property
  def add_bos(self) -> bool:
    return self.settings["add_bos"]

  @property
  def num_top_logprobs(self) -> int:
    return (self.top_logprobs or 0) if self.logprobs else 0


def parse_chat_request(body: dict) -> ChatRequest:
  """The request's settings, with OpenAI's defaults (after `parse_chat_messages`)."""
  settings, n, seed, max_tokens = _common_settings(body, None, 1)
  logprobs = get_bool(body, "logprobs", False)
  top_logprobs = get_int(body, "top_logprobs", None,
                         f"top_logprobs must be an integer between 0 and "
                         f"{MAX_CHAT_TOP_LOGPROBS}", minimum=0, maximum=MAX_CHAT_TOP_LOGPROBS)
  if top_logprobs is not None and not logprobs:
    raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
  stop = parse_stop(body)
  settings.update(seed=row_seeds(seed, n))
  return ChatRequest(n=n, settings=settings, max_tokens=max_tokens, logprobs=logprobs,
                     top_logprobs=top_logprobs, stop=stop)


def default_chat_max_tokens(prompt_tokens: int, max_positions: int) -> int:
  """max_tokens of a chat request that sets none: what fits, up to DEFAULT_CHAT_MAX_TOKENS."""
  return max(0, min(DEFAULT_CHAT_MAX_TOKENS, max_positions - prompt_tokens))


def chat_settings(request: ChatRequest, max_tokens: int, end_of_turn: str) -> dict[str, Any]:
  """The worker's settings: the request's, plus max_tokens and the end strings (the
  template's end of turn first, then the request's `stop` strings)."""
  return {**request.settings, "max_new_tokens": max_tokens,
          "end_strings": [end_of_turn] + [s for s in request.stop if s != end_of_turn]}


def render_chat(request: ChatRequest, replies: Sequence[Completion],
                prompt_ids: Sequence[Sequence[int]], *, model_name: str, response_id: str,
                created: int, token_text: Callable[[int], str],
                token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
  """OpenAI's `chat.completion` object: one assistant message per reply.

  `replies` are the completions as the user sees them (`TextGenerator.chat_reply`);
  `token_text` and `token_bytes` give a token id's text and raw bytes (for the
  top-logprob alternatives, which the completions hold by id)."""
  choices = []
  for index, c in enumerate(replies):
    choice_logprobs = None
    if request.logprobs:
      content = []
      for k in range(c.num_text_tokens):
        alternatives = (c.top_token_ids[k] if c.top_token_ids else [])[:request.top_logprobs or 0]
        content.append({
            "token": c.tokens[k], "logprob": c.logprobs[k],
            "bytes": list(token_bytes(c.token_ids[k])),
            "top_logprobs": [{"token": token_text(t), "logprob": lp,
                              "bytes": list(token_bytes(t))}
                             for t, lp in alternatives]})
      choice_logprobs = {"content": content, "refusal": None}
    choices.append({"index": index,
                     "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "logprobs": choice_logprobs, "finish_reason": c.finish_reason})
  return {"id": response_id, "object": "chat.completion", "created": created,
          "model": model_name, "choices": choices, "usage": usage(prompt_ids, replies)}


# --- /v1/models ----------------------------------------------------------------------------

def model_card(model_name: str, created: int, max_model_len: int) -> dict[str, Any]:
  """The one model this server has, as `/v1/models` lists it."""
  return {"id": model_name, "object": "model", "created": created, "owned_by": "cai_jax",
          "max_model_len": max_model_len}


def model_list(card: dict[str, Any]) -> dict[str, Any]:
  return {"object": "list", "data": [card]}


def check_model_id(model_id: str, model_name: str) -> None:
  """404 for `/v1/models/{id}` of a model this server does not have."""
  if model_id != model_name:
    raise RequestError(f"model {model_id!r} does not exist; this server has {model_name!r}",
                       status=404, param="model", code="model_not_found")
