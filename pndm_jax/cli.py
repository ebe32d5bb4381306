"""What each `main.py --mode` does, and the checks it makes before any compute."""

from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections

from pndm_jax import convert, eps_models, input_pipeline, sampling, schedules, train
from pndm_jax.evaluation import fid

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
    raise ValueError("--mode=convert reads --config.sampler.checkpoint=PATH (a DDIM .ckpt, a "
                     "diffusers UNet2DModel folder or a training workdir); it is empty")
  elif mode in ("stats", "eval"):
    schedules.check_choice("metric", config.eval.metric, fid.METRICS)
    if not config.eval.stats_file:
      verb = "writes" if mode == "stats" else "compares with"
      raise ValueError(f"--mode={mode} {verb} --config.eval.stats_file=PATH.npz; it is empty")


def run_train(config: ml_collections.ConfigDict, workdir: str) -> None:
  train.train_and_evaluate(config, workdir)


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> None:
  model = eps_models.load(config, workdir)
  sampling.generate_samples(model, config, os.path.join(workdir, SAMPLE_DIR))


def run_convert(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Any checkpoint (DDIM .ckpt, diffusers folder, training run's EMA) -> a params directory."""
  src = config.sampler.checkpoint
  dst = os.path.join(workdir, eps_models.CONVERTED_DIR)
  convert.save_params(dst, *eps_models.load_network(config, src))
  print(f"converted {src} -> {dst}; `--mode=sample` with this --workdir now samples from it")


def _feature_weights(config: ml_collections.ConfigDict) -> str:
  """Inception weights for FID; the digits classifier (trained on first use) for FD-digits."""
  if config.eval.metric == "fid":
    return config.eval.inception_weights
  return config.eval.digits_classifier


def run_stats(config: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir
  extract = fid.feature_fn_for(config.eval.metric, _feature_weights(config),
                               config.eval.batch_size)
  batches = input_pipeline.evaluation_batches(config.data, config.eval.batch_size)
  mu, sigma = fid.compute_stats_from_images(batches, extract,
                                            num_images=config.eval.num_images or None)
  fid.save_stats(config.eval.stats_file, mu, sigma)
  print(f"wrote {config.eval.metric} statistics of {config.data.dataset} to "
        f"{config.eval.stats_file}")


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> None:
  metric = config.eval.metric
  record = fid.evaluate_sample_dir(
      os.path.join(workdir, SAMPLE_DIR), config.eval.stats_file, _feature_weights(config),
      os.path.join(workdir, f"{metric}.json"),
      dict(sampling.sampler_settings(config), nfe=sampling.check_sampler_config(config)),
      metric=metric, batch_size=config.eval.batch_size)
  print(f"{metric} = {record[metric]:.4f} over {record['num_images']} images")


MODE_FUNCTIONS: dict[str, Callable[[ml_collections.ConfigDict, str], None]] = {
    "train": run_train,
    "sample": run_sample,
    "convert": run_convert,
    "stats": run_stats,
    "eval": run_eval,
}
