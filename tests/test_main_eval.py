"""`main.py --mode=stats` and `--mode=eval` end to end (FD-digits: real Frechet distances)."""

import json
import os
import subprocess
import sys

import numpy as np
from fid_weights import random_jax_fid_pickle

from pndm_jax.evaluation import fid, inception

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
  assert record["image_indices"] == "0..99" and not record["subset"]
  assert np.isfinite(record["fd_digits"]) and record["fd_digits"] > 0
  settings = record["sampler_settings"]
  assert record["nfe_per_image"] == 29 and settings["method"] == "f-pndm"
  assert settings["num_steps"] == 20
  assert record["stats_sha256"] == fid.file_sha256(str(tmp_path / "digits_stats.npz"))
  assert record["weights_sha256"] == fid.file_sha256(str(tmp_path / "classifier.msgpack"))


def test_fid_eval_with_random_inception_weights(tmp_path):
  samples = tmp_path / "external"  # chunks made elsewhere: no sampling.json, settings unknown
  samples.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for k in range(2):
    np.savez(samples / f"samples_{k:05d}.npz", indices=np.arange(3 * k, 3 * k + 3),
             images=rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8))
  weights, stats = tmp_path / "inception.pickle", tmp_path / "stats.npz"
  random_jax_fid_pickle(str(weights))
  a = rng.standard_normal((inception.FEATURE_DIM, 8))
  fid.save_stats(str(stats), rng.standard_normal(inception.FEATURE_DIM), a @ a.T)
  result = run_main("--mode=eval", f"--workdir={tmp_path / 'run'}", "--config.eval.metric=fid",
                    f"--config.eval.inception_weights={weights}",
                    f"--config.eval.stats_file={stats}", "--config.eval.batch_size=8",
                    f"--config.sampler.sample_dir={samples}", "--config.sampler.num_samples=6")
  assert result.returncode == 0, result.stderr
  record = json.load(open(tmp_path / "run" / "fid.json"))
  assert record["num_images"] == 6 and record["num_chunks"] == 2
  assert record["sampler_settings"] is None and record["nfe_per_image"] is None
  assert np.isfinite(record["fid"]) and record["fid"] > 0
  assert record["weights_sha256"] == fid.file_sha256(str(weights))


def test_eval_without_stats_file_fails_before_compute(tmp_path):
  result = run_main("--mode=eval", f"--workdir={tmp_path}")
  assert result.returncode == 2 and "config.eval.stats_file" in result.stderr
  result = run_main("--mode=stats", f"--workdir={tmp_path}", "--config.eval.metric=inception",
                    "--config.eval.stats_file=x.npz")
  assert result.returncode == 2 and "fid, fd_digits" in result.stderr
