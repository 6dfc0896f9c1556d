"""Mistral-7B's own tokenizer (the v1 tokenizer.model mistral-common ships) through every stage.

That tokenizer adds a dummy prefix ("▁") to each text it encodes and has none
of NeMo's `<extra_id_*>` markers as pieces, which the tiny tokenizers (markers
as pieces, no dummy prefix) cannot show. Here:
- the Mistral-instruct template's SFT rows, reward-model rows and PPO prompt
  rows equal mistral_common's own `encode_chat_completion` (fine-tuning and
  test modes), and the loss mask covers exactly each reply plus `</s>`;
- with NeMo's template, every stage's prompt ids are the first ids of the
  training row, and the mask covers each reply and its whole 7-token marker;
- completion text has no dummy-prefix space where the reply is its own text;
- PPO stops on the multi-token marker, reads the reward at its last token and
  penalises only the responses in which it never appears.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import engine, sampling
from cai_jax.data import batching, sources
from cai_jax.data.jsonl import atomic_write_jsonl
from cai_jax.tokenizer import MISTRAL_INST, NEMO
from cai_jax.train import ppo
from cai_jax.model import MistralConfig
from configs.models import get_config as model_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "You are a careful assistant. Answer briefly."


def conversations(n: int = 24) -> list[tuple[list[dict], str]]:
  """n multi-turn conversations (two shipped ones joined), every other one with a system prompt."""
  records, _ = sources.read_chat_records(os.path.join(ROOT, "data", "sft_datablend_sample.jsonl"))
  out = []
  for k in range(n):
    turns = list(records[k]["conversations"]) + list(records[k + n]["conversations"])
    out.append((turns, SYSTEM if k % 2 else ""))
  return out


def _replies(turns):
  return [t["value"] for t in turns if t["from"] == "Assistant"]


def _masked_runs(ids, mask):
  runs, current = [], []
  for i, m in zip(ids, mask):
    if m:
      current.append(i)
    elif current:
      runs.append(current)
      current = []
  return runs + ([current] if current else [])


def _generator(tokenizer, template):
  """A TextGenerator whose encoding is under test (its model is never run)."""
  config = MistralConfig.from_config(model_preset("tiny"), vocab_size=tokenizer.vocab_size)
  return engine.TextGenerator(config, None,
                              tokenizer, template=template)


def _prompt_rows(tmp_path, name, texts, tokenizer, template, max_len=4096):
  path = str(tmp_path / f"{name}.jsonl")
  atomic_write_jsonl(path, [{"text": t} for t in texts])
  rows, _ = ppo.load_prompt_rows(path, tokenizer, template, max_len, tokenizer.pad_id)
  return [r["ids"][max_len - int(r["length"]):].tolist() for r in rows]


# --- Mistral-instruct: equal to mistral_common -------------------------------------

def _mistral_common(path):
  from mistral_common.protocol.instruct.validator import ValidationMode
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
  return (MistralTokenizer.from_file(path, mode=ValidationMode.finetuning),
          MistralTokenizer.from_file(path, mode=ValidationMode.test))


def _messages(turns, system):
  from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage,
                                                         UserMessage)
  msgs = [SystemMessage(content=system)] if system else []
  for t in turns:
    cls = UserMessage if t["from"] == "User" else AssistantMessage
    msgs.append(cls(content=t["value"]))
  return msgs


def test_mistral_inst_rows_equal_mistral_common(mistral_v1_path, mistral_tokenizer, tmp_path):
  from mistral_common.protocol.instruct.messages import AssistantMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest
  tok = mistral_tokenizer
  finetune, test = _mistral_common(mistral_v1_path)
  convs = conversations()
  assert sum(len(t) > 2 for t, _ in convs) == len(convs)          # all multi-turn
  records = [{"conversations": t, "system": s} for t, s in convs]
  sft_rows, stats = batching.tokenize_conversations(records, tok, MISTRAL_INST, max_seq_len=8192)
  assert stats["truncated"] == 0 and len(sft_rows) == len(convs)
  pairs = [{"chosen": MISTRAL_INST.render_text(t, s),
            "rejected": MISTRAL_INST.render_text(t[:-1] + [{"from": "Assistant", "value": "No."}],
                                                 s)} for t, s in convs]
  rm_rows, _ = batching.tokenize_pairs(pairs, tok, MISTRAL_INST, max_seq_len=8192)
  prompts = [MISTRAL_INST.render_prompt(t[:-1], s) for t, s in convs]
  ppo_rows = _prompt_rows(tmp_path, "prompts", prompts, tok, MISTRAL_INST)
  gen = _generator(tok, MISTRAL_INST)
  served = gen.encode_prompts([gen.chat_prompt(t[:-1], s) for t, s in convs])
  served_bos = gen.encode_prompts(prompts, add_bos=True)          # never a second <s>
  for k, (turns, system) in enumerate(convs):
    msgs = _messages(turns, system)
    full = finetune.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
    prompt = test.encode_chat_completion(ChatCompletionRequest(messages=msgs[:-1])).tokens
    assert full[:2] != [1, 1] and sft_rows[k]["ids"].tolist() == full, k
    assert rm_rows[k]["chosen_ids"].tolist() == full, k
    assert ppo_rows[k] == served[k] == served_bos[k] == prompt == full[:len(prompt)], k
    # The loss covers exactly each reply and its </s>, as mistral_common encodes them.
    expected = [finetune.instruct_tokenizer.encode_assistant_message(
        AssistantMessage(content=r), False) for r in _replies(turns)]
    assert _masked_runs(full, sft_rows[k]["loss_mask"].tolist()) == expected, k
    assert all(run[-1] == tok.eos_id for run in expected)


# --- NeMo's template with markers that are not pieces -------------------------------

def test_nemo_marker_is_seven_tokens_and_encoding_is_consistent(mistral_tokenizer):
  tok = mistral_tokenizer
  eot = NEMO.end_of_turn_ids(tok)
  assert [tok.id_to_token(i) for i in eot] == ["<", "extra", "_", "id", "_", "1", ">"]
  assert NEMO.check(tok, sampling.MAX_STOP_LENGTH) == []
  text = NEMO.render_prompt([{"from": "User", "value": "Hello"}])
  ids = NEMO.encode(tok, text)
  assert tok.id_to_token(ids[0]) == "▁<" and ids[0] != tok.bos_id   # NeMo: no bos, one ▁
  assert NEMO.encode(tok, text, add_bos=True) == [tok.bos_id] + ids


def test_nemo_prompt_ids_are_the_first_ids_of_every_training_row(mistral_tokenizer, tmp_path):
  tok = mistral_tokenizer
  eot = NEMO.end_of_turn_ids(tok)
  gen = _generator(tok, NEMO)
  for k, (turns, system) in enumerate(conversations()):
    (row,), _ = batching.tokenize_conversations([{"conversations": turns, "system": system}],
                                                tok, NEMO, max_seq_len=8192)
    ids, mask = row["ids"].tolist(), row["loss_mask"].tolist()
    assert ids == NEMO.encode(tok, NEMO.render_text(turns, system))   # segment-wise == whole
    # The loss covers each reply, its newline and the whole 7-token end marker.
    runs = _masked_runs(ids, mask)
    assert [tok.decode(r) for r in runs] == [f"{r}\n<extra_id_1>" for r in _replies(turns)], k
    assert all(r[-len(eot):] == eot for r in runs)
    for j in range(1, len(turns), 2):                     # every assistant turn
      prompt = NEMO.render_prompt(turns[:j], system)
      (ppo_ids,) = _prompt_rows(tmp_path, f"p{k}_{j}", [prompt], tok, NEMO)
      (served,) = gen.encode_prompts([prompt])            # SL-CAI, RL-CAI, evaluation, server
      (rm,), _ = batching.tokenize_pairs(
          [{"chosen": NEMO.render_text(turns[:j + 1], system),
            "rejected": NEMO.render_text(turns[:j] + [{"from": "Assistant", "value": "No."}],
                                         system)}], tok, NEMO, max_seq_len=8192)
      assert ppo_ids == served == ids[:len(ppo_ids)], (k, j)
      assert rm["chosen_ids"].tolist() == ids[:len(rm["chosen_ids"])], (k, j)
      assert rm["chosen_ids"].tolist()[-len(eot):] == eot
      assert rm["rejected_ids"].tolist()[:len(ppo_ids)] == ppo_ids


def test_reward_truncation_keeps_the_whole_marker(mistral_tokenizer):
  tok = mistral_tokenizer
  eot = NEMO.end_of_turn_ids(tok)
  prompt = NEMO.render_prompt([{"from": "User", "value": "Tell me about bread."}])
  pairs = [{"chosen": prompt + "Bread is made of flour, water, yeast and salt.\n<extra_id_1>",
            "rejected": prompt + "No.\n<extra_id_1>"}]
  full, _ = batching.tokenize_pairs(pairs, tok, NEMO, max_seq_len=4096)
  limit = len(full[0]["chosen_ids"]) - 4
  cut, stats = batching.tokenize_pairs(pairs, tok, NEMO, max_seq_len=limit, overlong="truncate")
  ids = cut[0]["chosen_ids"].tolist()
  assert stats["truncated"] == 1 and len(ids) == limit
  assert ids[-len(eot):] == eot and ids[:limit - len(eot)] == full[0]["chosen_ids"].tolist()[
      :limit - len(eot)]


# --- completion text ----------------------------------------------------------------

def _fake_generate(ids):
  def generate(config, params, prompts, **kw):
    n = len(prompts)
    return sampling.GenerationOutput(tokens=[list(ids)] * n, logprobs=[[0.0] * len(ids)] * n,
                                     model_logprobs=[[0.0] * len(ids)] * n,
                                     finish_reasons=["stop"] * n, stop_lengths=[1] * n)
  return generate


def test_reply_text_has_no_dummy_prefix_space_where_the_reply_is_its_own_text(
    mistral_tokenizer, monkeypatch):
  tok = mistral_tokenizer
  reply = "Sure! Here you go."
  # The ids the model is trained to write after "[/INST]": the reply as its own text.
  ids = MISTRAL_INST.encode(tok, "[INST] hi [/INST]" + reply + "</s>")[-7:]
  assert tok.id_to_token(ids[0]).startswith("▁") and ids[-1] == tok.eos_id
  monkeypatch.setattr(engine.sampling, "generate", _fake_generate(ids))
  gen = _generator(tok, MISTRAL_INST)
  (c,) = gen.chat([[{"from": "User", "value": "hi"}]], max_new_tokens=8)
  assert c.text == reply == tok.decode(ids[:-1])        # as SentencePiece decodes it
  assert c.raw_text == reply + "</s>" and "".join(c.tokens) == c.raw_text
  # Encoding prompt + reply gives back the prompt's and the reply's ids.
  prompt = gen.chat_prompt([{"from": "User", "value": "hi"}])
  assert MISTRAL_INST.encode(tok, prompt + c.raw_text) == c.prompt_token_ids + c.token_ids
  # Plain completions continue text: a leading space is part of the text there.
  (plain,) = gen.complete(["Once upon a time"], max_new_tokens=8)
  assert plain.raw_text.startswith(" Sure")
  # NeMo's template continues the prompt's text too (the model is trained on "Sure").
  monkeypatch.setattr(engine.sampling, "generate",
                      _fake_generate(NEMO.encode(tok, "a\nSure!\n<extra_id_1>")[2:]))
  (c,) = _generator(tok, NEMO).chat([[{"from": "User", "value": "hi"}]], max_new_tokens=12)
  assert c.text == "Sure!" and c.finish_reason == "stop"


# --- PPO ----------------------------------------------------------------------------

SHORT = [{"from": "User", "value": "Say hi."}, {"from": "Assistant", "value": "Hi!"}]
LONG = [{"from": "User", "value": "Count to twelve."},
        {"from": "Assistant", "value": "one two three four five six seven eight nine ten "
                                       "eleven twelve, and that is all of them"}]


@pytest.fixture(scope="module")
def sft_model(mistral_v1_path, tmp_path_factory):
  """A tiny vocab-32000 model trained to answer SHORT (then the 7-token marker) and LONG."""
  from cai_jax.train.sft import run_sft
  from configs.sft import get_config
  work = tmp_path_factory.mktemp("real_sft")
  train = str(work / "train.jsonl")
  atomic_write_jsonl(train, [{"system": "", "conversations": c} for c in [SHORT, LONG] * 16])
  cfg = get_config("tiny")
  cfg.model.vocab_size = 32000
  cfg.tokenizer = mistral_v1_path
  cfg.train_file = train
  cfg.val_fraction = 0.0
  cfg.packing = False
  cfg.max_seq_len = 64
  cfg.global_batch_size = 8
  cfg.num_epochs = 24
  cfg.optim.update(lr=1e-2, min_lr=1e-2, schedule="constant", warmup_steps=0)
  cfg.eval_every = cfg.save_every = 0
  cfg.export_hf = False
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  run_sft(cfg, str(work / "sft"), mesh=mesh)
  return str(work / "sft" / "model")


def _last_token_reward(seq, valid, positions, last_col):
  return jnp.take_along_axis(seq, last_col[:, None], axis=1)[:, 0].astype(jnp.float32)


@pytest.mark.slow
def test_ppo_stops_on_the_multi_token_marker_and_reads_its_last_token(
    sft_model, mistral_v1_path, mistral_tokenizer, tmp_path):
  from configs.ppo import get_config
  tok = mistral_tokenizer
  eot = NEMO.end_of_turn_ids(tok)
  prompts = [NEMO.render_prompt(c[:1]) for c in (SHORT, LONG, SHORT, LONG)]
  path = str(tmp_path / "prompts.jsonl")
  atomic_write_jsonl(path, [{"text": p} for p in prompts])
  cfg = get_config("tiny")
  cfg.tokenizer = mistral_v1_path
  cfg.actor_init = cfg.critic_init = sft_model
  cfg.train_prompts = path
  cfg.rollout_batch_size = 4
  cfg.max_prompt_len = 48
  cfg.ppo.max_new_tokens = 16
  cfg.ppo.num_minibatches = 1
  cfg.ppo.no_stop_penalty = 1000.0
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  step, state, _ = ppo.build(cfg, mesh, tok, reward_fn=_last_token_reward)
  assert step.eot_ids == eot and len(eot) == 7
  rows, _ = ppo.load_prompt_rows(path, tok, NEMO, cfg.max_prompt_len, tok.pad_id)
  batch = {k: np.stack([r[k] for r in rows]) for k in ("ids", "length")}
  device_batch = step.put_batch(batch)
  r = step.rollout_fn(state.actor.params, step.models.frozen, device_batch["ids"],
                      device_batch["length"], step.eval_sp, step.eval_key)
  scores, lengths, stopped, _ = jax.device_get(step.eval_fn(
      state.actor.params, step.models.frozen, step.models.ref_params, step.models.reward_params,
      r))
  seq = np.asarray(jax.device_get(r.seq))
  P = cfg.max_prompt_len
  for i in (0, 2):                      # SHORT: "Hi!\n" then the whole marker, then stop
    response = seq[i, P:P + int(lengths[i])].tolist()
    assert stopped[i] and response[-len(eot):] == eot, tok.decode(response)
    assert tok.decode(response) == "Hi!\n<extra_id_1>"
    assert scores[i] == float(eot[-1])  # the reward is read at the marker's last token (">")
  for i in (1, 3):                      # LONG: never reaches the marker in 16 tokens
    response = seq[i, P:P + int(lengths[i])].tolist()
    assert not stopped[i] and lengths[i] == cfg.ppo.max_new_tokens
    assert not any(response[k:k + len(eot)] == eot for k in range(len(response)))
    assert scores[i] == float(response[-1]) - cfg.ppo.no_stop_penalty
  # One full iteration runs on these rollouts (score, GAE, update) with finite losses.
  step.kl.value = 0.01
  _, metrics = step(state, device_batch)
  assert metrics["stopped_fraction"] == pytest.approx(0.5)
  assert np.isfinite(metrics["policy_loss"]) and np.isfinite(metrics["value_loss"])


# --- the markers as new pieces (add_chat_tokens) ------------------------------------

def test_added_chat_tokens_change_only_the_markers(mistral_v1_path, mistral_tokenizer, tmp_path,
                                                    rl_cai_model_dir):
  import ml_collections

  from cai_jax import checkpoint
  from cai_jax.model import Mistral
  from cai_jax.tokenizer import Tokenizer
  from cai_jax.tokenizer_stages import add_chat_tokens
  tok = mistral_tokenizer
  # The stage, on a (tiny, vocab-512) base model standing in for Mistral-7B.
  out = add_chat_tokens(ml_collections.ConfigDict(
      {"tokenizer": mistral_v1_path, "pieces": list(NEMO.markers),
       "base_model": rl_cai_model_dir}), str(tmp_path / "chat_tokens"))
  ext = Tokenizer.from_file(out["outputs"]["tokenizer"])
  assert out["added"] == {"<extra_id_0>": 32000, "<extra_id_1>": 32001, "<extra_id_2>": 32002}
  assert ext.vocab_size == 32003 and NEMO.end_of_turn_ids(ext) == [32001]
  recorded = json.load(open(os.path.join(out["outputs"]["model"], "added_tokens.json")))
  assert recorded["added_pieces"] == out["added"] and recorded["model_vocab_after"] == 32003
  # Every conversation encodes as before, each 7-token marker now one id (the one at the
  # start of a text has its dummy-prefix spelling, "▁<").
  sequences = [(m, NEMO.marker_ids(tok, m)) for m in NEMO.markers] + [
      (m, tok.encode_chunks([m], [True])[0]) for m in NEMO.markers]
  for turns, system in conversations(8):
    old, old_mask = NEMO.render_ids(tok, turns, system)
    new, new_mask = NEMO.render_ids(ext, turns, system)
    expected, expected_mask, k = [], [], 0
    while k < len(old):
      for marker, seq in sequences:
        if old[k:k + len(seq)] == seq:
          expected.append(ext.token_to_id(marker))
          expected_mask.append(old_mask[k])
          k += len(seq)
          break
      else:
        expected.append(old[k])
        expected_mask.append(old_mask[k])
        k += 1
    assert new == expected and new_mask == expected_mask
  # The grown model (the stand-in's 512 rows grow to the tokenizer's 32003): old ids keep
  # their logits; new rows and LM-head columns start at the mean.
  cfg, params, _ = checkpoint.load_model(rl_cai_model_dir)
  grown_cfg, grown, _ = checkpoint.load_model(out["outputs"]["model"])
  assert grown_cfg.vocab_size == 32003 and cfg.vocab_size == 512
  emb = np.asarray(grown["embed_tokens"]["embedding"])
  np.testing.assert_allclose(emb[512:], np.broadcast_to(emb[:512].mean(0), emb[512:].shape),
                             rtol=1e-6, atol=1e-7)
  head = np.asarray(grown["lm_head"]["kernel"])
  np.testing.assert_allclose(head[:, 32001], head[:, :512].mean(1), rtol=1e-6, atol=1e-7)
  tokens = jnp.asarray([[5, 17, 200, 3, 99]])
  before = Mistral(cfg).apply({"params": params}, tokens)
  after = Mistral(grown_cfg).apply({"params": grown}, tokens)
  np.testing.assert_allclose(after[..., :512], before, rtol=1e-5, atol=1e-5)
