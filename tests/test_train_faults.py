"""Training killed with SIGKILL while it writes a checkpoint resumes to the uninterrupted result.

The runs are subprocesses on one CPU device (not the 8 fake devices of the
test session) sharing a persistent compilation cache, so only the first one
compiles.
"""

import glob
import os
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
from test_train import tiny_config, write_digits_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TMP_GLOB = "*.orbax-checkpoint-tmp*"  # orbax's name for a checkpoint being written

# Trains each `workdir:checkpoint_every` in argv[3:] to argv[2] steps on the digits .npz
# argv[1] (a one-level tiny_config U-Net: quick to compile), and saves the final state's
# leaves to <workdir>/final.npz.
TRAIN_SCRIPT = """
import os, sys
sys.path[:0] = ["tests", "."]
import jax, numpy as np
from test_train import tiny_config
from pndm_jax import train
data, steps, *runs = sys.argv[1:]
for run in runs:
  workdir, every = run.rsplit(":", 1)
  config = tiny_config(path=data)
  config.model.ch_mult = (1,)
  config.training.update(num_train_steps=int(steps), checkpoint_every=int(every))
  state = train.train_and_evaluate(config, workdir)
  np.savez(os.path.join(workdir, "final.npz"), *jax.tree.leaves(jax.device_get(state)))
"""


def train_command(data, *runs):
  """Trains `runs`, (workdir, checkpoint_every) pairs, in one subprocess."""
  return [sys.executable, "-c", TRAIN_SCRIPT, data, str(STEPS),
          *(f"{workdir}:{every}" for workdir, every in runs)]


def test_killed_mid_checkpoint_resumes_to_the_straight_result(tmp_path):
  data = write_digits_npz(str(tmp_path / "digits.npz"))
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  checkpoints = killed / "checkpoints"
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(train_command(data, (killed, 1)), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:  # until checkpoint 1 is complete and a later one is being written
      deadline = time.monotonic() + 180
      while proc.poll() is None and time.monotonic() < deadline and not (
          (checkpoints / "1").is_dir() and glob.glob(str(checkpoints / TMP_GLOB))):
        time.sleep(0.005)
    finally:
      proc.kill()  # SIGKILL: no cleanup runs, as in a crash or a preemption
      proc.wait()
  # A kill mid-run (the usual case) leaves fewer steps; one after the end leaves them all.
  assert ocp.utils.checkpoint_steps(str(checkpoints)), (tmp_path / "killed.log").read_text()

  resumed = subprocess.run(train_command(data, (killed, 1), (straight, 0)), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  keep = tiny_config().training.keep_checkpoints
  assert sorted(os.listdir(checkpoints)) == sorted(  # no temporary or moved-aside leftovers
      str(step) for step in range(STEPS - keep + 1, STEPS + 1))
  with np.load(killed / "final.npz") as a, np.load(straight / "final.npz") as b:
    assert len(a.files) == len(b.files) > 50
    for name in a.files:
      np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
