"""Sharded, resumable sample generation: `main.py --mode=sample`.

Image i is drawn from noise that depends only on (seed, i), so the same image
comes out whatever the batch size, device count or process count (for `pf`
the adaptive solver controls its step size over a whole batch, so there the
batch composition matters too). Images are written in shards
`samples_XXXXX.npz` (uint8 NHWC under "images", their "indices"), each written
under a temporary name and renamed when complete: a rerun skips finished
shards and never mistakes a partial one for a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from pndm_jax import image_grid, models, samplers, schedules, sharding

SHARD_PATTERN = "samples_{:05d}.npz"
META_FILE = "sampling.json"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True, eq=False)
class EpsModel:
  """apply(params, x, t) -> eps (pure, jittable), its params and one image's HWC shape."""

  apply: Callable[[Any, jax.Array, jax.Array], jax.Array]
  params: Any
  image_shape: tuple[int, int, int]


def network_model(model: models.UNet, params: Any = None) -> EpsModel:
  """A U-Net as an EpsModel (params may be passed later, e.g. a training run's EMA)."""
  apply = lambda p, x, t: models.eps_fn(model, p)(x, t)
  return EpsModel(apply, params, (model.image_size, model.image_size, model.in_channels))


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What determines the images: checked against a sample directory before resuming."""
  s = config.sampler
  return dict(method=s.method, num_steps=s.num_steps, index=s.index, grid=s.grid, eta=s.eta,
              seed=s.seed, num_samples=s.num_samples, shard_size=s.shard_size,
              schedule=config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps,
              model=config.model.to_dict(), checkpoint=s.checkpoint)


def check_sampler_config(config: ml_collections.ConfigDict) -> Optional[int]:
  """Validates every sampler setting before any compute; returns the NFE per image."""
  s = config.sampler
  schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  for name in ("num_samples", "batch_size", "shard_size"):
    if s[name] < 1:
      raise ValueError(f"config.sampler.{name} must be >= 1, got {s[name]}")
  return samplers.nfe(s.method, s.num_steps, num_timesteps=config.diffusion.num_timesteps,
                      grid=s.grid, index=s.index, eta=s.eta)


def initial_noise(seed: int, indices: jax.Array, image_shape: Sequence[int],
                  dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """x_T and a sampler key for each image index, from (seed, index) only."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
  noise_keys, sampler_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  x_T = jax.vmap(lambda k: jax.random.normal(k, tuple(image_shape), dtype))(noise_keys)
  return x_T, sampler_keys


def make_generate_fn(model: EpsModel, config: ml_collections.ConfigDict, mesh: Mesh
                     ) -> Callable[[Any, np.ndarray], tuple[jax.Array, jax.Array]]:
  """generate(params, indices) -> (images in [-1, 1], nfe), batch-sharded over `mesh`."""
  s = config.sampler
  schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  stochastic = isinstance(samplers.get_method(s.method, s.eta), samplers.Ancestral)
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def generate(params, indices):
    x_T, keys = initial_noise(s.seed, indices, model.image_shape)
    x0, info = samplers.sample(lambda x, t: model.apply(params, x, t), x_T, schedule,
                               method=s.method, num_steps=s.num_steps, index=s.index,
                               grid=s.grid, rng=keys if stochastic else None, eta=s.eta)
    return x0, jnp.asarray(info["nfe"])

  return jax.jit(generate, in_shardings=(replicated, batch), out_shardings=(batch, replicated))


def sample_images(generate: Callable, params: Any, indices: np.ndarray, mesh: Mesh,
                  batch_size: Optional[int] = None) -> tuple[np.ndarray, Any]:
  """uint8 images for `indices` from `generate`, in device batches padded to the mesh.

  Every batch is dispatched before any result is fetched, so the devices never
  wait on the host between batches.
  """
  batch_size = sharding.round_up(batch_size or len(indices), mesh)
  chunks = [indices[lo:lo + batch_size] for lo in range(0, len(indices), batch_size)]
  outputs = [generate(params, sharding.pad_batch(c, batch_size).astype(np.int32))
             for c in chunks]
  images = [image_grid.to_uint8(jax.device_get(x0))[:len(c)]
            for c, (x0, _) in zip(chunks, outputs)]
  return np.concatenate(images), outputs[-1][1]


def _write_atomically(path: str, **arrays: np.ndarray) -> None:
  """Writes under a hidden temporary name, then renames: a shard exists only when complete."""
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _check_or_write_meta(sample_dir: str, settings: dict[str, Any]) -> None:
  """Refuses to mix shards of different settings in one directory; loses nothing."""
  path = os.path.join(sample_dir, META_FILE)
  settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
    if existing != settings:
      changed = sorted(k for k in set(existing) | set(settings)
                       if existing.get(k) != settings.get(k))
      raise ValueError(f"{sample_dir} holds samples made with other settings (differing: "
                       f"{', '.join(changed)}); use another --workdir or remove that directory")
  elif jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(settings, f, indent=2)


def generate_samples(model: EpsModel, config: ml_collections.ConfigDict, sample_dir: str,
                     devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """Writes config.sampler.num_samples images as shards in `sample_dir`; returns a summary.

  Process p of P makes shards p, p+P, ...; each batch is sharded over this
  process's devices (or `devices`) and padded to a multiple of their count.
  """
  nfe = check_sampler_config(config)
  s = config.sampler
  os.makedirs(sample_dir, exist_ok=True)
  _check_or_write_meta(sample_dir, sampler_settings(config))
  mesh = sharding.batch_mesh(devices or jax.local_devices())
  generate = make_generate_fn(model, config, mesh)

  num_shards = math.ceil(s.num_samples / s.shard_size)
  mine = range(jax.process_index(), num_shards, jax.process_count())
  todo = [k for k in mine if not os.path.exists(os.path.join(sample_dir, SHARD_PATTERN.format(k)))]
  logging.info("sampling %d images with %s, %d steps (NFE %s per image) on %d device(s): "
               "%d of %d shards to make", s.num_samples, s.method, s.num_steps, nfe,
               mesh.size, len(todo), len(mine))
  start, made, nfe_seen = time.perf_counter(), 0, nfe
  for done, k in enumerate(todo, 1):
    indices = np.arange(k * s.shard_size, min((k + 1) * s.shard_size, s.num_samples))
    images, nfe_seen = sample_images(generate, model.params, indices, mesh, s.batch_size)
    _write_atomically(os.path.join(sample_dir, SHARD_PATTERN.format(k)), images=images,
                      indices=indices)
    if s.save_pngs:
      _save_pngs(images, indices, os.path.join(sample_dir, "png"))
    made += len(indices)
    rate = made / (time.perf_counter() - start)
    remaining = sum(min(s.shard_size, s.num_samples - j * s.shard_size) for j in todo[done:])
    logging.info("shard %d/%d: %d images, %.2f images/s, ETA %.0f s", done, len(todo), made,
                 rate, remaining / rate)

  elapsed = time.perf_counter() - start
  summary = dict(num_samples=s.num_samples, images_made_now=made,
                 nfe_per_image=int(nfe_seen) if nfe_seen is not None else None,
                 images_per_second=made / elapsed if made else None, method=s.method,
                 num_steps=s.num_steps, devices=mesh.size, sample_dir=sample_dir)
  if jax.process_index() == 0:
    _save_grid(sample_dir, os.path.join(sample_dir, "grid.png"))
    with open(os.path.join(sample_dir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2)
  logging.info("done: %s", summary)
  return summary


def _save_pngs(images: np.ndarray, indices: np.ndarray, folder: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  for image, i in zip(images, indices):
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        os.path.join(folder, f"{i:06d}.png"))


def _save_grid(sample_dir: str, path: str, count: int = 64, min_size: int = 32) -> None:
  """A grid of the first `count` images (from shard 0), small ones enlarged to `min_size`."""
  first = os.path.join(sample_dir, SHARD_PATTERN.format(0))
  if os.path.exists(first):
    with np.load(first) as shard:
      images = shard["images"][:count]
    scale = max(1, min_size // images.shape[1])
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    image_grid.save_image_grid(images, path, nrow=int(math.ceil(math.sqrt(len(images)))))
