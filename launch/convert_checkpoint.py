"""Converts model checkpoints between Hugging Face safetensors and our orbax model dirs.

    python -m launch.convert_checkpoint --src=HF_DIR --dst=OUT            # HF -> orbax
    python -m launch.convert_checkpoint --src=OURS --dst=OUT              # ours -> HF
    python -m launch.convert_checkpoint --src=HF_DIR --dst=OUT --to=hf --dtype=bfloat16

`--to` defaults to the other format from the source's. The head (LM or scalar
reward/value head) is read from the source (`architectures` in an HF
config.json, `cai_jax_head` in ours) unless `--head` says otherwise. The
conversion is transposes and reshapes only, so float32 -> float32 (or bf16 ->
bf16) round trips are bit-identical.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_SRC = flags.DEFINE_string("src", None, "Source model directory (HF or cai_jax orbax).",
                           required=True)
_DST = flags.DEFINE_string("dst", None, "Destination directory (created; replaced if it exists).",
                           required=True)
_TO = flags.DEFINE_enum("to", None, ["orbax", "hf"],
                        "Output format; default: orbax for an HF source, hf for ours.")
_HEAD = flags.DEFINE_enum("head", "auto", ["auto", "lm", "scalar"],
                          "Model head; auto reads it from the source.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Store params in this dtype; default: as in the source.")
_MAX_SHARD_BYTES = flags.DEFINE_integer("max_shard_bytes", 5 * 2**30,
                                        "HF output: largest safetensors shard, in bytes.")


def convert(src: str, dst: str, to: str | None = None, head: str = "auto",
            dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> str:
  """Does the conversion; returns the one-line summary that `main` prints."""
  from cai_jax import checkpoint
  if not os.path.isdir(src):
    raise checkpoint.CheckpointError(f"--src={src}: no such directory")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise checkpoint.CheckpointError(f"--dst={dst} is the source directory; choose another")
  src_kind = "orbax" if checkpoint.is_orbax_model_dir(src) else "hf"
  to = to or ("hf" if src_kind == "orbax" else "orbax")
  cfg, params, head = checkpoint.load_model(
      src, head=None if head == "auto" else head, param_dtype=dtype, dtype=dtype)
  if to == "orbax":
    checkpoint.save_model(dst, cfg, params, head=head)
  else:
    checkpoint.save_hf(dst, cfg, params, head=head, max_shard_bytes=max_shard_bytes)
  return (f"converted {src} ({src_kind}) -> {dst} ({to}): head={head}, "
          f"param_dtype={cfg.param_dtype}, layers={cfg.num_hidden_layers}, "
          f"hidden={cfg.hidden_size}, params={cfg.num_params(head):,}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from launch import runtime
  runtime.quiet_console()         # orbax logs every file it touches at INFO
  from cai_jax.checkpoint import CheckpointError
  try:
    summary = convert(_SRC.value, _DST.value, _TO.value, _HEAD.value, _DTYPE.value,
                      _MAX_SHARD_BYTES.value)
  except CheckpointError as e:
    print(f"convert_checkpoint: error: {e}", file=sys.stderr)
    return 1
  print(summary)
  return 0


if __name__ == "__main__":
  app.run(main)
