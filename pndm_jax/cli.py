"""What each `main.py --mode` does, and the checks it makes before any compute."""

from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections

from pndm_jax import convert, eps_models, models, sampling, train

SAMPLE_DIR = "samples"
USER_ERRORS = (eps_models.MissingCheckpointError, convert.ConversionError,
               train.CheckpointError, FileNotFoundError)


def check(mode: str, config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming any bad setting that `mode` would trip over later."""
  if mode == "train":
    train.check_config(config, jax.device_count())
  elif mode == "sample":
    eps_models.check_model_name(config.model.name)
    sampling.check_sampler_config(config)
  elif mode == "convert" and not config.sampler.checkpoint:
    raise ValueError("--mode=convert reads --config.sampler.checkpoint=PATH (a DDIM .ckpt or a "
                     "diffusers UNet2DModel folder); it is empty")


def run_train(config: ml_collections.ConfigDict, workdir: str) -> None:
  train.train_and_evaluate(config, workdir)


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> None:
  model = eps_models.load(config, workdir)
  sampling.generate_samples(model, config, os.path.join(workdir, SAMPLE_DIR))


def run_convert(config: ml_collections.ConfigDict, workdir: str) -> None:
  expected = models.unet_from_config(config.model, config.data.image_size,
                                     config.data.num_channels)
  dst = os.path.join(workdir, eps_models.CONVERTED_DIR)
  convert.convert_checkpoint(config.sampler.checkpoint, dst, expected,
                             list_entry=config.sampler.checkpoint_list_entry)
  print(f"converted {config.sampler.checkpoint} -> {dst}; `--mode=sample` with this "
        f"--workdir now samples from it")


MODE_FUNCTIONS: dict[str, Callable[[ml_collections.ConfigDict, str], None]] = {
    "train": run_train,
    "sample": run_sample,
    "convert": run_convert,
}
