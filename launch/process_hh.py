"""hh-rlhf comparisons: `python -m launch.process_hh --config=configs/process_hh.py:tiny --workdir=DIR`.

Replaces NeMo-Aligner's `examples/nlp/cai/process_anthropic_hh_using_chat_prompt.py`
(CAI tutorial step 1.4). Writes `{prefix}_{train,test}_{prompts,comparisons}_with_chat_prompt.jsonl`
and `manifest.json` in DIR, e.g. with the hub's data:

  python -m launch.process_hh --config=configs/process_hh.py:mistral_7b --workdir=DIR \\
      --config.subsets=helpful-base,helpful-online,helpful-rejection-sampled
"""

import json
import sys

from absl import app, flags, logging

from launch import runtime

_CONFIG = runtime.define_config("configs/process_hh.py:tiny", "process_hh config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value, uses_jax=False)
  runtime.announce("hh", _WORKDIR.value)
  runtime.preflight("hh", _CONFIG.value)
  from cai_jax.cai import hh
  from cai_jax.data import DataError
  try:
    report = hh.process_hh(_CONFIG.value, _WORKDIR.value)
  except (DataError, ValueError) as e:
    sys.exit(f"process_hh: {e}")
  logging.info("process_hh done: %s", json.dumps(report["counts"]))
  for split in hh.SPLITS:
    c = report["counts"][split]
    print(f"{split}: {c['pairs']} pairs, {c['prompts']} prompts -> "
          f"{report['outputs'][split]['comparisons']}")
  dropped = {k: v.get("dropped", {}) for k, v in report["counts"]["read"].items()}
  print(f"dropped (by reason): {json.dumps(dropped)}")


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
