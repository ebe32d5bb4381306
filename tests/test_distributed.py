"""Several processes on localhost (2 x 4 fake CPU devices, gloo) against one process.

Each run is `main.py` in subprocesses joined by `--coordinator_address` on a free
port of 127.0.0.1, within bounded time.
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_generation import IMAGE_LEVELS, read_all, sample_dir_of

from configs import digits_pndm, digits_train
from pndm_jax import (
  checkpoints,
  distributed,
  eps_models,
  generation,
  input_pipeline,
  sampler_spec,
  train,
)
from pndm_jax.evaluation import fid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
TRAIN = ["--config=configs/digits_train.py", "--mode=train", "--config.training.log_every=1",
         "--config.training.batch_size=16",
         "--config.training.checkpoint_every=1", "--config.training.sample_every=2",
         "--config.training.num_grid_samples=8", "--config.sampler.num_steps=5"]
SAMPLE = ["--config=configs/digits_pndm.py", "--config.sampler.num_steps=10",
          "--config.sampler.chunk_size=8", "--config.sampler.batch_size=8"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def start(args, devices: int, process_id: int | None = None, num_processes: int = 2,
          port: int | None = None, timeout: int = 60) -> subprocess.Popen:
  launch = [] if process_id is None else [
      f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
      f"--process_id={process_id}", f"--distributed_timeout={timeout}"]
  return subprocess.Popen([sys.executable, "main.py", *args, *launch], cwd=REPO,
                          env=env(devices), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def start_pair(*args, timeout: int = 60) -> list[subprocess.Popen]:
  port = free_port()
  return [start(args, 4, i, 2, port, timeout) for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
  """Waits for every process (all killed after TIMEOUT_S); each must exit 0."""
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.2)
  for p in procs:
    p.kill()
  outs = [p.communicate() for p in procs]
  assert [p.returncode for p in procs] == [0] * len(procs), [err[-3000:] for _, err in outs]
  return outs


def losses(stderr: str) -> list[float]:
  return [float(v) for v in re.findall(r" loss=([0-9.e+-]+)", stderr)]


def train_here(workdir, num_train_steps: int):
  """Trains in this process (one process, 8 devices) as main.py --mode=train would."""
  config = digits_train.get_config()
  config.training.update(num_train_steps=num_train_steps, log_every=1, checkpoint_every=1,
                         sample_every=0, batch_size=16)
  return train.train_and_evaluate(config, str(workdir))


def test_one_process_resumes_two_processes_checkpoint_and_steps_as_they_did(tmp_path, caplog):
  """2 x 4 devices train steps 1 and 2. One process (8 devices) restores their step-1
  checkpoint and takes step 2: the same loss and state as theirs (the same global batch in
  the same rows, the same draws), so their checkpoint was written whole."""
  finished = finish(start_pair(*TRAIN, f"--workdir={tmp_path / 'two'}",
                               "--config.training.num_train_steps=2"))
  assert losses(finished[0][1]) == losses(finished[1][1]) and len(losses(finished[0][1])) == 2
  assert os.path.isfile(tmp_path / "two" / "train_grids" / "00000002.png")

  shutil.copytree(tmp_path / "two" / "checkpoints" / "1", tmp_path / "one" / "checkpoints" / "1")
  caplog.set_level(logging.INFO)
  one = train_here(tmp_path / "one", 2)
  assert "training from step 1 to 2 on 8 device(s)" in caplog.text
  np.testing.assert_allclose(losses(caplog.text), losses(finished[0][1])[1:], rtol=1e-5)
  with checkpoints.checkpoint_manager(tmp_path / "two" / checkpoints.CHECKPOINT_DIR) as manager:
    two = checkpoints.restore_training(manager, one)
  assert int(two.step) == int(one.step) == 2
  for a, b in zip(jax.tree.leaves((two.params, two.ema_params, two.opt_state)),
                  jax.tree.leaves((one.params, one.ema_params, one.opt_state))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_two_processes_sample_and_score_as_one(tmp_path):
  """Sampling: every chunk made once, by either process, the images those of 1 x 1 device;
  stats and eval: each process extracts its share, the statistics are all of them."""
  common = [*SAMPLE, f"--workdir={tmp_path / 'two'}", "--config.sampler.num_samples=40",
            f"--config.eval.stats_file={tmp_path / 'stats.npz'}"]
  pair = start_pair(*common, "--mode=sample")
  config = digits_pndm.get_config()
  config.sampler.update(num_samples=40, num_steps=10, chunk_size=8, batch_size=8)
  spec = sampler_spec.from_config(config)
  generation.generate_samples(eps_models.load(config, spec, ""), spec, str(tmp_path / "one"),
                              jax.devices()[:1])  # meanwhile, the reference
  finish(pair)
  held = sample_dir_of(tmp_path / "two")
  summary = json.load(open(os.path.join(held, "summary.json")))
  assert (summary["processes"], summary["devices"], summary["num_images"]) == (2, 8, 40)
  assert len(summary["images_made_by_process"]) == 2 and summary["images_made_now"] == 40
  images, indices = read_all(held)
  reference, reference_indices = read_all(tmp_path / "one")
  assert np.array_equal(indices, reference_indices)
  assert np.max(np.abs(images.astype(int) - reference)) <= IMAGE_LEVELS

  finish(start_pair(*common, "--mode=stats"))
  weights = config.eval.digits_classifier
  extract = fid.feature_fn_for("fd_digits", weights, config.eval.batch_size)
  mu, sigma = fid.compute_stats_from_images(
      input_pipeline.evaluation_batches(config.data, config.eval.batch_size), extract)
  saved_mu, saved_sigma = fid.load_stats(str(tmp_path / "stats.npz"))
  np.testing.assert_allclose(saved_mu, mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(saved_sigma, sigma, rtol=1e-5, atol=1e-6)

  finish(start_pair(*common, "--mode=eval"))
  record = json.load(open(tmp_path / "two" / "fd_digits.json"))
  reference = fid.evaluate_sample_dir(held, str(tmp_path / "stats.npz"), weights,
                                      str(tmp_path / "reference.json"), metric="fd_digits")
  assert record["num_images"] == reference["num_images"] == 40
  assert record["fd_digits"] == pytest.approx(reference["fd_digits"], rel=1e-5)


def test_an_unreachable_coordinator_is_an_error_not_a_hang():
  began = time.monotonic()
  proc = start([*SAMPLE, "--mode=sample"], 1, process_id=1, port=free_port(), timeout=3)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
  (line,) = [line for line in err.splitlines() if line.startswith("error:")]
  assert "cannot reach the coordinator" in line and "process 1 of 2" in line
  assert time.monotonic() - began < 60
  for bad, named in [(["--num_processes=2"], "--coordinator_address"),
                     (["--coordinator_address=127.0.0.1", "--num_processes=2", "--process_id=0"],
                      "HOST:PORT"),
                     (["--coordinator_address=127.0.0.1:1", "--num_processes=2",
                       "--process_id=2"], "0..num_processes-1")]:
    proc = subprocess.run([sys.executable, "main.py", *SAMPLE, *bad], cwd=REPO, env=env(1),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and named in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_a_process_killed_mid_run_leaves_what_a_rerun_finishes(tmp_path):
  common = [*SAMPLE, f"--workdir={tmp_path}", "--config.sampler.num_samples=64", "--mode=sample"]
  pair = start_pair(*common, timeout=10)
  deadline = time.monotonic() + TIMEOUT_S
  while not (os.path.isdir(tmp_path / "samples") and read_chunks(sample_dir_of(tmp_path))):
    assert time.monotonic() < deadline and pair[1].poll() is None
    time.sleep(0.2)
  pair[1].send_signal(signal.SIGKILL)  # and not reaped: its claims are a zombie's
  held = sample_dir_of(tmp_path)
  written = len(read_chunks(held))
  pair[0].communicate(timeout=TIMEOUT_S)  # its peer's heartbeats stop: it ends too
  assert pair[0].returncode != 0 and 0 < written < 8

  finish(start_pair(*common))
  summary = json.load(open(os.path.join(held, "summary.json")))
  assert summary["num_images"] == 64 and summary["images_made_now"] <= 64 - 8 * written
  images, indices = read_all(held)
  assert indices.tolist() == list(range(64))
  assert not [f for f in os.listdir(held) if f.endswith(".claim") or ".tmp" in f]


def read_chunks(sample_dir):
  return [f for f in os.listdir(sample_dir) if f.startswith("samples_") and f.endswith(".npz")]


def test_the_cluster_is_read_from_the_environment():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "0"}
  assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "2"}) == "slurm"
  assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) != "slurm"  # one task: alone
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) != "slurm"
  assert distributed.initialize(distributed.Launch(timeout_s=5)) == "single"  # no flags here
  moments = np.random.default_rng(0).normal(size=(3, 5))
  assert np.array_equal(distributed.gather(moments), moments[None])
  assert distributed.gather(np.int64(4)).tolist() == [4]
