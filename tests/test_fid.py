"""Frechet distance, streaming statistics, stats files, FD-digits and the
end-to-end sample-directory evaluation."""

import itertools
import json

import jax
import numpy as np
import pytest
from fid_weights import random_jax_fid_pickle

from pndm_jax import input_pipeline
from pndm_jax.evaluation import digits_classifier, fid, inception


def _random_gaussian(rng, d):
  a = rng.standard_normal((d, d))
  return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


def _reference_distance(mu1, s1, mu2, s2):
  """Independent: Tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)) via eigh."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(w)) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_distance_matches_independent_computation(d):
  rng = np.random.default_rng(d)
  (mu1, s1), (mu2, s2) = _random_gaussian(rng, d), _random_gaussian(rng, d)
  expected = _reference_distance(mu1, s1, mu2, s2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_zero_and_symmetric():
  rng = np.random.default_rng(0)
  (mu1, s1), (mu2, s2) = _random_gaussian(rng, 32), _random_gaussian(rng, 32)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
      fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_distance_isotropic_closed_form():
  d, rng = 16, np.random.default_rng(3)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  a, b = 0.7, 1.9  # sigma = s^2 I
  expected = np.sum((mu1 - mu2) ** 2) + d * (a - b) ** 2
  got = fid.frechet_distance(mu1, a**2 * np.eye(d), mu2, b**2 * np.eye(d))
  assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_low_rank_covariances_are_finite():
  """Fewer samples than dimensions: singular covariances (the eps path)."""
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((5, 32)), rng.standard_normal((6, 32)) + 1
  value = fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False),
                               y.mean(0), np.cov(y, rowvar=False))
  assert np.isfinite(value) and value > 0


def test_frechet_distance_dimension_mismatch():
  with pytest.raises(ValueError, match="dimension"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


class _Recorder:
  """Identity "features" on flattened inputs that records the batch sizes it sees."""

  def __init__(self, batch_size):
    self.batch_size, self.sizes = batch_size, []

  def __call__(self, images):
    self.sizes.append(len(images))
    return np.asarray(images, np.float64).reshape(len(images), -1)


def test_streaming_stats_match_numpy_and_rebatch_exactly():
  rng = np.random.default_rng(5)
  x = 1e4 + rng.standard_normal((103, 2, 2, 1))  # large offset: cancellation check
  batches = [x[:7], x[7:8], x[8:60], x[60:]]
  recorder = _Recorder(batch_size=16)
  mu, sigma = fid.compute_stats_from_images(iter(batches), recorder)
  flat = x.reshape(len(x), -1)
  np.testing.assert_allclose(mu, flat.mean(0), rtol=1e-14)
  np.testing.assert_allclose(sigma, np.cov(flat, rowvar=False), rtol=1e-9, atol=1e-12)
  assert recorder.sizes == [16] * 6 + [7]


def test_num_images_takes_exactly_that_many():
  x = np.arange(50, dtype=np.float64).reshape(25, 2, 1, 1)
  mu, _ = fid.compute_stats_from_images([x[:10], x[10:]], _Recorder(4), num_images=13)
  np.testing.assert_allclose(mu, x[:13].reshape(13, -1).mean(0))
  with pytest.raises(ValueError, match="only 25 available"):
    fid.compute_stats_from_images(x, _Recorder(4), num_images=26)
  endless = itertools.repeat(x[:4])  # a repeating dataset iterator
  mu, _ = fid.compute_stats_from_images(endless, _Recorder(4), num_images=9)
  np.testing.assert_allclose(mu, np.concatenate([x[:4], x[:4], x[:1]]).reshape(9, -1).mean(0))


def test_sharded_extractor_pads_without_dropping_or_duplicating():
  apply_fn = lambda w, images: images.reshape(images.shape[0], -1) * w
  extract = fid.ShardedFeatureExtractor(apply_fn, np.float32(2.0), batch_size=5)
  assert extract.batch_size == 8  # rounded up to the 8 devices
  x = np.random.default_rng(6).standard_normal((19, 3, 3, 1)).astype(np.float32)
  np.testing.assert_array_equal(extract(x), 2 * x.reshape(19, -1))


def test_stats_npz_round_trip(tmp_path):
  mu, sigma = _random_gaussian(np.random.default_rng(7), 10)
  path = str(tmp_path / "cifar10_train_stats")  # no extension: written as given
  fid.save_stats(path, mu, sigma)
  loaded_mu, loaded_sigma = fid.load_stats(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  with np.load(path) as f:  # what pytorch-fid reads
    assert sorted(f.files) == ["mu", "sigma"]
  with pytest.raises(FileNotFoundError, match="stats_file"):
    fid.load_stats(str(tmp_path / "missing.npz"))


# --- FD-digits ---------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_params():
  return digits_classifier.train_digits_classifier(seed=0)


def test_digits_classifier_accuracy(digits_params):
  _, (x_test, y_test) = digits_classifier.digits_split()
  assert digits_classifier.accuracy(digits_params, x_test, y_test) >= 0.9


def test_fd_digits_halves_versus_noise(digits_params):
  x, _ = input_pipeline.digits_with_labels()
  order = np.random.default_rng(8).permutation(len(x))
  half_a, half_b = x[order[:898]], x[order[898:]]
  noise = np.random.default_rng(9).uniform(-1, 1, half_a.shape).astype(np.float32)
  extract = fid.ShardedFeatureExtractor(digits_classifier.features, digits_params, 256)
  stats_a, stats_b, stats_noise = (fid.compute_stats_from_images(images, extract)
                                   for images in (half_a, half_b, noise))
  between_halves = fid.frechet_distance(*stats_a, *stats_b)
  to_noise = fid.frechet_distance(*stats_a, *stats_noise)
  assert 0 < between_halves < 0.05 * to_noise


def test_digits_params_file_and_input_boundary(digits_params, tmp_path):
  path = str(tmp_path / "digits_classifier.msgpack")
  digits_classifier.save_digits_classifier(path, digits_params)
  loaded = digits_classifier.load_or_train_digits_classifier(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, digits_params)
  _, (x_test, y_test) = digits_classifier.digits_split()
  # 16x16 samples (the data pipeline's bilinear upsampling) are resized back at the boundary.
  big = np.asarray(jax.image.resize(x_test, (len(x_test), 16, 16, 1), "linear"))
  assert digits_classifier.accuracy(digits_params, big, y_test) >= 0.85
  # uint8 NHW input is scaled to [-1, 1] like the float data.
  as_uint8 = np.round((x_test[..., 0] + 1) * 127.5).astype(np.uint8)
  feats = digits_classifier.features(digits_params, x_test)
  np.testing.assert_allclose(digits_classifier.features(digits_params, as_uint8), feats,
                             atol=0.05 * np.abs(feats).max())


# --- end to end --------------------------------------------------------------

def test_evaluate_sample_dir_end_to_end(tmp_path, monkeypatch):
  rng = np.random.default_rng(10)
  images = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
  sample_dir = tmp_path / "samples"
  sample_dir.mkdir()
  np.savez(sample_dir / "samples_00000.npz", images=images[:3], indices=np.arange(3))
  np.savez(sample_dir / "samples_00001.npz", images=images[3:], indices=np.arange(3, 5))
  weights = str(tmp_path / "inception_v3_weights_fid.pickle")
  random_jax_fid_pickle(weights)
  ref_mu, ref_sigma = _random_gaussian(rng, inception.FEATURE_DIM)
  stats_file = str(tmp_path / "ref_stats.npz")
  fid.save_stats(stats_file, ref_mu, ref_sigma)
  out_json = str(tmp_path / "workdir" / "fid.json")
  # scipy's sqrtm of a 2048x2048 product takes a minute on a small CPU; the
  # distance itself is tested above, here we check what reaches it.
  calls = []
  monkeypatch.setattr(fid, "frechet_distance", lambda *stats: calls.append(stats) or 12.5)

  record = fid.evaluate_sample_dir(str(sample_dir), stats_file, weights, out_json,
                                  batch_size=2, devices=jax.devices()[:2])

  with open(out_json) as f:
    assert json.load(f) == record
  assert record["fid"] == 12.5 and record["metric"] == "fid"
  assert record["num_images"] == 5 and record["num_chunks"] == 2
  assert record["num_requested"] == 5 and not record["subset"]
  assert record["weights_sha256"] == fid.file_sha256(weights)
  assert record["stats_sha256"] == fid.file_sha256(stats_file)
  # The statistics of all 5 images, each exactly once, from an unsharded forward.
  (mu, sigma, got_ref_mu, got_ref_sigma), = calls
  module, variables = inception.load_inception(weights)
  feats = np.asarray(jax.jit(module.apply)(variables, images), np.float64)
  scale = np.abs(feats).max()
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-4 * scale**2)
  np.testing.assert_array_equal(got_ref_mu, ref_mu)
  np.testing.assert_array_equal(got_ref_sigma, ref_sigma)
