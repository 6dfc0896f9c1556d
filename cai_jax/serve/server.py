"""HTTP serving: NeMo's `PUT /generate` and an OpenAI-compatible `/v1` API over one model.

Two things shape this module:

- **One thread owns the accelerator.** `BatchingWorker` runs every JAX call on
  a single background thread. Request handlers (asyncio, so thousands may
  wait cheaply) validate and tokenise, queue a job and await its future. The
  worker merges queued jobs — rows from several requests, each with its own
  settings and seed — into one `TextGenerator.complete` call of up to
  `max_batch_rows` rows, then routes each job's rows back. The sampler takes
  every setting per row, so merged requests share one compiled program and
  decode together instead of queueing behind a lock as NeMo's server does.
  Each row's seed is derived from its request alone, so a request's samples
  do not depend on what it was batched with.
- **Wire compatibility.** `/generate` follows NeMo's
  `nemo/collections/nlp/modules/common/text_generation_server.py`
  (`MegatronGenerate.put`): same fields, defaults and validation messages
  (plus the received value), so NeMo-Aligner's CAI scripts and the tutorial's
  client snippet work unchanged. The `/v1` endpoints follow OpenAI's API so the
  `openai` package, and judges written against it, work too.

Errors never take the server down: a bad request gets a 4xx with a JSON body
naming the field (`{"error": "..."}` on `/generate`, OpenAI's
`{"error": {"message", "type", "param", "code"}}` on `/v1`), and a failure
inside generation gets a 500 while the worker carries on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import math
import queue
import secrets
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cai_jax.engine import Completion, TextGenerator

log = logging.getLogger(__name__)

# NeMo's limit on prompts per /generate request; we apply it to rows
# (prompts x n) of an OpenAI request too.
MAX_SENTENCES = 128
# NeMo's `API_ALLOWED_KEYS`; other keys are logged and ignored, as NeMo does.
NEMO_ALLOWED_KEYS = frozenset({
    "all_probs", "sentences", "task_ids", "tokens_to_generate", "temperature", "add_BOS",
    "greedy", "top_k", "top_p", "neighbors", "repetition_penalty", "min_tokens_to_generate",
    "end_strings", "compute_logprob", "random_seed"})
NEMO_DEFAULT_END_STRINGS = ("<|endoftext|>",)
# OpenAI's limits: `logprobs` on completions, `top_logprobs` on chat, `stop` strings.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512           # OpenAI: "up to the context"; capped so N stays small
# Top-logprob counts are compiled into the sampler: round requests up to few sizes.
_TOP_LOGPROB_BUCKETS = (5, MAX_CHAT_TOP_LOGPROBS)
# Integers the sampler holds as int32 (top_k, token counts); seeds are 64-bit.
INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
# A request body larger than this is refused from its Content-Length, unread: parsing
# holds Python's GIL ~5 ms per MB, which must not starve /health and other requests.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20


class RequestError(Exception):
  """A request the server cannot serve as sent; becomes a 4xx JSON error."""

  def __init__(self, message: str, *, status: int = 400, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.message = message
    self.status = status
    self.param = param
    self.code = code


# --- the batching worker -----------------------------------------------------------

# Per-row settings of `TextGenerator.complete`, with the value a job gets when it omits one.
ROW_SETTINGS = {
    "max_new_tokens": 16, "greedy": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
    "repetition_penalty": 1.0, "min_new_tokens": 0, "end_strings": (), "add_bos": False,
    "seed": None, "stop_at_eos": True,    # seed None: fresh randomness per row
}


class BatchStats:
  """Counters the worker updates; `snapshot()` is safe to call from any thread."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests = 0
    self.rows = 0
    self.batches = 0
    self.max_rows_per_batch = 0
    self.max_requests_per_batch = 0
    self.failed_batches = 0

  def add_request(self) -> None:
    with self._lock:
      self.requests += 1

  def add_batch(self, requests: int, rows: int, failed: bool = False) -> None:
    with self._lock:
      self.batches += 1
      self.rows += rows
      self.max_rows_per_batch = max(self.max_rows_per_batch, rows)
      self.max_requests_per_batch = max(self.max_requests_per_batch, requests)
      self.failed_batches += int(failed)

  def snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(requests=self.requests, rows=self.rows, batches=self.batches,
                  max_rows_per_batch=self.max_rows_per_batch,
                  max_requests_per_batch=self.max_requests_per_batch,
                  failed_batches=self.failed_batches)


@dataclasses.dataclass
class _Job:
  prompts: list[str]
  settings: dict[str, list]      # every ROW_SETTINGS key, one value per prompt
  num_top_logprobs: int
  return_prompt_logprobs: bool
  future: concurrent.futures.Future


_STOP = object()


class BatchingWorker:
  """Owns all JAX calls: merges queued jobs into batched `complete` calls on one thread.

  A job is never split: one larger than `max_batch_rows` runs alone. After
  taking a job the worker waits up to `batch_window_ms` for more; jobs that
  arrive while a batch runs are merged into the next one. `min_batch_rows`
  pads every batch to at least that many rows (fewer compiled shapes).
  """

  def __init__(self, generator: TextGenerator, *, max_batch_rows: int = 32,
               batch_window_ms: float = 5.0, min_batch_rows: int = 1):
    if max_batch_rows < 1:
      raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
    self.generator = generator
    self.max_batch_rows = max_batch_rows
    self.batch_window = max(batch_window_ms, 0.0) / 1000.0
    self.min_batch_rows = max(min_batch_rows, 1)
    self.stats = BatchStats()
    self._queue: queue.Queue = queue.Queue()
    self._closed = False
    self._thread = threading.Thread(target=self._run, name="cai_jax-generate", daemon=True)
    self._thread.start()

  def submit(self, prompts: Sequence[str], settings: dict[str, Any], *,
             num_top_logprobs: int = 0,
             return_prompt_logprobs: bool = False) -> concurrent.futures.Future:
    """Queues prompts; the future resolves to their `Completion`s (in order)."""
    n = len(prompts)
    if n == 0:
      raise ValueError("a job needs at least one prompt")
    unknown = set(settings) - set(ROW_SETTINGS)
    if unknown:
      raise ValueError(f"unknown generation settings {sorted(unknown)}")
    rows: dict[str, list] = {}
    for key, default in ROW_SETTINGS.items():
      value = settings.get(key, default)
      if key == "end_strings":
        value = [list(value)] * n if not value or isinstance(value[0], str) else value
      if isinstance(value, (list, tuple)):
        if len(value) != n:
          raise ValueError(f"{key}: {len(value)} values for {n} prompts")
        rows[key] = list(value)
      else:
        rows[key] = [value] * n
    rows["seed"] = [row_seed(None, 0) if s is None else int(s) for s in rows["seed"]]
    future: concurrent.futures.Future = concurrent.futures.Future()
    if self._closed:
      future.set_exception(RuntimeError("the server is shutting down"))
      return future
    self.stats.add_request()
    self._queue.put(_Job(list(prompts), rows, int(num_top_logprobs),
                         bool(return_prompt_logprobs), future))
    return future

  def close(self, timeout: float | None = 30.0) -> None:
    """Finishes the batch in progress, fails queued jobs, stops the thread."""
    if self._closed:
      return
    self._closed = True
    self._queue.put(_STOP)
    self._thread.join(timeout)

  # --- the thread ---

  def _run(self) -> None:
    carry = None
    while True:
      first = carry if carry is not None else self._queue.get()
      carry = None
      if first is _STOP:
        break
      jobs, carry, stop = self._collect(first)
      jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
      if jobs:
        try:
          self._execute(jobs)
        except Exception:  # never let the thread die: waiting requests would hang
          log.exception("generation worker: unexpected error")
          for job in jobs:
            if not job.future.done():
              job.future.set_exception(RuntimeError("generation worker failed"))
      if stop:
        break
    self._fail_pending(carry)

  def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
    """The first job plus what else fits, waiting up to the batch window."""
    jobs, rows = [first], len(first.prompts)
    deadline = time.monotonic() + self.batch_window
    while rows < self.max_batch_rows:
      remaining = deadline - time.monotonic()
      try:
        nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if nxt is _STOP:
        return jobs, None, True
      if rows + len(nxt.prompts) > self.max_batch_rows:
        return jobs, nxt, False
      jobs.append(nxt)
      rows += len(nxt.prompts)
    return jobs, None, False

  def _fail_pending(self, carry) -> None:
    pending = [carry] if carry is not None and carry is not _STOP else []
    while True:
      try:
        job = self._queue.get_nowait()
      except queue.Empty:
        break
      if job is not _STOP:
        pending.append(job)
    for job in pending:
      if job.future.set_running_or_notify_cancel():
        job.future.set_exception(RuntimeError("the server is shutting down"))

  def _execute(self, jobs: list[_Job]) -> None:
    rows = sum(len(j.prompts) for j in jobs)
    try:
      results = self._generate(jobs)
    except Exception as e:
      self.stats.add_batch(len(jobs), rows, failed=True)
      if len(jobs) > 1:
        # Find the request that broke the batch; the others still get served.
        log.warning("batch of %d requests failed (%s: %s); running them one by one",
                    len(jobs), type(e).__name__, e)
        for job in jobs:
          self._execute([job])
        return
      if not isinstance(e, ValueError):
        log.exception("generation failed")
      jobs[0].future.set_exception(e)
      return
    self.stats.add_batch(len(jobs), rows)
    for job, result in zip(jobs, results):
      job.future.set_result(result)

  def _generate(self, jobs: list[_Job]) -> list[list[Completion]]:
    prompts = [p for j in jobs for p in j.prompts]
    merged = {key: [v for j in jobs for v in j.settings[key]] for key in ROW_SETTINGS}
    top = max(j.num_top_logprobs for j in jobs)
    if top:
      top = next((b for b in _TOP_LOGPROB_BUCKETS if b >= top), top)
    completions = self.generator.complete(
        prompts, **merged, num_top_logprobs=top,
        return_prompt_logprobs=any(j.return_prompt_logprobs for j in jobs),
        min_batch_bucket=self.min_batch_rows)
    out, start = [], 0
    for j in jobs:
      out.append(completions[start:start + len(j.prompts)])
      start += len(j.prompts)
    return out


def row_seed(seed: int | None, row: int) -> int:
  """The sampler seed of a request's `row`: a mix of (seed, row), or fresh randomness.

  Rows of one request (OpenAI `n`, NeMo's several sentences) get distinct
  seeds, and the seed depends on nothing but the request.
  """
  if seed is None:
    return secrets.randbits(31)
  state = np.random.SeedSequence([seed & (2**64 - 1), row]).generate_state(1, np.uint32)
  return int(state[0] >> 1)


# --- request parsing -------------------------------------------------------------------

_MISSING = object()


def _type_name(value: Any) -> str:
  return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
          dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _get_bool(body: dict, name: str, default: bool, message: str | None = None) -> bool:
  value = body.get(name, _MISSING)
  if value is _MISSING or (value is None and message is None):
    return default
  if not isinstance(value, bool):
    raise RequestError(f"{message or name + ' must be a boolean'} (got {value!r})", param=name)
  return value


def _get_int(body: dict, name: str, default: int | None, message: str, *,
             minimum: int | None = None, maximum: int | None = INT32_MAX,
             allow_null: bool = True, integral_float: bool = False) -> int | None:
  value = body.get(name, _MISSING)
  if value is _MISSING or (value is None and allow_null):
    return default
  if integral_float and isinstance(value, float) and math.isfinite(value) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{message} (got {_type_name(value)} {value!r})", param=name)
  if minimum is not None and value < minimum:
    raise RequestError(f"{message} (got {value})", param=name)
  if maximum is not None and value > maximum:
    raise RequestError(f"{message}, at most {maximum} (got {value})", param=name)
  return value


def _get_number(body: dict, name: str, default: float, message: str, *,
                minimum: float | None = None, maximum: float | None = None,
                exclusive_minimum: bool = False) -> float:
  value = body.get(name, _MISSING)
  if value is _MISSING or value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise RequestError(f"{message} (got {_type_name(value)} {value!r})", param=name)
  if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
    raise RequestError(f"{message} (got {value})", param=name)
  if maximum is not None and value > maximum:
    raise RequestError(f"{message} (got {value})", param=name)
  return float(value)


def _get_stop(body: dict, name: str = "stop") -> list[str]:
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
  return [s for s in value if s]   # OpenAI ignores empty stop strings


def _reject_unsupported(body: dict, neutral: dict[str, Callable[[Any], bool]]) -> None:
  """400 for options we do not implement, unless they hold their no-op value."""
  for name, is_neutral in neutral.items():
    if name in body and not is_neutral(body[name]):
      raise RequestError(f"{name}={body[name]!r} is not supported by this server",
                         param=name, code="unsupported_parameter")


def _json_body(raw: bytes, max_bytes: int) -> dict:
  if len(raw) > max_bytes:
    raise RequestError(f"request body is {len(raw)} bytes; the limit is {max_bytes}", status=413)
  if not raw.strip():
    raise RequestError("request body is empty; send a JSON object")
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(f"request body is not valid JSON: {e}") from None
  except RecursionError:
    raise RequestError("request body is nested too deeply to be a request") from None
  if not isinstance(body, dict):
    raise RequestError(f"request body must be a JSON object, got a JSON {_type_name(body)}")
  return body


# --- responses -------------------------------------------------------------------------

NEMO, OPENAI = "nemo", "openai"


def _error_response(kind: str, status: int, message: str, *, param: str | None = None,
                    code: str | None = None, headers: dict | None = None) -> JSONResponse:
  if kind == NEMO:
    content: dict[str, Any] = {"error": message}
  else:
    err_type = ("authentication_error" if status == 401 else
                "invalid_request_error" if status < 500 else "server_error")
    content = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
  return JSONResponse(content, status_code=status, headers=headers)


def _kind_of(path: str) -> str:
  return OPENAI if path.startswith("/v1") else NEMO


def _text_offsets(pieces: Sequence[str], start: int, silent: Sequence[int] = ()) -> list[int]:
  """Character offset of each token; tokens in `silent` add no text (e.g. <s>)."""
  offsets, pos = [], start
  for k, piece in enumerate(pieces):
    offsets.append(pos)
    if k not in silent:
      pos += len(piece)
  return offsets


def _top_list(top: dict[str, float] | None, count: int, chosen: str, chosen_lp: float
              ) -> dict[str, float]:
  """The `count` most likely alternatives, plus the sampled token (as OpenAI does)."""
  items = dict(list((top or {}).items())[:count])
  items.setdefault(chosen, chosen_lp)
  return items


def _usage(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion]) -> dict:
  prompt = sum(len(p) for p in prompt_ids)
  completion = sum(len(c.token_ids) for c in completions)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


# --- the app ---------------------------------------------------------------------------

def create_app(generator: TextGenerator, *, api_key: str | None = None,
               max_batch_rows: int = 32, batch_window_ms: float = 5.0,
               model_name: str = "cai_jax", min_batch_rows: int = 1,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
  """The FastAPI app; its `BatchingWorker` thread starts now and stops at app shutdown.

  `app.state.stats` counts requests, batches and rows per batch.
  With `api_key`, every endpoint but `/health` needs `Authorization: Bearer <key>`.
  """
  worker = BatchingWorker(generator, max_batch_rows=max_batch_rows,
                          batch_window_ms=batch_window_ms, min_batch_rows=min_batch_rows)

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    yield
    await asyncio.to_thread(worker.close)

  app = FastAPI(title="cai_jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.generator = generator
  app.state.worker = worker
  app.state.stats = worker.stats
  app.state.model_name = model_name
  created = int(time.time())
  eos_id = generator.tokenizer.eos_id

  def endpoint(kind: str):
    """Turns every failure of a handler into a JSON error response of the API's shape."""
    def wrap(fn):
      @functools.wraps(fn)
      async def handler(request: Request):
        try:
          return await fn(request)
        except RequestError as e:
          return _error_response(kind, e.status, e.message, param=e.param, code=e.code)
        except ValueError as e:   # the generator refusing a request (names the field)
          return _error_response(kind, 400, str(e))
        except Exception as e:
          log.exception("%s %s failed", request.method, request.url.path)
          return _error_response(kind, 500, f"internal error: {type(e).__name__}: {e}")
      return handler
    return wrap

  async def read_json(request: Request) -> dict:
    """The body as a JSON object; parsed off the event loop, so a large body does not
    hold up other requests (the size is capped before reading)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
      raise RequestError(f"request body is {length} bytes; the limit is {max_body_bytes}",
                         status=413)
    return await asyncio.to_thread(_json_body, await request.body(), max_body_bytes)

  bos_text = (generator.tokenizer.id_to_token(generator.tokenizer.bos_id)
              if generator.tokenizer.bos_id >= 0 else None)

  def bos_added(add_bos: bool, prompt: str) -> bool:
    """Whether the prompt's first token is a bos that add_bos put there (it has no text);
    a prompt that writes `<s>` itself keeps it as text, and gets no second one."""
    return add_bos and not (bos_text and prompt.startswith(bos_text))

  async def run(prompts, settings, **kwargs) -> list[Completion]:
    return await asyncio.wrap_future(worker.submit(prompts, settings, **kwargs))

  # No token is longer than this many characters, so a longer prompt cannot fit the model
  # and is refused without being tokenized.
  longest_piece = max(len(p) for p in generator.pieces(range(generator.tokenizer.vocab_size)))
  max_prompt_chars = generator.max_positions * max(longest_piece, 1)

  def _encode_checked(prompts, add_bos, max_new, label) -> list[list[int]]:
    param = label.split("[")[0].split(" ")[0]
    for i, p in enumerate(prompts):
      if len(p) > max_prompt_chars:
        raise RequestError(f"{label.format(i=i)} has {len(p)} characters: more than the "
                           f"{generator.max_positions} tokens the model holds", param=param)
      try:
        p.encode("utf-8")
      except UnicodeEncodeError as e:
        raise RequestError(f"{label.format(i=i)} is not valid Unicode text ({e.reason} at "
                           f"character {e.start})", param=param) from None
    try:
      ids = generator.encode_prompts(prompts, add_bos, what=label)
      generator.check_lengths(ids, max_new, what=label)
    except ValueError as e:
      raise RequestError(str(e), param=param) from None
    return ids

  async def encode_checked(prompts, add_bos, max_new, label) -> list[list[int]]:
    """Checked prompt ids, tokenized off the event loop."""
    return await asyncio.to_thread(_encode_checked, prompts, add_bos, max_new, label)

  # --- auth, 404/405 ---

  @app.middleware("http")
  async def require_api_key(request: Request, call_next):
    if api_key is not None and request.url.path != "/health":
      scheme, _, token = request.headers.get("authorization", "").partition(" ")
      if scheme.lower() != "bearer" or not hmac.compare_digest(
          token.strip().encode(), api_key.encode()):
        return _error_response(
            _kind_of(request.url.path), 401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, exc: StarletteHTTPException):
    message = {404: f"no endpoint {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
    return _error_response(_kind_of(request.url.path), exc.status_code, message,
                           headers=getattr(exc, "headers", None))

  # --- health and models ---

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "stats": worker.stats.snapshot()}

  def model_card() -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "cai_jax",
            "max_model_len": generator.max_positions}

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{model_id:path}")
  @endpoint(OPENAI)
  async def get_model(request: Request):
    model_id = request.path_params["model_id"]
    if model_id != model_name:
      raise RequestError(f"model {model_id!r} does not exist; this server has {model_name!r}",
                         status=404, param="model", code="model_not_found")
    return model_card()

  # --- NeMo ---

  @app.put("/generate")
  @endpoint(NEMO)
  async def nemo_generate(request: Request):
    body = await read_json(request)
    for key in sorted(set(body) - NEMO_ALLOWED_KEYS):
      log.warning("PUT /generate: the request key %s is not allowed; ignored", key)
    for key in ("task_ids", "neighbors"):   # p-tuning and RETRO inputs: no such models here
      if body.get(key) is not None:
        raise RequestError(f"{key} is not supported by this server (no p-tuned or RETRO model)",
                           param=key)
    if "sentences" not in body:
      raise RequestError("sentences is required: a list of 1 to 128 prompt strings",
                         param="sentences")
    sentences = body["sentences"]
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
      raise RequestError(f"sentences must be a list of strings (got {_type_name(sentences)})",
                         param="sentences")
    if not sentences:
      raise RequestError("sentences must hold at least one prompt", param="sentences")
    if len(sentences) > MAX_SENTENCES:
      raise RequestError(f"Maximum number of sentences is {MAX_SENTENCES} "
                         f"(got {len(sentences)})", param="sentences")
    # NeMo refuses 0 ("an integer greater than 0"); we accept it: with
    # compute_logprob it scores the prompt without generating.
    tokens_to_generate = _get_int(
        body, "tokens_to_generate", 64, "tokens_to_generate must be an integer no less than 0",
        minimum=0, allow_null=False)
    all_probs = _get_bool(body, "all_probs", False, "all_probs must be a boolean value")
    greedy = _get_bool(body, "greedy", False, "greedy must be a boolean value")
    temperature = _get_number(
        body, "temperature", 1.0,
        "temperature must be a positive number less than or equal to 100.0",
        minimum=0.0, maximum=100.0)
    if temperature == 0.0 and not greedy:
      raise RequestError(
          "temperature must be a positive number less than or equal to 100.0 (got 0 with "
          "greedy=false): sampling divides the logits by the temperature; for deterministic "
          "decoding send greedy=true", param="temperature")
    add_bos = _get_bool(body, "add_BOS", False, "add_BOS must be a boolean value")
    top_k = _get_int(body, "top_k", 0, "top_k must be a positive integer number",
                     minimum=0, allow_null=False, integral_float=True)
    top_p = _get_number(body, "top_p", 0.9,
                        "top_p must be a positive number less than or equal to 1.0",
                        minimum=0.0, maximum=1.0)
    repetition_penalty = _get_number(
        body, "repetition_penalty", 1.0,
        "repetition_penalty must be a positive number no less than 1.0", minimum=1.0)
    end_strings = body.get("end_strings", list(NEMO_DEFAULT_END_STRINGS))
    if not isinstance(end_strings, list) or not all(isinstance(s, str) for s in end_strings):
      raise RequestError(f"expect end_strings to be a list of strings (got {end_strings!r})",
                         param="end_strings")
    end_strings = [s for s in end_strings if s]
    min_tokens = _get_int(
        body, "min_tokens_to_generate", 0,
        "min_tokens_to_generate must be an integer no less than 0", minimum=0, allow_null=False)
    compute_logprob = _get_bool(body, "compute_logprob", False,
                                "compute_logprob must be a boolean value")
    random_seed = _get_int(body, "random_seed", None,
                           "random_seed must be a positive integer number or None", minimum=0,
                           maximum=SEED_MAX)

    prompt_ids = await encode_checked(sentences, add_bos, tokens_to_generate, "sentences[{i}]")
    if greedy:
      # NeMo's greedy path is a bare argmax: temperature, top-k/p and the
      # repetition penalty are not applied (the tutorial sends greedy=True
      # with repetition_penalty=1.2, which NeMo therefore ignores).
      temperature, top_k, top_p, repetition_penalty = 1.0, 0, 1.0, 1.0
    elif top_p == 0.0:
      top_p = 1.0   # NeMo filters only when 0 < top_p < 1
    n = len(sentences)
    scores = compute_logprob or all_probs
    completions = await run(sentences, dict(
        max_new_tokens=tokens_to_generate, greedy=greedy, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, min_new_tokens=min_tokens,
        end_strings=end_strings, add_bos=add_bos,
        seed=[row_seed(random_seed, j) for j in range(n)], stop_at_eos=True),
        return_prompt_logprobs=scores)

    # What NeMo returns: `sentences[i]` is the detokenised prompt + generated
    # tokens, *including the tokens that completed the end string*. NeMo's
    # loop (`sample_sequence_batch`) writes each sampled token into the
    # sequence and only then checks `end_of_generation_condition` (the token
    # is an end token, or the decoded text `endswith` an end string), and
    # `generate()` detokenises that whole sequence. So "...reply\n<extra_id_1>"
    # comes back with the "<extra_id_1>" (hence the tutorial's and
    # NeMo-Aligner's post-processing that strips it). The exception is </s>:
    # NeMo's SentencePiece detokeniser renders the control token as "", so
    # it is left out of the sentence (but stays in `tokens`/`token_ids`).
    # `tokens`, `token_ids` and `offsets` cover prompt and completion;
    # `logprob` (with compute_logprob) is log p(token[t] | token[:t]) under
    # the raw model for t >= 1, as NeMo's `output_logits`.
    out = {"sentences": [], "tokens": [], "logprob": [] if scores else None, "token_ids": [],
           "offsets": []}
    for prompt, c in zip(sentences, completions):
      completion_text, silent = c.raw_text, set()
      if bos_added(add_bos, prompt):
        silent.add(0)
      if c.token_ids and c.token_ids[-1] == eos_id and c.finish_reason == "stop":
        completion_text = completion_text[:len(completion_text) - len(c.tokens[-1])]
        silent.add(len(c.prompt_tokens) + len(c.tokens) - 1)
      out["sentences"].append(prompt + completion_text)
      pieces = c.prompt_tokens + c.tokens
      out["tokens"].append(pieces)
      out["token_ids"].append(c.prompt_token_ids + c.token_ids)
      out["offsets"].append(_text_offsets(pieces, 0, sorted(silent)))
      if scores:
        out["logprob"].append(list(c.prompt_logprobs[1:]) + list(c.logprobs))
    if all_probs:
      # NeMo returns the full-vocabulary distribution of every token here;
      # that is vocab_size floats per token, so this server does not (use
      # /v1/completions with `logprobs` for the top alternatives).
      out["full_logprob"] = None
    return out

  # --- OpenAI ---

  def common_openai_settings(body: dict, default_max_tokens: int | None, n_rows: int):
    """Fields shared by completions and chat: (settings, n, seed, max_tokens, add_bos)."""
    _reject_unsupported(body, {
        "stream": lambda v: v in (None, False),
        "presence_penalty": lambda v: v in (None, 0, 0.0),
        "frequency_penalty": lambda v: v in (None, 0, 0.0),
        "logit_bias": lambda v: v in (None, {}),
        "suffix": lambda v: v in (None, ""),
    })
    model = body.get("model")
    if model is not None and not isinstance(model, str):
      raise RequestError(f"model must be a string (got {_type_name(model)})", param="model")
    n = _get_int(body, "n", 1, "n must be an integer between 1 and 128", minimum=1,
                 maximum=MAX_SENTENCES)
    if n * n_rows > MAX_SENTENCES:
      raise RequestError(f"n x prompts = {n * n_rows} completions; the limit is {MAX_SENTENCES}",
                         param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
      raise RequestError("best_of is not supported (leave it unset or equal to n)",
                         param="best_of", code="unsupported_parameter")
    temperature = _get_number(body, "temperature", 1.0,
                              "temperature must be a number between 0 and 2",
                              minimum=0.0, maximum=2.0)
    top_p = _get_number(body, "top_p", 1.0, "top_p must be a number in (0, 1]",
                        minimum=0.0, maximum=1.0, exclusive_minimum=True)
    # Extensions (vLLM's names): top_k, repetition_penalty, min_tokens, add_bos.
    top_k = _get_int(body, "top_k", 0, "top_k must be an integer no less than -1 (0 or -1 = off)",
                     minimum=-1)
    if top_k == -1:   # vLLM's "off"
      top_k = 0
    repetition_penalty = _get_number(body, "repetition_penalty", 1.0,
                                     "repetition_penalty must be a positive number",
                                     minimum=0.0, exclusive_minimum=True)
    min_tokens = _get_int(body, "min_tokens", 0, "min_tokens must be an integer no less than 0",
                          minimum=0)
    add_bos = _get_bool(body, "add_bos", False)
    seed = _get_int(body, "seed", None, "seed must be an integer", minimum=-SEED_MAX - 1,
                    maximum=SEED_MAX)
    greedy = temperature == 0.0
    if greedy:   # temperature 0 means argmax, as in OpenAI's API
      temperature, top_p, top_k = 1.0, 1.0, 0
    max_tokens = body.get("max_completion_tokens")
    field = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    max_tokens = _get_int(body, field, default_max_tokens,
                          f"{field} must be an integer no less than 0", minimum=0)
    settings = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, min_new_tokens=min_tokens,
                    add_bos=add_bos, stop_at_eos=True)
    return settings, n, seed, max_tokens, add_bos

  @app.post("/v1/completions")
  @endpoint(OPENAI)
  async def completions(request: Request):
    body = await read_json(request)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
      prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
      prompts = list(prompt)
    else:
      raise RequestError("prompt must be a string or a non-empty list of strings "
                         "(token-id prompts are not supported)", param="prompt")
    settings, n, seed, max_tokens, add_bos = common_openai_settings(
        body, DEFAULT_COMPLETION_MAX_TOKENS, len(prompts))
    logprobs = _get_int(body, "logprobs", None,
                        f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}",
                        minimum=0, maximum=MAX_COMPLETION_LOGPROBS)
    echo = _get_bool(body, "echo", False)
    stop = _get_stop(body)
    prompt_ids = await encode_checked(prompts, add_bos, max_tokens, "prompt[{i}]")

    rows = [p for p in prompts for _ in range(n)]
    settings.update(max_new_tokens=max_tokens, end_strings=stop,
                    seed=[row_seed(seed, r) for r in range(len(rows))])
    completions_ = await run(rows, settings,
                             num_top_logprobs=logprobs or 0,
                             return_prompt_logprobs=echo and logprobs is not None)
    choices = []
    for index, (row_prompt, c) in enumerate(zip(rows, completions_)):
      text = row_prompt + c.text if echo else c.text
      choice_logprobs = None
      if logprobs is not None:
        m = c.num_text_tokens
        tokens = c.tokens[:m]
        token_lps: list[float | None] = list(c.logprobs[:m])
        tops: list[dict | None] = [_top_list(t, logprobs, tok, lp) for t, tok, lp in zip(
            c.top_logprobs or [None] * m, tokens, token_lps)]
        if echo:
          silent = [0] if bos_added(add_bos, row_prompt) else []
          offsets = _text_offsets(c.prompt_tokens + tokens, 0, silent)
          tokens = c.prompt_tokens + tokens
          token_lps = [None] + list(c.prompt_logprobs[1:]) + token_lps
          tops = [None] * len(c.prompt_tokens) + tops
        else:
          offsets = _text_offsets(tokens, len(row_prompt))
        choice_logprobs = {"tokens": tokens, "token_logprobs": token_lps,
                           "top_logprobs": tops, "text_offset": offsets}
      choices.append({"index": index, "text": text, "logprobs": choice_logprobs,
                      "finish_reason": c.finish_reason})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model_name, "choices": choices,
            "usage": _usage(prompt_ids, completions_)}

  def chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise RequestError("messages must be a non-empty list of {role, content} objects",
                         param="messages")
    out = []
    for k, m in enumerate(messages):
      if not isinstance(m, dict):
        raise RequestError(f"messages[{k}] must be an object with role and content "
                           f"(got {_type_name(m)})", param="messages")
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
                           f"(got role={role!r}, content of type {_type_name(content)})",
                           param="messages")
      out.append({"role": role, "content": content})
    return out

  @app.post("/v1/chat/completions")
  @endpoint(OPENAI)
  async def chat_completions(request: Request):
    body = await read_json(request)
    _reject_unsupported(body, {
        "tools": lambda v: not v, "functions": lambda v: not v,
        "tool_choice": lambda v: v in (None, "none"),
        "response_format": lambda v: v is None or (isinstance(v, dict)
                                                   and v.get("type") == "text"),
    })
    messages = chat_messages(body)
    try:
      prompt = generator.chat_prompt(messages)
    except ValueError as e:
      raise RequestError(f"messages: {e}", param="messages") from None
    settings, n, seed, max_tokens, add_bos = common_openai_settings(body, None, 1)
    logprobs = _get_bool(body, "logprobs", False)
    top_logprobs = _get_int(body, "top_logprobs", None,
                            f"top_logprobs must be an integer between 0 and "
                            f"{MAX_CHAT_TOP_LOGPROBS}", minimum=0, maximum=MAX_CHAT_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
      raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    stop = _get_stop(body)
    label = "messages (rendered prompt {i})"
    if max_tokens is None:
      prompt_len = len((await encode_checked([prompt], add_bos, 0, label))[0])
      max_tokens = max(0, min(DEFAULT_CHAT_MAX_TOKENS, generator.max_positions - prompt_len))
    prompt_ids = await encode_checked([prompt], add_bos, max_tokens, label)
    eot = generator.template.end_of_turn
    settings.update(max_new_tokens=max_tokens, end_strings=[eot] + [s for s in stop if s != eot],
                    seed=[row_seed(seed, r) for r in range(n)])
    completions_ = await run([prompt] * n, settings,
                             num_top_logprobs=(top_logprobs or 0) if logprobs else 0)
    choices = []
    for index, c in enumerate(completions_):
      c = generator.chat_reply(c)
      choice_logprobs = None
      if logprobs:
        m = c.num_text_tokens
        content = []
        for k in range(m):
          alternatives = (c.top_token_ids[k] if c.top_token_ids else [])[:top_logprobs or 0]
          content.append({
              "token": c.tokens[k], "logprob": c.logprobs[k],
              "bytes": list(generator.token_bytes(c.token_ids[k])),
              "top_logprobs": [{"token": generator.pieces([t])[0], "logprob": lp,
                                "bytes": list(generator.token_bytes(t))}
                               for t, lp in alternatives]})
        choice_logprobs = {"content": content, "refusal": None}
      choices.append({"index": index,
                      "message": {"role": "assistant", "content": c.text, "refusal": None},
                      "logprobs": choice_logprobs, "finish_reason": c.finish_reason})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model_name, "choices": choices,
            "usage": _usage(prompt_ids, completions_)}

  return app
