"""The model a mode runs on, on both sides: cai_jax's config and params, and the torch
reference built beside them (same random weights through an HF checkpoint on CPU; same
shapes, built on the device, on GPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.model import MistralConfig, init_params
from launch.benchmark.timing import log


def import_torch():
  """torch + transformers, quiet and offline (a benchmark never downloads anything)."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  return torch, transformers


def id_tokenizer(vocab_size: int, *, pad: int | None, eos: int | None, unk: int | None):
  """A word-level fast tokenizer over ids, for TRL's trainers: they need a
  `PreTrainedTokenizerBase` (its pad/eos ids), and GRPO and DPO go through text
  (`id_text`). Id i is the word "t{i}", except the special tokens, named "<pad>", "<eos>",
  "<unk>" (no special token may be a prefix of a word: HF tokenizers match them anywhere
  in the text, so an eos "t2" would split "t27" into "t2" and "7"). Each sits at the id
  given, or (None) past the model's vocabulary (V, V+1, ... in that order): an id the
  model can neither emit nor read, so it never stops a rollout or hides a sampled token."""
  _, transformers = import_torch()
  from tokenizers import Tokenizer, models, pre_tokenizers
  specials, next_id = {}, vocab_size
  for role, token_id in (("pad", pad), ("eos", eos), ("unk", unk)):
    if token_id is None:
      token_id, next_id = next_id, next_id + 1
    specials[f"<{role}>"] = token_id
  if len(set(specials.values())) != len(specials):
    raise ValueError(f"special tokens share an id: {specials}")
  vocab = {f"t{i}": i for i in range(vocab_size) if i not in specials.values()}
  vocab.update(specials)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="<eos>", unk_token="<unk>")


def id_text(tokenizer, ids) -> str:
  """Token ids as `id_tokenizer`'s text: [5, 9] -> "t5 t9"."""
  return " ".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def randomize_hf_weights(model, seed: int) -> None:
  """Redraws every weight at ~unit activation scale with norms away from 1.

  HF's 0.02 init makes logits nearly flat, so greedy decoding would repeat one
  token and prove little; the tests use the same weights (tests/hf_utils.py).
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def _hf_kwargs(cfg: MistralConfig) -> dict:
  """`transformers.MistralConfig` arguments of a cai_jax config."""
  return {k: v for k, v in cfg.to_hf_dict().items()
          if k not in ("architectures", "model_type", "torch_dtype")}


@dataclasses.dataclass
class Setup:
  """One mode's model: cai_jax's config and params and how the torch side gets its own.

  CPU mode: an HF directory both sides load (same weights). GPU mode: `hf_dir` is None
  and the torch model is built on `torch_device` with the same shapes (its own weights).
  """
  preset: str
  workdir: str
  hf_dir: str | None
  config: Any              # cai_jax MistralConfig (the mode's dtypes)
  params: Any              # jax arrays on the first device
  seed: int = 0
  device: str = "cpu"      # the benchmark's mode: "cpu" or "gpu"
  torch_device: str = "cpu"
  profile_dir: str | None = None   # where `profile` writes jax.profiler traces
  _rm_dirs: tuple[str, str] | None = None

  def profile(self, name: str, fn: Callable[[], Any]) -> None:
    """With a `profile_dir`: one more call of cai_jax's `fn`, after the timed ones, under
    `jax.profiler.trace` (a TensorBoard / Perfetto trace in profile_dir/name)."""
    if self.profile_dir:
      log(f"profiling {name} -> {os.path.join(self.profile_dir, name)}")
      with jax.profiler.trace(os.path.join(self.profile_dir, name)):
        fn()

  def torch_lm(self, train: bool = False, bf16_weights: bool = False):
    torch, transformers = import_torch()
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    if self.hf_dir is not None:
      model = transformers.MistralForCausalLM.from_pretrained(
          self.hf_dir, dtype=dtype, attn_implementation="sdpa").to(self.torch_device)
    else:
      torch.manual_seed(self.seed)
      previous = torch.get_default_dtype()
      torch.set_default_dtype(dtype)
      try:
        with torch.device(self.torch_device):
          model = transformers.MistralForCausalLM(
              transformers.MistralConfig(**_hf_kwargs(self.config), attn_implementation="sdpa"))
      finally:
        torch.set_default_dtype(previous)
    return model.train(train)

  def autocast(self):
    """bf16 autocast for the torch side of the GPU mode (over fp32 weights)."""
    if self.device != "gpu":
      return contextlib.nullcontext()
    import torch
    return torch.autocast(self.torch_device.split(":")[0], dtype=torch.bfloat16)

  def sync(self) -> None:
    """Waits for the torch side's queued GPU work (a timer must not stop before it)."""
    if self.torch_device.startswith("cuda"):
      import torch
      torch.cuda.synchronize()

  def reward_model_dirs(self) -> tuple[str, str]:
    """(HF dir, cai_jax orbax dir) of the scalar-head model: the LM's body plus one
    random score head, so TRL's reward/value model and ours hold the same weights."""
    if self._rm_dirs is None:
      from cai_jax import checkpoint
      body = {k: v for k, v in self.params.items() if k != "lm_head"}
      D = self.config.hidden_size
      score = np.random.default_rng(self.seed + 1).standard_normal((D, 1)) / math.sqrt(D)
      params = {**body, "score": {"kernel": jnp.asarray(score, jnp.float32)}}
      hf = os.path.join(self.workdir, "rm_hf")
      ours = os.path.join(self.workdir, "rm_cai_jax")
      checkpoint.save_hf(hf, self.config, params, head="scalar")
      checkpoint.save_model(ours, self.config, params, head="scalar")
      self._rm_dirs = (hf, ours)
    return self._rm_dirs


def prepare(preset: str, workdir: str, seed: int = 0, *, device: str = "cpu",
            torch_device: str = "cpu", dtype: str = "float32",
            param_dtype: str = "float32", shared_weights: bool = True,
            overrides: dict | None = None) -> Setup:
  """The model of one mode. With `shared_weights`: draws the random HF Mistral of
  `preset`, saves it and loads it into cai_jax (both sides hold the same weights).
  Without: cai_jax's params are initialised on the device (no host round trip) and
  the torch side builds its own (`Setup.torch_lm`). `overrides`: MistralConfig fields
  of how cai_jax computes (never shapes), applied to cai_jax's config once the params
  are built."""
  torch, transformers = import_torch()
  from cai_jax import checkpoint, parallel
  from configs.models import get_config as model_preset
  overrides = dict(overrides or {})
  if not shared_weights:
    cfg = MistralConfig.from_config(model_preset(preset), dtype=dtype, param_dtype=param_dtype)
    mesh = parallel.mesh_from_config(parallel.ONE_DEVICE)
    params, _ = init_params(cfg, mesh, jax.random.PRNGKey(seed))
    jax.block_until_ready(params)
    log(f"model {preset}: {cfg.num_params('lm') / 1e6:.1f}M params ({param_dtype}), "
        "initialised on the device")
    return Setup(preset=preset, workdir=workdir, hf_dir=None, config=cfg.replace(**overrides),
                 params=params, seed=seed, device=device, torch_device=torch_device)
  cfg = MistralConfig.from_config(model_preset(preset))
  torch.manual_seed(seed)
  model = transformers.MistralForCausalLM(transformers.MistralConfig(**_hf_kwargs(cfg)))
  randomize_hf_weights(model, seed)
  hf_dir = os.path.join(workdir, "lm_hf")
  model.save_pretrained(hf_dir)
  del model
  config, params = checkpoint.load_hf(hf_dir)
  config = config.replace(dtype=dtype)
  params = jax.device_put(params, jax.devices()[0])
  log(f"model {preset}: {config.num_params('lm') / 1e6:.1f}M params, saved to {hf_dir}")
  return Setup(preset=preset, workdir=workdir, hf_dir=hf_dir, config=config.replace(**overrides),
               params=params, seed=seed, device=device, torch_device=torch_device)
