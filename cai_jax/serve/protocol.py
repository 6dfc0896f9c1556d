"""What NeMo's and OpenAI's wire protocols share (`nemo.py`, `openai_api.py`).

The request error, the limits, the typed field readers that turn a JSON body
into checked Python values (their messages name the field and the value
received), and the two token helpers both response renderers use. Pure
functions: no HTTP objects, no model.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

# NeMo's limit on prompts per /generate request; applied to the rows (prompts x n)
# of an OpenAI request too.
MAX_SENTENCES = 128
# Integers the sampler holds as int32 (top_k, token counts); seeds are 64-bit.
INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1


class RequestError(Exception):
  """A request the server cannot serve as sent; becomes a 4xx JSON error."""

  def __init__(self, message: str, *, status: int = 400, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.message = message
    self.status = status
    self.param = param
    self.code = code


_MISSING = object()


def type_name(value: Any) -> str:
  """The JSON name of a decoded value's type, for error messages."""
  return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
          dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def get_bool(body: dict, name: str, default: bool, message: str | None = None) -> bool:
  """`body[name]` as a boolean; without a `message`, null means the default too."""
  value = body.get(name, _MISSING)
  if value is _MISSING or (value is None and message is None):
    return default
  if not isinstance(value, bool):
    raise RequestError(f"{message or name + ' must be a boolean'} (got {value!r})", param=name)
  return value


def get_int(body: dict, name: str, default: int | None, message: str, *,
            minimum: int | None = None, maximum: int | None = INT32_MAX,
            allow_null: bool = True, integral_float: bool = False) -> int | None:
  """`body[name]` as an integer in [minimum, maximum]; `integral_float` accepts 3.0 as 3."""
  value = body.get(name, _MISSING)
  if value is _MISSING or (value is None and allow_null):
    return default
  if integral_float and isinstance(value, float) and math.isfinite(value) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{message} (got {type_name(value)} {value!r})", param=name)
  if minimum is not None and value < minimum:
    raise RequestError(f"{message} (got {value})", param=name)
  if maximum is not None and value > maximum:
    raise RequestError(f"{message}, at most {maximum} (got {value})", param=name)
  return value


def get_number(body: dict, name: str, default: float, message: str, *,
               minimum: float | None = None, maximum: float | None = None,
               exclusive_minimum: bool = False) -> float:
  """`body[name]` as a finite float in range; null means the default."""
  value = body.get(name, _MISSING)
  if value is _MISSING or value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise RequestError(f"{message} (got {type_name(value)} {value!r})", param=name)
  if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
    raise RequestError(f"{message} (got {value})", param=name)
  if maximum is not None and value > maximum:
    raise RequestError(f"{message} (got {value})", param=name)
  return float(value)


def reject_unsupported(body: dict, neutral: dict[str, Callable[[Any], bool]]) -> None:
  """400 for options we do not implement, unless they hold their no-op value."""
  for name, is_neutral in neutral.items():
    if name in body and not is_neutral(body[name]):
      raise RequestError(f"{name}={body[name]!r} is not supported by this server",
                         param=name, code="unsupported_parameter")


def parse_json_body(raw: bytes, max_bytes: int) -> dict:
  """The request body as a JSON object, or a RequestError saying what is wrong with it."""
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
    raise RequestError(f"request body must be a JSON object, got a JSON {type_name(body)}")
  return body


# --- shared by the renderers ------------------------------------------------------------

def text_offsets(pieces: Sequence[str], start: int, silent: Sequence[int] = ()) -> list[int]:
  """Character offset of each token; tokens in `silent` add no text (e.g. <s>)."""
  offsets, pos = [], start
  for k, piece in enumerate(pieces):
    offsets.append(pos)
    if k not in silent:
      pos += len(piece)
  return offsets


def bos_added(add_bos: bool, prompt: str, bos_text: str | None) -> bool:
  """Whether the prompt's first token is a bos that add_bos put there (it has no text);
  a prompt that writes `<s>` itself (`bos_text`) keeps it as text, and gets no second one."""
  return add_bos and not (bos_text and prompt.startswith(bos_text))
