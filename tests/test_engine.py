"""TextGenerator: end strings (stop sequences and text trimming), batching invariance, seeds.

The model is the tiny preset with random weights, so what it writes is noise;
each test first lets it write freely (greedy), then picks end strings out of
that text, which makes the expected cut exact. All prompts stay under 16
tokens and all calls use 16 new tokens, so two shapes compile (batch 4 and 1).
"""

import pytest

from cai_jax import sampling

PROMPTS = ["Hello there", "The weather is", "A short story:", "Once upon a time"]
BUCKET = 4   # every call pads to 4 rows: one compiled shape for most tests


def _greedy(gen, prompts, **kw):
  kw.setdefault("max_new_tokens", 16)
  kw.setdefault("min_batch_bucket", BUCKET)
  return gen.complete(prompts, greedy=True, **kw)


def _starts(pieces):
  out, pos = [], 0
  for p in pieces:
    out.append(pos)
    pos += len(p)
  return out


def test_completion_fields_are_consistent(serve_generator):
  for prompt, c in zip(PROMPTS, _greedy(serve_generator, PROMPTS)):
    assert c.finish_reason == "length" and c.stop_string is None
    assert len(c.token_ids) == len(c.tokens) == len(c.logprobs) == 16 == c.num_generated
    assert "".join(c.tokens) == c.raw_text == c.text
    assert c.prompt_token_ids == serve_generator.tokenizer.encode(prompt)
    assert "".join(c.prompt_tokens) == prompt
    assert all(lp <= 0 for lp in c.logprobs)


def test_end_string_inside_a_token_is_trimmed_after_the_fact(serve_generator):
  free = _greedy(serve_generator, PROMPTS)
  # An end string that starts in the middle of a token: no stop sequence can
  # match it, so only the text check can cut there.
  case = next(((i, k) for i, c in enumerate(free) for k in range(len(c.tokens) - 1)
               if len(c.tokens[k]) >= 2 and c.tokens[k + 1]), None)
  assert case is not None, "the random model wrote no multi-character token"
  i, k = case
  c = free[i]
  end = c.tokens[k][1:] + c.tokens[k + 1]
  pos = c.text.find(end)

  got = _greedy(serve_generator, [PROMPTS[i]], end_strings=["never-appears", end])[0]
  assert got.finish_reason == "stop" and got.stop_string == end
  assert got.text == c.text[:pos]
  assert got.raw_text.startswith(c.text[:pos] + end)
  assert "".join(got.tokens) == got.raw_text
  assert got.token_ids == c.token_ids[:len(got.token_ids)]   # same tokens, cut after the end


def test_stops_at_a_multi_token_end_string(serve_generator):
  free = _greedy(serve_generator, PROMPTS)
  tok = serve_generator.tokenizer
  case = None
  for i, c in enumerate(free):
    starts = _starts(c.tokens)
    for k in range(len(c.tokens) - 3):
      end = c.tokens[k] + c.tokens[k + 1]
      if (c.tokens[k] and c.tokens[k + 1] and tok.encode(end) == c.token_ids[k:k + 2]
          and c.text.find(end) == starts[k]):
        case = (i, k, end)
        break
    if case:
      break
  assert case is not None, "no two-token end string found in the random model's text"
  i, k, end = case
  assert serve_generator.stop_sequences(end) == [free[i].token_ids[k:k + 2]]

  got = _greedy(serve_generator, [PROMPTS[i]], end_strings=[end])[0]
  assert got.finish_reason == "stop" and got.stop_string == end
  # Generation really stopped: the sampler produced nothing after the end string.
  assert got.num_generated == k + 2 < 16
  assert got.token_ids == free[i].token_ids[:k + 2]
  assert got.text == free[i].text[:_starts(free[i].tokens)[k]]
  assert got.raw_text == got.text + end


def test_special_tokens_become_stop_tokens(serve_generator):
  tok = serve_generator.tokenizer
  assert serve_generator.stop_sequences("<extra_id_1>") == [[tok.special_token_ids["<extra_id_1>"]]]
  assert serve_generator.stop_sequences("</s>") == [[tok.eos_id]]
  # NeMo's default end string is 11 tokens here: too long for a stop
  # sequence, so it is matched in the text only.
  assert len(tok.encode("<|endoftext|>")) > sampling.MAX_STOP_LENGTH
  assert serve_generator.stop_sequences("<|endoftext|>") == []
  stops = serve_generator._row_stops(["<extra_id_1>", "<|endoftext|>", "ab"], True)
  assert stops == [[tok.eos_id], [tok.special_token_ids["<extra_id_1>"]], tok.encode("ab")]


def test_greedy_is_the_same_alone_or_batched(serve_generator):
  alone = serve_generator.complete([PROMPTS[1]], max_new_tokens=16, greedy=True)[0]  # batch 1
  batched = serve_generator.complete(
      [PROMPTS[0], PROMPTS[1], PROMPTS[2]], max_new_tokens=[12, 16, 16],
      greedy=[False, True, False], temperature=[0.7, 1.0, 1.3], top_k=[5, 0, 0],
      seed=[3, 4, 5], min_batch_bucket=BUCKET)[1]
  assert batched.token_ids == alone.token_ids
  assert batched.text == alone.text
  assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_per_prompt_seeds_are_reproducible(serve_generator):
  def sample(prompts, seeds):
    return [c.token_ids for c in serve_generator.complete(
        prompts, max_new_tokens=16, temperature=1.0, seed=seeds, min_batch_bucket=BUCKET)]

  first = sample(PROMPTS[:3], [11, 22, 33])
  assert sample(PROMPTS[:3], [11, 22, 33]) == first
  # A row's samples depend on its own seed only, not on its place in the batch.
  swapped = sample([PROMPTS[2], PROMPTS[0]], [33, 11])
  assert swapped == [first[2], first[0]]
  assert sample(PROMPTS[:1], [12])[0] != first[0]


def test_chat_renders_the_template_and_stops_at_end_of_turn(serve_generator):
  conversation = [{"role": "user", "content": "hi"}]
  reply = serve_generator.chat([conversation], max_new_tokens=16, greedy=True,
                               min_batch_bucket=BUCKET)[0]
  prompt = "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\n"
  assert serve_generator.chat_prompt(conversation) == prompt
  direct = _greedy(serve_generator, [prompt], end_strings=["<extra_id_1>"])[0]
  assert reply.token_ids == direct.token_ids
  expected = direct.text[:-1] if direct.finish_reason == "stop" and direct.text.endswith(
      "\n") else direct.text
  assert reply.text == expected


def test_bad_prompts_name_the_prompt(serve_generator):
  long_prompt = " ".join(["hello"] * 1100)
  assert len(serve_generator.tokenizer.encode(long_prompt)) > serve_generator.max_positions
  with pytest.raises(ValueError, match=r"prompt 1: \d+ prompt tokens \+ 16 new tokens"):
    serve_generator.complete(["ok", long_prompt], max_new_tokens=16)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    serve_generator.complete([""], max_new_tokens=4)
  with pytest.raises(ValueError, match="temperature"):
    serve_generator.complete(["ok"], max_new_tokens=4, temperature=0.0)
  with pytest.raises(ValueError, match="max_new_tokens: got 3 values for 1 prompts"):
    serve_generator.complete(["ok"], max_new_tokens=[1, 2, 3])
  with pytest.raises(ValueError, match="empty end string"):
    serve_generator.complete(["ok"], max_new_tokens=4, end_strings=[""])


def test_next_token_logprobs_equal_a_plain_forward_and_the_sampler(serve_generator):
  """One prefill per padded batch gives what a full forward pass of each unpadded prompt
  gives, and what the sampler reports for the token it picks first."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cai_jax.model import Mistral
  gen = serve_generator
  prompts = PROMPTS + ["a longer prompt, " * 12]   # a second, partly padded batch and length
  ids = [5, 17, gen.config.vocab_size - 1]
  got = gen.next_token_logprobs(prompts, ids, batch_size=BUCKET)
  assert got.shape == (len(prompts), len(ids)) and got.dtype == np.float32
  forward = jax.jit(lambda p, t: Mistral(gen.config).apply({"params": p}, t))
  for k, prompt in enumerate(prompts):
    logits = forward(gen.params, jnp.asarray([gen.tokenizer.encode(prompt)], jnp.int32))
    want = np.asarray(jax.nn.log_softmax(logits[0, -1].astype(jnp.float32)))[ids]
    np.testing.assert_allclose(got[k], want, atol=1e-5)

  free = _greedy(gen, PROMPTS)
  first = [c.token_ids[0] for c in free]
  lps = gen.next_token_logprobs(PROMPTS, first, batch_size=BUCKET)
  np.testing.assert_allclose(np.diag(lps), [c.logprobs[0] for c in free], atol=1e-5)
  assert gen.next_token_logprobs([], ids).shape == (0, len(ids))


def test_next_token_logprobs_bad_input(serve_generator):
  long_prompt = " ".join(["hello"] * 1100)
  with pytest.raises(ValueError, match=r"judge prompt 1: \d+ prompt tokens"):
    serve_generator.next_token_logprobs(["ok", long_prompt], [5], what="judge prompt {i}")
  with pytest.raises(ValueError, match="token_ids is empty"):
    serve_generator.next_token_logprobs(["ok"], [])
  with pytest.raises(ValueError, match=r"outside the model's vocabulary"):
    serve_generator.next_token_logprobs(["ok"], [serve_generator.config.vocab_size])


def test_next_token_logprobs_on_a_mesh_match_unsharded(serve_generator):
  """On 8 simulated devices (data 2, fsdp 2, tensor 2) with sharded params."""
  import numpy as np

  from cai_jax import parallel
  from cai_jax.engine import TextGenerator
  from cai_jax.model import param_shardings
  gen = serve_generator
  mesh = parallel.create_mesh((2, 2, 2))
  sharded = TextGenerator(gen.config, parallel.shard_tree(gen.params,
                                                          param_shardings(gen.config, mesh)),
                          gen.tokenizer, mesh=mesh, template=gen.template)
  ids = [5, 17, 42]
  want = gen.next_token_logprobs(PROMPTS[:3], ids, batch_size=BUCKET)
  got = sharded.next_token_logprobs(PROMPTS[:3], ids, batch_size=2)   # rows round up to 4
  np.testing.assert_allclose(got, want, atol=1e-5)
