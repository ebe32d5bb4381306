"""Stochastic posterior sampling: DDPM and DDIM with eta > 0 (docs/methods.md §7).

Each step predicts x0 = x/sqrt(a) - e sqrt(1/a - 1) and draws
x' = sqrt(a') x0 + c_eps e + std z; the variance value says how much of the
posterior variance the noise z carries (`std`) and how much the mean already
accounts for (`mean_std`, with c_eps = sqrt(1 - a' - mean_std^2)).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers.model_call import EpsFn, call_eps, per_step_arrays, state_dtype

if TYPE_CHECKING:  # methods.py builds its Ancestral from the variances below
  from pndm_jax.samplers.methods import Ancestral


def _posterior_variance(a: np.ndarray, a_next: np.ndarray) -> np.ndarray:
  return (1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next)


@dataclasses.dataclass(frozen=True)
class FixedSmall:
  """DDIM's sigma: std = eta * sqrt(posterior variance); eta = 0 is deterministic DDIM."""

  eta: float = 1.0

  def __post_init__(self):
    if self.eta < 0:
      raise ValueError(f"eta must be >= 0, got {self.eta}")

  def stds(self, a: np.ndarray, a_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean_std, std) per step."""
    std = self.eta * np.sqrt(_posterior_variance(a, a_next))
    return std, std


@dataclasses.dataclass(frozen=True)
class FixedLarge:
  """DDPM's choice: the posterior mean with std sqrt(1 - a/a'), no noise on the last step."""

  def stds(self, a: np.ndarray, a_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean_std, std) per step."""
    std = np.sqrt(1.0 - a / a_next)
    std[-1] = 0.0
    return np.sqrt(_posterior_variance(a, a_next)), std


Variance = FixedSmall | FixedLarge


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


def _coefficients(d: schedules.Discretization, variance: Variance) -> dict[str, np.ndarray]:
  a, a_next = d.alpha_bar(d.t), d.alpha_bar(d.t_next)
  mean_std, std = variance.stds(a, a_next)
  return dict(x_scale=1.0 / np.sqrt(a), eps_scale=np.sqrt(1.0 / a - 1.0),
              x0_coef=np.sqrt(a_next),
              eps_coef=np.sqrt(np.maximum(1.0 - a_next - mean_std**2, 0.0)), std=std)


def sample_ancestral(eps_fn: EpsFn, x_T: jax.Array, method: Ancestral,
                     discretization: schedules.Discretization, rng: jax.Array) -> jax.Array:
  """Ancestral sampling over the grid from x_T, with noise from `rng` (one key or one per image)."""
  rng = as_typed_key(rng)
  if rng.ndim not in (0, 1) or (rng.ndim == 1 and rng.shape[0] != x_T.shape[0]):
    raise ValueError(f"rng must be one key or one key per image ({x_T.shape[0]}), "
                     f"got key shape {rng.shape}")
  d = discretization
  x_T = x_T.astype(state_dtype(x_T))  # at least float32, as every sampler's state
  steps = per_step_arrays(x_T, _coefficients(d, method.variance), dict(t=d.t))
  steps["step"] = jnp.arange(len(d.t))

  def body(x, c):
    e = call_eps(eps_fn, x, c["t"])
    x0 = c["x_scale"] * x - c["eps_scale"] * e
    if method.clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    noise = step_noise(rng, c["step"], x)
    return c["x0_coef"] * x0 + c["eps_coef"] * e + c["std"] * noise, None

  x, _ = jax.lax.scan(body, x_T, steps)
  return x
