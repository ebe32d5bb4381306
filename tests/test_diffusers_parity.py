"""The `diffusers` convention against diffusers' own PNDMScheduler, model call by model call.

Both sides are driven by the same float64 eps function (an exact Gaussian-mixture
eps written here) and diffusers' alpha tables are recomputed in float64, so what
is compared is the algorithm, not diffusers' float32 storage (docs/methods.md §3).
"""

import itertools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import default
from pndm_jax import diffusers_scheduler, sampler_spec, samplers, schedules

N = 1000
SCHEDULES = {  # diffusers' beta_schedule with the endpoints of DDPM and of Stable Diffusion v1
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
}
# data per coordinate: 0.4 N(-0.6, 0.1^2) + 0.6 N(0.5, 0.2^2)
WEIGHTS, MEANS, STDS = np.array([0.4, 0.6]), np.array([-0.6, 0.5]), np.array([0.1, 0.2])
REL_TOL = 1e-9


def float64_alphas_cumprod(name):
  start, end = SCHEDULES[name]
  betas = np.linspace(start, end, N) if name == "linear" else np.linspace(start**0.5, end**0.5,
                                                                          N) ** 2
  return np.cumprod(1.0 - betas)


def exact_eps(x, a, scale=1.0):
  """E[eps | x_t = x] for the mixture above times `scale`, noised to alpha-bar a (float64)."""
  x, means, stds = x[..., None], scale * MEANS, scale * STDS
  var = a * stds**2 + (1.0 - a)
  log_w = np.log(WEIGHTS) - 0.5 * (x - np.sqrt(a) * means) ** 2 / var - 0.5 * np.log(var)
  resp = np.exp(log_w - log_w.max(-1, keepdims=True))
  resp /= resp.sum(-1, keepdims=True)
  return np.sqrt(1.0 - a) * np.sum(resp * (x - np.sqrt(a) * means) / var, -1)


def run_diffusers(x_T, table, num_steps, **options):
  """(model inputs, model timesteps, x0, scheduler config) of PNDMScheduler, float64 tables."""
  scheduler = diffusers.PNDMScheduler(num_train_timesteps=N, **options)
  scheduler.set_timesteps(num_steps)
  scheduler.alphas_cumprod = torch.from_numpy(table)
  scheduler.final_alpha_cumprod = torch.tensor(1.0 if options["set_alpha_to_one"] else table[0],
                                               dtype=torch.float64)
  x, inputs, times = torch.from_numpy(x_T), [], []
  for t in scheduler.timesteps:
    inputs.append(x.numpy().copy())
    times.append(int(t))
    eps = torch.from_numpy(exact_eps(x.numpy(), table[int(t)]))
    x = scheduler.step(eps, t, x).prev_sample
  return inputs, times, x.numpy(), dict(scheduler.config)


def run_project(x_T, table, method, d, scale=1.0):
  """The same on the project's sampler (eagerly, to record every model call)."""
  inputs, times = [], []

  def eps_fn(x, t):
    step = int(t[0])
    assert t[0] == step and np.all(t == t[0])  # integer model timesteps, one per call
    inputs.append(np.asarray(x))
    times.append(step)
    return jnp.asarray(exact_eps(np.asarray(x), table[step], scale))

  with jax.disable_jit():
    x0, nfe = samplers.run_sampler(eps_fn, jnp.asarray(x_T), method, d)
  return inputs, times, np.asarray(x0), nfe


def relative_difference(a, b):
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


# (skip_prk_steps, set_alpha_to_one): the scheduler's modes and its final alpha-bar
MODE_OPTIONS = list(itertools.product([True, False], [False, True]))
# On DDPM's schedule every grid (10, 30 (not a divisor of N) and 50 steps, each steps_offset and
# spacing) with the mode options in turn: so every grid, and every pair of any two options,
# is compared. Stable Diffusion's schedule differs only in its table: each mode option at 50.
PNDM_CASES = [
    (skip_prk_steps, num_steps, "linear", steps_offset, set_alpha_to_one, spacing)
    for i, (num_steps, steps_offset, spacing) in enumerate(itertools.product(
        [10, 30, 50], [0, 1], ["leading", "trailing", "linspace"]))
    for skip_prk_steps, set_alpha_to_one in [MODE_OPTIONS[i % 4]]] + [
    (skip_prk_steps, 50, "scaled_linear", i % 2, set_alpha_to_one,
     ["leading", "trailing", "linspace", "leading"][i])
    for i, (skip_prk_steps, set_alpha_to_one) in enumerate(MODE_OPTIONS)]


@pytest.mark.parametrize(
    "skip_prk_steps, num_steps, schedule_name, steps_offset, set_alpha_to_one, spacing",
    PNDM_CASES)
def test_trajectory_matches_pndm_scheduler(x64, skip_prk_steps, num_steps, schedule_name,
                                           steps_offset, set_alpha_to_one, spacing):
  table = float64_alphas_cumprod(schedule_name)
  start, end = SCHEDULES[schedule_name]
  x_T = np.random.default_rng(num_steps).standard_normal((3, 4))
  theirs = run_diffusers(x_T, table, num_steps, beta_schedule=schedule_name, beta_start=start,
                         beta_end=end, skip_prk_steps=skip_prk_steps,
                         set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
                         timestep_spacing=spacing)
  config = default.get_config()  # the project's side comes from the scheduler's own config
  diffusers_scheduler.apply_scheduler_config(config, theirs[3])
  config.sampler.num_steps = num_steps
  spec = sampler_spec.from_config(config)
  assert spec.method_name == ("plms" if skip_prk_steps else "f-pndm")
  ours = run_project(x_T, table, spec.method, spec.discretization)
  assert ours[1] == theirs[1]  # the model is called at the same timesteps, in order
  assert ours[3] == len(theirs[1]) == num_steps + (1 if skip_prk_steps else 9)
  for k, (a, b) in enumerate(zip(ours[0], theirs[0], strict=True)):
    assert relative_difference(a, b) <= REL_TOL, f"model input {k} at t={theirs[1][k]}"
  assert relative_difference(ours[2], theirs[2]) <= REL_TOL


@pytest.mark.parametrize("change", [dict(set_alpha_to_one=True), dict(steps_offset=0),
                                    dict(spacing="trailing", steps_offset=0)])
def test_every_option_is_visible_to_the_comparison(x64, change):
  """Changing one option on the project's side breaks parity by far more than the tolerance."""
  table = float64_alphas_cumprod("scaled_linear")
  x_T = np.random.default_rng(0).standard_normal((3, 4))
  stable_diffusion = dict(set_alpha_to_one=False, steps_offset=1)
  _, _, theirs, _ = run_diffusers(x_T, table, 50, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                                  timestep_spacing="leading", **stable_diffusion)
  schedule = schedules.Schedule("scaled_linear", N, 0.00085, 0.012)
  d = schedules.Discretization(schedule, 50, convention="diffusers",
                               **{"spacing": "leading", **stable_diffusion, **change})
  _, _, ours, _ = run_project(x_T, table, samplers.get_method("plms"), d)
  assert relative_difference(ours, theirs) > 1e3 * REL_TOL


# --- the multistep baselines against diffusers' DPMSolverMultistep/UniPCMultistep/DEISMultistep ---


class _Float64Torch:
  """The torch module, except that `torch.float32` is float64: DPMSolverMultistepScheduler.step
  casts the sample to float32, which would compare float32 rounding, not the algorithm."""

  float32 = torch.float64

  def __getattr__(self, name):
    return getattr(torch, name)


def run_multistep_scheduler(cls, x_T, table, num_steps, final_sigma, scale, **options):
  """(model inputs, model timesteps, x0) of a diffusers multistep scheduler, float64 tables,
  on the mixture times `scale`."""
  scheduler = cls(num_train_timesteps=N, timestep_spacing="trailing", **options)
  scheduler.alphas_cumprod = torch.from_numpy(table)  # set_timesteps reads it for the sigmas
  scheduler.set_timesteps(num_steps)
  sigma = np.sqrt((1.0 - table) / table)
  last = 0.0 if final_sigma == "zero" else sigma[0]
  scheduler.sigmas = torch.from_numpy(np.append(sigma[scheduler.timesteps.numpy()], last))
  x, inputs, times = torch.from_numpy(x_T), [], []
  for t in scheduler.timesteps:
    inputs.append(x.numpy().copy())
    times.append(int(t))
    eps = torch.from_numpy(exact_eps(x.numpy(), table[int(t)], scale))
    x = scheduler.step(eps, t, x).prev_sample
  return inputs, times, x.numpy()


BASELINES = {  # project method -> (diffusers scheduler, its options)
    **{f"dpm++{k}m": (diffusers.DPMSolverMultistepScheduler,
                      dict(solver_order=k, algorithm_type="dpmsolver++", solver_type="midpoint"))
       for k in (2, 3)},
    **{f"unipc{k}{suffix}": (diffusers.UniPCMultistepScheduler,
                             dict(solver_order=k, solver_type=variant, predict_x0=True))
       for k in (2, 3) for suffix, variant in (("", "bh2"), ("-bh1", "bh1"))},
    **{f"pseudo-logrho{k}-ramp": (diffusers.DEISMultistepScheduler,
                                  dict(solver_order=k, algorithm_type="deis",
                                       solver_type="logrho"))
       for k in (1, 2, 3)},
}


def endings(name):
  """The (final sigma, lower_order_final) pairs diffusers can run `name` with."""
  return [(final, lower_order_final)
          for final in ("zero", "sigma_min") for lower_order_final in (True, False)
          if not (BASELINES[name][0] is diffusers.DEISMultistepScheduler and final == "zero")
          # into sigma = 0, diffusers' UniPC divides by an infinite step without
          # lower_order_final and multiplies B(h) = -inf by 0 with bh1 (NaN either way)
          and not (BASELINES[name][1].get("solver_type") in ("bh1", "bh2") and final == "zero"
                   and (not lower_order_final or BASELINES[name][1]["solver_type"] == "bh1"))]


# Per method: each ending at 10 steps, where diffusers' lower_order_final acts (fewer than 15
# steps), on the two schedules in turn; then 20 and 50 steps, one schedule and ending each, so
# that every method meets every step count and schedule; and thresholding at 20 steps.
BASELINE_CASES = [
    case for name in BASELINES for case in (
        [(name, 10, list(SCHEDULES)[i % 2], *ending, False)
         for i, ending in enumerate(endings(name))]
        + [(name, num_steps, list(SCHEDULES)[i % 2], *endings(name)[-1 - i], False)
           for i, num_steps in enumerate((20, 50))]
        + [(name, 20, "linear", *endings(name)[0], True)])]
THRESHOLDED_SCALE = 2.5  # data beyond [-1, 1], so that thresholding clips


@pytest.mark.parametrize(
    "name, num_steps, schedule_name, final, lower_order_final, thresholding", BASELINE_CASES)
def test_trajectory_matches_multistep_schedulers(x64, monkeypatch, name, num_steps, schedule_name,
                                                 final, lower_order_final, thresholding):
  cls, options = BASELINES[name]
  monkeypatch.setattr(diffusers.schedulers.scheduling_dpmsolver_multistep, "torch",
                      _Float64Torch())
  table = float64_alphas_cumprod(schedule_name)
  start, end = SCHEDULES[schedule_name]
  x_T = np.random.default_rng(num_steps).standard_normal((3, 2, 4))  # [B, C, ...] images
  if cls is not diffusers.DEISMultistepScheduler:
    options = dict(options, final_sigmas_type=final)
  scale = THRESHOLDED_SCALE if thresholding else 1.0
  theirs = run_multistep_scheduler(cls, x_T, table, num_steps, final, scale,
                                   beta_schedule=schedule_name, beta_start=start, beta_end=end,
                                   lower_order_final=lower_order_final,
                                   thresholding=thresholding, **options)
  d = schedules.Discretization(schedules.Schedule(schedule_name, N, start, end), num_steps,
                               "trailing", "diffusers", set_alpha_to_one=final == "zero")
  method = samplers.get_method(name, lower_order_final=lower_order_final,
                               thresholding=samplers.Thresholding() if thresholding else None)
  ours = run_project(x_T, table, method, d, scale)
  assert ours[1] == theirs[1]  # the model is called at the same timesteps, in order
  assert ours[3] == len(theirs[1]) == num_steps
  for k, (a, b) in enumerate(zip(ours[0], theirs[0], strict=True)):
    assert relative_difference(a, b) <= REL_TOL, f"model input {k} at t={theirs[1][k]}"
  assert relative_difference(ours[2], theirs[2]) <= REL_TOL


@pytest.mark.parametrize("name, change", [("dpm++3m", dict(lower_order_final=False)),
                                          ("unipc3", dict(thresholding=samplers.Thresholding())),
                                          ("unipc2", dict(lower_order_final=False))])
def test_multistep_options_are_visible_to_the_comparison(x64, monkeypatch, name, change):
  """Flipping one option on the project's side breaks parity by far more than the tolerance."""
  cls, options = BASELINES[name]
  monkeypatch.setattr(diffusers.schedulers.scheduling_dpmsolver_multistep, "torch",
                      _Float64Torch())
  table = float64_alphas_cumprod("linear")
  x_T = np.random.default_rng(0).standard_normal((3, 2, 4))
  _, _, theirs = run_multistep_scheduler(cls, x_T, table, 10, "sigma_min", THRESHOLDED_SCALE,
                                         final_sigmas_type="sigma_min", **options)
  d = schedules.Discretization(schedules.Schedule("linear"), 10, "trailing", "diffusers")
  _, _, ours, _ = run_project(x_T, table, samplers.get_method(name, **change), d,
                              THRESHOLDED_SCALE)
  assert relative_difference(ours, theirs) > 1e3 * REL_TOL
