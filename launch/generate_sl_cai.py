"""SL-CAI data: `python -m launch.generate_sl_cai --config=configs/sl_cai.py:tiny --workdir=DIR`.

Replaces NeMo-Aligner's `examples/nlp/cai/generate_sl_cai_dataset.py` (CAI
tutorial step 2). Rerun with the same config after a crash or a kill: it
resumes from `DIR/sl_cai_raw.jsonl.partial` without repeating or skipping a prompt.

    # in-process engine on a local model
    python -m launch.generate_sl_cai --config=configs/sl_cai.py:tiny --workdir=/tmp/sl_cai \\
        --config.backend.model_dir=/path/to/model
    # a NeMo (or cai_jax) server, as the tutorial does
    python -m launch.generate_sl_cai --config=configs/sl_cai.py:mistral_7b --workdir=/tmp/sl_cai \\
        --config.backend.url=http://host:5999
"""

import json
import sys

from absl import app, flags, logging

from launch import runtime

_CONFIG = runtime.define_config("configs/sl_cai.py:tiny", "SL-CAI config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def _print_summary(summary: dict) -> None:
  p, s = summary["prompts"], summary["status"]
  print(f"SL-CAI: {p.get('prompts', 0)} prompts ({p.get('records', 0)} records read, "
        f"{p.get('duplicates', 0)} duplicates, {p.get('no_human_turn', 0)} without a human turn, "
        f"{p.get('empty_prompt', 0)} empty), {summary['rounds']} round(s)")
  print(f"  generated {summary['generated_now']} now, {summary['resumed']} resumed, "
        f"{summary['prompts_per_s']} prompts/s; ok {s['ok']}, dropped empty "
        f"{summary['dropped_empty']} ({', '.join(f'{k} {v}' for k, v in s.items() if k != 'ok')})")
  print(f"  {summary['sl_cai_records']} SL-CAI records + {summary['helpfulness']['used']} "
        f"helpfulness -> {summary['blend_records']} in the blend")
  print(f"  mean chars: {json.dumps(summary['mean_chars'])}")
  print(f"  outputs: {json.dumps(summary['outputs'])}")


def main(argv):
  del argv
  cfg = _CONFIG.value
  runtime.setup(_WORKDIR.value, uses_jax=cfg.backend.kind == "local")
  runtime.announce("sl_cai", _WORKDIR.value)
  runtime.preflight("sl_cai", _CONFIG.value)
  from cai_jax.cai.sl_cai import run_sl_cai
  from cai_jax.serve.client import RemoteError
  try:
    summary = run_sl_cai(cfg, _WORKDIR.value)
  except (RemoteError, ValueError) as e:
    # User-fixable (bad data — DataError is a ValueError —, config or server): one clear
    # line, no traceback.
    # Finished records stay in the partial file; rerunning resumes after them.
    logging.error("SL-CAI failed: %s", e)
    print(f"error: {e}\n(finished prompts are kept; rerun the same command to resume)",
          file=sys.stderr)
    sys.exit(1)
  logging.info("SL-CAI done: %s", json.dumps(summary))
  _print_summary(summary)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
