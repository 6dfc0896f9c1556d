"""`cai_jax.sampling`: parity with `transformers.generate`, log-probs, sampling statistics.

Every model is a random tiny HF Mistral saved with `save_pretrained` and read
back with `checkpoint.load_hf`, so the torch model is the reference for greedy
token ids and for the log-probs of a full forward pass over prompt + completion.
The expected sampling distributions are computed with plain NumPy following
Hugging Face's warper definitions (and checked against the warpers themselves).

Compiled shapes are kept to a handful: most tests reuse one bucket (batch 4,
prompt 16, 32 decode steps) of one global-attention model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_utils
from cai_jax import checkpoint, parallel, sampling
from cai_jax.model import cache_slots, param_shardings

# Programs that differ only in how they loop agree to float32 rounding on CPU; an NVIDIA
# GPU runs float32 matmuls on its TF32 units by default, so there they agree to ~1e-4.
_ATOL = 1e-5 if jax.default_backend() == "cpu" else 2e-3
PROMPT_LENGTHS = (3, 9, 14)   # ragged: left padding of 13, 7 and 2 in a 16-column bucket
NEW = 24                      # > sliding window 6, and > the prompt bucket - longest prompt
WINDOW = 6


def _prompts(seed=0, lengths=PROMPT_LENGTHS, vocab=101):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _load(path_factory, name, seed, **overrides):
  """(torch model, config, params) of one random tiny HF model, through save/load_hf."""
  model = hf_utils.make_hf_model(seed, **overrides)
  model.generation_config.eos_token_id = None   # HF would otherwise stop on id 2
  path = hf_utils.save_hf_model(model, path_factory.mktemp(name))
  cfg, params = checkpoint.load_hf(path)
  return model, cfg, params


@pytest.fixture(scope="module")
def global_model(tmp_path_factory):
  return _load(tmp_path_factory, "global", 0)


@pytest.fixture(scope="module")
def window_model(tmp_path_factory):
  return _load(tmp_path_factory, "window", 0, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def greedy_reference(global_model):
  """Greedy 24-token continuations of the three prompts, with no stop condition."""
  _, cfg, params = global_model
  return sampling.generate(cfg, params, _prompts(), max_new_tokens=NEW, greedy=True).tokens


def _hf_generate(model, prompt, max_new_tokens, **kwargs):
  """New token ids of transformers' `generate` for one prompt alone (batch 1, no padding)."""
  from transformers import GenerationConfig
  gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                           dtype=torch.long),
                         generation_config=gc)
  return out[0, len(prompt):].tolist()


def _next_token_logits(model, prompt, completion):
  """Raw logits [len(completion), V] predicting each completion token (full forward pass)."""
  seq = list(prompt) + list(completion)
  logits = hf_utils.torch_logits(model, [seq])[0].astype(np.float64)
  return logits[len(prompt) - 1:len(seq) - 1]


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  finite = np.isfinite(z)
  m = z[finite].max()
  lse = m + np.log(np.sum(np.exp(z[finite] - m)))
  return np.where(finite, z - lse, -np.inf)


def _log_softmax_rows(z):
  return np.stack([_log_softmax(row) for row in z])


def _picked(logits, tokens):
  return np.array([_log_softmax(row)[t] for row, t in zip(logits, tokens)])


# --- NumPy reference of HF's logits processing -----------------------------------

def ref_repetition_penalty(z, seen, penalty):
  z = np.array(z, np.float64)
  for t in set(seen):
    z[t] = z[t] * penalty if z[t] < 0 else z[t] / penalty
  return z


def ref_top_k(z, k):
  """TopKLogitsWarper: remove every token whose logit is < the k-th largest."""
  if k <= 0:
    return z
  kth = np.sort(z)[::-1][min(k, len(z)) - 1]
  return np.where(z < kth, -np.inf, z)


def ref_top_p(z, top_p, include_crossing=True):
  """TopPLogitsWarper: keep the smallest set of most probable tokens with mass >= top_p."""
  if top_p >= 1:
    return z
  probs = np.exp(_log_softmax(z))
  out = np.full_like(z, -np.inf)
  mass = 0.0
  for i in np.argsort(-probs, kind="stable"):
    if include_crossing and mass >= top_p:
      break
    if not include_crossing and mass + probs[i] > top_p and mass > 0:
      break
    out[i] = z[i]
    mass += probs[i]
  return out


def ref_distribution(z, *, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seen=()):
  """HF order: repetition penalty, temperature, top-k, top-p; returns probabilities."""
  z = ref_repetition_penalty(z, seen, repetition_penalty) / temperature
  return np.exp(_log_softmax(ref_top_p(ref_top_k(z, top_k), top_p)))


def _tv(p, q):
  return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


# --- 1. greedy parity with transformers -------------------------------------------

@pytest.mark.parametrize("which", ["global", "window"])
def test_greedy_ragged_batch_matches_transformers(which, global_model, window_model):
  """Prompts of 3, 9, 14 tokens decoded together == each decoded alone by HF.

  With window 6 and 24 new tokens the 6-slot rolling cache wraps several times.
  """
  model, cfg, params = global_model if which == "global" else window_model
  assert cfg.sliding_window == (None if which == "global" else WINDOW)
  prompts = _prompts()
  out = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, greedy=True)
  assert out.finish_reasons == ["length"] * 3
  for prompt, tokens in zip(prompts, out.tokens):
    assert len(tokens) == NEW
    assert tokens == _hf_generate(model, prompt, NEW)


def test_window_changes_generation(global_model, window_model):
  """Guards the window test above against a window that is silently ignored."""
  prompts = _prompts()
  g = sampling.generate(global_model[1], global_model[2], prompts, max_new_tokens=NEW, greedy=True)
  w = sampling.generate(window_model[1], window_model[2], prompts, max_new_tokens=NEW, greedy=True)
  assert all(a != b for a, b in zip(g.tokens, w.tokens))


def test_greedy_repetition_penalty_and_min_new_tokens_match_transformers(global_model):
  """HF's RepetitionPenalty + MinNewTokensLength processors with an eos that is the argmax."""
  model, cfg, params = global_model
  prompts = _prompts()
  penalty, min_new = 1.3, 3
  # The stop id: row 0's first greedy token under the penalty, so min_new_tokens must act.
  eos = _hf_generate(model, prompts[0], 1, repetition_penalty=penalty)[0]
  out = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, greedy=True,
                          repetition_penalty=penalty, min_new_tokens=min_new,
                          stop_token_ids=[eos])
  for prompt, tokens, reason in zip(prompts, out.tokens, out.finish_reasons):
    hf = _hf_generate(model, prompt, NEW, repetition_penalty=penalty, min_new_tokens=min_new,
                      eos_token_id=eos)
    assert tokens + ([eos] if reason == "stop" else []) == hf
    assert eos not in tokens and len(tokens) >= min_new
  assert out.tokens[0][0] != eos
  unpenalised = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, greedy=True)
  assert unpenalised.tokens != out.tokens


# --- 2. log-probs against a full forward pass --------------------------------------

@pytest.mark.parametrize("mode", ["greedy", "temperature_1", "temperature_0.7"])
def test_logprobs_equal_full_forward_pass(mode, global_model):
  model, cfg, params = global_model
  prompts = _prompts()
  kwargs = dict(greedy=True) if mode == "greedy" else dict(
      temperature=float(mode.split("_")[1]), seed=[11, 12, 13])
  out = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, **kwargs)
  temperature = kwargs.get("temperature", 1.0)
  for prompt, tokens, lps, mlps in zip(prompts, out.tokens, out.logprobs, out.model_logprobs):
    assert len(tokens) == len(lps) == len(mlps) == NEW
    logits = _next_token_logits(model, prompt, tokens)
    np.testing.assert_allclose(mlps, _picked(logits, tokens), atol=1e-4, rtol=0)
    np.testing.assert_allclose(lps, _picked(logits / temperature, tokens), atol=1e-4, rtol=0)
    if mode == "greedy":
      assert tokens == logits.argmax(-1).tolist()
  if mode == "temperature_0.7":
    assert not np.allclose(out.logprobs[0], out.model_logprobs[0], atol=1e-3)


def test_greedy_row_unaffected_by_sampling_batch_mates(global_model, greedy_reference):
  """Per-row settings: a greedy row next to filtered, tempered rows keeps its own tokens and
  raw log-probs (its batch-mates' top-k / top-p / temperature must not leak into it)."""
  model, cfg, params = global_model
  prompts = _prompts()
  out = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, greedy=[False, True, False],
                          temperature=[0.5, 1.0, 1.3], top_k=[3, 0, 0], top_p=[1.0, 1.0, 0.6],
                          seed=[1, 2, 3])
  assert out.tokens[1] == greedy_reference[1]
  logits = _next_token_logits(model, prompts[1], out.tokens[1])
  np.testing.assert_allclose(out.logprobs[1], _picked(logits, out.tokens[1]), atol=1e-4)
  for r, temperature, top_k, top_p in ((0, 0.5, 3, 1.0), (2, 1.3, 0, 0.6)):
    logits = _next_token_logits(model, prompts[r], out.tokens[r])
    want = [np.log(ref_distribution(z, temperature=temperature, top_k=top_k, top_p=top_p)[t])
            for z, t in zip(logits, out.tokens[r])]
    np.testing.assert_allclose(out.logprobs[r], want, atol=1e-4)


def test_prompt_logprobs_and_top_logprobs_equal_full_forward_pass(global_model):
  model, cfg, params = global_model
  prompts = _prompts()
  out = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, greedy=True,
                          return_prompt_logprobs=True, num_top_logprobs=3)
  for prompt, tokens, plps, tops in zip(prompts, out.tokens, out.prompt_logprobs,
                                        out.top_logprobs):
    seq = prompt + tokens
    lp = _log_softmax_rows(hf_utils.torch_logits(model, [seq])[0].astype(np.float64))
    assert len(plps) == len(prompt) and plps[0] == 0.0
    np.testing.assert_allclose(plps[1:], lp[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
    assert len(tops) == len(tokens)
    for t, step in enumerate(tops):
      row = lp[len(prompt) - 1 + t]
      ids, values = zip(*step)
      assert list(ids) == np.argsort(-row)[:3].tolist() and ids[0] == tokens[t]
      np.testing.assert_allclose(values, row[list(ids)], atol=1e-4)


# --- 3. sampling statistics -------------------------------------------------------

STAT_PROMPT = [1, 5, 9, 3, 12, 7]
STAT_SETTINGS = [  # (temperature, top_k, top_p, repetition_penalty)
    (1.0, 0, 1.0, 1.0),     # the plain softmax
    (0.7, 5, 1.0, 1.5),     # penalty then temperature then top-k
    (1.5, 0, 0.7, 1.0),     # temperature before top-p changes the nucleus
    (1.2, 6, 0.8, 1.0),     # both bind: top-p over the renormalised top-k keeps 4 of 6
]
STAT_ROWS = 4096            # samples per setting
# Total-variation bounds for 4096 exact draws from these distributions: the TV of a
# multinomial sample is ~0.018 on average (99.9th percentile 0.035) over the 16 first
# tokens, ~0.060 (99.9th percentile 0.075) over the 256 (first, second) pairs.
TV_BOUND = 0.04
JOINT_TV_BOUND = 0.09


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
  """Vocab-16 model whose next-token logits after STAT_PROMPT have std ~1.5 (not flat)."""
  model = hf_utils.make_hf_model(3, vocab_size=16)
  std = hf_utils.torch_logits(model, [STAT_PROMPT])[0, -1].std()
  with torch.no_grad():
    model.lm_head.weight.mul_(1.5 / std)
  path = hf_utils.save_hf_model(model, tmp_path_factory.mktemp("vocab16"))
  cfg, params = checkpoint.load_hf(path)
  logits = hf_utils.torch_logits(model, [STAT_PROMPT])[0, -1].astype(np.float64)
  return model, cfg, params, logits


def test_reference_distribution_matches_hf_warpers(small_vocab_model):
  """The NumPy reference below is HF's processors, applied in generate's order."""
  from transformers.generation.logits_process import (
      LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
      TopKLogitsWarper, TopPLogitsWarper)
  _, _, _, logits = small_vocab_model
  for temperature, top_k, top_p, penalty in STAT_SETTINGS:
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty),
                                 TemperatureLogitsWarper(temperature)])
    if top_k:
      procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
      procs.append(TopPLogitsWarper(top_p))
    hf = procs(torch.tensor([STAT_PROMPT]), torch.tensor(logits[None]))[0].softmax(-1).numpy()
    ours = ref_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=penalty, seen=STAT_PROMPT)
    np.testing.assert_allclose(ours, hf, atol=1e-6)


def test_sampled_tokens_follow_processed_distribution(small_vocab_model):
  """Two new tokens for 4 x 4096 rows (one seed each): support, log-probs and frequencies.

  The exact log-prob check pins the processed distribution (temperature, top-k
  off by one, the crossing token of the nucleus, renormalisation); the support
  check that filtered tokens never appear; the total-variation check that the
  sampler really draws from it. Each setting is checked to be sensitive: the
  distributions of plausible wrong implementations sit well outside TV_BOUND.
  """
  model, cfg, params, logits = small_vocab_model
  n = STAT_ROWS * len(STAT_SETTINGS)
  cols = list(zip(*[s for s in STAT_SETTINGS for _ in range(STAT_ROWS)]))
  out = sampling.generate(cfg, params, [STAT_PROMPT] * n, max_new_tokens=2,
                          temperature=list(cols[0]), top_k=list(cols[1]), top_p=list(cols[2]),
                          repetition_penalty=list(cols[3]), seed=list(range(n)))
  tokens = np.array([t[0] for t in out.tokens])
  lps = np.array([lp[0] for lp in out.logprobs])
  mlps = np.array([lp[0] for lp in out.model_logprobs])
  np.testing.assert_allclose(mlps, _log_softmax(logits)[tokens], atol=1e-4)

  caught = set()
  for i, (temperature, top_k, top_p, penalty) in enumerate(STAT_SETTINGS):
    rows = slice(i * STAT_ROWS, (i + 1) * STAT_ROWS)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
              seen=STAT_PROMPT)
    expected = ref_distribution(logits, **kw)
    where = f"setting {STAT_SETTINGS[i]}"
    support = expected > 0
    assert support[tokens[rows]].all(), f"{where}: sampled a filtered token"
    np.testing.assert_allclose(lps[rows], np.log(expected[tokens[rows]]), atol=1e-4,
                               err_msg=where)
    empirical = np.bincount(tokens[rows], minlength=cfg.vocab_size) / STAT_ROWS
    assert _tv(empirical, expected) < TV_BOUND, (where, empirical, expected)
    # Every token in the support shows up (a truncation one token too deep would not).
    assert (empirical[support] > 0).all(), where

    # Sensitivity: sampling from any of these wrong distributions would fail a check
    # above even if its log-probs were reported right (TV, or tokens outside/missing).
    z = ref_repetition_penalty(logits, STAT_PROMPT, penalty) / temperature
    wrong = {
        "temperature ignored": ref_distribution(logits, **{**kw, "temperature": 1.0}),
        "top_k - 1": ref_distribution(logits, **{**kw, "top_k": max(top_k - 1, 1)}),
        "top_k + 1": ref_distribution(logits, **{**kw, "top_k": top_k + 1}),
        "top-p before temperature": np.exp(_log_softmax(
            ref_top_p(ref_top_k(z * temperature, top_k), top_p) / temperature)),
        "nucleus without the crossing token": np.exp(_log_softmax(
            ref_top_p(ref_top_k(z, top_k), top_p, include_crossing=False))),
        "nucleus not renormalised after top-k": np.exp(_log_softmax(
            np.where(np.isfinite(ref_top_p(z, top_p)), ref_top_k(z, top_k), -np.inf))),
        "no penalty": ref_distribution(logits, **{**kw, "repetition_penalty": 1.0}),
    }
    for name, q in wrong.items():
      if _tv(q, expected) < 1e-9 or (name.startswith("top_k") and not top_k):
        continue   # the same distribution under this setting
      outside = q[~support].sum() * STAT_ROWS          # expected draws of filtered tokens
      missing = expected[q == 0].sum() * STAT_ROWS     # expected draws q can never make
      assert _tv(q, empirical) > TV_BOUND or outside > 20 or missing > 20, (where, name)
      caught.add(name)
  assert caught == set(wrong), set(wrong) - caught

  # Second token of the plain-softmax rows: exact conditional log-probs, and the
  # joint (first, second) frequencies, which a key reused across steps distorts.
  rows = slice(0, STAT_ROWS)
  pairs = np.array(out.tokens[rows])
  second = np.array([lp[1] for lp in out.logprobs[rows]])
  cond = _log_softmax_rows(hf_utils.torch_logits(
      model, [STAT_PROMPT + [a] for a in range(cfg.vocab_size)])[:, -1].astype(np.float64))
  np.testing.assert_allclose(second, cond[pairs[:, 0], pairs[:, 1]], atol=1e-4)
  joint = np.exp(_log_softmax(logits))[:, None] * np.exp(cond)
  counts = np.zeros_like(joint)
  np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1.0 / STAT_ROWS)
  assert _tv(counts, joint) < JOINT_TV_BOUND


# --- 4. logits processors on hand-made logits, stops, min_new_tokens --------------

def test_apply_repetition_penalty_by_hand():
  logits = jnp.array([[2.0, -2.0, 3.0, -1.0, 0.0],
                      [2.0, -2.0, 3.0, -1.0, 0.0]])
  seen = jnp.array([[True, True, False, False, True],
                    [True, True, True, True, True]])
  out = np.asarray(sampling.apply_repetition_penalty(logits, seen, jnp.array([2.0, 1.0])))
  np.testing.assert_array_equal(out[0], [1.0, -4.0, 3.0, -1.0, 0.0])
  np.testing.assert_array_equal(out[1], np.asarray(logits[1]))


def _kept(logits, top_k, top_p):
  """Which logits `apply_top_k_top_p` keeps; the kept ones must be unchanged."""
  out = np.asarray(jax.jit(sampling.apply_top_k_top_p)(
      jnp.asarray(logits, jnp.float32), jnp.asarray(top_k, jnp.int32),
      jnp.asarray(top_p, jnp.float32)))
  kept = out > sampling.NEG_INF / 2
  np.testing.assert_array_equal(out[kept], np.asarray(logits, np.float32)[kept])
  return kept


def test_apply_top_k_top_p_by_hand():
  probs = np.log([0.5, 0.3, 0.15, 0.05])
  rows = [  # (logits, top_k, top_p, kept)
      (probs, 0, 1.0, [1, 1, 1, 1]),    # off
      (probs, 0, 0.45, [1, 0, 0, 0]),   # 0.5 >= 0.45
      (probs, 0, 0.55, [1, 1, 0, 0]),   # the token that crosses 0.55 is kept
      (probs, 0, 0.9, [1, 1, 1, 0]),
      (probs, 0, 0.99, [1, 1, 1, 1]),
      (probs, 1, 1.0, [1, 0, 0, 0]),    # top-1
      (probs, 3, 1.0, [1, 1, 1, 0]),    # top-3
      (probs, 2, 0.6, [1, 0, 0, 0]),    # top-2 renormalised to (0.625, 0.375): 0.625 >= 0.6
      (probs, 9, 0.55, [1, 1, 0, 0]),   # k > vocab: off
      # top-k keeps ties with the k-th logit (HF: remove only logits < the k-th largest).
      ([3.0, 3.0, 3.0, 1.0], 2, 1.0, [1, 1, 1, 0]),
      # top_p = 1 is off even for a negligible tail (a batch-mate below does filter).
      ([0.0, -30.0, -5.0, -40.0], 0, 1.0, [1, 1, 1, 1]),
      ([0.0, -30.0, -5.0, -40.0], 0, 0.5, [1, 0, 0, 0]),
  ]
  logits, top_k, top_p, want = zip(*rows)
  np.testing.assert_array_equal(_kept(np.stack(logits), top_k, top_p).astype(int), want)


def test_apply_top_k_top_p_matches_hf_warpers():
  from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(40, 23)) * rng.uniform(0.3, 3.0, (40, 1))).astype(np.float32)
  top_k = rng.integers(0, 25, 40)
  top_p = rng.choice([1.0, 0.95, 0.8, 0.5, 0.2, 0.01], 40)
  kept = _kept(logits, top_k, top_p)
  for i in range(40):
    scores = torch.tensor(logits[i:i + 1])
    if top_k[i]:
      scores = TopKLogitsWarper(int(top_k[i]))(None, scores)
    if top_p[i] < 1:
      scores = TopPLogitsWarper(float(top_p[i]))(None, scores)
    np.testing.assert_array_equal(kept[i], torch.isfinite(scores[0]).numpy(),
                                  err_msg=f"top_k={top_k[i]} top_p={top_p[i]}")


def _cut_at(tokens, stops, min_new_tokens=0):
  """(tokens before the first complete stop sequence, finish reason, that stop sequence).

  A stop sequence counts only if its last token is token number > min_new_tokens.
  """
  for end in range(min_new_tokens + 1, len(tokens) + 1):
    for stop in stops:
      if end >= len(stop) and tokens[end - len(stop):end] == list(stop):
        return tokens[:end - len(stop)], "stop", list(stop)
  return tokens, "length", []


def test_min_new_tokens_masks_only_the_stop_token(global_model, greedy_reference):
  """Each row's stop id is its own greedy first token; min_new_tokens=4 forbids it 4 steps."""
  model, cfg, params = global_model
  prompts, k = _prompts(), 4
  stop_ids = [g[0] for g in greedy_reference]
  out = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, greedy=True,
                          min_new_tokens=k, row_stop_sequences=[[[s]] for s in stop_ids])
  for prompt, stop, tokens, lps, mlps, reason in zip(
      prompts, stop_ids, out.tokens, out.logprobs, out.model_logprobs, out.finish_reasons):
    assert len(tokens) >= k and stop not in tokens
    logits = _next_token_logits(model, prompt, tokens)
    masked = logits.copy()
    masked[:k, stop] = -np.inf   # exactly the stop logit, during the first k steps only
    assert tokens == masked.argmax(-1).tolist()
    assert tokens[0] == np.argsort(logits[0])[-2]
    if reason == "stop":   # it stopped because the stop id became the argmax after step k
      assert _next_token_logits(model, prompt, tokens + [stop])[-1].argmax() == stop
    np.testing.assert_allclose(mlps, _picked(logits, tokens), atol=1e-4)
    np.testing.assert_allclose(lps, _picked(masked, tokens), atol=1e-4)


@pytest.mark.parametrize("case", ["one_id", "several_ids", "sequence", "sequence_min_new",
                                  "max_new_tokens", "include_stop"])
def test_stops_end_generation_and_are_excluded(case, global_model, greedy_reference):
  """Stops only truncate a greedy run (no single-token stop under min_new_tokens here),
  so the expected output is the no-stop greedy run cut by `_cut_at`."""
  _, cfg, params = global_model
  g = greedy_reference
  max_new, min_new, kwargs = NEW, 0, {}
  if case == "one_id":
    stops = [[g[1][5]]]                     # also row 0's first token: an empty completion
  elif case == "several_ids":
    stops = [[g[1][6]], [g[2][4]], [g[0][2]]]
  elif case in ("sequence", "include_stop"):
    # A 2-token sequence that does occur, and a 3-token one that only starts to.
    stops = [g[2][6:8], g[1][3:5] + [(g[1][5] + 1) % cfg.vocab_size]]
  elif case == "sequence_min_new":
    # Row 1's tokens 3..4 complete a stop at token 5 <= min_new_tokens: not a stop yet.
    stops, min_new = [g[1][3:5], g[2][9:12]], 5
  else:
    stops, max_new = [], [5, NEW, 10]
  if case in ("one_id", "several_ids"):
    kwargs["stop_token_ids"] = [s[0] for s in stops]
  else:
    kwargs["stop_sequences"] = stops
  out = sampling.generate(cfg, params, _prompts(), max_new_tokens=max_new, greedy=True,
                          min_new_tokens=min_new, include_stop=case == "include_stop", **kwargs)
  for r, (tokens, reason) in enumerate(zip(out.tokens, out.finish_reasons)):
    full = g[r][:np.broadcast_to(max_new, 3)[r]]
    expected, expected_reason, stop = _cut_at(full, stops, min_new)
    if case == "include_stop":
      assert out.stop_lengths[r] == len(stop)
      expected = expected + stop
    assert (tokens, reason) == (expected, expected_reason), f"row {r}"
    assert len(out.logprobs[r]) == len(tokens)
  assert ("stop" in out.finish_reasons) == (case != "max_new_tokens")
  if case == "sequence_min_new":
    assert _cut_at(g[1], stops) != _cut_at(g[1], stops, min_new)


# --- 5. seeds -------------------------------------------------------------------------

def test_seeds_reproducible_and_independent_of_batch_mates(global_model):
  _, cfg, params = global_model
  p = _prompts(seed=1, lengths=(4, 10, 7, 12))
  run = functools.partial(sampling.generate, cfg, params, max_new_tokens=NEW, temperature=1.0)
  a = run(p[:3], seed=[5, 6, 7])
  assert run(p[:3], seed=[5, 6, 7]).tokens == a.tokens
  # Same prompt + seed in another row, next to other prompts (same compiled bucket).
  b = run([p[2], p[3], p[0]], seed=[7, 9, 5])
  assert b.tokens[2] == a.tokens[0] and b.tokens[0] == a.tokens[2]
  np.testing.assert_allclose(b.logprobs[2], a.logprobs[0], atol=1e-5)
  c = run(p[:3], seed=[15, 16, 17])
  assert all(x != y for x, y in zip(a.tokens, c.tokens))
  # An int seed: reproducible, rows get different keys, and another int differs.
  d = run([p[0]] * 3, seed=3)
  assert run([p[0]] * 3, seed=3).tokens == d.tokens
  assert len({tuple(t) for t in d.tokens}) == 3
  assert run([p[0]] * 3, seed=4).tokens != d.tokens


@pytest.mark.parametrize("greedy", [True, False])
def test_unrolled_decode_equals_the_scanned_decode(greedy, global_model):
  """`decode_loop` changes how the layer loop is compiled, not what it computes."""
  _, cfg, params = global_model
  kw = dict(max_new_tokens=NEW, greedy=greedy, temperature=0.8, top_k=20, seed=[3, 4, 5])
  unrolled = sampling.generate(cfg.replace(decode_loop="unroll"), params, _prompts(), **kw)
  scanned = sampling.generate(cfg.replace(decode_loop="scan"), params, _prompts(), **kw)
  assert unrolled.tokens == scanned.tokens
  for a, b in zip(unrolled.model_logprobs + unrolled.logprobs,
                  scanned.model_logprobs + scanned.logprobs):
    np.testing.assert_allclose(a, b, atol=_ATOL)


@pytest.mark.parametrize("kwargs", [
    dict(greedy=True),
    dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=[3, 4, 5],
         num_top_logprobs=3, return_prompt_logprobs=True),
    dict(greedy=True, stop_token_ids=[7], min_new_tokens=2, max_new_tokens=[5, 24, 17]),
])
def test_host_driven_decode_equals_the_device_loop(kwargs, global_model, window_model):
  """`stepwise` moves the decode loop to the host; tokens, log-probs and stops stay."""
  for _, cfg, params in (global_model, window_model):
    kw = {"max_new_tokens": NEW, **kwargs}
    device = sampling.generate(cfg, params, _prompts(), stepwise=False, **kw)
    host = sampling.generate(cfg, params, _prompts(), stepwise=True, **kw)
    assert host.tokens == device.tokens and host.finish_reasons == device.finish_reasons
    for name in ("logprobs", "model_logprobs", "prompt_logprobs"):
      for a, b in zip(getattr(host, name) or [], getattr(device, name) or []):
        np.testing.assert_allclose(a, b, atol=_ATOL)
    for r, q in zip(host.top_logprobs or [], device.top_logprobs or []):
      assert [[i for i, _ in x] for x in r] == [[i for i, _ in y] for y in q]
      np.testing.assert_allclose([[v for _, v in x] for x in r], [[v for _, v in y] for y in q],
                                 atol=_ATOL)
  assert sampling.stepwise_default("gpu")
  assert not sampling.stepwise_default("cpu") and not sampling.stepwise_default("tpu")


def test_auto_decode_loop_scans_on_cpu_and_unrolls_on_accelerators(global_model):
  _, cfg, _ = global_model
  assert cfg.decode_loop == "auto"
  assert not cfg.unrolls_decode("cpu")
  assert cfg.unrolls_decode("gpu") and cfg.unrolls_decode("tpu")
  assert cfg.replace(decode_loop="unroll").unrolls_decode("cpu")
  with pytest.raises(ValueError, match="decode_loop must be one of"):
    cfg.replace(decode_loop="unrolled")


# --- 6. bucketing -----------------------------------------------------------------------

def test_same_bucket_reuses_the_compiled_function(global_model):
  _, cfg, params = global_model
  sampling.generate(cfg, params, _prompts(), max_new_tokens=NEW, greedy=True)
  fn = sampling._compiled_sample(cfg, sampling.bucket(NEW), 0, 0, False, None)
  size, info = fn._cache_size(), sampling._compiled_sample.cache_info()
  # Other prompt lengths (<= 16), batch sizes (3..4) and new-token counts (17..32), one bucket.
  sampling.generate(cfg, params, _prompts(seed=5, lengths=(2, 16, 7, 11)), max_new_tokens=17,
                    temperature=0.9, top_k=7, top_p=0.9)
  sampling.generate(cfg, params, _prompts(seed=6, lengths=(1, 5, 15)), max_new_tokens=[32, 20, 3],
                    greedy=True)
  assert fn._cache_size() == size   # no new trace / compile of the jitted core
  after = sampling._compiled_sample.cache_info()
  assert after.misses == info.misses and after.hits == info.hits + 2
  assert [sampling.bucket(n) for n in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 64]


# --- 7. sharded ---------------------------------------------------------------------------

@pytest.mark.parametrize("stepwise", [False, True])
def test_sharded_generation_matches_unsharded(stepwise, global_model):
  _, cfg, params = global_model
  mesh = parallel.create_mesh((2, 2, 2))
  sharded = parallel.shard_tree(params, param_shardings(cfg, mesh))
  q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.shard_shape(q.shape) != q.shape
  prompts = _prompts()
  for kwargs in (dict(greedy=True), dict(temperature=1.0, seed=[1, 2, 3])):
    ref = sampling.generate(cfg, params, prompts, max_new_tokens=NEW, **kwargs)
    out = sampling.generate(cfg, sharded, prompts, max_new_tokens=NEW, mesh=mesh,
                            stepwise=stepwise, **kwargs)
    assert out.tokens == ref.tokens
    for a, b in zip(out.logprobs, ref.logprobs):
      np.testing.assert_allclose(a, b, atol=1e-4)


# --- 8. KV cache memory ----------------------------------------------------------------

def test_sliding_window_cache_holds_window_slots(window_model, global_model):
  _, cfg, params = window_model
  assert cache_slots(cfg, 48) == WINDOW and cache_slots(cfg, 4) == 4
  assert cache_slots(global_model[1], 48) == 48
  # The decode loop's carried cache: WINDOW slots, not P + N (k: [layers, batch, kv_heads,
  # head_dim, slots], v: [layers, batch, kv_heads, slots, head_dim]).
  B, P, N = 4, 16, 32
  sp = sampling.make_sampling_params(3, B, greedy=True, max_new_tokens=NEW)
  fn = functools.partial(sampling.sample, cfg, max_new_tokens=N)
  jaxpr = jax.make_jaxpr(fn)(params, np.zeros((B, P), np.int32), np.ones((B,), np.int32), sp)
  loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
  assert len(loops) == 1
  kv = [v.aval.shape for v in loops[0].outvars if v.aval.ndim == 5]
  L, K, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
  assert kv == [(L, B, K, hd, WINDOW), (L, B, K, WINDOW, hd)]


def test_greedy_token_is_argmax_with_first_index_on_ties():
  rng = np.random.RandomState(0)
  logits = rng.randn(6, 1001).astype(np.float32)
  logits[1, [7, 300, 999]] = 50.0          # three-way tie: the first index wins
  logits[2] = 0.0                          # all equal: index 0
  logits[3, -1] = 80.0                     # the last index
  logits[4, :] = -np.inf
  logits[4, 5] = -1.0                      # everything else impossible
  got = np.asarray(jax.jit(sampling.greedy_token)(logits))
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
  assert got.dtype == np.int32


# --- 9. errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[]], {}, "at least one token"),
    ([[5, 6], []], {}, "at least one token"),
    ([[5, 6]], dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ([[5, 6], [7]], dict(max_new_tokens=[3, -2]), "max_new_tokens must be >= 0"),
    ([[5, 6]], dict(temperature=0.0), "temperature must be > 0"),
    ([[5] * 120], dict(max_new_tokens=9), "max_position_embeddings=128"),
    ([[5, 6]], dict(top_p=0.0), "top_p"),
    ([[5, 6]], dict(top_k=-1), "top_k"),
    ([[5, 6]], dict(repetition_penalty=0.0), "repetition_penalty"),
    ([[5, 6], [7], [8]], dict(seed=[1, 2]), "2 seeds for 3 prompts"),
])
def test_bad_arguments_raise_clear_errors(prompts, kwargs, match, global_model):
  _, cfg, params = global_model
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    sampling.generate(cfg, params, prompts, **kwargs)


def test_empty_request_and_zero_new_tokens(global_model):
  _, cfg, params = global_model
  assert sampling.generate(cfg, params, [], max_new_tokens=4).tokens == []
  out = sampling.generate(cfg, params, _prompts(), max_new_tokens=[0, 17, 0], greedy=True)
  assert [len(t) for t in out.tokens] == [0, 17, 0]
  assert out.finish_reasons == ["length"] * 3
