"""Where CAI data stages get their text from: the in-process engine or a server.

One interface, `complete(prompts, settings, seeds) -> list[str]`, three
implementations:
- `LocalBackend`: a `cai_jax.engine.TextGenerator` in this process (a model dir).
- `NemoBackend`: NeMo's `PUT /generate` (ours or NeMo's `megatron_gpt_eval.py server=True`).
- `OpenAIBackend`: any OpenAI-compatible `/v1/completions` (ours, vLLM, a hosted API).
All return the completion text with the end string removed. `make_backend` builds
one from a `backend` config block (configs/common.py `backend_config`, which holds
the defaults: the constructors have none of their own).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  max_new_tokens: int = 256
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  min_new_tokens: int = 0
  end_strings: tuple[str, ...] = ("<extra_id_1>",)

  @classmethod
  def from_config(cls, cfg) -> "GenerationSettings":
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d["end_strings"] = tuple(d.get("end_strings", ()))
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class Backend(Protocol):
  name: str

  def complete(self, prompts: Sequence[str], settings: GenerationSettings,
               seeds: Sequence[int]) -> list[str]:
    ...


class LocalBackend:
  """The jitted engine in this process; prompts go through in batches of `batch_size`.

  Every batch is padded to `batch_size` rows: the last, short batch of a run
  and the steps that lose rows to empty generations then reuse the compiled
  program instead of compiling a new batch shape each (minutes for a 7B model).
  """

  def __init__(self, generator, *, batch_size: int):
    self.generator = generator
    self.batch_size = batch_size
    self.name = "local"

  @classmethod
  def from_model_dir(cls, model_dir: str, tokenizer_path: str = "", *, template: str = "nemo",
                     batch_size: int, mesh=None) -> "LocalBackend":
    from cai_jax.engine import TextGenerator
    tokenizer_path = tokenizer_path or os.path.join(model_dir, "tokenizer.model")
    return cls(TextGenerator.from_checkpoint(model_dir, tokenizer_path, mesh=mesh,
                                             template=template), batch_size=batch_size)

  def prompt_tokens(self, prompt: str) -> int:
    """How many tokens `prompt` is for this model (remote backends cannot tell)."""
    return len(self.generator.encode_prompts([prompt])[0])

  def fits(self, prompt: str, settings: GenerationSettings) -> bool:
    """Whether `prompt` and `settings.max_new_tokens` fit the model's positions."""
    return self.prompt_tokens(prompt) + settings.max_new_tokens <= self.generator.max_positions

  def complete(self, prompts, settings: GenerationSettings, seeds) -> list[str]:
    out: list[str] = []
    for i in range(0, len(prompts), self.batch_size):
      chunk = list(prompts[i:i + self.batch_size])
      completions = self.generator.complete(
          chunk, max_new_tokens=settings.max_new_tokens, greedy=settings.greedy,
          temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
          repetition_penalty=settings.repetition_penalty, min_new_tokens=settings.min_new_tokens,
          end_strings=list(settings.end_strings), seed=[int(s) for s in seeds[i:i + len(chunk)]],
          min_batch_bucket=self.batch_size)
      out.extend(c.text for c in completions)
    return out


OVERLONG = ("drop", "truncate", "error")


def fit_prompt(backend, render, text: str, settings: GenerationSettings, overlong: str,
               where: str) -> str | None:
  """`text` (a user message that `render` turns into the model's prompt) made to fit the
  model with `settings.max_new_tokens` new tokens, by `overlong`:
  "drop" -> None, "truncate" -> the longest prefix of `text` that fits, "error" ->
  a DataError naming `where` (file:line). Backends that cannot count tokens (remote
  ones: their server refuses over-long prompts itself) get `text` back unchanged."""
  if overlong not in OVERLONG:
    raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
  fits = getattr(backend, "fits", None)
  if fits is None or fits(render(text), settings):
    return text
  if overlong == "error":
    from cai_jax.data.jsonl import DataError
    raise DataError(f"{where}: the prompt is {backend.prompt_tokens(render(text))} tokens; with "
                    f"{settings.max_new_tokens} new tokens it exceeds the model's "
                    f"{backend.generator.max_positions} positions (set overlong=drop or "
                    f"truncate, or shorten it)")
  if overlong == "drop":
    return None
  lo, hi = 0, len(text)           # the longest prefix that fits: binary search on characters
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(render(text[:mid]), settings):
      lo = mid
    else:
      hi = mid - 1
  return text[:lo].rstrip() or None


class NemoBackend:
  """NeMo's text-generation API (`PUT /generate`), as the NeMo-Aligner scripts use it.

  One request per `batch_size` prompts, seeded with the chunk's first seed:
  NeMo's API takes one `random_seed` per request, so sampled (non-greedy)
  output depends on how prompts were batched. Greedy output does not.
  """

  def __init__(self, url: str, *, timeout: float, retries: int, backoff: float,
               batch_size: int):
    from cai_jax.serve.client import NemoClient
    if not url:
      raise ValueError("backend.url: the server's address is required for kind='nemo', "
                       "e.g. http://localhost:5999")
    self.client = NemoClient(url, timeout=timeout, retries=retries, backoff=backoff)
    self.batch_size = batch_size
    self.name = f"nemo:{self.client.url}"

  def complete(self, prompts, settings: GenerationSettings, seeds) -> list[str]:
    out: list[str] = []
    for i in range(0, len(prompts), self.batch_size):
      chunk = list(prompts[i:i + self.batch_size])
      out.extend(self.client.generate(
          chunk, tokens_to_generate=settings.max_new_tokens, greedy=settings.greedy,
          temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
          repetition_penalty=settings.repetition_penalty,
          min_tokens_to_generate=settings.min_new_tokens,
          end_strings=list(settings.end_strings), random_seed=int(seeds[i])))
    return out


class OpenAIBackend:
  """Any OpenAI-compatible `/v1/completions` endpoint; the API key comes from an env variable.

  One request per prompt, so each prompt keeps its own seed (the API has one
  seed per request), with up to `concurrency` requests in flight: a batching
  server (ours, vLLM) merges them into batches again.
  """

  def __init__(self, base_url: str, *, model: str, api_key_env: str, timeout: float,
               retries: int, backoff: float, concurrency: int):
    from cai_jax.serve.client import OpenAIClient
    if not base_url:
      raise ValueError("backend.url: the server's base URL is required for kind='openai', "
                       "e.g. http://localhost:5999/v1")
    if concurrency < 1:
      raise ValueError(f"backend.concurrency must be >= 1, got {concurrency}")
    api_key = os.environ.get(api_key_env) if api_key_env else ""
    if api_key_env and not api_key:
      raise ValueError(f"environment variable {api_key_env} (the API key) is not set")
    # api_key="" (not None): without api_key_env no key is sent, whatever the environment holds.
    self.client = OpenAIClient(base_url, api_key=api_key, model=model or "cai_jax",
                               timeout=timeout, retries=retries, backoff=backoff)
    self.concurrency = concurrency
    self.name = f"openai:{self.client.base_url}"

  @staticmethod
  def _extensions(settings: GenerationSettings) -> dict:
    """Settings outside OpenAI's API, under vLLM's names (ours too), sent only when not neutral.

    A hosted API that knows none of them still works with neutral settings.
    """
    extra = {}
    if settings.top_k > 0 and not settings.greedy:
      extra["top_k"] = settings.top_k
    if settings.repetition_penalty != 1.0:
      extra["repetition_penalty"] = settings.repetition_penalty
    if settings.min_new_tokens > 0:
      extra["min_tokens"] = settings.min_new_tokens
    return extra

  def _one(self, prompt: str, settings: GenerationSettings, seed: int) -> str:
    # A one-element list, so the reply is always a list of texts, one per choice.
    texts = self.client.complete(
        [prompt], max_tokens=settings.max_new_tokens,
        temperature=0.0 if settings.greedy else settings.temperature, top_p=settings.top_p,
        stop=list(settings.end_strings) or None, seed=int(seed), **self._extensions(settings))
    if len(texts) != 1:
      from cai_jax.serve.client import RemoteError
      raise RemoteError(f"{self.client.base_url}/completions: expected 1 choice, got "
                        f"{len(texts)}", url=self.client.base_url)
    return texts[0]

  def complete(self, prompts, settings: GenerationSettings, seeds) -> list[str]:
    if self.concurrency == 1 or len(prompts) <= 1:
      return [self._one(p, settings, s) for p, s in zip(prompts, seeds)]
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
      # map keeps prompt order and re-raises the first failure.
      return list(pool.map(lambda ps: self._one(ps[0], settings, ps[1]), zip(prompts, seeds)))


def require_fields(cfg, names: Sequence[str], block: str, builder: str) -> None:
  """Raises ValueError naming the fields of `names` that config block `block` lacks; `builder`
  is the config function that makes a complete block (the one place its defaults live)."""
  missing = [n for n in names if n not in cfg]
  if missing:
    raise ValueError(f"{block}: missing field(s) {', '.join(missing)}; build the block with "
                     f"{builder}, which sets every field")


BACKEND_CONFIG = "configs/common.py backend_config()"
_KIND_FIELDS = {"local": ("model_dir", "tokenizer", "template", "batch_size"),
                "nemo": ("url", "timeout", "retries", "backoff", "batch_size"),
                "openai": ("url", "model", "api_key_env", "timeout", "retries", "backoff",
                           "concurrency")}


def make_backend(cfg, *, mesh=None, template: str | None = None) -> Backend:
  """From a `backend` config block (configs/common.py `backend_config`): kind (local | nemo |
  openai) and that kind's fields, each read from the block (a missing one is an error).

  `template` is the one the stage renders its prompts with; a local engine then
  encodes with it (over `cfg.template`), so the ids are the ones that template
  gives the same text everywhere else."""
  require_fields(cfg, ("kind",), "backend", BACKEND_CONFIG)
  kind = cfg.kind
  if kind not in _KIND_FIELDS:
    raise ValueError(f"backend.kind must be local, nemo or openai, got {kind!r}")
  require_fields(cfg, _KIND_FIELDS[kind], "backend", BACKEND_CONFIG)
  if kind == "local":
    if not cfg.model_dir:
      raise ValueError("backend.model_dir: a model directory is required for kind='local'")
    return LocalBackend.from_model_dir(cfg.model_dir, cfg.tokenizer,
                                       template=template or cfg.template,
                                       batch_size=cfg.batch_size, mesh=mesh)
  if kind == "nemo":
    return NemoBackend(cfg.url, timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff,
                       batch_size=cfg.batch_size)
  return OpenAIBackend(cfg.url, model=cfg.model, api_key_env=cfg.api_key_env,
                       timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff,
                       concurrency=cfg.concurrency)
