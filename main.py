"""pndm_jax: sample, train, convert checkpoints, and compute FID statistics / evaluations.

  python main.py --config=configs/digits_pndm.py --mode=sample
  python main.py --config=configs/celeba_pndm.py --mode=sample \\
      --config.sampler.checkpoint=/path/to/celeba.ckpt --config.sampler.num_steps=20

Modes (--mode):
  sample   images from a model into <workdir>/samples/<settings>/ (resumable chunks)
  train    train the eps-prediction U-Net; checkpoints and logs in --workdir (resumable)
  convert  a DDIM .ckpt, diffusers folder or training run -> <workdir>/converted
  stats    reference feature statistics of a dataset -> --config.eval.stats_file
  eval     FID (or FD-digits) of the samples the same config made

Several processes (a pod, a cluster): on a TPU VM pod slice or under srun nothing more is
needed; elsewhere give --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(README "Running on a pod or a cluster").

Any config field can be overridden as --config.SECTION.FIELD=VALUE; list a config's
fields and values with --show_config. Third-party INFO logs are hidden unless --verbose.
Bad input ends with one `error:` line and exit status 2, before any compute.
"""

import difflib
import glob
import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

MODES = ("train", "sample", "convert", "stats", "eval")
REPO = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(REPO, "pndm_jax")
CLU_METRICS_LOG = os.path.join("clu", "metric_writers", "logging_writer.py")

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file name>).")
flags.DEFINE_enum("mode", "sample", MODES, "What to do (see the modes above).")
flags.DEFINE_bool("show_config", False, "Print the config's fields and values, then exit.")
flags.DEFINE_bool("verbose", False, "Show third-party INFO logs and tracebacks of errors.")
flags.DEFINE_string("coordinator_address", "", "Several processes: HOST:PORT of process 0 "
                    "(with --num_processes, --process_id). Not needed alone, on a TPU VM pod "
                    "slice, or under srun: those are detected.")
flags.DEFINE_integer("num_processes", None, "Several processes: how many in all.")
flags.DEFINE_integer("process_id", None, "Several processes: this one's id, 0..num_processes-1.")
flags.DEFINE_integer("distributed_timeout", 300, "Several processes: seconds to reach the "
                     "coordinator, for all to join, and without a heartbeat before a process "
                     "counts as dead.")
FLAGS = flags.FLAGS


class UserError(Exception):
  """Bad input found while reading the command line."""


def fail(message: str, exc: BaseException = None) -> None:
  """Ends the run with one `error:` line (details may follow) and exit status 2."""
  if exc is not None and "--verbose" in sys.argv:
    traceback.print_exception(exc)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def config_files() -> list[str]:
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                if not p.endswith("__init__.py"))


def usage() -> str:
  fields = "python main.py --config=configs/digits_pndm.py --show_config"
  return (f"{__doc__}\nConfigs:\n  " + "\n  ".join(config_files())
          + f"\n\nList a config's fields:\n  {fields}\n\nFlags:\n"
          + FLAGS.main_module_help())


def _load_config(path: str) -> ConfigDict:
  """The config a --config file defines (for checking overrides before absl parses them)."""
  spec = importlib.util.spec_from_file_location("_pndm_jax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check_command_line(argv: list[str]) -> None:
  """Names a missing or unknown config file and any override of a field that does not exist."""
  paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if not paths:
    raise UserError("--config=FILE is required; configs: " + ", ".join(config_files()))
  path = paths[-1].split(":", 1)[0]
  if not os.path.isfile(path):
    raise UserError(f"--config={path}: no such file; configs: " + ", ".join(config_files()))
  config = _load_config(path)
  for arg in argv[1:]:
    m = re.match(r"--config\.([^=]+)", arg)
    if not m:
      continue
    node, keys = config, m[1].split(".")
    for i, key in enumerate(keys):
      if not isinstance(node, ConfigDict) or key not in node:
        parent = ".".join(["config", *keys[:i]])
        choices = sorted(node.keys()) if isinstance(node, ConfigDict) else []
        close = difflib.get_close_matches(key, choices, n=1)
        hint = f"; did you mean {parent}.{close[0]}?" if close else ""
        raise UserError(f"--config.{m[1]}: {parent} has no field {key!r}{hint} "
                        f"(its fields: {', '.join(choices) or 'none'}; all fields: "
                        f"--config={path} --show_config)")
      node = node[key]


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with bad input reported as one `error:` line, and a useful --help."""
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
    print(usage())
    sys.exit(0)
  try:
    check_command_line(argv)
    return FLAGS(argv)
  except (UserError, flags.Error) as e:
    fail(str(e), e)
  except Exception as e:  # pylint: disable=broad-except  # a config file that does not load
    fail(f"--config could not be loaded: {type(e).__name__}: {e}", e)


class _ProjectOrWarnings(std_logging.Filter):
  """Keeps the project's own log lines (training metrics go through clu's logging writer)
  and every warning; drops third-party INFO."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or record.pathname.startswith(PACKAGE_DIR)
            or record.pathname.endswith(CLU_METRICS_LOG))


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  mode, config = FLAGS.mode, FLAGS.config
  if FLAGS.show_config:
    print(config)
    return
  if not FLAGS.verbose:
    logging.get_absl_handler().addFilter(_ProjectOrWarnings())
  logging.set_verbosity(logging.INFO)
  workdir = FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(
          FLAGS["config"])))[0])
  from pndm_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.keep_freed_memory()  # before jax starts its threads
  # Imported here so that `--help` and flag errors answer without loading jax.
  from pndm_jax import cli, distributed  # pylint: disable=import-outside-toplevel
  launch = distributed.Launch(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                              FLAGS.distributed_timeout)
  try:
    distributed.initialize(launch)
    cli.run(mode, config, workdir)
  except cli.USER_ERRORS as e:
    fail(str(e), e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
