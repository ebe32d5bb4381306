"""Stochastic posterior sampling: DDPM (fixedlarge) and DDIM with eta > 0 (fixedsmall)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers import methods
from pndm_jax.samplers.model_call import EpsFn, call_eps, per_step_arrays


def as_typed_key(rng: jax.Array) -> jax.Array:
  """Accepts new-style typed keys and raw uint32 keys (shape [2] or [B, 2])."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def step_noise(rng: jax.Array, step: jax.Array, x: jax.Array) -> jax.Array:
  """Standard normal noise for `step`.

  A scalar key draws the whole batch at once; a key per image ([B]) makes each
  image's noise depend on its own key only, whatever batch it is sampled in.
  """
  if rng.ndim == 0:
    return jax.random.normal(jax.random.fold_in(rng, step), x.shape, x.dtype)
  draw = lambda key: jax.random.normal(jax.random.fold_in(key, step), x.shape[1:], x.dtype)
  return jax.vmap(draw)(rng)


def _coefficients(schedule, method: methods.Ancestral, t, t_next, index):
  """x0 = x/sqrt(a) - e sqrt(1/a - 1); x' = sqrt(a') x0 + c_eps e + std z."""
  a = schedule.alpha_bar(t, index)
  a_next = schedule.alpha_bar(t_next, index)
  posterior_var = (1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next)
  if method.variance == "fixedsmall":
    mean_std = std = method.eta * np.sqrt(posterior_var)
  else:
    mean_std = np.sqrt(posterior_var)
    std = np.sqrt(1.0 - a / a_next)
    std[-1] = 0.0
  return dict(x_scale=1.0 / np.sqrt(a), eps_scale=np.sqrt(1.0 / a - 1.0),
              x0_coef=np.sqrt(a_next),
              eps_coef=np.sqrt(np.maximum(1.0 - a_next - mean_std**2, 0.0)), std=std)


def sample(eps_fn: EpsFn, x_T: jax.Array, schedule: schedules.Schedule,
           method: methods.Ancestral, t: np.ndarray, t_next: np.ndarray, index: str,
           rng: jax.Array) -> jax.Array:
  """Ancestral sampling over the grid (t, t_next) with noise from `rng`."""
  rng = as_typed_key(rng)
  if rng.ndim not in (0, 1) or (rng.ndim == 1 and rng.shape[0] != x_T.shape[0]):
    raise ValueError(f"rng must be one key or one key per image ({x_T.shape[0]}), "
                     f"got key shape {rng.shape}")
  steps = per_step_arrays(x_T, _coefficients(schedule, method, t, t_next, index),
                          dict(t=t))
  steps["step"] = jnp.arange(len(t))

  def body(x, c):
    e = call_eps(eps_fn, x, c["t"])
    x0 = c["x_scale"] * x - c["eps_scale"] * e
    if method.clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    noise = step_noise(rng, c["step"], x)
    return c["x0_coef"] * x0 + c["eps_coef"] * e + c["std"] * noise, None

  x, _ = jax.lax.scan(body, x_T, steps)
  return x
