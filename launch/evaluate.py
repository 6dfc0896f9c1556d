"""Evaluation: `python -m launch.evaluate --workdir=DIR --models=base=DIR,sft=DIR,ppo=DIR --rm=DIR`.

Compares models on held-out red-team and helpfulness prompts: judge win rates
(both orders), reward-model mean score, response length and evasive rate.
Writes DIR/report.json, summary.md and PNG plots. Replaces the manual
"Step 7: inference" spot checks of the NeMo-Aligner tutorial.
"""

from absl import app, flags

from launch import runtime

_CONFIG = runtime.define_config("configs/evaluate.py:tiny", "Evaluation config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_MODELS = flags.DEFINE_list("models", None, "name=model_dir pairs, earliest stage first.",
                            required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "sentencepiece model (default: in the first model dir).")
_RM = flags.DEFINE_string("rm", "", "Reward model dir (optional).")
_CURVES = flags.DEFINE_list("curves", [], "stage=workdir pairs whose metrics.jsonl get plotted.")


def main(argv):
  del argv
  runtime.setup(_WORKDIR.value)
  runtime.announce("evaluate", _WORKDIR.value)
  import os
  runtime.preflight("evaluate", _CONFIG.value)
  from cai_jax.cai.evaluate import run_evaluate
  models = dict(kv.split("=", 1) for kv in _MODELS.value)
  tok = _TOKENIZER.value or os.path.join(next(iter(models.values())), "tokenizer.model")
  curves = dict(kv.split("=", 1) for kv in _CURVES.value)
  result = run_evaluate(_CONFIG.value, _WORKDIR.value, models=models, tokenizer_path=tok,
                        rm_dir=_RM.value, stage_dirs=curves)
  for comp, per in result["win_rates"].items():
    print(comp, {s: v["win_rate"] for s, v in per.items()})
  print("report:", os.path.join(_WORKDIR.value, "summary.md"))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
