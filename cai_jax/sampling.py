"""Batched generation with a KV cache: one prefill pass, then one compiled decode loop.

Layers:
- `sample(...)`: the pure, jittable core on padded arrays. Prompts are
  left-padded to a common length P so every row's last prompt token sits in
  column P-1 and each decode step writes one column for all rows. Every
  sampling setting is a per-row array, so requests with different settings
  share one batch and one compiled program. PPO calls this inside its own jit.
- `generate(config, params, prompts, ...)`: the public contract. Pads prompts
  into shape buckets (batch, prompt length, new tokens) so a server does not
  recompile for every request, runs the compiled core, and returns Python lists.

Stop conditions are token *sequences* (a single stop id is a sequence of one),
matched in the loop against the last generated tokens; `min_new_tokens` masks
single-token stops out of the distribution until it is reached (HF semantics)
and suppresses every stop before it.

Logits processing follows Hugging Face's order: repetition penalty, then
temperature, top-k, top-p. `logprobs` are under the distribution actually
sampled from (after processing); `model_logprobs` are the raw model's
(temperature 1, nothing filtered), which PPO needs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.model import Mistral, MistralConfig, cache_from_prefill, cache_slots, param_shardings

NEG_INF = -1e30
MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 8


class SamplingParams(NamedTuple):
  """Per-row settings, all arrays with leading dimension B."""
  temperature: jax.Array         # f32 [B]
  top_k: jax.Array               # i32 [B], 0 = off
  top_p: jax.Array               # f32 [B], 1 = off
  repetition_penalty: jax.Array  # f32 [B], 1 = off
  greedy: jax.Array              # bool [B]
  min_new_tokens: jax.Array      # i32 [B]
  max_new_tokens: jax.Array      # i32 [B] (<= the compiled number of steps)
  stop_seqs: jax.Array           # i32 [B, MAX_STOP_SEQUENCES, MAX_STOP_LENGTH], right-aligned, -1 pad
  seeds: jax.Array               # u32 [B, 2] per-row PRNG keys (jax.random.key_data)


class SampleOutput(NamedTuple):
  tokens: jax.Array          # i32 [B, N]; pad after the row's end
  logprobs: jax.Array        # f32 [B, N] under the processed (sampled-from) distribution
  model_logprobs: jax.Array  # f32 [B, N] under the raw model
  lengths: jax.Array         # i32 [B] tokens generated, stop sequence included
  stop_lengths: jax.Array    # i32 [B] length of the stop sequence that ended the row (0 = none)
  top_ids: jax.Array | None       # i32 [B, N, K] top model tokens per step (if asked)
  top_logprobs: jax.Array | None  # f32 [B, N, K]
  prompt_logprobs: jax.Array | None  # f32 [B, P]: log p(prompt[t] | prompt[:t]); 0 at t=0


def row_keys(seed: int | Sequence[int], n: int, batch: int) -> np.ndarray:
  """Per-row PRNG key data [batch, 2]: fold_in(PRNGKey(seed), row) for an int seed,
  PRNGKey(seed[row]) for a list, so a row's samples do not depend on its batch-mates."""
  if isinstance(seed, (int, np.integer)):
    keys = _fold_in_rows(jax.random.PRNGKey(int(seed)), np.arange(batch, dtype=np.uint32))
  else:
    seeds = list(seed)
    if len(seeds) != n:
      raise ValueError(f"seed: {len(seeds)} seeds for {n} prompts; give one seed per prompt "
                       "or a single int")
    seeds += [0] * (batch - n)
    keys = _keys_from_seeds(np.asarray(seeds, np.int64).astype(np.uint32))
  return np.asarray(keys).astype(np.uint32)


@jax.jit
def _fold_in_rows(base, rows):
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(rows)


@jax.jit
def _keys_from_seeds(seeds):
  return jax.vmap(jax.random.PRNGKey)(seeds)


def make_sampling_params(n: int, batch: int, *, greedy=False, temperature=1.0, top_k=0,
                         top_p=1.0, repetition_penalty=1.0, min_new_tokens=0, max_new_tokens=16,
                         stop_sequences: Sequence[Sequence[int]] = (),
                         row_stop_sequences=None, seed=0) -> SamplingParams:
  """Host-side `SamplingParams` for `n` real rows padded to `batch` rows.

  Settings are scalars or length-`n` lists. Filler rows are greedy and
  generate nothing. `stop_sequences` (token-id lists) apply to every row,
  `row_stop_sequences[i]` to row i.
  """
  def rows(x, dtype, fill):
    a = np.broadcast_to(np.asarray(x, dtype), (n,))
    return np.concatenate([a, np.full((batch - n,), fill, dtype)])

  sp = SamplingParams(
      temperature=rows(temperature, np.float32, 1.0), top_k=rows(top_k, np.int32, 0),
      top_p=rows(top_p, np.float32, 1.0),
      repetition_penalty=rows(repetition_penalty, np.float32, 1.0),
      greedy=rows(greedy, bool, True), min_new_tokens=rows(min_new_tokens, np.int32, 0),
      max_new_tokens=rows(max_new_tokens, np.int32, 0),
      stop_seqs=_stop_array(stop_sequences, batch, row_stop_sequences),
      seeds=row_keys(seed, n, batch))
  if np.any(~sp.greedy[:n] & (sp.temperature[:n] <= 0)):
    raise ValueError("temperature must be > 0 when greedy is False")
  if np.any(sp.top_p[:n] <= 0) or np.any(sp.top_p[:n] > 1):
    raise ValueError("top_p must be in (0, 1]")
  if np.any(sp.top_k[:n] < 0):
    raise ValueError("top_k must be >= 0")
  if np.any(sp.repetition_penalty[:n] <= 0):
    raise ValueError("repetition_penalty must be > 0")
  return sp


def _stop_array(stop_sequences: Sequence[Sequence[int]], batch: int,
                row_stop_sequences: Sequence[Sequence[Sequence[int]]] | None = None) -> np.ndarray:
  """[B, MAX_STOP_SEQUENCES, MAX_STOP_LENGTH] right-aligned stop sequences, -1 padded.

  `stop_sequences` apply to every row; `row_stop_sequences[b]` to row b only.
  """
  out = np.full((batch, MAX_STOP_SEQUENCES, MAX_STOP_LENGTH), -1, np.int32)
  for b in range(batch):
    extra = row_stop_sequences[b] if row_stop_sequences and b < len(row_stop_sequences) else ()
    seqs = [list(q) for q in list(stop_sequences) + list(extra) if len(q)]
    if len(seqs) > MAX_STOP_SEQUENCES:
      raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences per prompt, got {len(seqs)}")
    for j, seq in enumerate(seqs):
      if len(seq) > MAX_STOP_LENGTH:
        raise ValueError(f"stop sequence {seq} is longer than {MAX_STOP_LENGTH} tokens")
      out[b, j, MAX_STOP_LENGTH - len(seq):] = seq
  return out


# --- logits processing ---------------------------------------------------------

def apply_repetition_penalty(logits, seen, penalty):
  """HF/NeMo semantics: a seen token's logit is divided by the penalty if positive,
  multiplied if negative."""
  p = penalty[:, None]
  penalised = jnp.where(logits > 0, logits / p, logits * p)
  return jnp.where(seen, penalised, logits)


def apply_top_k_top_p(logits, top_k, top_p):
  """Masks logits outside the top-k, then outside the nucleus of mass top_p (per row).

  top-k keeps every token whose logit is >= the k-th largest (k=0: all);
  top-p keeps the smallest prefix of the sorted distribution whose
  probability mass before a token is < top_p (so the top token always stays).
  """
  V = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
  logits = jnp.where(logits < kth, NEG_INF, logits)
  sorted_desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_desc, NEG_INF)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # top_p >= 1 is "off": without this, tail tokens whose preceding mass rounds to 1.0
  # in float32 would be dropped from a row that asked for no nucleus filtering.
  keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
  keep = keep.at[:, 0].set(True)
  threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


def greedy_token(logits):
  """argmax over the last axis (first index among ties), as a max then a min over
  the positions that reach it: XLA:CPU runs the fused (value, index) argmax
  reduction about 6x slower, which at batch 32 costs 2 ms of every decode step."""
  V = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first, V - 1)  # a NaN row has no maximum; keep the index in range


def _token_logprob(logits, token):
  """log_softmax(logits)[token] per row, without materialising the full log-softmax."""
  picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _process_and_sample(logits, step, seen, stop_single_mask, sp: SamplingParams):
  """One step: returns (token, sampled-distribution logprob, raw model logprob).

  Each optional stage sits behind a `lax.cond` on whether any row uses it, so
  a batch of greedy rows pays for an argmax and two log-sum-exps only.
  """
  raw = logits
  logits = jax.lax.cond(jnp.any(sp.repetition_penalty != 1.0),
                        lambda l: apply_repetition_penalty(l, seen, sp.repetition_penalty),
                        lambda l: l, logits)
  logits = jax.lax.cond(jnp.any(step < sp.min_new_tokens),
                        lambda l: jnp.where((step < sp.min_new_tokens)[:, None] & stop_single_mask,
                                            NEG_INF, l),
                        lambda l: l, logits)

  def greedy_only(l):
    token = greedy_token(l)
    return token, _token_logprob(l, token)

  def with_sampling(l):
    temp = jnp.where(sp.greedy, 1.0, jnp.maximum(sp.temperature, 1e-6))[:, None]
    needs_filter = jnp.any(~sp.greedy & ((sp.top_k > 0) | (sp.top_p < 1.0)))
    filtered = jax.lax.cond(needs_filter, lambda x: apply_top_k_top_p(x, sp.top_k, sp.top_p),
                            lambda x: x, l / temp)
    # A greedy row's distribution is the unfiltered one whatever its batch-mates ask for.
    filtered = jnp.where(sp.greedy[:, None], l, filtered)
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), step))(sp.seeds)
    # Gumbel-max, i.e. `jax.random.categorical`, with `greedy_token` for its argmax.
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, filtered.shape[1:], filtered.dtype))(keys)
    sampled = greedy_token(filtered + gumbel)
    token = jnp.where(sp.greedy, greedy_token(l), sampled)
    return token, _token_logprob(filtered, token)

  token, lp = jax.lax.cond(jnp.all(sp.greedy), greedy_only, with_sampling, logits)
  return token, lp, _token_logprob(raw, token), raw


def _stop_match(history, count, stop_seqs):
  """Length of the stop sequence the history ends with (0 if none). history [B, L]."""
  valid = stop_seqs >= 0                                     # [B, M, L]
  seq_len = valid.sum(-1)                                    # [B, M]
  eq = (stop_seqs == history[:, None, :]) | ~valid
  hit = eq.all(-1) & (seq_len > 0) & (seq_len <= count[:, None])
  return jnp.max(jnp.where(hit, seq_len, 0), axis=-1)


# --- the core -------------------------------------------------------------------
#
# Generation is a prefill (`_prefill`: the prompt pass, the KV cache and the decode
# state), decode steps (`_decode_step`) and `_finish`. `sample` runs the steps in a loop
# inside one program (PPO's rollout jits it into its own); `generate` may instead drive
# one compiled step per token from the host (`stepwise`, see there).

def _prefill(config: MistralConfig, params, prompt_ids, prompt_lengths, sp: SamplingParams, *,
             max_new_tokens: int, pad_id: int, num_top_logprobs: int,
             return_prompt_logprobs: bool) -> tuple[dict, dict]:
  """(decode state, constants of the decode loop) after the prompt pass."""
  model = Mistral(config)
  B, P = prompt_ids.shape
  N = max_new_tokens
  V = config.vocab_size
  cols = jnp.arange(P, dtype=jnp.int32)[None, :]
  pad = (P - prompt_lengths)[:, None]
  valid = cols >= pad
  positions = jnp.maximum(cols - pad, 0)

  # Prompts are left-padded, so column P-1 is every row's last token; the vocab
  # projection runs on the other columns only when their log-probs are asked for.
  out = model.apply({"params": params}, prompt_ids, positions=positions, attention_mask=valid,
                    return_kv=True, head_columns=None if return_prompt_logprobs else (P - 1, P))
  logits_all = out.logits
  num_slots = cache_slots(config, P + N)
  cache = cache_from_prefill(out.kv[0], out.kv[1], valid, num_slots)

  prompt_lp = None
  if return_prompt_logprobs:
    lp = jax.nn.log_softmax(logits_all[:, :-1], axis=-1)
    nxt = jnp.take_along_axis(lp, prompt_ids[:, 1:, None], axis=-1)[..., 0]
    prompt_lp = jnp.concatenate([jnp.zeros((B, 1), jnp.float32), nxt], axis=1)
    prompt_lp = jnp.where(valid & (cols > pad), prompt_lp, 0.0)

  seen = jnp.zeros((B, V), bool)
  seen = seen.at[jnp.arange(B)[:, None], prompt_ids].max(valid)
  single = (sp.stop_seqs[:, :, :-1] < 0).all(-1) & (sp.stop_seqs[:, :, -1] >= 0)   # [B, M]
  single_ids = jnp.where(single, sp.stop_seqs[:, :, -1], V)                         # V = dropped
  stop_single_mask = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], single_ids].set(
      True, mode="drop")

  K = num_top_logprobs
  carry = dict(
      logits=logits_all[:, -1],
      cache=cache,
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((B, N), pad_id, jnp.int32),
      logprobs=jnp.zeros((B, N), jnp.float32),
      model_logprobs=jnp.zeros((B, N), jnp.float32),
      top_ids=jnp.zeros((B, N, K), jnp.int32),
      top_lps=jnp.zeros((B, N, K), jnp.float32),
      done=sp.max_new_tokens <= 0,
      lengths=jnp.zeros((B,), jnp.int32),
      stop_lengths=jnp.zeros((B,), jnp.int32),
      history=jnp.full((B, MAX_STOP_LENGTH), -1, jnp.int32),
      seen=seen,
  )
  consts = dict(stop_single_mask=stop_single_mask, positions0=P - pad[:, 0],
                prompt_lp=prompt_lp)
  return carry, consts


def _decode_step(config: MistralConfig, params, c: dict, consts: dict, sp: SamplingParams, *,
                 pad_id: int, num_top_logprobs: int) -> dict:
  """One token for every row: pick it from the last logits, record it, check the stops,
  run the model on it (KV cache updated in place)."""
  B = c["done"].shape[0]
  K = num_top_logprobs
  step = c["step"]
  token, lp, mlp, raw = _process_and_sample(c["logits"], step, c["seen"],
                                            consts["stop_single_mask"], sp)
  active = ~c["done"]
  token = jnp.where(active, token, pad_id)
  c = dict(c)
  c["tokens"] = jax.lax.dynamic_update_slice_in_dim(c["tokens"], token[:, None], step, axis=1)
  c["logprobs"] = jax.lax.dynamic_update_slice_in_dim(
      c["logprobs"], jnp.where(active, lp, 0.0)[:, None], step, axis=1)
  c["model_logprobs"] = jax.lax.dynamic_update_slice_in_dim(
      c["model_logprobs"], jnp.where(active, mlp, 0.0)[:, None], step, axis=1)
  if K:
    top_lp, top_id = jax.lax.top_k(jax.nn.log_softmax(raw, axis=-1), K)
    c["top_ids"] = jax.lax.dynamic_update_slice_in_dim(c["top_ids"], top_id[:, None], step, axis=1)
    c["top_lps"] = jax.lax.dynamic_update_slice_in_dim(c["top_lps"], top_lp[:, None], step, axis=1)
  lengths = c["lengths"] + active
  history = jnp.concatenate([c["history"][:, 1:], token[:, None]], axis=1)
  stop_len = _stop_match(history, lengths, sp.stop_seqs)
  stop_len = jnp.where(active & (step >= sp.min_new_tokens), stop_len, 0)
  c["stop_lengths"] = jnp.where(active & (stop_len > 0), stop_len, c["stop_lengths"])
  c["done"] = c["done"] | (stop_len > 0) | (lengths >= sp.max_new_tokens)
  c["lengths"] = lengths
  c["history"] = history
  c["seen"] = c["seen"].at[jnp.arange(B), token].set(True)
  positions = (consts["positions0"] + step)[:, None]
  dec = Mistral(config).apply({"params": params}, token[:, None], positions=positions,
                              cache=c["cache"])
  c["logits"] = dec.logits[:, -1]
  c["cache"] = dec.cache
  c["step"] = step + 1
  return c


def _finish(c: dict, consts: dict, num_top_logprobs: int) -> SampleOutput:
  K = num_top_logprobs
  return SampleOutput(
      tokens=c["tokens"], logprobs=c["logprobs"], model_logprobs=c["model_logprobs"],
      lengths=c["lengths"], stop_lengths=c["stop_lengths"],
      top_ids=c["top_ids"] if K else None, top_logprobs=c["top_lps"] if K else None,
      prompt_logprobs=consts["prompt_lp"])


def sample(config: MistralConfig, params, prompt_ids, prompt_lengths, sp: SamplingParams, *,
           max_new_tokens: int, pad_id: int = 0, num_top_logprobs: int = 0,
           return_prompt_logprobs: bool = False) -> SampleOutput:
  """Jittable generation core.

  prompt_ids: i32 [B, P] left-padded (real tokens in the last `prompt_lengths[b]` columns).
  max_new_tokens: static number of decode steps compiled (rows may stop earlier
  through `sp.max_new_tokens`, stop sequences, or all rows finishing).
  """
  N = max_new_tokens
  carry, consts = _prefill(config, params, prompt_ids, prompt_lengths, sp, max_new_tokens=N,
                           pad_id=pad_id, num_top_logprobs=num_top_logprobs,
                           return_prompt_logprobs=return_prompt_logprobs)
  step_fn = functools.partial(_decode_step, config, params, consts=consts, sp=sp,
                              pad_id=pad_id, num_top_logprobs=num_top_logprobs)

  def cond(c):
    return (c["step"] < N) & ~jnp.all(c["done"])

  c = jax.lax.while_loop(cond, step_fn, carry)
  return _finish(c, consts, num_top_logprobs)


# --- buckets and the public entry point ---------------------------------------

def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, *, min_rows: int = 1,
                mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Token-id prompts -> (ids i32 [B, P] left-padded, lengths i32 [B]) in the compiled-shape
  buckets: B the next power of two >= len(prompts) (at least `min_rows`), rounded up to the
  mesh's data-parallel size, P the next power of two >= the longest prompt. Filler rows
  hold one real token (the first prompt's last) and length 1."""
  dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  B = max(bucket(len(prompts), minimum=max(min_rows, 1)), dp)
  B = -(-B // dp) * dp
  P = bucket(max(len(p) for p in prompts))
  ids = np.full((B, P), pad_id, np.int32)
  lengths = np.ones((B,), np.int32)
  for i, p in enumerate(prompts):
    ids[i, P - len(p):] = p
    lengths[i] = len(p)
  ids[len(prompts):, -1] = prompts[0][-1]
  return ids, lengths


def bucket(n: int, minimum: int = 16) -> int:
  """Next power of two >= n (at least `minimum`): the compiled-shape buckets."""
  size = minimum
  while size < n:
    size *= 2
  return size


def sampling_params_shardings(mesh) -> SamplingParams:
  """`SamplingParams` sharded by row over the mesh's batch axes."""
  from cai_jax import parallel
  rows = parallel.batch_sharding(mesh, 1)
  return SamplingParams(*([rows] * 7), parallel.batch_sharding(mesh, 3),
                        parallel.batch_sharding(mesh, 2))


def _jit_prompt_program(fn, config: MistralConfig, mesh):
  """jit of `fn(params, prompt_ids, prompt_lengths, sp)`, its inputs sharded on `mesh`."""
  if mesh is None:
    return jax.jit(fn)
  from cai_jax import parallel
  return jax.jit(fn, in_shardings=(param_shardings(config, mesh),
                                   parallel.batch_sharding(mesh, 2),
                                   parallel.batch_sharding(mesh, 1),
                                   sampling_params_shardings(mesh)))


@functools.lru_cache(maxsize=16)
def next_token_logprobs_program(config: MistralConfig, token_ids: tuple[int, ...], pad_id: int,
                                mesh):
  """A jitted `(params, prompt_ids, prompt_lengths, sp) -> f32 [B, len(token_ids)]`: log p of
  each of `token_ids` right after each left-padded prompt, from the sampler's own prefill
  (its next-token logits normalised, the asked-for columns kept; the KV cache and decode
  state it also builds are not outputs, so XLA drops them). A judge reads its option
  letters with it (`engine.TextGenerator.next_token_logprobs`)."""
  def fn(params, prompt_ids, prompt_lengths, sp):
    state, _ = _prefill(config, params, prompt_ids, prompt_lengths, sp, max_new_tokens=0,
                        pad_id=pad_id, num_top_logprobs=0, return_prompt_logprobs=False)
    logits = state["logits"].astype(jnp.float32)                        # [B, V]
    picked = logits[:, jnp.asarray(token_ids, jnp.int32)]
    return picked - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

  return _jit_prompt_program(fn, config, mesh)


@functools.lru_cache(maxsize=64)
def _compiled_sample(config: MistralConfig, max_new_tokens: int, pad_id: int,
                     num_top_logprobs: int, return_prompt_logprobs: bool, mesh=None):
  fn = functools.partial(sample, config, max_new_tokens=max_new_tokens, pad_id=pad_id,
                         num_top_logprobs=num_top_logprobs,
                         return_prompt_logprobs=return_prompt_logprobs)
  return _jit_prompt_program(fn, config, mesh)


@functools.lru_cache(maxsize=64)
def _compiled_stepwise(config: MistralConfig, max_new_tokens: int, pad_id: int,
                       num_top_logprobs: int, return_prompt_logprobs: bool, mesh=None):
  """(prefill, step) programs for a host-driven decode: `step` is one token, its decode
  state donated so the KV cache and the token buffers are updated in place."""
  prefill = functools.partial(_prefill, config, max_new_tokens=max_new_tokens, pad_id=pad_id,
                              num_top_logprobs=num_top_logprobs,
                              return_prompt_logprobs=return_prompt_logprobs)

  def step(params, c, consts, sp):
    c = _decode_step(config, params, c, consts, sp, pad_id=pad_id,
                     num_top_logprobs=num_top_logprobs)
    return c, jnp.all(c["done"])

  # The step's shardings follow the prefill's outputs.
  return _jit_prompt_program(prefill, config, mesh), jax.jit(step, donate_argnums=1)


def _sample_stepwise(fns, params, ids, lengths, sp, *, steps: int,
                     num_top_logprobs: int) -> SampleOutput:
  """`sample`'s result with the decode loop on the host: one step program per token, at
  most `steps` (the longest row's max_new_tokens). The host keeps one step queued ahead
  of the device and, before queueing another, waits for the older one's "every row
  done" flag: the device never idles on the host, and at most one step runs after the
  last row ends. Inside a device loop the same 7B step ran ~1.7x slower on an H200
  (README)."""
  prefill, step = fns
  c, consts = prefill(params, ids, lengths, sp)
  pending = collections.deque()
  for _ in range(steps):
    c, all_done = step(params, c, consts, sp)
    pending.append(all_done)
    if len(pending) > 1 and bool(pending.popleft()):
      break
  return _finish(c, consts, num_top_logprobs)


def stepwise_default(backend: str | None = None) -> bool:
  """Whether `generate` drives decode from the host by default: on GPUs, where a step
  inside a device loop ran ~1.7x slower (README). On CPU the device loop is faster; on
  TPU nothing was measured, and its while loops do not wait on the host."""
  return (backend or jax.default_backend()) == "gpu"


@dataclasses.dataclass
class GenerationOutput:
  """Python-side result of `generate`; stop tokens are excluded from every list."""
  tokens: list[list[int]]
  logprobs: list[list[float]]
  model_logprobs: list[list[float]]
  finish_reasons: list[str]          # "stop" or "length"
  top_logprobs: list[list[list[tuple[int, float]]]] | None = None
  prompt_logprobs: list[list[float]] | None = None
  # Per row, how many trailing tokens of the lists are the stop sequence that
  # ended it (only with `include_stop=True`; otherwise nothing is kept of it).
  stop_lengths: list[int] | None = None


def generate(config: MistralConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: Any, greedy: Any = False, temperature: Any = 1.0, top_k: Any = 0,
             top_p: Any = 1.0, repetition_penalty: Any = 1.0, min_new_tokens: Any = 0,
             stop_token_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (),
             row_stop_sequences: Sequence[Sequence[Sequence[int]]] | None = None,
             seed: int | Sequence[int] = 0, pad_id: int = 0, num_top_logprobs: int = 0,
             return_prompt_logprobs: bool = False, mesh=None,
             min_batch_bucket: int = 1, include_stop: bool = False,
             min_steps: int = 0, stepwise: bool | None = None) -> GenerationOutput:
  """Generates continuations for token-id prompts of different lengths.

  Settings (max_new_tokens included) may be scalars or per-prompt lists.
  `stop_token_ids` and `stop_sequences` apply to every prompt,
  `row_stop_sequences[i]` to prompt i. `seed` is an int (row i gets key
  fold_in(seed, i)) or a list of per-row seeds. Returns token lists without
  their stop token/sequence, and the matching log-probabilities; with
  `include_stop` the stop sequence is kept (a server that echoes the end string,
  as NeMo's does, needs its ids and log-probabilities) and `stop_lengths` says
  how long it is. `min_steps` compiles at least that many decode steps (rows still
  stop at their own max_new_tokens), so calls of different lengths share one program.
  `stepwise` drives the decode loop from the host, one compiled step per token
  (default: `stepwise_default()`, on GPUs); the results are the same.
  """
  if not prompts:
    return GenerationOutput([], [], [], [], None, None)
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  n = len(prompts)
  new = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (n,))
  if np.any(new < 0):
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  for i, p in enumerate(prompts):
    if len(p) + new[i] > config.max_position_embeddings:
      raise ValueError(f"prompt {i}: {len(p)} tokens + {new[i]} new tokens exceeds the model's "
                       f"max_position_embeddings={config.max_position_embeddings}")
  ids, lengths = pad_prompts(prompts, pad_id, min_rows=min_batch_bucket, mesh=mesh)
  B, P = ids.shape
  N = bucket(max(int(new.max()), min_steps, 1))

  stops = [[t] for t in stop_token_ids] + [list(q) for q in stop_sequences]
  sp = make_sampling_params(
      n, B, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
      repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
      max_new_tokens=new, stop_sequences=stops, row_stop_sequences=row_stop_sequences, seed=seed)

  if stepwise is None:
    stepwise = stepwise_default()
  if stepwise:
    fns = _compiled_stepwise(config, N, pad_id, num_top_logprobs, return_prompt_logprobs, mesh)
    out = jax.device_get(_sample_stepwise(fns, params, ids, lengths, sp,
                                          steps=int(new.max()),
                                          num_top_logprobs=num_top_logprobs))
  else:
    fn = _compiled_sample(config, N, pad_id, num_top_logprobs, return_prompt_logprobs, mesh)
    out = jax.device_get(fn(params, ids, lengths, sp))

  tokens, logprobs, model_lps, reasons, tops, prompt_lps = [], [], [], [], [], []
  for i in range(n):
    keep = int(out.lengths[i]) - (0 if include_stop else int(out.stop_lengths[i]))
    tokens.append(out.tokens[i, :keep].tolist())
    logprobs.append(out.logprobs[i, :keep].tolist())
    model_lps.append(out.model_logprobs[i, :keep].tolist())
    reasons.append("stop" if out.stop_lengths[i] > 0 else "length")
    if num_top_logprobs:
      tops.append([list(zip(out.top_ids[i, t].tolist(), out.top_logprobs[i, t].tolist()))
                   for t in range(keep)])
    if return_prompt_logprobs:
      prompt_lps.append(out.prompt_logprobs[i, P - len(prompts[i]):].tolist())
  return GenerationOutput(tokens, logprobs, model_lps, reasons,
                          tops if num_top_logprobs else None,
                          prompt_lps if return_prompt_logprobs else None,
                          [int(x) for x in out.stop_lengths[:n]] if include_stop else None)
