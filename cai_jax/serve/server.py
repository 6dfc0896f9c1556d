"""HTTP serving: NeMo's `PUT /generate` and an OpenAI-compatible `/v1` API over one model.

A thin FastAPI app. Each route reads the JSON body, calls its protocol's pure
parser (`nemo.py`, `openai_api.py`), tokenises and length-checks the prompts off
the event loop, submits the rows to the `BatchingWorker` (`worker.py`: one
thread owns the accelerator and batches requests together) and returns what the
protocol's pure renderer makes of the completions. This module holds what is
HTTP: routes, the API-key middleware, health, and errors.

Errors never take the server down: a bad request gets a 4xx with a JSON body
naming the field (`{"error": "..."}` on `/generate`, OpenAI's
`{"error": {"message", "type", "param", "code"}}` on `/v1`), and a failure
inside generation gets a 500 while the worker carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cai_jax.engine import Completion, TextGenerator
from cai_jax.serve import nemo, openai_api
from cai_jax.serve.protocol import RequestError, parse_json_body
from cai_jax.serve.worker import BatchingWorker

log = logging.getLogger(__name__)

# A request body larger than this is refused from its Content-Length, unread: parsing
# holds Python's GIL ~5 ms per MB, which must not starve /health and other requests.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20

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
    return await asyncio.to_thread(parse_json_body, await request.body(), max_body_bytes)

  bos_text = (generator.tokenizer.id_to_token(generator.tokenizer.bos_id)
              if generator.tokenizer.bos_id >= 0 else None)

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

  card = openai_api.model_card(model_name, created, generator.max_positions)

  @app.get("/v1/models")
  async def list_models():
    return openai_api.model_list(card)

  @app.get("/v1/models/{model_id:path}")
  @endpoint(OPENAI)
  async def get_model(request: Request):
    openai_api.check_model_id(request.path_params["model_id"], model_name)
    return card

  # --- NeMo ---

  @app.put("/generate")
  @endpoint(NEMO)
  async def nemo_generate(request: Request):
    body = await read_json(request)
    for key in nemo.unknown_keys(body):
      log.warning("PUT /generate: the request key %s is not allowed; ignored", key)
    req = nemo.parse_generate_request(body)
    await encode_checked(req.sentences, req.add_bos, req.tokens_to_generate, "sentences[{i}]")
    completions = await run(req.sentences, req.settings,
                            return_prompt_logprobs=req.compute_logprob)
    return nemo.render_generate(req, completions, eos_id=generator.tokenizer.eos_id,
                                bos_text=bos_text)

  # --- OpenAI ---

  @app.post("/v1/completions")
  @endpoint(OPENAI)
  async def completions(request: Request):
    req = openai_api.parse_completion_request(await read_json(request))
    prompt_ids = await encode_checked(req.prompts, req.add_bos, req.max_tokens, "prompt[{i}]")
    completions_ = await run(req.rows, req.settings, num_top_logprobs=req.num_top_logprobs,
                             return_prompt_logprobs=req.return_prompt_logprobs)
    return openai_api.render_completion(
        req, completions_, prompt_ids, model_name=model_name,
        response_id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), bos_text=bos_text)

  @app.post("/v1/chat/completions")
  @endpoint(OPENAI)
  async def chat_completions(request: Request):
    body = await read_json(request)
    messages = openai_api.parse_chat_messages(body)
    try:
      prompt = generator.chat_prompt(messages)
    except ValueError as e:
      raise RequestError(f"messages: {e}", param="messages") from None
    req = openai_api.parse_chat_request(body)
    label = "messages (rendered prompt {i})"
    max_tokens = req.max_tokens
    if max_tokens is None:
      prompt_len = len((await encode_checked([prompt], req.add_bos, 0, label))[0])
      max_tokens = openai_api.default_chat_max_tokens(prompt_len, generator.max_positions)
    prompt_ids = await encode_checked([prompt], req.add_bos, max_tokens, label)
    settings = openai_api.chat_settings(req, max_tokens, generator.template.end_of_turn)
    completions_ = await run([prompt] * req.n, settings, num_top_logprobs=req.num_top_logprobs)
    return openai_api.render_chat(
        req, [generator.chat_reply(c) for c in completions_], prompt_ids, model_name=model_name,
        response_id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
        token_text=lambda t: generator.pieces([t])[0], token_bytes=generator.token_bytes)

  return app
