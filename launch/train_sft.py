"""SFT: `python -m launch.train_sft --config=configs/sft.py:tiny --workdir=DIR [--config.x=y]`.

Replaces NeMo-Aligner's `examples/nlp/gpt/train_gpt_sft.py` (CAI tutorial step 3).
Resumes from the newest checkpoint in DIR/checkpoints when rerun.
"""

from absl import app, flags, logging

from launch import runtime

_CONFIG = runtime.define_config("configs/sft.py:tiny", "SFT config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_FORCE = runtime.define_force()


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value)
  runtime.announce("sft", _WORKDIR.value)
  runtime.preflight("sft", _CONFIG.value)
  from cai_jax.train.sft import run_sft
  with runtime.user_errors("train_sft"):
    report = run_sft(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
  logging.info("SFT done: %s", runtime.headline(report))
  print(runtime.headline(report))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
