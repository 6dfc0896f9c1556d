"""DPO: `python -m launch.train_dpo --config=configs/dpo.py:tiny --workdir=DIR`.

Trains the SFT model (`--config.init_from`) on the comparison files RL-CAI and
hh-rlhf write (`--config.train_file`, `--config.test_file`), against itself as
the frozen reference; an alternative to the reward model + PPO stages.
"""

from absl import app, flags, logging

from launch import runtime

_CONFIG = runtime.define_config("configs/dpo.py:tiny", "DPO config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_FORCE = runtime.define_force()


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value)
  runtime.announce("dpo", _WORKDIR.value)
  runtime.preflight("dpo", _CONFIG.value)
  from cai_jax.train.dpo import run_dpo
  with runtime.user_errors("train_dpo"):
    report = run_dpo(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
  logging.info("DPO done: %s", runtime.headline(report))
  print(runtime.headline(report))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
