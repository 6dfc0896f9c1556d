"""The wire protocols as pure functions: NeMo's and OpenAI's request parsers and response
renderers (`cai_jax/serve/nemo.py`, `openai_api.py`, `protocol.py`), with hand-built
completions. No HTTP, no model: tests/test_server.py covers the app end to end.
"""

import pytest

from cai_jax.engine import Completion
from cai_jax.serve import nemo, openai_api, protocol, worker
from cai_jax.serve.protocol import RequestError


def _completion(**fields) -> Completion:
  """A completion of the prompt "Hi" (tokens "Hi"; ids 10) that generated " a b</s>"."""
  values = dict(text=" a b", raw_text=" a b", token_ids=[20, 21], tokens=[" a", " b"],
                logprobs=[-0.5, -0.25], sampled_logprobs=[-0.5, -0.25], finish_reason="length",
                prompt_token_ids=[10], prompt_tokens=["Hi"], prompt_logprobs=[0.0])
  values.update(fields)
  return Completion(**values)


def _raises(parse, body, param: str, *fragments: str, status: int = 400,
            code: str | None = None) -> RequestError:
  with pytest.raises(RequestError) as info:
    parse(body)
  err = info.value
  assert (err.param, err.status, err.code) == (param, status, code), err.message
  for fragment in fragments:
    assert fragment in err.message, err.message
  return err


# --- shared field readers ---------------------------------------------------------------

def test_typed_readers_take_defaults_and_name_the_field():
  assert protocol.get_int({}, "k", 7, "k must be an int") == 7
  assert protocol.get_int({"k": None}, "k", 7, "k must be an int") == 7
  assert protocol.get_int({"k": 3.0}, "k", 7, "m", integral_float=True) == 3
  assert protocol.get_number({"t": 1}, "t", 0.5, "m") == 1.0
  assert isinstance(protocol.get_number({"t": 1}, "t", 0.5, "m"), float)
  assert protocol.get_bool({"b": None}, "b", True) is True      # null is the default ...
  err = _raises(lambda b: protocol.get_bool(b, "b", True, "b must be a boolean value"),
                {"b": None}, "b")                              # ... unless NeMo's message
  assert err.message == "b must be a boolean value (got None)"
  err = _raises(lambda b: protocol.get_int(b, "k", 0, "k must be an int"), {"k": 2**31}, "k")
  assert err.message == "k must be an int, at most 2147483647 (got 2147483648)"
  err = _raises(lambda b: protocol.get_int(b, "k", 0, "k must be an int"), {"k": True}, "k")
  assert err.message == "k must be an int (got boolean True)"
  err = _raises(lambda b: protocol.get_number(b, "t", 0.0, "t in (0, 1]", minimum=0.0,
                                              exclusive_minimum=True), {"t": 0}, "t")
  assert err.message == "t in (0, 1] (got 0)"
  _raises(lambda b: protocol.get_number(b, "t", 0.0, "t finite"), {"t": float("inf")}, "t",
          "got number inf")


def test_json_body_errors_say_what_is_wrong():
  assert protocol.parse_json_body(b'{"a": [1]}', 100) == {"a": [1]}
  _raises(lambda raw: protocol.parse_json_body(raw, 4), b'{"a": 1}', None,
          "8 bytes; the limit is 4", status=413)
  _raises(lambda raw: protocol.parse_json_body(raw, 100), b"  \n", None, "body is empty")
  _raises(lambda raw: protocol.parse_json_body(raw, 100), b'{"a": ', None, "not valid JSON")
  _raises(lambda raw: protocol.parse_json_body(raw, 100), b"[1]", None, "got a JSON array")
  _raises(lambda raw: protocol.parse_json_body(raw, 10**6), b"[" * 100000 + b"]" * 100000,
          None, "nested too deeply")


def test_text_offsets_and_added_bos():
  assert protocol.text_offsets(["ab", "c", "def"], 5) == [5, 7, 8]
  assert protocol.text_offsets(["<s>", "ab", "</s>", "c"], 0, [0, 2]) == [0, 0, 2, 2]
  assert protocol.bos_added(True, "Hi", "<s>")
  assert not protocol.bos_added(True, "<s>Hi", "<s>")     # the prompt writes it as text
  assert not protocol.bos_added(False, "Hi", "<s>")
  assert protocol.bos_added(True, "Hi", None)


def test_row_seeds_depend_on_the_request_alone():
  seeds = worker.row_seeds(7, 3)
  assert seeds == [worker.row_seed(7, r) for r in range(3)] == worker.row_seeds(7, 3)
  assert len(set(seeds)) == 3 and all(0 <= s < 2**31 for s in seeds)
  assert worker.row_seeds(8, 3) != seeds
  assert worker.row_seeds(None, 2) == [None, None]       # the worker draws fresh ones
  # Top-logprob buckets cover what either API may ask for.
  assert worker.TOP_LOGPROB_BUCKETS[-1] >= openai_api.MAX_CHAT_TOP_LOGPROBS
  assert openai_api.MAX_COMPLETION_LOGPROBS in worker.TOP_LOGPROB_BUCKETS


# --- NeMo: PUT /generate ----------------------------------------------------------------

def test_nemo_defaults_are_nemos():
  req = nemo.parse_generate_request({"sentences": ["a", "b"]})
  assert req.sentences == ["a", "b"]
  assert req.settings == dict(
      max_new_tokens=64, greedy=False, temperature=1.0, top_k=0, top_p=0.9,
      repetition_penalty=1.0, min_new_tokens=0, end_strings=["<|endoftext|>"], add_bos=False,
      seed=[None, None], stop_at_eos=True)
  assert not req.compute_logprob and not req.all_probs
  assert set(req.settings) == set(worker.ROW_SETTINGS)
  assert (req.add_bos, req.tokens_to_generate) == (False, 64)


def test_nemo_greedy_is_a_bare_argmax_as_in_the_tutorial():
  body = {"sentences": ["q"], "tokens_to_generate": 512, "top_k": 1, "greedy": True,
          "repetition_penalty": 1.2, "temperature": 0, "top_p": 0.5,
          "end_strings": ["<extra_id_1>", ""]}
  settings = nemo.parse_generate_request(body).settings
  assert settings["greedy"] is True and settings["max_new_tokens"] == 512
  assert (settings["temperature"], settings["top_k"], settings["top_p"],
          settings["repetition_penalty"]) == (1.0, 0, 1.0, 1.0)
  assert settings["end_strings"] == ["<extra_id_1>"]       # empty end strings are dropped


def test_nemo_sampling_settings_and_seeds():
  body = {"sentences": ["a", "b"], "temperature": 0.7, "top_k": 3.0, "top_p": 0.0,
          "repetition_penalty": 1.1, "min_tokens_to_generate": 2, "add_BOS": True,
          "random_seed": 5, "compute_logprob": True, "tokens_to_generate": 0, "end_strings": []}
  req = nemo.parse_generate_request(body)
  s = req.settings
  assert (s["temperature"], s["top_k"], s["repetition_penalty"], s["min_new_tokens"]) == (
      0.7, 3, 1.1, 2)
  assert isinstance(s["top_k"], int)
  assert s["top_p"] == 1.0                                  # NeMo filters only in (0, 1)
  assert s["add_bos"] is True and s["end_strings"] == [] and s["max_new_tokens"] == 0
  assert s["seed"] == [worker.row_seed(5, 0), worker.row_seed(5, 1)]
  assert req.compute_logprob and not req.all_probs
  assert nemo.parse_generate_request({"sentences": ["a"], "all_probs": True}).compute_logprob


def test_nemo_unknown_keys_are_listed_not_refused():
  body = {"sentences": ["a"], "zeta": 1, "alpha": 2, "top_k": 0}
  assert nemo.unknown_keys(body) == ["alpha", "zeta"]
  assert nemo.parse_generate_request(body).sentences == ["a"]


BAD_NEMO = [
    ({"tokens_to_generate": 4}, "sentences", "sentences is required"),
    ({"sentences": "hi"}, "sentences", "must be a list of strings (got string)"),
    ({"sentences": ["a", 1]}, "sentences", "must be a list of strings (got array)"),
    ({"sentences": []}, "sentences", "at least one prompt"),
    ({"sentences": ["a"] * 129}, "sentences", "Maximum number of sentences is 128 (got 129)"),
    ({"sentences": ["a"], "task_ids": [0]}, "task_ids", "no p-tuned or RETRO model"),
    ({"sentences": ["a"], "neighbors": 2}, "neighbors", "not supported"),
    ({"sentences": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate",
     "integer no less than 0 (got string '5')"),
    ({"sentences": ["a"], "tokens_to_generate": None}, "tokens_to_generate", "(got null None)"),
    ({"sentences": ["a"], "tokens_to_generate": -1}, "tokens_to_generate", "(got -1)"),
    ({"sentences": ["a"], "tokens_to_generate": 2**63}, "tokens_to_generate", "at most"),
    ({"sentences": ["a"], "all_probs": 1}, "all_probs", "all_probs must be a boolean value"),
    ({"sentences": ["a"], "greedy": "yes"}, "greedy", "greedy must be a boolean value"),
    ({"sentences": ["a"], "temperature": 101}, "temperature", "less than or equal to 100.0"),
    ({"sentences": ["a"], "temperature": 0}, "temperature", "send greedy=true"),
    ({"sentences": ["a"], "add_BOS": 0}, "add_BOS", "add_BOS must be a boolean value"),
    ({"sentences": ["a"], "top_k": 1.5}, "top_k", "positive integer number (got number 1.5)"),
    ({"sentences": ["a"], "top_k": 2**31}, "top_k", "at most 2147483647"),
    ({"sentences": ["a"], "top_p": 1.5}, "top_p", "less than or equal to 1.0 (got 1.5)"),
    ({"sentences": ["a"], "top_p": "x"}, "top_p", "(got string 'x')"),
    ({"sentences": ["a"], "repetition_penalty": 0.5}, "repetition_penalty", "no less than 1.0"),
    ({"sentences": ["a"], "end_strings": [1]}, "end_strings", "list of strings (got [1])"),
    ({"sentences": ["a"], "end_strings": "x"}, "end_strings", "list of strings (got 'x')"),
    ({"sentences": ["a"], "min_tokens_to_generate": -1}, "min_tokens_to_generate",
     "no less than 0"),
    ({"sentences": ["a"], "compute_logprob": "no"}, "compute_logprob", "boolean value"),
    ({"sentences": ["a"], "random_seed": -3}, "random_seed", "or None (got -3)"),
    ({"sentences": ["a"], "random_seed": 2**70}, "random_seed", "at most 9223372036854775807"),
]


@pytest.mark.parametrize("body,param,fragment", BAD_NEMO, ids=[str(b) for b, _, _ in BAD_NEMO])
def test_bad_nemo_fields_raise_naming_the_field(body, param, fragment):
  _raises(nemo.parse_generate_request, body, param, param, fragment)


def test_nemo_reply_keeps_the_end_string_and_covers_the_prompt():
  req = nemo.parse_generate_request({"sentences": ["Hi there"], "compute_logprob": True,
                                     "end_strings": ["<extra_id_1>"]})
  c = _completion(text=" yes", raw_text=" yes<extra_id_1>", tokens=[" yes", "<extra_id_1>"],
                  token_ids=[20, 5], logprobs=[-0.5, -0.25], finish_reason="stop",
                  prompt_tokens=["Hi", " there"], prompt_token_ids=[10, 11],
                  prompt_logprobs=[0.0, -1.5], stop_string="<extra_id_1>")
  assert nemo.render_generate(req, [c], eos_id=2, bos_text="<s>") == {
      "sentences": ["Hi there yes<extra_id_1>"],
      "tokens": [["Hi", " there", " yes", "<extra_id_1>"]],
      "logprob": [[-1.5, -0.5, -0.25]],
      "token_ids": [[10, 11, 20, 5]],
      "offsets": [[0, 2, 8, 12]],
  }


def test_nemo_reply_leaves_eos_and_added_bos_out_of_the_text():
  req = nemo.parse_generate_request({"sentences": ["Hi", "<s>Yo"], "add_BOS": True,
                                     "all_probs": True})
  eos_ended = _completion(text=" ok", raw_text=" ok</s>", tokens=[" ok", "</s>"],
                          token_ids=[21, 2], finish_reason="stop", prompt_tokens=["<s>", "Hi"],
                          prompt_token_ids=[1, 10], prompt_logprobs=[0.0, -2.0])
  # The second prompt writes <s> itself: it is text, and no bos was added.
  cut_at_length = _completion(text=" x", raw_text=" x", tokens=[" x"], token_ids=[22],
                              logprobs=[-0.1], prompt_tokens=["<s>", "Yo"],
                              prompt_token_ids=[1, 12], prompt_logprobs=[0.0, -3.0])
  out = nemo.render_generate(req, [eos_ended, cut_at_length], eos_id=2, bos_text="<s>")
  assert out["sentences"] == ["Hi ok", "<s>Yo x"]
  assert out["tokens"] == [["<s>", "Hi", " ok", "</s>"], ["<s>", "Yo", " x"]]
  assert out["token_ids"] == [[1, 10, 21, 2], [1, 12, 22]]
  assert out["offsets"] == [[0, 0, 2, 5], [0, 3, 5]]
  assert out["logprob"] == [[-2.0, -0.5, -0.25], [-3.0, -0.1]]
  assert "full_logprob" in out and out["full_logprob"] is None


def test_nemo_reply_without_logprobs():
  req = nemo.parse_generate_request({"sentences": ["Hi"]})
  out = nemo.render_generate(req, [_completion()], eos_id=2, bos_text=None)
  assert out["logprob"] is None and "full_logprob" not in out
  assert out["sentences"] == ["Hi a b"] and out["offsets"] == [[0, 2, 4]]


# --- OpenAI: /v1/completions ------------------------------------------------------------

def test_completion_defaults_are_openais():
  req = openai_api.parse_completion_request({"prompt": "Hi"})
  assert (req.prompts, req.rows, req.logprobs, req.echo) == (["Hi"], ["Hi"], None, False)
  assert req.settings == dict(
      greedy=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
      min_new_tokens=0, add_bos=False, stop_at_eos=True, max_new_tokens=16, end_strings=[],
      seed=[None])
  assert set(req.settings) == set(worker.ROW_SETTINGS)
  assert (req.num_top_logprobs, req.return_prompt_logprobs) == (0, False)


def test_completion_rows_seeds_and_greedy():
  body = {"prompt": ["a", "b"], "n": 2, "seed": 7, "temperature": 0, "top_p": 0.5,
          "top_k": -1, "stop": "x", "logprobs": 0, "echo": True, "max_completion_tokens": 5,
          "max_tokens": 99, "min_tokens": 1, "repetition_penalty": 1.3, "add_bos": True,
          "stream": False, "presence_penalty": 0, "best_of": 2, "model": "m"}
  req = openai_api.parse_completion_request(body)
  assert req.rows == ["a", "a", "b", "b"]
  assert req.settings["seed"] == [worker.row_seed(7, r) for r in range(4)]
  assert len(set(req.settings["seed"])) == 4
  s = req.settings
  assert (s["greedy"], s["temperature"], s["top_p"], s["top_k"]) == (True, 1.0, 1.0, 0)
  assert (s["max_new_tokens"], s["end_strings"], s["min_new_tokens"]) == (5, ["x"], 1)
  assert (s["repetition_penalty"], s["add_bos"]) == (1.3, True)
  assert (req.num_top_logprobs, req.return_prompt_logprobs) == (0, True)
  sampled = openai_api.parse_completion_request(
      {"prompt": "a", "temperature": 0.5, "top_k": 4, "stop": ["", "y", "z"], "logprobs": 3})
  assert (sampled.settings["greedy"], sampled.settings["temperature"]) == (False, 0.5)
  assert sampled.settings["top_k"] == 4 and sampled.settings["end_strings"] == ["y", "z"]
  assert (sampled.num_top_logprobs, sampled.return_prompt_logprobs) == (3, False)


BAD_COMPLETIONS = [
    ({}, "prompt", "prompt must be a string or a non-empty list", None),
    ({"prompt": [1, 2]}, "prompt", "token-id prompts are not supported", None),
    ({"prompt": []}, "prompt", "non-empty list", None),
    ({"prompt": "a", "stream": True}, "stream", "stream=True is not supported",
     "unsupported_parameter"),
    ({"prompt": "a", "logit_bias": {"1": 2}}, "logit_bias", "not supported",
     "unsupported_parameter"),
    ({"prompt": "a", "suffix": "s"}, "suffix", "not supported", "unsupported_parameter"),
    ({"prompt": "a", "model": 3}, "model", "model must be a string (got integer)", None),
    ({"prompt": "a", "n": 0}, "n", "between 1 and 128 (got 0)", None),
    ({"prompt": ["a"] * 64, "n": 3}, "n", "n x prompts = 192 completions; the limit is 128", None),
    ({"prompt": "a", "best_of": 3}, "best_of", "best_of is not supported",
     "unsupported_parameter"),
    ({"prompt": "a", "temperature": 3}, "temperature", "between 0 and 2 (got 3)", None),
    ({"prompt": "a", "top_p": 0}, "top_p", "in (0, 1] (got 0)", None),
    ({"prompt": "a", "top_k": -2}, "top_k", "no less than -1", None),
    ({"prompt": "a", "top_k": 2**31}, "top_k", "at most 2147483647", None),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", "positive number", None),
    ({"prompt": "a", "min_tokens": 2**40}, "min_tokens", "at most", None),
    ({"prompt": "a", "add_bos": "y"}, "add_bos", "add_bos must be a boolean (got 'y')", None),
    ({"prompt": "a", "seed": 2**80}, "seed", "seed must be an integer, at most", None),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens", "max_tokens must be an integer", None),
    ({"prompt": "a", "max_completion_tokens": "5"}, "max_completion_tokens", "(got string", None),
    ({"prompt": "a", "logprobs": 6}, "logprobs", "between 0 and 5", None),
    ({"prompt": "a", "echo": 1}, "echo", "echo must be a boolean", None),
    ({"prompt": "a", "stop": 3}, "stop", "string or a list of strings (got 3)", None),
    ({"prompt": "a", "stop": list("abcde")}, "stop", "at most 4 strings (got 5)", None),
]


@pytest.mark.parametrize("body,param,fragment,code", BAD_COMPLETIONS,
                         ids=[str(b)[:60] for b, _, _, _ in BAD_COMPLETIONS])
def test_bad_completion_fields_raise_naming_the_field(body, param, fragment, code):
  _raises(openai_api.parse_completion_request, body, param, param, fragment, code=code)


def _completion_with_tops(**fields) -> Completion:
  """" a b" then a stop string: `text` is the first two tokens."""
  values = dict(text=" a b", raw_text=" a b<extra_id_1>", tokens=[" a", " b", "<extra_id_1>"],
                token_ids=[20, 21, 5], logprobs=[-0.1, -0.7, -0.2],
                sampled_logprobs=[-0.1, -0.7, -0.2], finish_reason="stop",
                top_logprobs=[{" a": -0.1, " c": -2.0, " d": -3.0}, {" e": -0.5, " b": -0.7},
                              {"<extra_id_1>": -0.2}],
                prompt_tokens=["<s>", "Hi"], prompt_token_ids=[1, 10],
                prompt_logprobs=[0.0, -2.5], stop_string="<extra_id_1>")
  values.update(fields)
  return _completion(**values)


def test_completion_reply_with_logprobs_and_usage():
  req = openai_api.parse_completion_request({"prompt": "Hi", "logprobs": 1, "n": 2})
  c = _completion_with_tops()
  out = openai_api.render_completion(req, [c, _completion()], [[1, 10]], model_name="m",
                                     response_id="cmpl-1", created=123, bos_text="<s>")
  assert out == {
      "id": "cmpl-1", "object": "text_completion", "created": 123, "model": "m",
      "choices": [
          {"index": 0, "text": " a b", "finish_reason": "stop", "logprobs": {
              "tokens": [" a", " b"], "token_logprobs": [-0.1, -0.7],
              # the top 1 alternative, plus the sampled token when it is not that one
              "top_logprobs": [{" a": -0.1}, {" e": -0.5, " b": -0.7}],
              "text_offset": [2, 4]}},
          {"index": 1, "text": " a b", "finish_reason": "length", "logprobs": {
              "tokens": [" a", " b"], "token_logprobs": [-0.5, -0.25],
              "top_logprobs": [{" a": -0.5}, {" b": -0.25}], "text_offset": [2, 4]}},
      ],
      # the prompt counts once; completions count every generated token
      "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7},
  }


def test_completion_reply_echoes_the_prompt():
  req = openai_api.parse_completion_request({"prompt": "Hi", "logprobs": 2, "echo": True,
                                             "add_bos": True})
  out = openai_api.render_completion(req, [_completion_with_tops()], [[1, 10]], model_name="m",
                                     response_id="x", created=0, bos_text="<s>")
  choice = out["choices"][0]
  assert choice["text"] == "Hi a b"
  assert choice["logprobs"] == {
      "tokens": ["<s>", "Hi", " a", " b"],
      "token_logprobs": [None, -2.5, -0.1, -0.7],
      "top_logprobs": [None, None, {" a": -0.1, " c": -2.0}, {" e": -0.5, " b": -0.7}],
      "text_offset": [0, 0, 2, 4]}                          # the added <s> has no text
  plain = openai_api.parse_completion_request({"prompt": "Hi", "echo": True})
  out = openai_api.render_completion(plain, [_completion()], [[10]], model_name="m",
                                     response_id="x", created=0, bos_text="<s>")
  assert out["choices"] == [{"index": 0, "text": "Hi a b", "logprobs": None,
                             "finish_reason": "length"}]


# --- OpenAI: /v1/chat/completions -------------------------------------------------------

def test_chat_messages_are_normalised():
  body = {"messages": [{"role": "developer", "content": "Be kind."},
                       {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                    {"type": "text", "text": "lo"}]}],
          "tool_choice": "none", "tools": [], "response_format": {"type": "text"}}
  assert openai_api.parse_chat_messages(body) == [
      {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]


BAD_CHAT_MESSAGES = [
    ({"model": "x"}, "messages", "non-empty list of {role, content} objects", None),
    ({"messages": []}, "messages", "non-empty list", None),
    ({"messages": ["hi"]}, "messages", "messages[0] must be an object", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages[0].content: only text parts are supported", None),
    ({"messages": [{"role": "user", "content": "a"}, {"role": 1, "content": "b"}]}, "messages",
     "messages[1] needs a string role and string content (got role=1", None),
    ({"messages": [{"role": "user"}]}, "messages", "content of type null", None),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
     "tools", "not supported", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "a"}], "tool_choice": "auto"}, "tool_choice",
     "not supported", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json"}},
     "response_format", "not supported", "unsupported_parameter"),
]


@pytest.mark.parametrize("body,param,fragment,code", BAD_CHAT_MESSAGES,
                         ids=[str(b)[:60] for b, _, _, _ in BAD_CHAT_MESSAGES])
def test_bad_chat_messages_raise_naming_the_field(body, param, fragment, code):
  _raises(openai_api.parse_chat_messages, body, param, fragment, code=code)


def test_chat_settings_defaults_and_end_of_turn():
  req = openai_api.parse_chat_request({})       # the messages are parse_chat_messages' job
  assert (req.n, req.max_tokens, req.logprobs, req.top_logprobs, req.stop) == (
      1, None, False, None, [])
  assert req.settings["seed"] == [None] and req.num_top_logprobs == 0
  req = openai_api.parse_chat_request({"n": 3, "seed": 2, "stop": ["<extra_id_1>", "x"],
                                       "logprobs": True, "top_logprobs": 3, "max_tokens": 9})
  assert req.settings["seed"] == [worker.row_seed(2, r) for r in range(3)]
  assert (req.max_tokens, req.num_top_logprobs) == (9, 3)
  settings = openai_api.chat_settings(req, 9, "<extra_id_1>")
  assert settings["end_strings"] == ["<extra_id_1>", "x"]  # end of turn first, once
  assert settings["max_new_tokens"] == 9
  assert set(settings) == set(worker.ROW_SETTINGS)
  assert "end_strings" not in req.settings                  # the request is left as it was
  only_logprobs = openai_api.parse_chat_request({"logprobs": True})
  assert only_logprobs.num_top_logprobs == 0
  assert openai_api.default_chat_max_tokens(100, 1024) == 512
  assert openai_api.default_chat_max_tokens(900, 1024) == 124
  assert openai_api.default_chat_max_tokens(2000, 1024) == 0


def test_bad_chat_fields_raise_naming_the_field():
  _raises(openai_api.parse_chat_request, {"top_logprobs": 2}, "top_logprobs",
          "top_logprobs needs logprobs=true")
  _raises(openai_api.parse_chat_request, {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
          "between 0 and 20")
  _raises(openai_api.parse_chat_request, {"logprobs": "yes"}, "logprobs",
          "logprobs must be a boolean")
  _raises(openai_api.parse_chat_request, {"n": 500}, "n", "at most 128")
  _raises(openai_api.parse_chat_request, {"frequency_penalty": 1}, "frequency_penalty",
          "not supported", code="unsupported_parameter")


def test_chat_reply_with_logprobs_bytes_and_usage():
  pieces = {30: " Hel", 31: "lo", 5: "<extra_id_1>", 40: " Hi", 41: "!", 42: "la"}
  reply = _completion(text=" Hello", raw_text=" Hello<extra_id_1>",
                      tokens=[" Hel", "lo", "<extra_id_1>"], token_ids=[30, 31, 5],
                      logprobs=[-0.2, -0.3, -0.1], finish_reason="stop",
                      top_token_ids=[[(30, -0.2), (40, -1.0), (41, -2.0)], [(31, -0.3), (42, -1.5)],
                                     [(5, -0.1)]])
  req = openai_api.parse_chat_request({"logprobs": True, "top_logprobs": 2})
  out = openai_api.render_chat(req, [reply], [[1, 2, 3]], model_name="m",
                               response_id="chatcmpl-1", created=9, token_text=pieces.__getitem__,
                               token_bytes=lambda t: pieces[t].encode())
  assert out == {
      "id": "chatcmpl-1", "object": "chat.completion", "created": 9, "model": "m",
      "choices": [{
          "index": 0, "message": {"role": "assistant", "content": " Hello", "refusal": None},
          "finish_reason": "stop",
          "logprobs": {"refusal": None, "content": [
              {"token": " Hel", "logprob": -0.2, "bytes": list(b" Hel"), "top_logprobs": [
                  {"token": " Hel", "logprob": -0.2, "bytes": list(b" Hel")},
                  {"token": " Hi", "logprob": -1.0, "bytes": list(b" Hi")}]},
              {"token": "lo", "logprob": -0.3, "bytes": list(b"lo"), "top_logprobs": [
                  {"token": "lo", "logprob": -0.3, "bytes": list(b"lo")},
                  {"token": "la", "logprob": -1.5, "bytes": list(b"la")}]},
          ]}}],
      "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
  }
  plain = openai_api.parse_chat_request({"n": 2})
  out = openai_api.render_chat(plain, [reply, _completion()], [[1, 2, 3]], model_name="m",
                               response_id="x", created=0, token_text=pieces.__getitem__,
                               token_bytes=lambda t: pieces[t].encode())
  assert [c["logprobs"] for c in out["choices"]] == [None, None]
  assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == [
      (0, " Hello", "stop"), (1, " a b", "length")]
  assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


# --- OpenAI: /v1/models -----------------------------------------------------------------

def test_models_list_and_unknown_model():
  card = openai_api.model_card("tiny", 5, 1024)
  assert card == {"id": "tiny", "object": "model", "created": 5, "owned_by": "cai_jax",
                  "max_model_len": 1024}
  assert openai_api.model_list(card) == {"object": "list", "data": [card]}
  openai_api.check_model_id("tiny", "tiny")
  _raises(lambda model_id: openai_api.check_model_id(model_id, "tiny"), "big", "model",
          "model 'big' does not exist; this server has 'tiny'", status=404,
          code="model_not_found")
