"""Stable ids and derived numbers of the generation stages (SL-CAI, RL-CAI).

A prompt's key is a hash of its text: it names the same prompt whatever the
input order or however far an interrupted run got, and it is the key field of
the stages' resumable raw files (`jsonl.ResumableWriter`). Sampling seeds and
principle draws are `derived_int`s of (purpose, seed, key, indices), never of a
batch position, so a resumed run makes exactly the samples an uninterrupted one
would have made.
"""

from __future__ import annotations

import hashlib
from typing import Any

# How `derived_int` joins its parts. SL-CAI derived its seeds with "\0" between the parts
# until both stages shared this function; its resume fingerprint names the scheme, so a raw
# file begun with the old seeds is discarded rather than continued with the new ones.
DERIVATION = "sha256-unit-separator"
_SEPARATOR = "\x1f"


def prompt_key(prompt: str) -> str:
  """A stable id of a prompt: the first 16 hex digits of its text's SHA-256."""
  return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def derived_int(*parts: Any) -> int:
  """A 64-bit integer determined by `parts` (compared by their `str`) alone."""
  text = _SEPARATOR.join(str(p) for p in parts)
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
