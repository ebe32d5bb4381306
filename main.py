"""pndm_jax command line: train, sample, convert, and FID statistics / evaluation.

  python main.py --config=configs/digits_pndm.py --mode=sample
  python main.py --config=configs/celeba_pndm.py --mode=sample \
      --config.sampler.checkpoint=/path/to/ckpt.pth --config.sampler.num_steps=20

Any config field can be overridden as --config.SECTION.FIELD=VALUE.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "sample", "convert", "stats", "eval")

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file name>).")
flags.DEFINE_string("mode", "sample", f"One of: {', '.join(MODES)}.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def default_workdir(config_path: str) -> str:
  return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def fail(error: Exception) -> None:
  """Bad input ends the run with its message, not a traceback."""
  logging.error("%s", error)
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.mode not in MODES:
    raise app.UsageError(f"unknown --mode={FLAGS.mode!r}; valid modes: {', '.join(MODES)}")
  mode, config = FLAGS.mode, FLAGS.config
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  # Imported here so that `--help` and flag errors answer without loading jax.
  from pndm_jax import cli  # pylint: disable=import-outside-toplevel
  try:
    cli.check(mode, config)  # before any compute
  except ValueError as e:
    fail(e)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"config_{mode}.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  try:
    cli.MODE_FUNCTIONS[mode](config, workdir)
  except cli.USER_ERRORS as e:
    fail(e)


if __name__ == "__main__":
  app.run(main)
