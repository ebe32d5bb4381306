"""Sharded, resumable sample generation: `main.py --mode=sample`.

Image i is drawn from noise that depends only on (seed, i), so the same image
comes out whatever the batch size, device count or process count, up to float
rounding: XLA does not promise bitwise-equal results across batch shapes,
device counts or CPU kernels, so images agree to within one level of 255 (the
float outputs to 1e-4). For `pf` the adaptive solver controls its step size
over a whole batch, so there the batch size is one of the settings. The sample
directory's format (settings, verified chunks, claims) is `sample_store`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from pndm_jax import (
  compiler_options,
  distributed,
  files,
  image_grid,
  models,
  progress,
  sample_store,
  sampler_spec,
  samplers,
  schedules,
  sharding,
)

SAMPLE_DIR = "samples"    # default sample directories live under <workdir>/samples/
CLAIM_POLL_SECONDS = 1.0  # how often to look at chunks other processes are making


@dataclasses.dataclass(frozen=True, eq=False)
class EpsModel:
  """apply(params, x, t) -> eps (pure, jittable), its params and one image's HWC shape.

  `source` says exactly which weights these are (path, and step for a training
  run): it is part of the settings a sample directory records.
  """

  apply: Callable[[Any, jax.Array, jax.Array], jax.Array]
  params: Any
  image_shape: tuple[int, int, int]
  source: str = ""


def network_model(model: nn.Module, params: Any = None, source: str = "",
                  prediction_type: str = "epsilon",
                  schedule: schedules.Schedule | None = None) -> EpsModel:
  """A network of `models.NETWORKS` as an EpsModel (params may be passed later, e.g. a training
  run's EMA).

  `schedule` is the one the network was trained with: continuous-time networks read their
  timestep count from it, and a network that predicts x0 (`sample`) or v (`v_prediction`) has
  its output converted to eps with its alpha-bar (`models.eps_from_output`).
  """
  models.check_conversion(prediction_type, schedule)
  steps = None if schedule is None else schedule.num_timesteps
  apply = lambda p, x, t: models.eps_from_output(models.eps_fn(model, p, num_timesteps=steps),
                                                 schedule, prediction_type)(x, t)
  return EpsModel(apply, params, (model.image_size, model.image_size, model.in_channels), source)


def default_sample_dir(spec: sampler_spec.SamplerSpec, workdir: str) -> str:
  """`spec.sample_dir`, else `<workdir>/samples/<method>-<steps>-seed<seed>-<hash>`.

  The hash covers every image setting, so runs with other settings never meet
  in one directory, and a rerun (or a larger num_samples) finds its own.
  """
  if spec.sample_dir:
    return spec.sample_dir
  settings = spec.image_settings()
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
  name = f"{settings['method']}-{settings['num_steps']}-seed{settings['seed']}-{digest}"
  return os.path.join(workdir, SAMPLE_DIR, name)


def initial_noise(seed: int, indices: jax.Array, image_shape: Sequence[int],
                  dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """x_T and a sampler key for each image index, from (seed, index) only."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
  noise_keys, sampler_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  x_T = jax.vmap(lambda k: jax.random.normal(k, tuple(image_shape), dtype))(noise_keys)
  return x_T, sampler_keys


def make_generate_fn(model: EpsModel, spec: sampler_spec.SamplerSpec, mesh: Mesh
                     ) -> Callable[[Any, np.ndarray], tuple[jax.Array, jax.Array]]:
  """generate(params, indices) -> (images in [-1, 1], nfe), batch-sharded over `mesh`."""
  stochastic = isinstance(spec.method, samplers.Ancestral)
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def generate(params, indices):
    x_T, keys = initial_noise(spec.seed, indices, model.image_shape)
    x0, nfe = samplers.run_sampler(lambda x, t: model.apply(params, x, t), x_T, spec.method,
                                   spec.discretization, rng=keys if stochastic else None)
    return x0, jnp.asarray(nfe)

  return jax.jit(generate, in_shardings=(replicated, batch), out_shardings=(batch, replicated),
                 compiler_options=compiler_options.PROGRAMS)


def dispatch_images(generate: Callable, params: Any, indices: np.ndarray, mesh: Mesh,
                    batch_size: int | None = None) -> list[tuple[Any, int]]:
  """Dispatches `generate` over `indices` in batches padded to `batch_size` (a multiple of the
  mesh); returns each batch's (output, real rows) without waiting for the devices."""
  batch_size = sharding.round_up(batch_size or len(indices), mesh)
  run = lambda batch: generate(params, sharding.put_batch(batch.astype(np.int32), mesh))
  return list(sharding.map_padded(run, [indices], batch_size))


def fetch_images(outputs: list[tuple[Any, int]],
                 bar: progress.Progress | None = None) -> tuple[np.ndarray, Any]:
  """uint8 images and the NFE of `dispatch_images`' outputs; `bar` advances per batch."""
  images = []
  for (x0, _), valid in outputs:
    images.append(image_grid.to_uint8(distributed.to_host(x0))[:valid])
    if bar is not None:
      bar.update(valid)
  return np.concatenate(images), outputs[-1][0][1]


def sample_images(generate: Callable, params: Any, indices: np.ndarray, mesh: Mesh,
                  batch_size: int | None = None,
                  bar: progress.Progress | None = None) -> tuple[np.ndarray, Any]:
  """uint8 images for `indices` from `generate`, in device batches padded to the mesh."""
  return fetch_images(dispatch_images(generate, params, indices, mesh, batch_size), bar)


def generate_samples(model: EpsModel, spec: sampler_spec.SamplerSpec, sample_dir: str,
                     devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Makes images 0..spec.num_samples-1 as chunks in `sample_dir`; returns a summary.

  Resumes: finished chunks are verified and kept, bad or short ones remade.
  Processes sharing the directory claim chunks, so each is made once; a chunk
  claimed by a dead process is taken over. The processes of one distributed run
  start at their own offsets into the chunks, and process 0 writes the summary
  once all have finished (docs/distributed.md §2). Each batch (`spec.device_batch`:
  one compiled size) is sharded over this process's devices (or `devices`); the
  parameters are put on them once. Chunk k+1 is dispatched before chunk k is
  fetched and written, so the devices do not wait for the host. The summary
  (also `summary.json` once the directory is complete) is read back from the
  chunks: what the directory holds, not what was asked.
  """
  s = spec
  mesh = sharding.batch_mesh(devices or jax.local_devices())
  sampler_spec.check_devices(spec, mesh.size)
  settings = sample_store.open_for_writing(sample_dir, s.directory_settings(model.source))
  generate = make_generate_fn(model, spec, mesh)
  params = jax.device_put(model.params, sharding.replicated(mesh))  # once, not per batch

  todo = []
  for k in range(sample_store.num_chunks(s.chunk_size, s.num_samples)):
    why = sample_store.check_chunk(sample_dir, k, s.chunk_size, s.num_samples)
    if why is not None and why.startswith("bad chunk"):
      logging.warning("remaking chunk %d: %s", k, why)
    if why is not None:
      todo.append(k)
  if jax.process_count() > 1:  # start each process at its own share
    start = len(todo) * jax.process_index() // jax.process_count()
    todo = todo[start:] + todo[:start]
  num_todo = sum(len(sample_store.chunk_indices(k, s.chunk_size, s.num_samples)) for k in todo)
  logging.info("sampling into %s: %d of %d images to make with %s, %d steps, on %d device(s)",
               sample_dir, num_todo, s.num_samples, s.method_name, s.discretization.num_steps,
               mesh.size)

  start, made = time.perf_counter(), 0
  batch_size = s.device_batch(mesh.size)
  written = None  # (chunk, its indices, its dispatched batches): computing, not yet written

  def write(k: int, indices: np.ndarray, outputs: list, bar: progress.Progress) -> None:
    nonlocal made
    try:
      images, nfe = fetch_images(outputs, bar)
      sample_store.write_chunk(sample_dir, k, images, indices,
                               None if nfe is None else int(nfe))
      if s.save_pngs:
        _save_pngs(images, indices, os.path.join(sample_dir, "png"))
      made += len(indices)
    finally:
      sample_store.release_claim(sample_dir, k)

  def make(k: int, bar: progress.Progress) -> None:
    """Dispatches chunk k (claimed), then writes the chunk before it while the devices work."""
    nonlocal written
    if sample_store.check_chunk(sample_dir, k, s.chunk_size, s.num_samples) is None:
      sample_store.release_claim(sample_dir, k)
      return  # another process finished it meanwhile
    indices = sample_store.chunk_indices(k, s.chunk_size, s.num_samples)
    try:
      outputs = dispatch_images(generate, params, indices, mesh, batch_size)
    except BaseException:
      sample_store.release_claim(sample_dir, k)
      raise
    previous, written = written, (k, indices, outputs)
    if previous is not None:
      write(*previous, bar)

  def flush(bar: progress.Progress) -> None:
    nonlocal written
    if written is not None:
      previous, written = written, None
      write(*previous, bar)

  def drop() -> None:
    """An interrupted run leaves the chunk it dispatched but did not write to a rerun."""
    if written is not None:
      sample_store.release_claim(sample_dir, written[0])

  with progress.Progress(num_todo, "sample", "img") as bar:
    others = []
    try:
      for k in todo:
        if sample_store.try_claim(sample_dir, k):
          make(k, bar)
        else:
          others.append(k)
      flush(bar)
    finally:
      drop()
    while others:  # chunks other processes claimed: wait for them, or take a dead one over
      time.sleep(CLAIM_POLL_SECONDS)
      for k in list(others):
        claim = sample_store.claimant(sample_dir, k)
        if sample_store.check_chunk(sample_dir, k, s.chunk_size, s.num_samples) is None:
          others.remove(k)
        elif claim is not None and claim.get("host") != socket.gethostname():
          logging.warning("chunk %d is being made on %s; not waiting for it", k, claim["host"])
          others.remove(k)
        elif sample_store.try_claim(sample_dir, k):
          logging.warning("chunk %d: its claimant is gone; making it here", k)
          try:
            make(k, bar)
            flush(bar)
          finally:
            drop()
          others.remove(k)

  made_by_process = distributed.gather(np.int64(made)).tolist()  # waits for every process
  made = sum(made_by_process)
  elapsed = time.perf_counter() - start
  held = sample_store.contents(sample_dir, s.num_samples, allow_subset=True)
  summary = dict(
      sample_dir=os.path.abspath(sample_dir), num_images=held.num_images,
      num_requested=s.num_samples, complete=held.num_images >= s.num_samples,
      images_made_now=made, images_made_by_process=made_by_process,
      nfe_per_image=held.nfe_per_image,
      images_per_second=made / elapsed if made else None,
      devices=mesh.size * jax.process_count(), processes=jax.process_count(),
      batch_size=batch_size, settings=settings)
  if summary["complete"] and distributed.is_chief():
    files.write_json_atomically(os.path.join(sample_dir, sample_store.SUMMARY_FILE), summary)
    _save_grid(held, os.path.join(sample_dir, "grid.png"))
  logging.info("%s: %d of %d images (%d made now, NFE %s per image)", sample_dir,
               held.num_images, s.num_samples, made, held.nfe_per_image)
  return summary


def _save_pngs(images: np.ndarray, indices: np.ndarray, folder: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  for image, i in zip(images, indices):
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        os.path.join(folder, f"{i:06d}.png"))


def _save_grid(held: sample_store.Contents, path: str, count: int = 64,
               min_size: int = 32) -> None:
  """A grid of the first `count` images, small ones enlarged to `min_size` (written atomically)."""
  images = next(held.images())[:count]
  scale = max(1, min_size // images.shape[1])
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  tmp = files.temporary_name(path) + ".png"  # PIL picks the format by the extension
  image_grid.save_image_grid(images, tmp, nrow=int(math.ceil(math.sqrt(len(images)))))
  os.replace(tmp, path)
