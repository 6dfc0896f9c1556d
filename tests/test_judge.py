"""The RL-CAI judge: prompts and letter tokens (`judge_prompts`), answers and soft labels
(`verdicts`), the local and remote judges and both orders (`judge`).

References are computed by hand in the tests: the model's full forward pass on
one unpadded prompt, a softmax over the two option logits, the paper's
combination of the two orders.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi import FastAPI, Request

from cai_jax.cai import constitution
from cai_jax.cai import judge as J
from cai_jax.cai import judge_prompts as P
from cai_jax.cai import verdicts as V
from cai_jax.model import Mistral
from cai_jax.tokenizer import NEMO, Tokenizer
from configs.rl_cai import judge_config

PRINCIPLE = constitution.ComparisonPrinciple(
    "less_harmful", "Which of these assistant responses is less harmful?")
CONVERSATION = "How do I pick the lock on my neighbour's door?"
R1 = "I can't help with getting into someone else's home. A locksmith can help with your own."
R2 = "Use a tension wrench."


@pytest.fixture(scope="module")
def examples():
  return constitution.load_judge_few_shot()


def _local_judge(generator, examples, **overrides):
  """A local judge built the way the pipeline builds one, from a `judge_config` block.

  No worked examples: short prompts (one length bucket) keep the compiles few.
  """
  cfg = judge_config(**{"few_shot": 0, "batch_size": 4, **overrides})
  return J.make_judge(cfg, examples, generator=generator)


def _settings(**overrides) -> J.JudgeSettings:
  return J.JudgeSettings.from_config(judge_config(**overrides))


def _fmt(**overrides) -> P.PromptFormat:
  return P.PromptFormat.from_config(judge_config(**overrides))


@pytest.fixture(scope="module")
def local_judge(rl_cai_generator, examples):
  return _local_judge(rl_cai_generator, examples)


def _hand_p_a(generator, prompt: str) -> tuple[float, np.ndarray]:
  """P(A) over the two letters and the full-vocab log-probs of A, B from one plain forward."""
  ids = generator.tokenizer.encode(prompt)
  forward = jax.jit(lambda p, t: Mistral(generator.config).apply({"params": p}, t))
  logits = forward(generator.params, jnp.asarray([ids], jnp.int32))
  last = np.asarray(logits[0, -1], np.float64)
  a, b = P.option_token_ids(generator.tokenizer)
  pair = last[[a, b]]
  p_a = math.exp(pair[0]) / (math.exp(pair[0]) + math.exp(pair[1]))
  lse = np.log(np.exp(last - last.max()).sum()) + last.max()
  return p_a, pair - lse


# ----------------------------------------------------------------------------
# Prompt format.


def test_prompt_is_the_papers_multiple_choice_question(examples):
  q = P.Question(CONVERSATION, PRINCIPLE.question, R1, R2)
  fmt = P.PromptFormat(template=NEMO, chat=True, few_shot=1, system="")
  assert _fmt(few_shot=1) == fmt
  prompt = P.judge_prompt(q, examples, fmt)
  ex = examples[0]
  assert prompt == (
      "<extra_id_0>System\n\n"
      "<extra_id_1>User\n"
      "Consider the following conversation between a human and an assistant:\n"
      f"Human: {ex.conversation}\n\n{ex.question}\nOptions:\n(A) {ex.option_a}\n"
      f"(B) {ex.option_b}\n"
      "<extra_id_1>Assistant\n"
      f"The answer is: ({ex.answer})\n"
      "<extra_id_1>User\n"
      "Consider the following conversation between a human and an assistant:\n"
      f"Human: {CONVERSATION}\n\n{PRINCIPLE.question}\nOptions:\n(A) {R1}\n(B) {R2}\n"
      "<extra_id_1>Assistant\n"
      "The answer is: (")
  raw = P.judge_prompt(q, examples, _fmt(chat=False, few_shot=0))
  assert raw == ("Consider the following conversation between a human and an assistant:\n"
                 f"Human: {CONVERSATION}\n\n{PRINCIPLE.question}\nOptions:\n(A) {R1}\n(B) {R2}\n"
                 "The answer is: (")
  cot = P.judge_prompt(q, examples, _fmt(chat=False, few_shot=0), cot=True)
  assert cot.endswith(f"(B) {R2}\nLet's think step by step:")
  messages = P.chat_messages(q, examples, _fmt(few_shot=2))
  assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
  assert messages[1]["content"] == f"The answer is: ({examples[0].answer})"
  assert messages[-1]["content"].endswith(P.CHAT_ANSWER_INSTRUCTION)


@pytest.mark.parametrize("text,expected", [
    ("(A)", "A"), ("A)", "A"), ("A", "A"), ("B.", "B"), ("B\n\nHuman: hi", "B"),
    ("Answer: B", "B"), ("The answer is: (B) because it refuses.", "B"),
    ("the answer is A", "A"), ("Reasoning... The answer is (A). Wait, the answer is (B)", "B"),
    ("I prefer (B) here", "B"),
    ("", None), ("   ", None), ("I like turtles", None), ("A good answer would be kind", None),
    ("Both (A) and (B) are fine", None), ("And then", None), ("(A is better", None),
    ("C", None), ("The answer is: (C)", None), (None, None),
])
def test_parse_answer_is_strict(text, expected):
  assert V.parse_answer(text) == expected


def test_clamp_and_combination():
  assert V.clamp_probability(0.9) == 0.6
  assert V.clamp_probability(0.05) == 0.4
  assert V.clamp_probability(0.55) == 0.55
  assert V.clamp_probability(0.9, (0.2, 0.8)) == 0.8
  assert V.combine_orders(0.8, 0.3) == pytest.approx(0.75)
  assert V.combine_orders(0.3, 0.8) == pytest.approx(0.25)
  assert V.soft_label_from_top([("A", math.log(0.6)), (" B", math.log(0.2)),
                                ("x", math.log(0.1))]) == pytest.approx(0.75)
  assert V.soft_label_from_top([("A", math.log(0.6)), ("x", math.log(0.3))]) is None


# ----------------------------------------------------------------------------
# Letter tokens.


def test_letters_are_single_tokens_after_paren(tokenizer):
  for letter in "AB":
    token_id, single = P.letter_token_id(tokenizer, letter)
    assert single
    assert tokenizer.id_to_token(token_id) == letter
    assert tokenizer.encode("(" + letter) == tokenizer.encode("(") + [token_id]
  a, b = P.option_token_ids(tokenizer)
  assert a != b


def test_letters_with_a_dummy_prefix_sentencepiece(tmp_path):
  """Mistral-style tokenizers encode a bare "A" as "▁A": the answer token is the one after "("."""
  import sentencepiece as spm
  corpus = (tmp_path / "corpus.txt")
  lines = [f"The answer is: ({x}) and option {x} here" for x in "AB"] * 50
  lines += ["A cat sat. B is for ball. (A) (B) A B", "Consider the following conversation"] * 50
  corpus.write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "dummy"), vocab_size=400,
      model_type="bpe", add_dummy_prefix=True, byte_fallback=True, character_coverage=1.0,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
  tok = Tokenizer.from_file(str(tmp_path / "dummy.model"))
  assert tok.decode_tokens_to_pieces(tok.encode("A"))[0] == " A"   # the dummy prefix at work
  for letter in "AB":
    token_id, single = P.letter_token_id(tok, letter)
    assert single and tok.id_to_token(token_id) == letter
    assert tok.encode("The answer is: (" + letter) == tok.encode("The answer is: (") + [token_id]


# ----------------------------------------------------------------------------
# In-process judge.


def test_local_judge_probabilities_equal_hand_computation(local_judge, rl_cai_generator,
                                                          examples):
  questions = [J.Question(CONVERSATION, PRINCIPLE.question, R1, R2),
               J.Question("hi", PRINCIPLE.question, "Hello! How can I help?", "go away"),
               J.Question([{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"},
                           {"from": "User", "value": "c " * 20}], PRINCIPLE.question, "x", "y")]
  prompts = [local_judge.prompt(q) for q in questions]
  lengths = [len(rl_cai_generator.tokenizer.encode(p)) for p in prompts]
  assert len(set(lengths)) == 3 and max(lengths) > 128   # real padding, past the sliding window
  pairs_judge = _local_judge(rl_cai_generator, examples, batch_size=2)   # a second batch,
  lps, p_a = pairs_judge.option_logprobs(prompts)                         # partly padded
  verdicts = pairs_judge.verdicts(questions)
  for k, prompt in enumerate(prompts):
    want_p, want_lps = _hand_p_a(rl_cai_generator, prompt)
    assert p_a[k] == pytest.approx(want_p, abs=1e-5)
    np.testing.assert_allclose(lps[k], want_lps, atol=1e-4)
    assert verdicts[k].p_a == pytest.approx(want_p, abs=1e-5)
    assert verdicts[k].soft and verdicts[k].answer == ("A" if want_p > 0.5 else "B")
  # The scaled random model has opinions: the check above is not 0.5 == 0.5.
  assert max(abs(p - 0.5) for p in p_a) > 0.05


def test_both_orders_combine_symmetrically(local_judge):
  forward = J.judge_pair(local_judge, CONVERSATION, R1, R2, PRINCIPLE)
  backward = J.judge_pair(local_judge, CONVERSATION, R2, R1, PRINCIPLE)
  assert forward["principle"] == PRINCIPLE.name
  first, second = forward["orders"]
  assert (first["a"], second["a"]) == ("r1", "r2")
  assert forward["p_r1"] == pytest.approx((first["p_a"] + (1 - second["p_a"])) / 2)
  assert forward["p_r1"] == pytest.approx(1.0 - backward["p_r1"], abs=1e-9)
  assert forward["position_bias"] == backward["position_bias"]
  assert forward["position_bias"] == ((first["p_a"] > 0.5) != (second["p_a"] < 0.5))
  assert forward["dropped"] is None
  # Soft labels are never "unparseable", and disagreement is kept (p near 0.5), not dropped.
  assert forward["verdict"] == ("r1" if forward["p_r1"] > 0.5 else "r2")


def test_questions_too_long_for_the_judge_are_dropped_not_truncated(local_judge):
  huge = "word " * 1200                   # more tokens than the tiny model's 1024 positions
  fine, too_long = J.judge_pairs(local_judge, [J.PairQuery(CONVERSATION, R1, R2, PRINCIPLE),
                                               J.PairQuery(CONVERSATION, R1, huge, PRINCIPLE)])
  assert fine == J.judge_pair(local_judge, CONVERSATION, R1, R2, PRINCIPLE)
  assert too_long["dropped"] == "too_long" and too_long["p_r1"] is None
  assert [o["error"] for o in too_long["orders"]] == ["too_long", "too_long"]


def test_chain_of_thought_is_clamped(rl_cai_generator, examples):
  judge = _local_judge(rl_cai_generator, examples, cot=True, cot_max_tokens=6)
  questions = [J.Question(CONVERSATION, PRINCIPLE.question, R1, R2),
               J.Question("hi", PRINCIPLE.question, "Hello! How can I help?", "go away")]
  verdicts = judge.verdicts(questions)
  unclamped = []
  for q, v in zip(questions, verdicts):
    assert 0.4 <= v.p_a <= 0.6
    prompt = judge.prompt(q, v.reasoning)
    assert prompt.startswith(P.judge_prompt(q, examples, judge.fmt, cot=True))
    assert prompt.endswith("\nThe answer is: (")
    want, _ = _hand_p_a(rl_cai_generator, prompt)
    unclamped.append(want)
    assert v.p_a == pytest.approx(V.clamp_probability(want), abs=1e-5)
  assert any(not 0.4 <= p <= 0.6 for p in unclamped)   # the clamp did something


# ----------------------------------------------------------------------------
# Remote judges.


def _scripted_judge_app():
  """An OpenAI-compatible judge with canned answers, chosen by the options it is shown.

  Responses containing GOOD win; the answer's shape depends on a tag in the
  options: PAREN "(A)", BARE "B", STATED "The answer is: (A)", SOFT with
  logprobs 0.8/0.2, BIASED always "(A)", GARBAGE text without an answer.
  """
  import re
  app = FastAPI()
  seen = []

  def answer(text: str):
    a = re.findall(r"\(A\) (.*)", text)[-1]
    b = re.findall(r"\(B\) (.*)", text)[-1]
    both = a + b
    letter = "A" if "GOOD" in a else "B"
    if "BIASED" in both:
      return "(A)", None
    if "GARBAGE" in both:
      return "I like turtles", None
    if "SOFT" in both:
      other = "B" if letter == "A" else "A"
      return f"({letter})", {letter: math.log(0.8), other: math.log(0.2)}
    if "BARE" in both:
      return letter, None
    if "STATED" in both:
      return f"The answer is: ({letter}). It is kinder.", None
    return f"({letter})", None

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    body = await request.json()
    seen.append(body)
    text, top = answer(body["messages"][-1]["content"])
    logprobs = None
    if top is not None and body.get("logprobs"):
      tokens = ["(", text[1], ")"]
      content = [{"token": t, "logprob": 0.0, "top_logprobs": []} for t in tokens]
      content[1] = {"token": text[1], "logprob": top[text[1]],
                    "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()]}
      logprobs = {"content": content}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": "stop"}]}

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await request.json()
    seen.append(body)
    text, top = answer(body["prompt"])
    # The prompt ends with "(": continue after it.
    text = text[1:] if text.startswith("(") else text
    logprobs = None
    if top is not None and body.get("logprobs"):
      logprobs = {"tokens": [text[0], ")"], "token_logprobs": [top[text[0]], 0.0],
                  "top_logprobs": [top, {")": 0.0}], "text_offset": [0, 1]}
    return {"choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": "stop"}]}

  app.state.seen = seen
  return app


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_scripted_remote_judge(api, examples, rl_cai_serve):
  from cai_jax.serve.client import OpenAIClient
  app = _scripted_judge_app()
  cases = {
      "paren": ("GOOD PAREN reply", "bad PAREN reply"),
      "bare": ("bad BARE reply", "GOOD BARE reply"),
      "stated": ("GOOD STATED reply", "bad STATED reply"),
      "soft": ("bad SOFT reply", "GOOD SOFT reply"),
      "biased": ("GOOD BIASED reply", "bad BIASED reply"),
      "garbage": ("GOOD GARBAGE reply", "bad GARBAGE reply"),
  }
  with rl_cai_serve(app) as url:
    client = OpenAIClient(url + "/v1", api_key="", model="scripted", retries=0)
    judge = J.RemoteJudge(client, examples, _fmt(few_shot=1), _settings(api=api, concurrency=4))
    queries = [J.PairQuery(CONVERSATION, r1, r2, PRINCIPLE) for r1, r2 in cases.values()]
    records = dict(zip(cases, J.judge_pairs(judge, queries)))
  assert len(app.state.seen) == 2 * len(cases)
  for name in ("paren", "bare", "stated"):
    r = records[name]
    good_is_r1 = "GOOD" in cases[name][0]
    assert r["dropped"] is None and r["position_bias"] is False
    assert r["p_r1"] == (1.0 if good_is_r1 else 0.0)
    assert r["verdict"] == ("r1" if good_is_r1 else "r2")
    assert not any(o["soft"] for o in r["orders"])
  soft = records["soft"]
  assert soft["dropped"] is None and soft["verdict"] == "r2"
  assert all(o["soft"] for o in soft["orders"])
  assert soft["p_r1"] == pytest.approx(0.2)
  biased = records["biased"]
  assert biased["dropped"] == "contradictory" and biased["position_bias"] is True
  assert biased["p_r1"] is None and biased["verdict"] is None
  garbage = records["garbage"]
  assert garbage["dropped"] == "unparseable" and garbage["p_r1"] is None
  assert [o["answer"] for o in garbage["orders"]] == [None, None]
  assert garbage["orders"][0]["text"] == "I like turtles"


def test_remote_judge_against_our_server(rl_cai_generator, examples, rl_cai_serve):
  """Plumbing against the real server: a random model's text is parsed or counted, never guessed."""
  from cai_jax.serve.client import OpenAIClient
  from cai_jax.serve.server import create_app
  app = create_app(rl_cai_generator, max_batch_rows=8, min_batch_rows=8, model_name="tiny")
  queries = [J.PairQuery(CONVERSATION, R1, R2, PRINCIPLE),
             J.PairQuery("hi", "Hello! How can I help?", "go away", PRINCIPLE)]
  with rl_cai_serve(app) as url:
    client = OpenAIClient(url, api_key="", model="tiny", retries=0)
    results = {}
    for api in ("completions", "chat"):
      judge = J.RemoteJudge(client, examples, _fmt(few_shot=0),
                            _settings(api=api, max_tokens=4, concurrency=4))
      results[api] = J.judge_pairs(judge, queries)
    # Greedy and seeded: nothing random in the verdicts.
    assert J.judge_pairs(judge, queries) == results["chat"]
  for api, records in results.items():
    for r in records:
      for order in r["orders"]:
        shown = ("(" if api == "completions" else "") + order["text"]
        assert order["answer"] == V.parse_answer(shown)
        assert (order["p_a"] is None) == (order["answer"] is None)
      if any(o["answer"] is None for o in r["orders"]):
        assert r["dropped"] == "unparseable" and r["p_r1"] is None
      else:
        assert r["dropped"] in (None, "contradictory")


def test_judge_config_errors(monkeypatch, examples):
  cfg = judge_config(kind="openai", url="http://127.0.0.1:9/v1",
                     api_key_env="CAI_JAX_TEST_MISSING_KEY")
  monkeypatch.delenv("CAI_JAX_TEST_MISSING_KEY", raising=False)
  with pytest.raises(ValueError, match="CAI_JAX_TEST_MISSING_KEY"):
    J.make_judge(cfg, examples)
  with pytest.raises(ValueError, match="judge.kind"):
    J.make_judge(judge_config(kind="psychic"), examples)
  with pytest.raises(ValueError, match="api"):
    J.RemoteJudge(object(), examples, _fmt(), _settings(api="telepathy"))


def test_a_judge_block_without_a_field_is_an_error_not_a_default(examples):
  """The defaults live in configs/rl_cai.py `judge_config` only: a block that lacks a field
  names it instead of falling back to a value written somewhere else."""
  import ml_collections
  cfg = judge_config(kind="openai", url="http://127.0.0.1:9/v1").to_dict()
  del cfg["timeout"], cfg["cot_max_tokens"]
  missing = r"judge: missing field\(s\) cot_max_tokens, timeout;.*judge_config"
  with pytest.raises(ValueError, match=missing):
    J.make_judge(ml_collections.ConfigDict(cfg), examples)
  cfg = judge_config().to_dict()
  del cfg["few_shot"]
  with pytest.raises(ValueError, match=r"missing field\(s\) few_shot"):
    J.make_judge(ml_collections.ConfigDict(cfg), examples, generator=object())
  # Every preset that builds a judge block builds a complete one.
  from configs import pipeline as pipeline_config
  from configs import rl_cai as rl_cai_config
  blocks = [rl_cai_config.get_config(p).judge for p in ("tiny", "mistral_7b")]
  blocks += [pipeline_config.get_config(p).evaluate.judge for p in ("tiny", "mistral_7b")]
  for block in blocks:
    settings = J.JudgeSettings.from_config(block)
    assert settings.clamp == (block.clamp_low, block.clamp_high)
    assert P.PromptFormat.from_config(block).few_shot == block.few_shot


def test_a_backend_block_without_a_field_is_an_error_not_a_default():
  """`make_backend` (whose LocalBackend also loads a judge's model) reads its fields the same
  way: the defaults live in configs/common.py `backend_config` only."""
  import ml_collections

  from cai_jax.cai.backends import make_backend
  from configs.common import backend_config
  cfg = backend_config(kind="nemo", url="http://127.0.0.1:9").to_dict()
  del cfg["backoff"]
  with pytest.raises(ValueError, match=r"backend: missing field\(s\) backoff;.*backend_config"):
    make_backend(ml_collections.ConfigDict(cfg))
  with pytest.raises(ValueError, match="backend.kind"):
    make_backend(backend_config(kind="telepathy"))
  backend = make_backend(backend_config(kind="openai", url="http://127.0.0.1:9/v1", timeout=5.0,
                                        concurrency=2))
  assert backend.concurrency == 2 and backend.name == "openai:http://127.0.0.1:9/v1"
