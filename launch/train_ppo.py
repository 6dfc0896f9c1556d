"""PPO: `python -m launch.train_ppo --config=configs/ppo.py:tiny --workdir=DIR`.

Replaces NeMo-Aligner's `serve_ppo_critic.py` + `train_gpt_ppo_actor.py` pair (CAI
tutorial step 6): actor, critic, reference and reward model run in this one process.
"""

from absl import app, flags, logging

from launch import runtime

_CONFIG = runtime.define_config("configs/ppo.py:tiny", "PPO config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_FORCE = runtime.define_force()


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value)
  runtime.announce("ppo", _WORKDIR.value)
  runtime.preflight("ppo", _CONFIG.value)
  from cai_jax.train.ppo import run_ppo
  with runtime.user_errors("train_ppo"):
    report = run_ppo(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
  logging.info("PPO done: %s", runtime.headline(report))
  print(runtime.headline(report))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
