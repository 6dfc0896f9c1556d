"""Reward model: `python -m launch.train_rm --config=configs/rm.py:tiny --workdir=DIR`.

Replaces NeMo-Aligner's `examples/nlp/gpt/train_reward_model.py` (CAI tutorial step 5).
"""

from absl import app, flags, logging

from launch import runtime

_CONFIG = runtime.define_config("configs/rm.py:tiny", "Reward model config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_FORCE = runtime.define_force()


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value)
  runtime.announce("rm", _WORKDIR.value)
  runtime.preflight("rm", _CONFIG.value)
  from cai_jax.train.reward import run_rm
  with runtime.user_errors("train_rm"):
    report = run_rm(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
  logging.info("RM done: %s", runtime.headline(report))
  print(runtime.headline(report))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
