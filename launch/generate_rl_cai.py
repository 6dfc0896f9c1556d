"""RL-CAI preference data: `python -m launch.generate_rl_cai --config=configs/rl_cai.py:tiny --workdir=DIR`.

Replaces NeMo-Aligner's `examples/nlp/cai/generate_rl_cai_dataset.py` (CAI tutorial
step 4). Tiny, in process (policy and judge = the SFT model):

  python -m launch.generate_rl_cai --config=configs/rl_cai.py:tiny --workdir=DIR \\
      --config.policy.model_dir=SFT_DIR --config.blend_with=PROCESS_HH_DIR

With a remote judge (any OpenAI-compatible endpoint; the key is read from the
environment variable named by judge.api_key_env):

  NVIDIA_API_KEY=nvapi-... python -m launch.generate_rl_cai \\
      --config=configs/rl_cai.py:mistral_7b --workdir=DIR \\
      --config.policy.model_dir=SFT_DIR --config.blend_with=PROCESS_HH_DIR

Rerunning with the same settings resumes a killed run without duplicates or gaps.
"""

import sys

from absl import app, flags, logging

from launch import runtime

_CONFIG = runtime.define_config("configs/rl_cai.py:tiny", "RL-CAI config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value)
  runtime.announce("rl_cai", _WORKDIR.value)
  runtime.preflight("rl_cai", _CONFIG.value)
  from cai_jax.cai import rl_cai
  from cai_jax.data import DataError
  try:
    report = rl_cai.run_rl_cai(_CONFIG.value, _WORKDIR.value, progress=True)
  except (DataError, ValueError) as e:
    sys.exit(f"generate_rl_cai: {e}")
  logging.info("RL-CAI done: %s", report["summary"])
  print(rl_cai.format_summary(report))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
