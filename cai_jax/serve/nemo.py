"""NeMo's text-generation protocol (`PUT /generate`) as pure functions.

It follows NeMo's `nemo/collections/nlp/modules/common/text_generation_server.py`
(`MegatronGenerate.put`): same fields, defaults and validation messages (plus
the received value), so NeMo-Aligner's CAI scripts and the tutorial's client
snippet work unchanged. `parse_generate_request` turns a decoded JSON body into
a `GenerateRequest` (the worker's settings) or a `RequestError` naming the
field; `render_generate` turns the completions into NeMo's reply. No HTTP
objects and no model here: the server tokenises, checks lengths and generates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from cai_jax.engine import Completion
from cai_jax.serve.protocol import (MAX_SENTENCES, SEED_MAX, RequestError, bos_added, get_bool,
                                    get_int, get_number, text_offsets, type_name)
from cai_jax.serve.worker import row_seeds

# NeMo's `API_ALLOWED_KEYS`; other keys are logged and ignored, as NeMo does.
NEMO_ALLOWED_KEYS = frozenset({
    "all_probs", "sentences", "task_ids", "tokens_to_generate", "temperature", "add_BOS",
    "greedy", "top_k", "top_p", "neighbors", "repetition_penalty", "min_tokens_to_generate",
    "end_strings", "compute_logprob", "random_seed"})
NEMO_DEFAULT_END_STRINGS = ("<|endoftext|>",)


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
  """A checked `PUT /generate` request."""
  sentences: list[str]
  settings: dict[str, Any]        # `BatchingWorker.submit` settings; one seed per sentence
  compute_logprob: bool           # the reply carries `logprob` (compute_logprob or all_probs)
  all_probs: bool

  @property
  def add_bos(self) -> bool:
    return self.settings["add_bos"]

  @property
  def tokens_to_generate(self) -> int:
    return self.settings["max_new_tokens"]


def unknown_keys(body: dict) -> list[str]:
  """Keys NeMo does not know: NeMo logs and ignores them, and so does the server."""
  return sorted(set(body) - NEMO_ALLOWED_KEYS)


def parse_generate_request(body: dict) -> GenerateRequest:
  """The request's settings, with NeMo's defaults; RequestError names a bad field."""
  for key in ("task_ids", "neighbors"):   # p-tuning and RETRO inputs: no such models here
    if body.get(key) is not None:
      raise RequestError(f"{key} is not supported by this server (no p-tuned or RETRO model)",
                         param=key)
  if "sentences" not in body:
    raise RequestError("sentences is required: a list of 1 to 128 prompt strings",
                       param="sentences")
  sentences = body["sentences"]
  if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
    raise RequestError(f"sentences must be a list of strings (got {type_name(sentences)})",
                       param="sentences")
  if not sentences:
    raise RequestError("sentences must hold at least one prompt", param="sentences")
  if len(sentences) > MAX_SENTENCES:
    raise RequestError(f"Maximum number of sentences is {MAX_SENTENCES} "
                       f"(got {len(sentences)})", param="sentences")
  # NeMo refuses 0 ("an integer greater than 0"); we accept it: with
  # compute_logprob it scores the prompt without generating.
  tokens_to_generate = get_int(
      body, "tokens_to_generate", 64, "tokens_to_generate must be an integer no less than 0",
      minimum=0, allow_null=False)
  all_probs = get_bool(body, "all_probs", False, "all_probs must be a boolean value")
  greedy = get_bool(body, "greedy", False, "greedy must be a boolean value")
  temperature = get_number(
      body, "temperature", 1.0,
      "temperature must be a positive number less than or equal to 100.0",
      minimum=0.0, maximum=100.0)
  if temperature == 0.0 and not greedy:
    raise RequestError(
        "temperature must be a positive number less than or equal to 100.0 (got 0 with "
        "greedy=false): sampling divides the logits by the temperature; for deterministic "
        "decoding send greedy=true", param="temperature")
  add_bos = get_bool(body, "add_BOS", False, "add_BOS must be a boolean value")
  top_k = get_int(body, "top_k", 0, "top_k must be a positive integer number",
                  minimum=0, allow_null=False, integral_float=True)
  top_p = get_number(body, "top_p", 0.9,
                     "top_p must be a positive number less than or equal to 1.0",
                     minimum=0.0, maximum=1.0)
  repetition_penalty = get_number(
      body, "repetition_penalty", 1.0,
      "repetition_penalty must be a positive number no less than 1.0", minimum=1.0)
  end_strings = body.get("end_strings", list(NEMO_DEFAULT_END_STRINGS))
  if not isinstance(end_strings, list) or not all(isinstance(s, str) for s in end_strings):
    raise RequestError(f"expect end_strings to be a list of strings (got {end_strings!r})",
                       param="end_strings")
  end_strings = [s for s in end_strings if s]
  min_tokens = get_int(
      body, "min_tokens_to_generate", 0,
      "min_tokens_to_generate must be an integer no less than 0", minimum=0, allow_null=False)
  compute_logprob = get_bool(body, "compute_logprob", False,
                             "compute_logprob must be a boolean value")
  random_seed = get_int(body, "random_seed", None,
                        "random_seed must be a positive integer number or None", minimum=0,
                        maximum=SEED_MAX)

  if greedy:
    # NeMo's greedy path is a bare argmax: temperature, top-k/p and the
    # repetition penalty are not applied (the tutorial sends greedy=True
    # with repetition_penalty=1.2, which NeMo therefore ignores).
    temperature, top_k, top_p, repetition_penalty = 1.0, 0, 1.0, 1.0
  elif top_p == 0.0:
    top_p = 1.0   # NeMo filters only when 0 < top_p < 1
  settings = dict(
      max_new_tokens=tokens_to_generate, greedy=greedy, temperature=temperature, top_k=top_k,
      top_p=top_p, repetition_penalty=repetition_penalty, min_new_tokens=min_tokens,
      end_strings=end_strings, add_bos=add_bos, seed=row_seeds(random_seed, len(sentences)),
      stop_at_eos=True)
  return GenerateRequest(sentences=sentences, settings=settings,
                         compute_logprob=compute_logprob or all_probs, all_probs=all_probs)


def render_generate(request: GenerateRequest, completions: Sequence[Completion], *,
                    eos_id: int, bos_text: str | None) -> dict[str, Any]:
  """NeMo's reply: `sentences`, `tokens`, `logprob`, `token_ids` and `offsets`.

  `sentences[i]` is the detokenised prompt + generated tokens, *including the
  tokens that completed the end string*. NeMo's loop (`sample_sequence_batch`)
  writes each sampled token into the sequence and only then checks
  `end_of_generation_condition` (the token is an end token, or the decoded text
  `endswith` an end string), and `generate()` detokenises that whole sequence.
  So "...reply\\n<extra_id_1>" comes back with the "<extra_id_1>" (hence the
  tutorial's and NeMo-Aligner's post-processing that strips it). The exception
  is </s> (`eos_id`): NeMo's SentencePiece detokeniser renders the control
  token as "", so it is left out of the sentence (but stays in
  `tokens`/`token_ids`). `tokens`, `token_ids` and `offsets` cover prompt and
  completion; `logprob` (with compute_logprob) is log p(token[t] | token[:t])
  under the raw model for t >= 1, as NeMo's `output_logits`. `bos_text` is the
  bos token's text (None without one): a bos that add_BOS added has no text.
  """
  scores = request.compute_logprob
  out: dict[str, Any] = {"sentences": [], "tokens": [], "logprob": [] if scores else None,
                         "token_ids": [], "offsets": []}
  for prompt, c in zip(request.sentences, completions):
    completion_text, silent = c.raw_text, set()
    if bos_added(request.add_bos, prompt, bos_text):
      silent.add(0)
    if c.token_ids and c.token_ids[-1] == eos_id and c.finish_reason == "stop":
      completion_text = completion_text[:len(completion_text) - len(c.tokens[-1])]
      silent.add(len(c.prompt_tokens) + len(c.tokens) - 1)
    out["sentences"].append(prompt + completion_text)
    pieces = c.prompt_tokens + c.tokens
    out["tokens"].append(pieces)
    out["token_ids"].append(c.prompt_token_ids + c.token_ids)
    out["offsets"].append(text_offsets(pieces, 0, sorted(silent)))
    if scores:
      out["logprob"].append(list(c.prompt_logprobs[1:]) + list(c.logprobs))
  if request.all_probs:
    # NeMo returns the full-vocabulary distribution of every token here;
    # that is vocab_size floats per token, so this server does not (use
    # /v1/completions with `logprobs` for the top alternatives).
    out["full_logprob"] = None
  return out
