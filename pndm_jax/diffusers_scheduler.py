"""diffusers' PNDMScheduler settings as this project's config (docs/methods.md §3).

A pipeline's `scheduler/scheduler_config.json` (Stable Diffusion v1 ships one)
names the schedule, the grid and PRK-or-PLMS; `apply_scheduler_config` writes the
equivalent settings into a config, after which every sampler of the project
runs on diffusers' grid and `plms` / `pndm` reproduce PNDMScheduler itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from pndm_jax import schedules

# PNDMScheduler's defaults (diffusers 0.42), for keys a saved config leaves out
DEFAULTS: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                beta_schedule="linear", trained_betas=None,
                                skip_prk_steps=False, set_alpha_to_one=False,
                                prediction_type="epsilon", timestep_spacing="leading",
                                steps_offset=0)


def read(path: str) -> dict[str, Any]:
  """A scheduler_config.json as a dict."""
  with open(path) as f:
    return json.load(f)


def apply_scheduler_config(config: ml_collections.ConfigDict,
                           scheduler_config: Mapping[str, Any]) -> None:
  """Sets config.diffusion / config.sampler / config.model.prediction_type from a PNDMScheduler
  config (keys starting with `_` are diffusers' bookkeeping). diffusers applies steps_offset to
  `leading` spacing only and beta_start / beta_end to the linear schedules only, so those are
  dropped elsewhere."""
  class_name = scheduler_config.get("_class_name", "PNDMScheduler")
  if class_name != "PNDMScheduler":
    raise ValueError(f"a {class_name} config is not a PNDMScheduler one; its sampler is not "
                     f"diffusers' PNDM")
  unknown = {k for k in scheduler_config if not k.startswith("_")} - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown PNDMScheduler settings: {', '.join(sorted(unknown))}; "
                     f"known: {', '.join(DEFAULTS)}")
  s = {**DEFAULTS, **scheduler_config}
  if s["trained_betas"] is not None:
    raise ValueError("trained_betas: save them as a .npy file and set "
                     "config.diffusion.schedule='trained', config.diffusion.trained_betas=PATH")
  endpoints = (s["beta_start"], s["beta_end"])
  if s["beta_schedule"] not in ("linear", "scaled_linear"):  # diffusers ignores them there
    endpoints = (schedules.BETA_START, schedules.BETA_END)
  config.diffusion.update(schedule=s["beta_schedule"], num_timesteps=s["num_train_timesteps"],
                          beta_start=endpoints[0], beta_end=endpoints[1])
  config.sampler.update(method="plms" if s["skip_prk_steps"] else "pndm", convention="diffusers",
                        spacing=s["timestep_spacing"],
                        steps_offset=s["steps_offset"] if s["timestep_spacing"] == "leading"
                        else 0,
                        set_alpha_to_one=bool(s["set_alpha_to_one"]))
  config.model.prediction_type = s["prediction_type"]
