"""Process set-up shared by the entrypoints: multi-host init, logging, summaries."""

from __future__ import annotations

import contextlib
import json
import logging as pylogging
import os
import re
import sys

from absl import logging


def _bad_override(e: Exception, where: str) -> str:
  # ml_collections nests the KeyError's repr in the AttributeError: unquote it.
  detail = re.sub(r"\\?'", "", str(e)).replace("\\n", " ").replace("\n", " ").strip("\" ")
  if isinstance(e, (AttributeError, KeyError)):
    detail = f"unknown config field {detail}"
  given = [a for a in sys.argv[1:] if a.startswith("--config")]
  return (f"{os.path.basename(sys.argv[0])}: bad --config: {detail} "
          f"(given: {' '.join(given) or 'none'}; field names are those of {where})")


def define_config(default: str, help_text: str):
  """`--config` (an ml_collections config file and `--config.x=y` overrides), with a clean
  error for a bad override or preset: absl applies them while this module is imported (the
  default file) or while flags are parsed (`parse_flags`), and a mistyped field would
  otherwise end in a traceback saying only `AttributeError: "'typo'"`."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(_bad_override(e, default.split(":")[0]))


def parse_flags(argv):
  """`app.run(main, flags_parser=runtime.parse_flags)`: absl's parser, with bad config
  overrides and presets reported in one line."""
  from absl import app
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    config = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "--config")
    sys.exit(_bad_override(e, config.split(":")[0]))


def define_force():
  """`--force` of the training stages (see `cai_jax.train.identity.claim_workdir`)."""
  from absl import flags
  return flags.DEFINE_bool("force", False, "If --workdir holds a run of another config or "
                           "inputs, delete its outputs and start afresh (else it is refused).")


LOG_FILE = "run.log"
_FILE_FORMAT = "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"


def log_name() -> str:
  """`run.log` on the lead process, `run.<i>.log` on the others of a multi-host job."""
  import jax
  i = jax.process_index()
  return LOG_FILE if i == 0 else LOG_FILE.replace(".log", f".{i}.log")


class _LogFile(pylogging.FileHandler):
  """A log file that comes into being with its first record (directory included), so a
  stage refused before any work leaves its workdir untouched."""

  def __init__(self, path: str):
    super().__init__(path, delay=True)

  def _open(self):
    os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
    return super()._open()

  def handleError(self, record):
    # An unwritable workdir: the stage itself stops with an error naming it; the log
    # records just go nowhere instead of printing a traceback per record.
    self.setLevel(pylogging.CRITICAL + 1)


def _file_handler() -> pylogging.FileHandler | None:
  return next((h for h in pylogging.getLogger().handlers if getattr(h, "cai_jax_log", False)),
              None)


def log_to(path: str | None) -> None:
  """Sends every INFO-and-above log record (the library's, orbax's checkpoint chatter, JAX's)
  to the file `path` (appended; None: to no file). The console keeps warnings and errors,
  and INFO too when `--verbosity` is given (`setup`)."""
  root = pylogging.getLogger()
  old = _file_handler()
  if old is not None:
    root.removeHandler(old)
    old.close()
    root.setLevel(old.root_level)
  if path is None:
    return
  handler = _LogFile(os.path.abspath(path))
  handler.cai_jax_log = True
  handler.root_level = root.level        # put back when the file is closed
  handler.setLevel(pylogging.INFO)
  handler.setFormatter(pylogging.Formatter(_FILE_FORMAT))
  root.addHandler(handler)
  if root.level > pylogging.INFO or root.level == pylogging.NOTSET:
    root.setLevel(pylogging.INFO)


@contextlib.contextmanager
def stage_log(path: str):
  """`log_to(path)` for a block (one stage of the pipeline), then back to the previous file."""
  previous = _file_handler()
  previous = previous.baseFilename if previous is not None else None
  log_to(path)
  try:
    yield
  finally:
    log_to(previous)


def quiet_console() -> None:
  """Console logging at WARNING unless `--verbosity` (or `-v`) was given explicitly."""
  from absl import flags
  explicit = "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present
  logging.get_absl_handler().setLevel(pylogging.NOTSET if explicit else pylogging.WARNING)


def setup(workdir: str | None = None, *, uses_jax: bool = True) -> None:
  """Logging and, when launched as one, the multi-host job.

  INFO records go to `<workdir>/run.log` and the console shows warnings, errors and
  what the entrypoint prints (a start line, progress bars, a result line);
  `--verbosity=0` (INFO) or higher brings the INFO records back to the console.

  `jax.distributed.initialize()` discovers the coordinator itself under Slurm
  (one task per host) and on Cloud TPU pods; elsewhere set
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or
  CAI_JAX_DISTRIBUTED=1 to force it. `uses_jax=False` (a stage that only talks to
  servers) sets up logging without importing JAX.
  """
  quiet_console()
  if not uses_jax:
    if workdir:
      log_to(os.path.join(workdir, LOG_FILE))
    return
  import jax
  if (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("CAI_JAX_DISTRIBUTED") == "1"
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
    jax.distributed.initialize()
  logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  if workdir:
    log_to(os.path.join(workdir, log_name()))


def announce(stage: str, workdir: str) -> None:
  """The stage's start line on the console (its progress bar and result line follow)."""
  print(f"{stage}: running -> {os.path.abspath(workdir)} (INFO log: {LOG_FILE})", flush=True)


def preflight(stage: str, cfg) -> None:
  """Exits with every problem of the stage's config listed, before any work (see
  `cai_jax.preflight`)."""
  from cai_jax import preflight as checks
  problems = checks.stage_problems(stage, cfg)
  if problems:
    sys.exit(f"{stage}: {checks.PreflightError('config', problems)}")


@contextlib.contextmanager
def user_errors(name: str):
  """Errors a user can fix (bad config, data, paths, a refused workdir, a diverged run) end
  the program with one clear line; `--verbosity=1` shows the traceback instead."""
  try:
    yield
  except (ValueError, OSError, FloatingPointError) as e:
    if logging.get_verbosity() >= 1:
      raise
    sys.exit(f"{name}: error: {e}\n(rerun with --verbosity=1 for the traceback)")


# What a data stage's report says in one line (SL-CAI, hh-rlhf, RL-CAI, the reward model).
_HEADLINE_COUNTS = ("sl_cai_records", "blend_records", "counts.train", "counts.test",
                    "summary.pairs_kept", "summary.dropped_total", "test_accuracy")


def headline(report: dict, *, outputs: bool = True, stage: bool = True) -> str:
  """One-line summary of a stage report for the console: its final train / eval metrics
  (and the stage's name and output paths)."""
  parts = [f"stage={report.get('stage')}"] if stage else []
  for k in ("final_train", "final_eval"):
    v = report.get(k) or {}
    parts += [f"{k}.{m}={v[m]:.4g}" for m in ("loss", "val_loss", "accuracy", "val_accuracy",
                                               "score_mean", "kl_per_sequence", "eval_score_mean")
              if isinstance(v.get(m), (int, float))]
  for path in _HEADLINE_COUNTS:
    v = report
    for key in path.split("."):
      v = v.get(key) if isinstance(v, dict) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      parts.append(f"{path}={v:.4g}" if isinstance(v, float) else f"{path}={v}")
  outs = report.get("outputs") or {}
  if outs and outputs:
    parts.append("outputs=" + json.dumps(outs))
  return " ".join(parts)
