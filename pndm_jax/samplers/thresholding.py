"""Dynamic thresholding of the data prediction (Imagen; docs/methods.md §6).

Each evaluation's x0 = (x - sqrt(1 - a) e) / sqrt(a) is clipped per image to
[-s, s] and divided by s, with s the `ratio` quantile of |x0| clamped to
[1, max_value] (max_value = 1: plain clipping to [-1, 1]); the eps the sampler
sees is the one that predicts the thresholded x0. Every method takes it,
whatever its transfer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pndm_jax.samplers.model_call import EpsFn


@dataclasses.dataclass(frozen=True)
class Thresholding:
  """diffusers' defaults: the 99.5% quantile, clamped to [1, 1]."""

  ratio: float = 0.995
  max_value: float = 1.0

  def __post_init__(self):
    if not 0 < self.ratio <= 1 or self.max_value < 1:
      raise ValueError(f"thresholding needs 0 < ratio <= 1 and max_value >= 1, got "
                       f"ratio={self.ratio}, max_value={self.max_value}")

  def __call__(self, x0: jax.Array) -> jax.Array:
    """x0 [B, ...] thresholded per image."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.clip(jnp.quantile(jnp.abs(flat), self.ratio, axis=1), 1.0, self.max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def thresholded(eps_fn: EpsFn, thresholding: Thresholding,
                alpha_bar: Callable[[jax.Array], jax.Array]) -> EpsFn:
  """eps_fn whose output predicts the thresholded x0 at the alpha-bar of its timestep."""

  def fn(x: jax.Array, t: jax.Array) -> jax.Array:
    e = eps_fn(x, t).astype(x.dtype)
    a = alpha_bar(t).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    x0 = thresholding((x - jnp.sqrt(1.0 - a) * e) / jnp.sqrt(a))
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)

  return fn
