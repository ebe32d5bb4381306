"""The sampler spec: what determines a run's images, made and validated once from the config.

`from_config` is the only place that reads `config.sampler` / `config.diffusion`
strings; sampling, the CLI, evaluation records and experiments take the
resulting frozen value (vdm's "typed config at the boundary").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from pndm_jax import samplers, schedules


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """A validated sampling run: the method and grid, the images' seed, and which weights."""

  method_name: str      # the canonical name (aliases resolved): names sample directories
  method: samplers.Method
  discretization: schedules.Discretization
  eta: float            # ddim's stochasticity (0: deterministic)
  seed: int
  num_samples: int
  batch_size: int
  chunk_size: int
  save_pngs: bool
  sample_dir: str       # "" = the default under the workdir
  model: dict[str, Any]  # config.model: the network (or analytic model) asked for
  checkpoint: str
  checkpoint_step: int  # -1: the latest
  checkpoint_list_entry: int

  @property
  def nfe(self) -> int | None:
    """Model evaluations per image (None: probability flow adapts its steps)."""
    return self.method.num_evals(self.discretization)

  @property
  def adaptive(self) -> bool:
    return isinstance(self.method, samplers.ProbabilityFlow)

  def device_batch(self, num_devices: int) -> int:
    """Images per compiled call, a multiple of `num_devices`: batch_size, but no more than a
    chunk or the whole run holds (pf: batch_size itself, a setting of its images). One size
    for the whole run, so nothing recompiles; only the last batch is padded."""
    size = self.batch_size if self.adaptive else min(self.batch_size, self.chunk_size,
                                                      self.num_samples)
    return math.ceil(size / num_devices) * num_devices

  def directory_settings(self, weights: str | None = None) -> dict[str, Any]:
    """What a sample directory records: the image settings, the chunk size, the number of
    images and (once loaded) exactly which `weights`; all but num_samples must match to reuse it."""
    settings = dict(self.image_settings(), chunk_size=self.chunk_size,
                    num_samples=self.num_samples)
    return settings if weights is None else dict(settings, weights=weights)

  def image_settings(self) -> dict[str, Any]:
    """The settings that determine the images (not how many there are), as JSON values.

    They name the default sample directory and are recorded in it. Probability
    flow controls its step size over a whole batch, so there the batch size counts too.
    """
    settings = dict(method=self.method_name, **samplers.method_options(self.method),
                    **self.discretization.settings(), eta=self.eta,
                    seed=self.seed, model=self.model, checkpoint=self.checkpoint,
                    checkpoint_step=self.checkpoint_step,
                    checkpoint_list_entry=self.checkpoint_list_entry)
    if self.adaptive:
      settings["batch_size"] = self.batch_size
    return settings


def from_config(config: ml_collections.ConfigDict, num_devices: int | None = None
                ) -> SamplerSpec:
  """The spec of `config.sampler` / `config.diffusion`; a ValueError names any bad setting.

  With `num_devices`, probability flow's batch size must be a multiple of it, so
  that its batches are the same on any number of devices.
  """
  s, d = config.sampler, config.diffusion
  for name in ("num_samples", "batch_size", "chunk_size"):
    if s[name] < 1:
      raise ValueError(f"config.sampler.{name} must be >= 1, got {s[name]}")
  thresholding = (samplers.Thresholding(s.threshold_ratio, s.threshold_max)
                  if s.thresholding else None)
  method = samplers.get_method(s.method, s.eta, lower_order_final=s.lower_order_final,
                               denoise_to_zero=s.denoise_to_zero, thresholding=thresholding)
  discretization = schedules.Discretization(
      schedules.from_config(d), s.num_steps, spacing=s.spacing, convention=s.convention,
      steps_offset=s.steps_offset, set_alpha_to_one=s.set_alpha_to_one, end=s.grid_end)
  spec = SamplerSpec(
      method_name=samplers.canonical_name(s.method), method=method, discretization=discretization,
      eta=float(s.eta), seed=s.seed,
      num_samples=s.num_samples, batch_size=s.batch_size, chunk_size=s.chunk_size,
      save_pngs=bool(s.save_pngs), sample_dir=s.sample_dir, model=config.model.to_dict(),
      checkpoint=s.checkpoint, checkpoint_step=s.checkpoint_step,
      checkpoint_list_entry=s.checkpoint_list_entry)
  method.num_evals(discretization)  # raises if the method needs more steps
  if num_devices:
    check_devices(spec, num_devices)
  return spec


def check_devices(spec: SamplerSpec, num_devices: int) -> None:
  """Probability flow's batches must not depend on the device count (it pads to a multiple)."""
  if spec.adaptive and spec.batch_size % num_devices:
    raise ValueError(f"pf controls its step size over a whole batch: config.sampler.batch_size "
                     f"({spec.batch_size}) must be a multiple of the device count "
                     f"({num_devices}) so that batches are the same on any number of devices")
