"""Serves a model over HTTP: NeMo's `PUT /generate` and an OpenAI-compatible `/v1` API.

    python -m launch.serve --checkpoint=MODEL_DIR --tokenizer=tokenizer.model
    python -m launch.serve --checkpoint=ppo/final --tokenizer=tok.model --port=1427 \\
        --mesh=1,1,-1 --api_key_env=CAI_JAX_API_KEY --host=0.0.0.0

`MODEL_DIR` is an HF Mistral directory or one of ours (orbax). The server
binds 127.0.0.1 unless told otherwise; before exposing it on another
interface, set an API key (`--api_key`, or better the environment variable
named by `--api_key_env`, which keeps the key out of `ps`).

Once it logs its URL, the NeMo tutorial's client snippet works against it
(`PUT /generate`), and so does any OpenAI client with `base_url=<url>/v1`.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (HF or cai_jax orbax).",
                                  required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "SentencePiece model file (or a directory with tokenizer.model); "
                                 "default: MODEL_DIR/tokenizer.model.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 5999, "TCP port.")
_API_KEY = flags.DEFINE_string("api_key", None,
                               "Require 'Authorization: Bearer <key>' on every endpoint but "
                               "/health.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "CAI_JAX_API_KEY",
                                   "Environment variable read for the key when --api_key is unset.")
_TEMPLATE = flags.DEFINE_enum("template", "nemo", ["nemo", "mistral_inst"],
                              "Chat template for /v1/chat/completions.")
_MESH = flags.DEFINE_string("mesh", "",
                            "Device mesh sizes 'data,fsdp,tensor' (one may be -1), e.g. 1,1,-1 "
                            "for tensor parallelism; default: one device, or fsdp over all.")
_MAX_BATCH_ROWS = flags.DEFINE_integer("max_batch_rows", 32,
                                       "Most prompts decoded together (requests are merged).")
_MIN_BATCH_ROWS = flags.DEFINE_integer("min_batch_rows", 1,
                                       "Pad batches to at least this many rows (fewer compiles).")
_BATCH_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 5.0,
                                      "How long to wait for more requests to merge into a batch.")
_MODEL_NAME = flags.DEFINE_string("model_name", None,
                                  "Model id on /v1/models; default: the checkpoint's dir name.")
_MAX_BODY_MB = flags.DEFINE_float("max_body_mb", 8.0,
                                  "Largest request body accepted (MiB); larger ones get 413 "
                                  "unread.")


def parse_mesh(spec: str):
  """'data,fsdp,tensor' sizes -> a Mesh; '' -> None on one device, fsdp over all otherwise."""
  import jax

  from cai_jax import parallel
  if not spec:
    return None if jax.device_count() == 1 else parallel.mesh_from_config(None)
  try:
    sizes = [int(s) for s in spec.split(",")]
  except ValueError:
    raise app.UsageError(f"--mesh={spec!r}: expected three integers 'data,fsdp,tensor'") from None
  if len(sizes) != 3:
    raise app.UsageError(f"--mesh={spec!r}: expected three sizes 'data,fsdp,tensor'")
  return parallel.mesh_from_config(dict(zip(parallel.MESH_AXES, sizes)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import uvicorn

  from cai_jax.engine import TextGenerator
  from cai_jax.serve.server import create_app
  from launch import runtime

  runtime.setup()
  checkpoint = _CHECKPOINT.value
  tokenizer = _TOKENIZER.value or os.path.join(checkpoint, "tokenizer.model")
  mesh = parse_mesh(_MESH.value)
  print(f"loading {checkpoint} (tokenizer {tokenizer}, mesh "
        f"{dict(mesh.shape) if mesh is not None else 'none'})", flush=True)
  generator = TextGenerator.from_checkpoint(checkpoint, tokenizer, mesh=mesh,
                                            template=_TEMPLATE.value)
  api_key = _API_KEY.value or os.environ.get(_API_KEY_ENV.value) or None
  if api_key is None and _HOST.value not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("serving on %s without an API key: anyone who can reach the port can "
                    "use the model (set --api_key_env)", _HOST.value)
  model_name = _MODEL_NAME.value or os.path.basename(os.path.normpath(checkpoint))
  server_app = create_app(generator, api_key=api_key, max_batch_rows=_MAX_BATCH_ROWS.value,
                          batch_window_ms=_BATCH_WINDOW_MS.value, model_name=model_name,
                          min_batch_rows=_MIN_BATCH_ROWS.value,
                          max_body_bytes=int(_MAX_BODY_MB.value * 2**20))
  host = f"[{_HOST.value}]" if ":" in _HOST.value else _HOST.value
  url = f"http://{host}:{_PORT.value}"
  print(f"serving {model_name} at {url}: NeMo PUT {url}/generate, OpenAI {url}/v1 "
        f"({'API key required' if api_key else 'no API key'})", flush=True)
  uvicorn.run(server_app, host=_HOST.value, port=_PORT.value, log_level="info")
  return 0


if __name__ == "__main__":
  app.run(main)
