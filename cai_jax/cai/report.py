"""Plots and the markdown summary of an evaluation (matplotlib, headless)."""

from __future__ import annotations

import os
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cai_jax.metrics import read_metrics  # noqa: E402

# Which metrics tell each stage's story.
CURVES = {
    "base": [("train", "loss"), ("eval", "val_loss")],
    "sft": [("train", "loss"), ("eval", "val_loss")],
    "rm": [("train", "loss"), ("train", "accuracy"), ("eval", "val_accuracy")],
    "ppo": [("train", "score_mean"), ("train", "kl_per_sequence"), ("eval", "eval_score_mean")],
    "dpo": [("train", "loss"), ("train", "margin"), ("eval", "val_accuracy")],
}


def plot_training_curves(stage_dirs: Mapping[str, str], out_dir: str) -> list[str]:
  """One PNG per stage with its metrics.jsonl curves; returns the files written."""
  written = []
  for stage, workdir in stage_dirs.items():
    path = os.path.join(workdir, "metrics.jsonl")
    wanted = CURVES.get(stage)
    if not wanted or not os.path.exists(path):
      continue
    fig, axes = plt.subplots(1, len(wanted), figsize=(4.2 * len(wanted), 3.2), squeeze=False)
    for ax, (split, key) in zip(axes[0], wanted):
      rows = [r for r in read_metrics(path, split) if isinstance(r.get(key), (int, float))]
      ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="." if len(rows) < 30 else None)
      ax.set_title(f"{stage}: {split} {key}")
      ax.set_xlabel("step" if stage != "ppo" else "iteration")
      ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(out_dir, f"curves_{stage}.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    written.append(out)
  return written


def plot_win_rates(win_rates: Mapping[str, Mapping[str, float]], out_path: str) -> str:
  """Bar chart: for each comparison ("ppo vs sft"), win rate per prompt set."""
  comparisons = list(win_rates)
  sets = sorted({s for v in win_rates.values() for s in v})
  fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(comparisons)), 3.4))
  width = 0.8 / max(len(sets), 1)
  for i, s in enumerate(sets):
    xs = [j + i * width for j in range(len(comparisons))]
    ax.bar(xs, [win_rates[c].get(s, float("nan")) for c in comparisons], width, label=s)
  ax.axhline(0.5, color="grey", lw=1, ls="--")
  ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(comparisons))])
  ax.set_xticklabels(comparisons)
  ax.set_ylim(0, 1)
  ax.set_ylabel("judge win rate (both orders)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path


def markdown_summary(report: Mapping) -> str:
  """A human-readable page of the evaluation report."""
  lines = ["# cai_jax evaluation", ""]
  models = report.get("models", {})
  sets = report.get("prompt_sets", {})
  lines += ["## Models", "", "| model | prompt set | RM mean score | mean length (tokens) | "
            "evasive rate |", "|---|---|---|---|---|"]
  for name, per_set in models.items():
    for s, m in per_set.items():
      lines.append(f"| {name} | {s} | {_fmt(m.get('rm_score_mean'))} | "
                   f"{_fmt(m.get('response_length_mean'), 1)} | {_fmt(m.get('evasive_rate'))} |")
  lines += ["", "## Judge win rates (both orders, soft labels averaged)", "",
            "| comparison | prompt set | win rate | judged | dropped |", "|---|---|---|---|---|"]
  for comp, per_set in report.get("win_rates", {}).items():
    for s, w in per_set.items():
      lines.append(f"| {comp} | {s} | {_fmt(w.get('win_rate'))} | {w.get('judged', 0)} | "
                   f"{w.get('dropped', 0)} |")
  lines += ["", "Prompt sets: " + ", ".join(f"{k} ({v} prompts)" for k, v in sets.items()), ""]
  examples = report.get("examples", [])
  if examples:
    lines += ["## Examples", ""]
    for ex in examples:
      lines.append(f"**{ex['prompt_set']}** — {ex['prompt']!r}")
      for name, text in ex["responses"].items():
        lines.append(f"- *{name}*: {text!r}")
      lines.append("")
  return "\n".join(lines)


def _fmt(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  return f"{x:.{digits}f}"
