"""SFT: `python -m launch.train_sft --config=configs/sft.py:tiny --workdir=DIR [--config.x=y]`.

Replaces NeMo-Aligner's `examples/nlp/gpt/train_gpt_sft.py` (CAI tutorial step 3).
Resumes from the newest checkpoint in DIR/checkpoints when rerun.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from launch import runtime

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sft.py:tiny", "SFT config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  runtime.setup()
  runtime.preflight('sft', _CONFIG.value)
  from cai_jax.train.sft import run_sft
  report = run_sft(_CONFIG.value, _WORKDIR.value)
  logging.info("SFT done: %s", runtime.headline(report))
  print(runtime.headline(report))


if __name__ == "__main__":
  app.run(main)
