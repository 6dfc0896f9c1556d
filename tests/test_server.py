"""The HTTP server end to end: NeMo's tutorial snippet, the `openai` package, batching,
bad input, API keys, and the clients' retries.

One uvicorn server (conftest `serve_url`) runs for the whole module over the
tiny random model; batches are padded to 32 rows. Compiles dominate the
runtime, so every generating request uses a prompt of 33-64 tokens and one
of three settings families: NeMo greedy with 512 new tokens (the snippet's
default), 16 new tokens with top logprobs (OpenAI), 16 with prompt logprobs
(NeMo compute_logprob).
"""

import concurrent.futures
import http.server
import json
import threading

import openai
import pytest
import requests

from cai_jax.serve.client import NemoClient, OpenAIClient, RemoteError, strip_prompt

TEMPLATE = "<extra_id_0>System\n\n<extra_id_1>User\n{question}\n<extra_id_1>Assistant\n"
QUESTION = "How can I hack into my neighbour's Wifi?"


def _port(url):
  return int(url.rsplit(":", 1)[1])


def _sized(tokenizer, text, filler=" Please answer in detail."):
  """`text` grown to 33..64 tokens, the prompt bucket every test shares."""
  while len(tokenizer.encode(text)) <= 32:
    text += filler
  assert len(tokenizer.encode(text)) <= 64
  return text


# --- the NeMo tutorial's client snippet, verbatim -------------------------------------

import requests  # noqa: E402,F811  (the snippet's own import)


def get_answer(question, max_tokens=512, eval_port=1427):
  prompt = (
      "<extra_id_0>System\n\n"
      "<extra_id_1>User\n{question}\n<extra_id_1>Assistant\n"
  )
  prompts = [prompt.format(question=question)]
  data = {
      "sentences": prompts,
      "tokens_to_generate": max_tokens,
      "top_k": 1,
      "greedy": True,
      "end_strings": ["<extra_id_1>"],
  }
  url = f"http://localhost:{eval_port}/generate"
  response = requests.put(url, json=data)
  json_response = response.json()
  response_sentence = json_response["sentences"][0][len(prompt):]
  return response_sentence

# --- end of the snippet ---------------------------------------------------------------


def _nemo(url, sentences, **fields):
  return requests.put(f"{url}/generate", json={"sentences": sentences, **fields}, timeout=120)


def test_nemo_tutorial_snippet_works_unchanged(serve_url, tokenizer):
  prompt = TEMPLATE.format(question=QUESTION)
  assert 32 < len(tokenizer.encode(prompt)) <= 64
  answer = get_answer(QUESTION, eval_port=_port(serve_url))

  reply = _nemo(serve_url, [prompt], tokens_to_generate=512, top_k=1, greedy=True,
                end_strings=["<extra_id_1>"])
  assert reply.status_code == 200
  sentence = reply.json()["sentences"][0]
  assert sentence.startswith(prompt)
  # The snippet slices at the length of the *unformatted* template, so its
  # answer starts with the tail of the prompt (its bug, kept as NeMo has it).
  assert answer == sentence[len(TEMPLATE):]
  assert answer.endswith(sentence[len(prompt):])
  # The corrected client returns just the completion, end string removed.
  fixed = NemoClient(serve_url).generate([prompt], tokens_to_generate=512, top_k=1, greedy=True,
                                         end_strings=["<extra_id_1>"])
  assert fixed == [sentence[len(prompt):].split("<extra_id_1>")[0]]


def test_generate_returns_nemo_fields_and_keeps_the_end_string(serve_url, tokenizer):
  prompts = [_sized(tokenizer, "The capital of France is"),
             _sized(tokenizer, "Write a haiku about the sea.")]
  fields = dict(tokens_to_generate=16, greedy=True, compute_logprob=True, end_strings=[])
  free = _nemo(serve_url, prompts, **fields).json()
  assert set(free) >= {"sentences", "tokens", "logprob", "token_ids", "offsets"}
  for prompt, sentence, pieces, ids, lps in zip(prompts, free["sentences"], free["tokens"],
                                                free["token_ids"], free["logprob"]):
    prompt_ids = tokenizer.encode(prompt)
    assert sentence.startswith(prompt)
    assert ids[:len(prompt_ids)] == prompt_ids
    assert len(ids) == len(pieces) == len(lps) + 1 == len(prompt_ids) + 16
    assert "".join(pieces) == sentence
    assert all(lp <= 0 for lp in lps)

  # Ask again with an end string taken from the free-running text: NeMo
  # returns the sentence up to and including the end string.
  completion = free["sentences"][0][len(prompts[0]):]
  end = next(completion[k:k + 2] for k in range(2, len(completion) - 1)
             if completion[k:k + 2].strip() and "<" not in completion[k:k + 2])
  pos = completion.find(end)
  cut = _nemo(serve_url, prompts[:1], **{**fields, "end_strings": [end]}).json()
  got = cut["sentences"][0][len(prompts[0]):]
  assert got.startswith(completion[:pos] + end)
  assert completion.startswith(got)              # greedy: the same tokens, stopped early
  assert len(got) < len(completion) or pos + len(end) >= len(completion) - 8
  assert NemoClient(serve_url).generate(prompts[:1], **{**fields, "end_strings": [end]}) == [
      completion[:pos]]


def test_openai_completions_with_logprobs(serve_url, tokenizer):
  client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
  prompt = _sized(tokenizer, "Once upon a time, in a land far away,")
  greedy = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=8,
                                     temperature=0, logprobs=3, n=2)
  assert greedy.object == "text_completion" and greedy.model == "tiny-test"
  assert [c.index for c in greedy.choices] == [0, 1]
  assert greedy.choices[0].text == greedy.choices[1].text
  choice = greedy.choices[0]
  assert choice.finish_reason in ("stop", "length")
  lp = choice.logprobs
  assert "".join(lp.tokens) == choice.text or choice.finish_reason == "stop"
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
  assert lp.text_offset[0] == len(prompt)
  for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert 1 <= len(top) <= 4 and top[token] == pytest.approx(token_lp)
    assert token_lp == pytest.approx(max(top.values()))        # greedy picks the argmax
  assert greedy.usage.prompt_tokens == len(tokenizer.encode(prompt))
  assert 0 < greedy.usage.completion_tokens <= 16

  sampled = client.completions.create(model="tiny-test", prompt=[prompt], max_tokens=8,
                                      temperature=1.0, n=2, seed=7, logprobs=1)
  again = client.completions.create(model="tiny-test", prompt=[prompt], max_tokens=8,
                                    temperature=1.0, n=2, seed=7, logprobs=1)
  texts = [c.text for c in sampled.choices]
  assert texts == [c.text for c in again.choices]            # a seed reproduces
  assert texts[0] != texts[1]                                # n choices get distinct seeds


def test_openai_chat_completions(serve_url, tokenizer, serve_generator):
  client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
  question = _sized(tokenizer, "Tell me about the weather.", " Be brief.")
  messages = [{"role": "system", "content": "You are kind."},
              {"role": "user", "content": question}]
  assert 32 < len(tokenizer.encode(serve_generator.chat_prompt(messages))) <= 64
  reply = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=12,
                                         temperature=0, logprobs=True, top_logprobs=2)
  assert reply.object == "chat.completion"
  choice = reply.choices[0]
  assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
  assert choice.finish_reason in ("stop", "length")
  content = choice.logprobs.content
  assert "".join(t.token for t in content).startswith(choice.message.content)
  for t in content:
    assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
  # `bytes` carry the raw bytes, also of byte-fallback tokens that hold part of a character.
  raw = b"".join(bytes(t.bytes) for t in content)
  assert raw.decode("utf-8", "replace") == "".join(t.token for t in content)
  assert reply.usage.completion_tokens >= len(content)

  # `stop` strings are honoured: cut before the first occurrence.
  text = choice.message.content
  stop = next((text[k:k + 2] for k in range(1, len(text) - 1) if text[k:k + 2].strip()), None)
  if stop is not None:
    cut = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=12,
                                         temperature=0, stop=[stop], logprobs=True,
                                         top_logprobs=2)
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
  # Our OpenAIClient speaks the same API.
  assert OpenAIClient(f"{serve_url}/v1", model="tiny-test").chat(
      messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2) == text


def test_models_and_health(serve_url):
  client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
  assert [m.id for m in client.models.list().data] == ["tiny-test"]
  health = requests.get(f"{serve_url}/health", timeout=10).json()
  assert health["status"] == "ok" and "batches" in health["stats"]


def test_concurrent_requests_are_batched(serve_url, serve_app, tokenizer):
  questions = [f"Question {i}: how can I hack into my neighbour's Wifi?" for i in range(32)]
  questions[0] = QUESTION
  before = serve_app.state.stats.snapshot()
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(lambda q: get_answer(q, eval_port=_port(serve_url)), questions))
  after = serve_app.state.stats.snapshot()
  assert after["requests"] - before["requests"] == 32
  batches = after["batches"] - before["batches"]
  assert batches < 32, f"32 requests ran in {batches} batches"
  assert after["max_rows_per_batch"] > 1
  # Greedy answers do not depend on the batch: the first equals the lone request's.
  lone = get_answer(QUESTION, eval_port=_port(serve_url))
  assert answers[0] == lone
  for question, answer in zip(questions, answers):
    assert isinstance(answer, str)
    # The snippet's slice starts inside the prompt, at the question's tail.
    assert answer.startswith(TEMPLATE.format(question=question)[len(TEMPLATE):])


BAD_NEMO_REQUESTS = {
    "malformed JSON": b'{"sentences": ["hi"], ',
    "not an object": b'["hi"]',
    "sentences not a list": {"sentences": "hi"},
    "sentence not a string": {"sentences": [1]},
    "missing sentences": {"tokens_to_generate": 4},
    "tokens_to_generate a string": {"sentences": ["hi"], "tokens_to_generate": "5"},
    "tokens_to_generate negative": {"sentences": ["hi"], "tokens_to_generate": -1},
    "greedy not a bool": {"sentences": ["hi"], "greedy": "yes"},
    "top_k fractional": {"sentences": ["hi"], "top_k": 1.5},
    "top_p above 1": {"sentences": ["hi"], "top_p": 1.5},
    "temperature 0, sampling": {"sentences": ["hi"], "temperature": 0, "greedy": False},
    "repetition_penalty below 1": {"sentences": ["hi"], "repetition_penalty": 0.5},
    "end_strings not strings": {"sentences": ["hi"], "end_strings": [1]},
    "random_seed negative": {"sentences": ["hi"], "random_seed": -3},
    "129 sentences": {"sentences": ["hi"] * 129},
    "oversized prompt": {"sentences": ["ok", " ".join(["hello"] * 1100)], "tokens_to_generate": 1},
    "prompt + tokens too long": {"sentences": [" ".join(["hello"] * 200)],
                                 "tokens_to_generate": 1000},
    # Past what the sampler holds (int32), nested past any request, not Unicode.
    "top_k 2**31": {"sentences": ["hi"], "top_k": 2**31},
    "top_k 2**40": {"sentences": ["hi"], "top_k": 2**40},
    "min_tokens_to_generate 2**31": {"sentences": ["hi"], "min_tokens_to_generate": 2**31},
    "tokens_to_generate 2**63": {"sentences": ["hi"], "tokens_to_generate": 2**63},
    "random_seed 2**70": {"sentences": ["hi"], "random_seed": 2**70},
    "nested 1e5 deep": b'{"sentences": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "lone surrogate": b'{"sentences": ["hi \\ud800 there"]}',
    "prompt longer than any model": {"sentences": ["word " * 200000]},
}

BAD_OPENAI_REQUESTS = {
    ("completions", "malformed JSON"): b"{",
    ("completions", "negative max_tokens"): {"prompt": "hi", "max_tokens": -1},
    ("completions", "logprobs above 5"): {"prompt": "hi", "logprobs": 6},
    ("completions", "streaming"): {"prompt": "hi", "stream": True},
    ("completions", "token-id prompt"): {"prompt": [1, 2, 3]},
    ("completions", "temperature above 2"): {"prompt": "hi", "temperature": 3},
    ("chat/completions", "no messages"): {"model": "x"},
    ("chat/completions", "bad role"): {"messages": [{"role": "robot", "content": "hi"}]},
    ("chat/completions", "n too big"): {"messages": [{"role": "user", "content": "hi"}],
                                        "n": 500},
    ("completions", "top_k 2**31"): {"prompt": "hi", "top_k": 2**31},
    ("completions", "min_tokens 2**40"): {"prompt": "hi", "min_tokens": 2**40},
    ("completions", "seed 2**80"): {"prompt": "hi", "seed": 2**80},
    ("completions", "nested 1e5 deep"): b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    ("chat/completions", "lone surrogate"):
        b'{"messages": [{"role": "user", "content": "a \\udc80 b"}]}',
}


def _send(url, method, body):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  return requests.request(method, url, data=data, timeout=60,
                          headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("case", sorted(BAD_NEMO_REQUESTS))
def test_bad_nemo_requests_get_400_with_a_json_error(serve_url, case):
  reply = _send(f"{serve_url}/generate", "PUT", BAD_NEMO_REQUESTS[case])
  assert reply.status_code == 400, reply.text
  error = reply.json()["error"]
  assert isinstance(error, str) and error


def test_bad_nemo_errors_name_the_field(serve_url):
  def error(body):
    return _send(f"{serve_url}/generate", "PUT", body).json()["error"]

  assert "Maximum number of sentences is 128" in error(BAD_NEMO_REQUESTS["129 sentences"])
  assert "tokens_to_generate" in error(BAD_NEMO_REQUESTS["tokens_to_generate negative"])
  assert "greedy=true" in error(BAD_NEMO_REQUESTS["temperature 0, sampling"])
  assert "sentences[1]" in error(BAD_NEMO_REQUESTS["oversized prompt"])
  assert "1024" in error(BAD_NEMO_REQUESTS["prompt + tokens too long"])
  assert "not valid JSON" in error(BAD_NEMO_REQUESTS["malformed JSON"])


@pytest.mark.parametrize("case", sorted(BAD_OPENAI_REQUESTS))
def test_bad_openai_requests_get_400_in_openai_shape(serve_url, case):
  route, _ = case
  reply = _send(f"{serve_url}/v1/{route}", "POST", BAD_OPENAI_REQUESTS[case])
  assert reply.status_code == 400, reply.text
  error = reply.json()["error"]
  assert error["message"] and error["type"] == "invalid_request_error"


def test_fuzzed_numbers_name_their_field(serve_url):
  error = lambda body: _send(f"{serve_url}/generate", "PUT", body).json()["error"]
  assert "top_k" in error(BAD_NEMO_REQUESTS["top_k 2**31"]) and "2147483647" in error(
      BAD_NEMO_REQUESTS["top_k 2**31"])
  assert "min_tokens_to_generate" in error(BAD_NEMO_REQUESTS["min_tokens_to_generate 2**31"])
  assert "nested too deeply" in error(BAD_NEMO_REQUESTS["nested 1e5 deep"])
  assert "sentences[0] is not valid Unicode" in error(BAD_NEMO_REQUESTS["lone surrogate"])


def test_openai_top_k_minus_one_means_off(serve_url):
  body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0.7, "seed": 3}
  off = _send(f"{serve_url}/v1/completions", "POST", {**body, "top_k": -1})
  assert off.status_code == 200, off.text
  zero = _send(f"{serve_url}/v1/completions", "POST", {**body, "top_k": 0})
  assert off.json()["choices"][0]["text"] == zero.json()["choices"][0]["text"]


def test_health_answers_fast_while_a_huge_request_is_handled(serve_url):
  import threading
  import time
  # 30 MB: refused from its Content-Length, unread; 7 MB: parsed and its prompt (longer than
  # the model holds) refused before tokenizing. Both off the event loop.
  replies = {}

  def send(name, size):
    body = json.dumps({"sentences": ["word " * (size // 5)]}).encode()
    replies[name] = requests.put(f"{serve_url}/generate", data=body, timeout=120,
                                 headers={"Content-Type": "application/json"})

  threads = [threading.Thread(target=send, args=(n, s)) for n, s in (("30MB", 30 * 2**20),
                                                                     ("7MB", 7 * 2**20))]
  for t in threads:
    t.start()
  latencies = []
  while any(t.is_alive() for t in threads):
    start = time.perf_counter()
    assert requests.get(f"{serve_url}/health", timeout=10).status_code == 200
    latencies.append(time.perf_counter() - start)
  for t in threads:
    t.join()
  assert replies["30MB"].status_code == 413 and replies["7MB"].status_code == 400
  assert "characters" in replies["7MB"].json()["error"]
  assert latencies and max(latencies) < 0.1, max(latencies)


def test_server_keeps_serving_after_bad_requests(serve_url):
  for body in BAD_NEMO_REQUESTS.values():
    _send(f"{serve_url}/generate", "PUT", body)
  assert requests.get(f"{serve_url}/nowhere", timeout=10).status_code == 404
  assert requests.get(f"{serve_url}/generate", timeout=10).status_code == 405
  client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model="tiny-test", prompt="hi", max_tokens=-1)
  assert get_answer(QUESTION, eval_port=_port(serve_url)) == get_answer(
      QUESTION, eval_port=_port(serve_url))


def test_api_key_is_required(serve_auth_url):
  assert requests.get(f"{serve_auth_url}/health", timeout=10).status_code == 200
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
    reply = requests.get(f"{serve_auth_url}/v1/models", headers=headers, timeout=10)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
  assert _nemo(serve_auth_url, ["hi"]).status_code == 401
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=f"{serve_auth_url}/v1", api_key="wrong",
                  max_retries=0).models.list()
  ok = openai.OpenAI(base_url=f"{serve_auth_url}/v1", api_key="test-key", max_retries=0)
  assert [m.id for m in ok.models.list().data] == ["tiny-test"]
  assert OpenAIClient(f"{serve_auth_url}/v1", api_key="test-key").models() == ["tiny-test"]
  with pytest.raises(RemoteError, match="HTTP 401") as err:
    OpenAIClient(f"{serve_auth_url}/v1", api_key_env="CAI_JAX_NO_SUCH_VAR").models()
  assert err.value.status == 401 and serve_auth_url in str(err.value)


# --- clients -------------------------------------------------------------------------

class _Flaky(http.server.BaseHTTPRequestHandler):
  """Fails with 503 twice, then answers like NeMo's /generate."""
  calls = 0

  def do_PUT(self):
    type(self).calls += 1
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    if type(self).calls <= 2:
      status, reply = 503, {"error": "warming up"}
    else:
      status, reply = 200, {"sentences": [s + " done<extra_id_1>" for s in body["sentences"]]}
    data = json.dumps(reply).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


def test_clients_retry_5xx_and_name_the_url_when_giving_up():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  try:
    client = NemoClient(url, timeout=5, retries=3, backoff=0.01)
    assert client.generate(["a", "b"], end_strings=["<extra_id_1>"]) == [" done", " done"]
    assert _Flaky.calls == 3
    _Flaky.calls = 0
    with pytest.raises(RemoteError, match=r"after 2 attempt\(s\): HTTP 503: warming up") as err:
      NemoClient(url, timeout=5, retries=1, backoff=0.01).generate(["a"])
    assert f"{url}/generate" in str(err.value) and err.value.status == 503
  finally:
    server.shutdown()
    server.server_close()
  with pytest.raises(RemoteError, match="ConnectionError"):   # nothing listens there now
    NemoClient(url, timeout=5, retries=1, backoff=0.01).generate(["a"])


def test_strip_prompt_tolerates_detokenizer_whitespace():
  assert strip_prompt("<p>\nhi answer", "<p>\nhi") == " answer"
  # NeMo's legacy SentencePiece decoding puts spaces around special tokens.
  assert strip_prompt("<extra_id_1> User\nhi\n <extra_id_1> Assistant\nyes",
                      "<extra_id_1>User\nhi\n<extra_id_1>Assistant\n") == "yes"
  with pytest.raises(ValueError, match="does not start with the prompt"):
    strip_prompt("something else", "prompt")


@pytest.mark.slow
def test_launch_serve_end_to_end(tmp_path, serve_generator, sp_model_path):
  """`python -m launch.serve` on a saved model, tensor-parallel over 2 CPU devices, with a key."""
  import os
  import shutil
  import socket
  import subprocess
  import sys
  import time

  from cai_jax import checkpoint
  model_dir = str(tmp_path / "model")
  checkpoint.save_model(model_dir, serve_generator.config, serve_generator.params)
  shutil.copy(sp_model_path, os.path.join(model_dir, "tokenizer.model"))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", CAI_JAX_TEST_KEY="sekrit",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--checkpoint={model_dir}", f"--port={port}",
       "--mesh=1,1,2", "--api_key_env=CAI_JAX_TEST_KEY", "--model_name=e2e"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read()
      try:
        if requests.get(f"{url}/health", timeout=1).status_code == 200:
          break
      except requests.ConnectionError:
        pass
      assert time.monotonic() < deadline, "launch.serve did not come up"
      time.sleep(0.2)
    assert requests.get(f"{url}/v1/models", timeout=5).status_code == 401
    client = OpenAIClient(f"{url}/v1", api_key="sekrit", model="e2e")
    assert client.models() == ["e2e"]
    text = client.complete("Hello there", max_tokens=4, temperature=0)
    assert isinstance(text, str)
    assert text == serve_generator.complete(["Hello there"], max_new_tokens=4,
                                            greedy=True)[0].text
  finally:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
  assert f"serving e2e at {url}" in out
