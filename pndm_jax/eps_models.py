"""The eps-prediction model a run samples from: a network with its weights, or an analytic one.

Resolution order for networks: `config.sampler.checkpoint` (a converted/shipped
params directory, a training workdir, its checkpoints or one step directory, a
DDIM `.ckpt` or a diffusers folder, converted on the fly), else the workdir's
`converted` model, else its own training checkpoints. Analytic models need no
weights at all.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from pndm_jax import (
  analytic,
  checkpoints,
  choices,
  generation,
  input_pipeline,
  models,
  sampler_spec,
)

MODEL_NAMES = (*models.NETWORKS, "digits_gmm")


def digits_gmm(std: float) -> analytic.GaussianMixture:
  """A mixture of the ten class-mean 8x8 digits (scikit-learn's data) in [-1, 1]."""
  images, labels = input_pipeline.digits_with_labels()
  images = images.reshape(len(images), -1).astype(np.float64)
  means = np.stack([images[labels == k].mean(0) for k in range(10)])
  return analytic.GaussianMixture(np.full(10, 0.1), means, np.full_like(means, std))


def check_model_name(name: str) -> str:
  return choices.check("model", name, MODEL_NAMES)


def load(config: ml_collections.ConfigDict, spec: sampler_spec.SamplerSpec, workdir: str
         ) -> generation.EpsModel:
  """The EpsModel named by `config.model.name`, with weights resolved as described above.

  An analytic model's exact eps follows the spec's schedule and alpha-bar convention. A
  network's output is converted to eps per `config.model.prediction_type`, with the spec's
  schedule as the one it was trained with; analytic models return eps, so they take `epsilon`.

  Its `source` names the weights exactly: a training run's checkpoints
  directory and step, a checkpoint's absolute path, or the analytic model.
  """
  if check_model_name(config.model.name) == "digits_gmm":
    if config.model.prediction_type != "epsilon":
      raise ValueError(f"model digits_gmm is analytic and returns eps: prediction_type must be "
                       f"'epsilon', got {config.model.prediction_type!r}")
    d = spec.discretization
    eps_fn = digits_gmm(config.model.gmm_std).eps_fn(d.alpha_bar)
    return generation.EpsModel(lambda p, x, t: eps_fn(x, t), {}, (8, 8, 1),
                               f"analytic digits_gmm(std={config.model.gmm_std})")

  path = config.sampler.checkpoint or checkpoints.find_weights(workdir)
  model, params, source = load_network(config, path)
  return generation.network_model(model, params, source, config.model.prediction_type,
                                  spec.discretization.schedule)


def load_network(config: ml_collections.ConfigDict, path: str
                 ) -> tuple[nn.Module, Any, str]:
  """(network, params, source) from any checkpoint path (see `checkpoints.load_weights`).

  The architecture is checked against `config.model` / `config.data`.
  """
  expected = models.from_config(config.model, config.data.image_size, config.data.num_channels)
  step = config.sampler.checkpoint_step
  return checkpoints.load_weights(path, expected, None if step == -1 else step,
                                  config.sampler.checkpoint_list_entry)
