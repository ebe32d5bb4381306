"""Frechet distances between feature statistics: FID and FD-digits.

Pipeline: images -> features (jitted, batch-sharded over this process's devices) -> streaming
float64 mean/covariance on the host -> `.npz` with `mu`/`sigma` (pytorch-fid's statistics format) ->
Frechet distance in float64. With several processes each extracts every process_count-th batch
and the moments are merged across processes; process 0 writes the files.

Two feature extractors share the machinery (`metric`):
  * "fid": pytorch-fid's Inception-v3 pool features (`inception.py`); numbers are comparable with
    published FIDs only with pytorch-fid's weights and statistics made by the same network.
  * "fd_digits": penultimate features of the project's digits classifier (`digits_classifier.py`),
    for the digits model that has no Inception statistics. It is not FID and must never be reported
    as such.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from scipy import linalg

from pndm_jax import choices, distributed, files, progress, sample_store, sharding
from pndm_jax.evaluation import digits_classifier, inception

METRICS = ("fid", "fd_digits")

FeatureFn = Callable[[np.ndarray], np.ndarray]
Images = np.ndarray | Iterable[np.ndarray]


class ShardedFeatureExtractor:
  """Runs `apply_fn(variables, images) -> features` over `devices` (default: this process's).

  The batch axis is sharded over a 1-D mesh and the variables are replicated. Calls accept any
  number of host images: they are cut into batches of `batch_size` (rounded up to a multiple of the
  device count), the last batch padded with zeros, and exactly one feature row per input image is
  returned. The images come from this host's memory.
  """

  def __init__(self, apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
               batch_size: int, devices: Sequence[jax.Device] | None = None):
    mesh = self._mesh = sharding.batch_mesh(devices or jax.local_devices())
    self.batch_size = sharding.round_up(batch_size, mesh)
    data = sharding.batch_sharding(mesh)
    self._variables = jax.device_put(variables, sharding.replicated(mesh))
    self._apply = jax.jit(apply_fn, in_shardings=(sharding.replicated(mesh), data),
                          out_shardings=data)

  def map_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Features of a stream of image batches, one array per device batch, in order (see
    `sharding.map_padded`: host work overlaps device compute)."""

    def extract(batch: np.ndarray) -> jax.Array:
      return self._apply(self._variables, sharding.put_batch(batch, self._mesh))

    as_input = lambda images: (images if images.dtype == np.uint8 else images.astype(np.float32))
    stream = (as_input(np.asarray(images)) for images in batches)
    for features, valid in sharding.map_padded(extract, stream, self.batch_size):
      yield np.asarray(features)[:valid]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """(N, ...) images -> (N, dim) features."""
    if not len(images):
      raise ValueError("no images to extract features from")
    return np.concatenate(list(self.map_batches([images])))


def inception_feature_fn(weights_path: str, batch_size: int = 200,
                         devices: Sequence[jax.Device] | None = None) -> ShardedFeatureExtractor:
  """FID features: pytorch-fid's Inception pool3 (2048-d) from a weights file."""
  module, variables = inception.load_inception(weights_path)
  return ShardedFeatureExtractor(module.apply, variables, batch_size, devices)


def digits_feature_fn(params_path: str, batch_size: int = 512,
                      devices: Sequence[jax.Device] | None = None) -> ShardedFeatureExtractor:
  """FD-digits features; trains and caches the classifier if the file is absent."""
  params = digits_classifier.load_or_train_digits_classifier(params_path)
  return ShardedFeatureExtractor(digits_classifier.features, params, batch_size, devices)


def feature_fn_for(metric: str, weights_file: str, batch_size: int,
                   devices: Sequence[jax.Device] | None = None) -> ShardedFeatureExtractor:
  """The extractor of `metric` ("fid" or "fd_digits") from its weights file."""
  if choices.check("metric", metric, METRICS) == "fid":
    return inception_feature_fn(weights_file, batch_size, devices)
  return digits_feature_fn(weights_file, batch_size, devices)


class RunningStats:
  """Streaming mean and covariance in float64 (Chan et al.'s pairwise merge).

  Merging per-batch centred moments avoids the cancellation of accumulating raw second moments; the
  result equals `np.mean(x, 0)`, `np.cov(x, rowvar=False)`.
  """

  def __init__(self):
    self.count = 0
    self._mean: np.ndarray | None = None
    self._scatter: np.ndarray | None = None  # sum of centred outer products

  def update(self, features: np.ndarray) -> None:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be (batch, dim), got {x.shape}")
    if len(x):
      mean = x.mean(axis=0)
      centred = x - mean
      self.merge(len(x), mean, centred.T @ centred)

  def merge(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
    """Adds the moments of n more vectors (their mean and centred scatter)."""
    if not n:
      return
    if self._mean is None:
      self.count, self._mean, self._scatter = n, mean.copy(), scatter.copy()
      return
    total = self.count + n
    delta = mean - self._mean
    self._scatter += scatter + np.outer(delta, delta) * (self.count * n / total)
    self._mean += delta * (n / total)
    self.count = total

  def across_processes(self) -> RunningStats:
    """The statistics of every process's vectors, merged in process order (the same on all)."""
    if jax.process_count() == 1:
      return self
    sizes = distributed.gather(np.array([self.count, -1 if self._mean is None else
                                         len(self._mean)], np.int64))  # [process, (n, dim)]
    dim = int(sizes[:, 1].max())
    if dim < 0:
      return self
    empty = self._mean is None
    means = distributed.gather(np.zeros(dim) if empty else self._mean)
    scatters = distributed.gather(np.zeros((dim, dim)) if empty else self._scatter)
    merged = RunningStats()
    for n, mean, scatter in zip(sizes[:, 0], means, scatters):
      merged.merge(int(n), mean, scatter)
    return merged

  def finalize(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) with sigma the unbiased (ddof = 1) covariance, as pytorch-fid."""
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors, got {self.count}")
    return self._mean.copy(), self._scatter / (self.count - 1)


def _rebatch(batches: Iterable[np.ndarray], size: int | None) -> Iterator[np.ndarray]:
  """Regroups a stream of image batches into batches of exactly `size` (the last one possibly
  smaller), so only the very last device batch is padded."""
  pending, held = [], 0
  for batch in batches:
    batch = np.asarray(batch)
    if size is None:
      yield batch
      continue
    pending.append(batch)
    held += len(batch)
    if held < size:
      continue
    joined = np.concatenate(pending)
    cut = held - held % size
    for start in range(0, cut, size):
      yield joined[start:start + size]
    pending, held = [joined[cut:]], held - cut
  if held:
    yield np.concatenate(pending)


def _take(batches: Iterable[np.ndarray], limit: int | None) -> Iterator[np.ndarray]:
  """The first `limit` images (all if None) of a stream of batches."""
  if limit is not None and limit <= 0:
    return
  seen = 0
  for batch in batches:
    batch = np.asarray(batch)
    if limit is not None:
      batch = batch[:limit - seen]
    seen += len(batch)
    yield batch
    if limit is not None and seen >= limit:
      return  # without pulling another batch from the iterator


def accumulate_features(images: Images, feature_fn: FeatureFn, *,
                        num_images: int | None = None) -> RunningStats:
  """Streams `images` through `feature_fn` into a `RunningStats`.

  `images` is one (N, H, W, C) array or an iterable of such batches (e.g. a dataset iterator; uint8,
  or float in [-1, 1]). With `num_images` exactly that many images are used (an infinite iterator is
  fine); fewer available images is an error, not a silently smaller sample. With several
  processes (each given the same images), each extracts its share of the batches and the
  returned statistics are all processes' merged.
  """
  if isinstance(images, (np.ndarray, jax.Array)):
    images = [np.asarray(images)]
  batches = _rebatch(_take(images, num_images), getattr(feature_fn, "batch_size", None))
  batches = itertools.islice(batches, jax.process_index(), None, jax.process_count())
  if isinstance(feature_fn, ShardedFeatureExtractor):
    features = feature_fn.map_batches(batches)
  else:
    features = map(feature_fn, batches)
  stats = RunningStats()
  for batch_features in features:
    stats.update(batch_features)
  stats = stats.across_processes()
  if num_images is not None and stats.count != num_images:
    raise ValueError(f"asked for {num_images} images, only {stats.count} available")
  return stats


def compute_stats_from_images(images: Images, feature_fn: FeatureFn, *,
                              num_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the features of `images` (see `accumulate_features`)."""
  stats = accumulate_features(images, feature_fn, num_images=num_images)
  logging.info("feature statistics over %d images", stats.count)
  return stats.finalize()


def check_stats_destination(path: str, overwrite: bool = False) -> None:
  """Raises before any compute if statistics cannot be written to `path` as asked.

  An existing file is kept unless `overwrite`: it may be the reference an evaluation reads. The
  directory is probed with a temporary file.
  """
  if os.path.isdir(path):
    raise ValueError(f"config.eval.stats_file={path!r} is a directory; give a .npz file path")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"statistics file {path} exists; refusing to overwrite it (pass "
                          "--config.eval.overwrite=True to replace it, or another "
                          "--config.eval.stats_file)")
  try:
    files.ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
  except OSError as e:
    raise ValueError(f"cannot write statistics to {path}: {e.strerror or e}") from e


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, overwrite: bool = False) -> None:
  """Writes pytorch-fid's statistics file (`mu`, `sigma`) to exactly `path`, atomically.

  An existing file is replaced only with `overwrite`.
  """
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_stats(mu, sigma, path)
  check_stats_destination(path, overwrite)
  tmp = files.temporary_name(os.path.abspath(path))
  with open(tmp, "wb") as f:  # a file object: np.savez must not append ".npz"
    np.savez(f, mu=mu, sigma=sigma)
  if overwrite:
    os.replace(tmp, path)
    return
  try:
    os.link(tmp, path)  # fails if the file appeared meanwhile: never replaces one
  finally:
    os.remove(tmp)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads `mu`, `sigma` from a statistics `.npz` (ours or pytorch-fid's)."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f"statistics file {path!r} not found (config.eval.stats_file); make it with main.py "
        "--mode=stats")
  with np.load(path) as f:
    missing = {"mu", "sigma"} - set(f.files)
    if missing:
      raise ValueError(f"{path} lacks {sorted(missing)}; it has {f.files}")
    mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
  _check_stats(mu, sigma, path)
  return mu, sigma


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{where}: mu must be (d,) and sigma (d, d), got {mu.shape} and "
                     f"{sigma.shape}")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64.

  As pytorch-fid: if the square root of the product is not finite (singular product), `eps * I` is
  added to both covariances; small imaginary parts from round-off are dropped, large ones (diagonal
  |imag| > 1e-3) are an error.
  """
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"statistics differ in dimension: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{s1.shape} vs {s2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    logging.warning("singular product of covariances; adding %g to the diagonals", eps)
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance "
                       "square root")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file, to record exactly which weights/statistics were used."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def evaluate_sample_dir(sample_dir: str, stats_file: str, weights_file: str, out_json: str, *,
                        metric: str = "fid", batch_size: int = 200, num_images: int | None = None,
                        allow_subset: bool = False,
                        devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Frechet distance of images 0..num_images-1 of `sample_dir` to `stats_file`.

  `weights_file` is the Inception weights for "fid" or the digits-classifier params for "fd_digits".
  The images are read from verified chunks (a bad one is named); fewer than `num_images` (default:
  the directory's own num_samples) is an error unless `allow_subset`. Writes and returns a JSON
  record of what was scored, read from the data: the value (under the metric's name), the image
  count and index range, whether that is a subset, the directory's sampler settings and the NFE its
  chunks record, and both files' paths and SHA-256.
  """
  choices.check("metric", metric, METRICS)
  ref_mu, ref_sigma = load_stats(stats_file)
  held = sample_store.contents(sample_dir, num_images, allow_subset)
  feature_fn = feature_fn_for(metric, weights_file, batch_size, devices)
  with progress.Progress(held.num_images, metric, "img") as bar:
    stats = accumulate_features(progress.track(held.images(), bar), feature_fn)
  mu, sigma = stats.finalize()
  if mu.shape != ref_mu.shape:
    raise ValueError(f"{metric} features are {mu.shape[0]}-d but {stats_file} holds "
                     f"{ref_mu.shape[0]}-d statistics")
  if stats.count < mu.shape[0]:
    logging.warning("%d images for %d-d features: the covariance is singular and the distance is "
                    "biased high", stats.count, mu.shape[0])
  record = {
      metric: frechet_distance(mu, sigma, ref_mu, ref_sigma),
      "metric": metric,
      "num_images": stats.count,
      "image_indices": f"0..{stats.count - 1}",
      "num_requested": held.num_requested,
      "subset": stats.count < held.num_requested,
      "sample_dir": os.path.abspath(sample_dir),
      "num_chunks": len(held.paths),
      "sampler_settings": held.settings,
      "nfe_per_image": held.nfe_per_image,
      "weights_file": os.path.abspath(weights_file),
      "weights_sha256": file_sha256(weights_file),
      "stats_file": os.path.abspath(stats_file),
      "stats_sha256": file_sha256(stats_file),
  }
  if distributed.is_chief():
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    files.write_json_atomically(out_json, record)
  logging.info("%s = %.4f over %d images -> %s", metric, record[metric], stats.count, out_json)
  return record
