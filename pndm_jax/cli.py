"""What each `main.py --mode` does, and the checks it makes before any compute.

The training and evaluation stacks (`train`, `evaluation.fid`) are imported by the modes that
use them: sampling, the common case, starts ~1 s sooner without them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import ml_collections

from pndm_jax import (
  checkpoints,
  choices,
  distributed,
  eps_models,
  files,
  generation,
  input_pipeline,
  models,
  progress,
  sample_store,
  sampler_spec,
)

Started = Callable[[], None]  # a mode calls it once its inputs are loaded and work begins
Spec = sampler_spec.SamplerSpec | None  # made for the modes that sample

# The errors a user's input causes: main.py prints them as one `error:` line and exits 2.
# (checkpoints.CheckpointError is a ValueError; ConnectionError: an unreachable coordinator.)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, ConnectionError)


def check(mode: str, config: ml_collections.ConfigDict, spec: Spec, workdir: str) -> None:
  """Raises a user error naming any bad setting that `mode` would trip over later.

  Cheap checks only (no weights, no compile), so bad input costs nothing and
  changes nothing: the workdir is checked last, and only then created.
  """
  if mode in ("train", "stats"):
    choices.check("dataset", config.data.dataset, input_pipeline.DATASETS)
  if mode == "convert" and not config.sampler.checkpoint:
    raise ValueError("--mode=convert reads --config.sampler.checkpoint=PATH (a DDIM .ckpt, a "
                     "diffusers UNet2DModel folder, an improved-diffusion .pt, a score_sde "
                     ".pth or a training workdir); it is empty")
  if mode in ("train", "convert"):  # these need a network, not an analytic model
    models.check_name(config.model.name)
  if mode in ("train", "sample", "convert") and config.model.name in models.NETWORKS:
    models.check_config(config.model, config.data.image_size, config.data.num_channels)
  if mode == "train":
    from pndm_jax import train
    train.check_config(config, jax.device_count())
  elif mode == "sample":
    eps_models.check_model_name(config.model.name)
    recorded = sample_store.read_settings(generation.default_sample_dir(spec, workdir))
    if recorded is not None:
      _check_sample_settings(spec, workdir, recorded)
  elif mode in ("stats", "eval"):
    from pndm_jax.evaluation import fid
    choices.check("metric", config.eval.metric, fid.METRICS)
    if not config.eval.stats_file:
      verb = "writes" if mode == "stats" else "compares with"
      raise ValueError(f"--mode={mode} {verb} --config.eval.stats_file=PATH.npz; it is empty")
    if mode == "stats":
      fid.check_stats_destination(config.eval.stats_file, config.eval.overwrite)
    else:
      _eval_contents(config, spec, workdir)
  check_workdir(workdir)


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that files can be written in it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file, not a directory")
  try:
    files.ensure_writable_dir(workdir)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} cannot be written: {e.strerror or e}") from e


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs `mode` after its checks; `config_<mode>.json` is written once the run starts.

  The sampler spec is made here, once, for the modes that sample. A run that
  fails on its inputs (a checkpoint of another model, damaged weights) never
  replaces the record of the run before it.
  """
  spec = (sampler_spec.from_config(config, len(jax.local_devices()))
          if mode in ("train", "sample", "eval") else None)
  check(mode, config, spec, workdir)

  def started() -> None:
    if distributed.is_chief():
      files.write_json_atomically(os.path.join(workdir, f"config_{mode}.json"),
                                  json.loads(config.to_json_best_effort()))

  MODE_FUNCTIONS[mode](config, spec, workdir, started)


def _check_sample_settings(spec: sampler_spec.SamplerSpec, workdir: str, recorded: dict) -> None:
  """The sample directory's recorded settings must be the spec's (num_samples may grow)."""
  sample_store.check_settings(generation.default_sample_dir(spec, workdir), recorded,
                              spec.directory_settings())


def _eval_contents(config: ml_collections.ConfigDict, spec: sampler_spec.SamplerSpec,
                   workdir: str) -> sample_store.Contents:
  """What eval will score: the verified images of the spec's sample directory."""
  sample_dir = generation.default_sample_dir(spec, workdir)
  recorded = sample_store.read_settings(sample_dir)
  if recorded is not None:
    _check_sample_settings(spec, workdir, recorded)
  elif not spec.sample_dir:
    raise sample_store.SampleDirError(
        f"no samples of these settings: {sample_dir} does not exist. Make them first with "
        "--mode=sample and the same config, or point --config.sampler.sample_dir at a "
        "directory of samples_XXXXX.npz chunks")
  return sample_store.contents(sample_dir, spec.num_samples, config.eval.subset)


def run_train(config: ml_collections.ConfigDict, spec: Spec, workdir: str,
              started: Started) -> None:
  from pndm_jax import train
  train.train_and_evaluate(config, workdir, spec=spec, on_start=started)


def run_sample(config: ml_collections.ConfigDict, spec: Spec, workdir: str,
               started: Started) -> None:
  model = eps_models.load(config, spec, workdir)
  started()
  summary = generation.generate_samples(model, spec, generation.default_sample_dir(spec, workdir))
  print(f"{summary['num_images']} of {summary['num_requested']} images in "
        f"{summary['sample_dir']} ({summary['images_made_now']} made by this run; "
        f"NFE {summary['nfe_per_image']} per image)")


def run_convert(config: ml_collections.ConfigDict, spec: Spec, workdir: str,
                started: Started) -> None:
  """Any checkpoint (DDIM .ckpt, diffusers folder, improved-diffusion .pt, score_sde .pth,
  training run's EMA) -> a params directory."""
  src = config.sampler.checkpoint
  del spec
  dst = os.path.join(workdir, checkpoints.CONVERTED_DIR)
  model, params, _ = eps_models.load_network(config, src)
  started()
  if distributed.is_chief():
    checkpoints.save_params(dst, model, params)
  print(f"converted {src} -> {dst}; `--mode=sample` with this --workdir now samples from it")


def _feature_weights(config: ml_collections.ConfigDict) -> str:
  """Inception weights for FID; the digits classifier (trained on first use) for FD-digits."""
  if config.eval.metric == "fid":
    return config.eval.inception_weights
  return config.eval.digits_classifier


def run_stats(config: ml_collections.ConfigDict, spec: Spec, workdir: str,
              started: Started) -> None:
  from pndm_jax.evaluation import fid
  del spec, workdir
  started()
  extract = fid.feature_fn_for(config.eval.metric, _feature_weights(config),
                               config.eval.batch_size)
  batches = input_pipeline.evaluation_batches(config.data, config.eval.batch_size)
  num_images = config.eval.num_images or None
  with progress.Progress(num_images, "stats", "img") as bar:
    mu, sigma = fid.compute_stats_from_images(progress.track(batches, bar), extract,
                                              num_images=num_images)
  if distributed.is_chief():
    fid.save_stats(config.eval.stats_file, mu, sigma, overwrite=config.eval.overwrite)
  print(f"wrote {config.eval.metric} statistics of {config.data.dataset} to "
        f"{config.eval.stats_file}")


def run_eval(config: ml_collections.ConfigDict, spec: Spec, workdir: str,
             started: Started) -> None:
  from pndm_jax.evaluation import fid
  metric = config.eval.metric
  started()
  record = fid.evaluate_sample_dir(
      generation.default_sample_dir(spec, workdir), config.eval.stats_file,
      _feature_weights(config), os.path.join(workdir, f"{metric}.json"), metric=metric,
      batch_size=config.eval.batch_size, num_images=spec.num_samples,
      allow_subset=config.eval.subset)
  subset = f" (a subset of the {record['num_requested']} asked for)" if record["subset"] else ""
  print(f"{metric} = {record[metric]:.4f} over {record['num_images']} images{subset}")


MODE_FUNCTIONS: dict[str, Callable[[ml_collections.ConfigDict, Spec, str, Started], None]] = {
    "train": run_train,
    "sample": run_sample,
    "convert": run_convert,
    "stats": run_stats,
    "eval": run_eval,
}
