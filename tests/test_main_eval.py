"""`main.py --mode=stats` and `--mode=eval` end to end (FD-digits: real Frechet distances)."""

import json
import os
import subprocess
import sys

import numpy as np

from pndm_jax.evaluation import fid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
  return subprocess.run([sys.executable, "main.py", "--config=configs/gmm_pndm.py", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})


def test_stats_then_sample_then_eval(tmp_path):
  common = [f"--workdir={tmp_path / 'run'}", "--config.eval.metric=fd_digits",
            f"--config.eval.digits_classifier={tmp_path / 'classifier.msgpack'}",
            f"--config.eval.stats_file={tmp_path / 'digits_stats.npz'}"]
  result = run_main("--mode=stats", *common)
  assert result.returncode == 0, result.stderr
  mu, sigma = fid.load_stats(str(tmp_path / "digits_stats.npz"))
  assert mu.shape == (64,) and sigma.shape == (64, 64)

  result = run_main("--mode=sample", *common, "--config.sampler.num_samples=100",
                    "--config.sampler.num_steps=20")
  assert result.returncode == 0, result.stderr
  result = run_main("--mode=eval", *common, "--config.sampler.num_samples=100",
                    "--config.sampler.num_steps=20")
  assert result.returncode == 0, result.stderr
  record = json.load(open(tmp_path / "run" / "fd_digits.json"))
  assert record["metric"] == "fd_digits" and record["num_images"] == 100
  assert np.isfinite(record["fd_digits"]) and record["fd_digits"] > 0
  assert record["nfe"] == 29 and record["method"] == "f-pndm" and record["num_steps"] == 20
  assert record["stats_sha256"] == fid.file_sha256(str(tmp_path / "digits_stats.npz"))
  assert record["weights_sha256"] == fid.file_sha256(str(tmp_path / "classifier.msgpack"))


def test_eval_without_stats_file_fails_before_compute(tmp_path):
  result = run_main("--mode=eval", f"--workdir={tmp_path}")
  assert result.returncode == 2 and "config.eval.stats_file" in result.stderr
  result = run_main("--mode=stats", f"--workdir={tmp_path}", "--config.eval.metric=inception",
                    "--config.eval.stats_file=x.npz")
  assert result.returncode == 2 and "fid, fd_digits" in result.stderr
