"""The eps-prediction model a run samples from: a network with its weights, or an analytic one.

Resolution order for networks: `config.sampler.checkpoint` (a converted/shipped
params directory, a training workdir, its checkpoints or one step directory, a
DDIM `.ckpt` or a diffusers folder, converted on the fly), else the workdir's
`converted` model, else its own training checkpoints. Analytic models need no
weights at all.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from pndm_jax import analytic, convert, input_pipeline, models, sampling, schedules, train

MODEL_NAMES = ("unet", "digits_gmm")
CONVERTED_DIR = "converted"  # where `main.py --mode=convert` writes into the workdir


class MissingCheckpointError(FileNotFoundError):
  """No weights to sample from; the message says how to get them."""


def digits_gmm(std: float) -> analytic.GaussianMixture:
  """A mixture of the ten class-mean 8x8 digits (scikit-learn's data) in [-1, 1]."""
  images, labels = input_pipeline.digits_with_labels()
  images = images.reshape(len(images), -1).astype(np.float64)
  means = np.stack([images[labels == k].mean(0) for k in range(10)])
  return analytic.GaussianMixture(np.full(10, 0.1), means, np.full_like(means, std))


def _raise_missing(workdir: str):
  raise MissingCheckpointError(
      f"no model to sample from: config.sampler.checkpoint is empty and {workdir!r} has "
      f"neither training checkpoints nor a converted model. Either train one:\n"
      f"  python main.py --config=<train config> --mode=train --workdir={workdir}\n"
      f"or convert downloaded PyTorch weights (a DDIM .ckpt or a diffusers UNet2DModel "
      f"folder) and point the sampler at them:\n"
      f"  python main.py --config=<this config> --mode=convert "
      f"--config.sampler.checkpoint=PATH --workdir={workdir}\n"
      f"  (or sample straight from PATH with --config.sampler.checkpoint=PATH)")


def check_model_name(name: str) -> str:
  return schedules.check_choice("model", name, MODEL_NAMES)


def load(config: ml_collections.ConfigDict, workdir: str) -> sampling.EpsModel:
  """The EpsModel named by `config.model.name`, with weights resolved as described above.

  Its `source` names the weights exactly: a training run's checkpoints
  directory and step, a checkpoint's absolute path, or the analytic model.
  """
  if check_model_name(config.model.name) == "digits_gmm":
    schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    eps_fn = digits_gmm(config.model.gmm_std).eps_fn(schedule, config.sampler.index)
    return sampling.EpsModel(lambda p, x, t: eps_fn(x, t), {}, (8, 8, 1),
                             f"analytic digits_gmm(std={config.model.gmm_std})")

  path = config.sampler.checkpoint or _workdir_checkpoint(workdir) or _raise_missing(workdir)
  return sampling.network_model(*load_network(config, path))


def load_network(config: ml_collections.ConfigDict, path: str
                 ) -> tuple[models.UNet, Any, str]:
  """(U-Net, params, source) from a training run's EMA or any checkpoint `convert` reads.

  A training run is a workdir, its checkpoints or one step directory; its step is
  `config.sampler.checkpoint_step` (-1: the latest, or the step directory's own).
  The architecture is checked against `config.model` / `config.data`; `source`
  names the weights exactly (see `load`).
  """
  expected = models.unet_from_config(config.model, config.data.image_size,
                                     config.data.num_channels)
  step = config.sampler.checkpoint_step
  if train.find_training_checkpoints(path) is not None:
    directory, step = train.resolve_checkpoint(path, None if step == -1 else step)
    return expected, train.load_ema_params(path, step), f"{directory} step {step} (EMA)"
  if step != -1:
    raise ValueError(f"config.sampler.checkpoint_step={step} picks a step of a training run, "
                     f"but {path} is not one")
  model, params = convert.load_checkpoint(path, expected,
                                          list_entry=config.sampler.checkpoint_list_entry)
  return model, params, os.path.abspath(path)


def _workdir_checkpoint(workdir: str) -> str | None:
  """`--mode=convert`'s output in the workdir, else the workdir's training run, else None."""
  converted = os.path.join(workdir, CONVERTED_DIR)
  if os.path.isdir(converted):
    return converted
  return workdir if train.find_training_checkpoints(workdir) is not None else None
