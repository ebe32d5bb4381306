"""High-accuracy solutions of the sampling ODE for any eps: the yardstick of order experiments.

With y = x / sqrt(a) and sigma = sqrt((1 - a) / a), every deterministic sampler here solves
dy/dsigma = eps(x, t) from the start of its grid to the end (docs/methods.md §4), where, under
the `consistent` convention, t is the timestep whose alpha-bar is a. `solve` integrates that ODE
with many fixed RK4 steps in log sigma, where it is smooth; `timestep_eps_y` gives it any
eps_fn(x, t) of a timestep-conditioned network, so a trained network's own ODE has a reference
solution as exact eps has one (docs/experiments.md).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import schedules

EpsY = Callable[[jax.Array, jax.Array], jax.Array]  # eps_y(y [B, ...], sigma [B]) -> [B, ...]


def rk4(f: Callable, y: jax.Array, s0: float, s1: float, num_steps: int) -> jax.Array:
  """Classical fixed-step RK4 for dy/ds = f(s, y) from s0 to s1."""
  h = (s1 - s0) / num_steps

  def step(i, y):
    s = s0 + i * h
    k1 = f(s, y)
    k2 = f(s + h / 2, y + h / 2 * k1)
    k3 = f(s + h / 2, y + h / 2 * k2)
    k4 = f(s + h, y + h * k3)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

  return jax.lax.fori_loop(0, num_steps, step, y)


def solve(eps_y: EpsY, x_T: jax.Array, a_start: float, a_end: float, floor: float,
          num_steps: int = 2000) -> jax.Array:
  """x at alpha-bar a_end from x_T at a_start: RK4 in log sigma down to sigma = `floor`, then
  8 steps in sigma to sigma_end (0 when a_end = 1), where eps is nearly constant.

  `floor` should lie far below every scale of the data, where sigma * eps no longer moves y.
  """
  sigma_of = lambda a: float(np.sqrt((1.0 - a) / a))
  sigma_start, sigma_end = sigma_of(a_start), sigma_of(a_end)
  floor = max(sigma_end, floor)
  batch = x_T.shape[0]
  eps = lambda y, s: eps_y(y, jnp.full((batch,), s, y.dtype))
  y = x_T / np.sqrt(a_start)
  y = rk4(lambda s, y: jnp.exp(s) * eps(y, jnp.exp(s)), y, np.log(sigma_start), np.log(floor),
          num_steps)
  if floor > sigma_end:
    y = rk4(lambda s, y: eps(y, s), y, floor, sigma_end, 8)
  return (np.sqrt(a_end) * y).astype(x_T.dtype)


def timestep_eps_y(eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
                   schedule: schedules.Schedule) -> EpsY:
  """eps_y(y, sigma) of a network called as eps_fn(x, t) with the schedule's timesteps: the ODE
  the samplers solve under the `consistent` convention (t: the timestep whose alpha-bar is a)."""

  def eps_y(y: jax.Array, sigma: jax.Array) -> jax.Array:
    a = 1.0 / (1.0 + sigma**2)
    t = schedule.time_of_alpha_bar(a)
    scale = jnp.sqrt(a).reshape((-1,) + (1,) * (y.ndim - 1))
    return eps_fn(y * scale, t).astype(y.dtype)

  return eps_y
