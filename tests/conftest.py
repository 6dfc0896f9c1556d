"""Shared pytest fixtures. Each block below belongs to one module; keep blocks self-contained."""

# ---- jax test environment (model/checkpoint/sharding tests) -------------------
# Eight simulated CPU devices for the sharding tests. Must run before anything
# imports jax, hence above every other import in this file.
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# ---- end of jax test environment ----------------------------------------------

import pathlib

import pytest

from cai_jax.tokenizer import Tokenizer, train_sentencepiece


# ---- tokenizer fixtures (cai_jax/tokenizer.py) -------------------------------

TOKENIZER_CORPUS = pathlib.Path(__file__).parent.parent / "data" / "tokenizer_corpus.txt"


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
  """A vocab-512 SentencePiece model trained on the shipped corpus (chat tokens included)."""
  text = TOKENIZER_CORPUS.read_text(encoding="utf-8")
  prefix = tmp_path_factory.mktemp("tokenizer") / "sp512"
  return train_sentencepiece([text], str(prefix), vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer(sp_model_path) -> Tokenizer:
  return Tokenizer.from_file(sp_model_path)


@pytest.fixture(scope="session")
def mistral_v1_path() -> str:
  """Mistral-7B's own v1 tokenizer.model (32000 pieces, dummy prefix, no chat pieces), as the
  `mistral-common` package (a test requirement) ships it; never downloaded."""
  import importlib.util
  spec = importlib.util.find_spec("mistral_common")
  if spec is None:
    pytest.fail("mistral-common is not installed: pip install -r requirements-test.txt")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
  assert path.is_file(), f"{path}: mistral-common no longer ships the v1 tokenizer here"
  return str(path)


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_v1_path) -> Tokenizer:
  return Tokenizer.from_file(mistral_v1_path)

# ---- end of tokenizer fixtures ------------------------------------------------

# ---- server fixtures (cai_jax/engine.py, cai_jax/serve) -----------------------
# One tiny random model and one running server per session: compiles are the
# cost here, so the tests share shapes (see tests/test_server.py).


@pytest.fixture(scope="session")
def serve_generator(tokenizer):
  """A TextGenerator over the tiny preset with random params (vocab = the tokenizer's)."""
  import jax

  from cai_jax import parallel
  from cai_jax.engine import TextGenerator
  from cai_jax.model import MistralConfig, init_params
  from configs.models import get_config as model_preset
  config = MistralConfig.from_config(model_preset("tiny"), vocab_size=tokenizer.vocab_size)
  mesh = parallel.create_mesh([1, 1, 1], devices=jax.devices()[:1])
  params, _ = init_params(config, mesh, jax.random.PRNGKey(0))
  return TextGenerator(config, params, tokenizer, template="nemo")


def _serve_in_thread(app):
  """Runs `app` with uvicorn on a free loopback port; returns (url, stop)."""
  import socket
  import threading
  import time

  import uvicorn
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError("uvicorn did not start")
    time.sleep(0.01)

  def stop():
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()

  return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def serve_app(serve_generator):
  """The app under test: no API key; batches padded to 32 rows so few shapes compile."""
  from cai_jax.serve.server import create_app
  return create_app(serve_generator, max_batch_rows=32, batch_window_ms=5, min_batch_rows=32,
                    model_name="tiny-test")


@pytest.fixture(scope="session")
def serve_url(serve_app):
  url, stop = _serve_in_thread(serve_app)
  yield url
  stop()


@pytest.fixture(scope="session")
def serve_auth_url(serve_generator):
  """A second server that requires `Authorization: Bearer test-key`."""
  from cai_jax.serve.server import create_app
  app = create_app(serve_generator, api_key="test-key", min_batch_rows=32, model_name="tiny-test")
  url, stop = _serve_in_thread(app)
  yield url
  stop()

# ---- end of server fixtures ---------------------------------------------------

# ---- sl_cai fixtures (cai_jax/cai/sl_cai.py, cai_jax/cai/constitution.py) -----


@pytest.fixture(scope="session")
def sl_cai_model_dir(serve_generator, tmp_path_factory) -> str:
  """The server tests' tiny random model saved as a cai_jax model dir (same shapes, same compiles)."""
  from cai_jax import checkpoint
  path = tmp_path_factory.mktemp("sl_cai_model") / "model"
  checkpoint.save_model(str(path), serve_generator.config, serve_generator.params)
  return str(path)

# ---- end of sl_cai fixtures ---------------------------------------------------

# ---- rl_cai fixtures (cai_jax/cai/hh.py, judge.py, rl_cai.py) -----------------


@pytest.fixture(scope="session")
def rl_cai_model_dir(sp_model_path, tmp_path_factory) -> str:
  """A tiny random LM saved as a cai_jax model dir with its tokenizer.model.

  Same config as the server tests' model (so the sampler's compiles are
  shared); the LM head is scaled up so the judge's letter probabilities are
  far from 0.5 and a wrong padding or position shows in the numbers.
  """
  import shutil

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from cai_jax import checkpoint
  from cai_jax.model import Mistral, MistralConfig
  from configs.models import get_config as model_preset
  config = MistralConfig.from_config(model_preset("tiny"),
                                     vocab_size=Tokenizer.from_file(sp_model_path).vocab_size)
  init = jax.jit(lambda rng: nn.unbox(Mistral(config).init(rng, jnp.zeros((1, 1), jnp.int32))))
  params = init(jax.random.PRNGKey(7))["params"]
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 30.0
  path = tmp_path_factory.mktemp("rl_cai_model") / "model"
  checkpoint.save_model(str(path), config, params)
  shutil.copy(sp_model_path, path / "tokenizer.model")
  return str(path)


@pytest.fixture(scope="session")
def rl_cai_generator(rl_cai_model_dir):
  from cai_jax.engine import TextGenerator
  return TextGenerator.from_checkpoint(rl_cai_model_dir,
                                       os.path.join(rl_cai_model_dir, "tokenizer.model"))


@pytest.fixture(scope="session")
def rl_cai_serve():
  """`with rl_cai_serve(app) as url:` runs a FastAPI app with uvicorn on a free loopback port."""
  import contextlib

  @contextlib.contextmanager
  def serve(app):
    url, stop = _serve_in_thread(app)
    try:
      yield url
    finally:
      stop()

  return serve

# ---- end of rl_cai fixtures ---------------------------------------------------

# ---- RL fixtures (cai_jax/train/ppo.py: test_ppo, test_rl_estimators, test_ppo_microbatch,
# test_lora) -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory, sp_model_path) -> tuple[str, str]:
  """(train, held-out) red-team prompt files rendered with the NeMo template
  (`tests/ppo_worker.write_prompt_files`), the RL tests' prompts."""
  import ppo_worker
  return ppo_worker.write_prompt_files(str(tmp_path_factory.mktemp("prompts")), sp_model_path)

# ---- end of RL fixtures ---------------------------------------------------------

# ---- train fixtures (cai_jax/train: tests/test_train.py, test_sft.py, test_rm.py) ----
# Compiling the tiny model's init, train and eval steps costs tens of seconds on
# a small CPU, and the training tests run the same programs many times (a
# reference run, then the interrupted and resumed runs). A persistent
# compilation cache, on only while a training test module runs, makes each
# repeat a cache hit; it changes which compile is reused, never what runs.


@pytest.fixture(scope="session")
def train_compile_cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("jax_compile_cache"))


@pytest.fixture(scope="module")
def train_compile_cache(train_compile_cache_dir):
  """Enables JAX's persistent compilation cache for one module, then restores the settings."""
  import jax
  from jax._src import compilation_cache  # no public switch to re-read the setting mid-process

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", train_compile_cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  yield train_compile_cache_dir
  for n, v in before.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()

# ---- end of train fixtures -----------------------------------------------------
