"""Variance schedules, alpha-bar lookups and sampling grids (METHODS §1-§3).

Everything here runs on the host in float64: the tables are exact to the last
bit, and samplers cast the per-step coefficients they derive from them to the
dtype of the data only at the very end.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "quad", "cosine")
INDEX_CONVENTIONS = ("paper", "consistent")
GRIDS = ("uniform", "linspace")

ArrayLike = Union[np.ndarray, jax.Array, float]


def check_choice(kind: str, value: str, valid: tuple[str, ...]) -> str:
  """Returns `value` if it is one of `valid`, else raises a ValueError listing them."""
  if value not in valid:
    raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")
  return value


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """The float64 betas of schedule `name` for `num_timesteps` training steps."""
  check_choice("schedule", name, SCHEDULES)
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  n = num_timesteps
  if name == "linear":
    return np.linspace(1e-4, 0.02, n, dtype=np.float64)
  if name == "quad":
    return np.linspace(np.sqrt(1e-4), np.sqrt(0.02), n, dtype=np.float64) ** 2
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  i = np.arange(n, dtype=np.float64)
  return np.minimum(1.0 - f((i + 1) / n) / f(i / n), 0.999)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete variance schedule; hashable, so it can be a static jit argument."""

  name: str
  num_timesteps: int = 1000

  def __post_init__(self):
    beta_schedule(self.name, self.num_timesteps)  # validates both fields

  @functools.cached_property
  def betas(self) -> np.ndarray:
    return beta_schedule(self.name, self.num_timesteps)

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    """A[k] = prod_{i<=k} (1 - beta_i), float64, shape [N]."""
    return np.cumprod(1.0 - self.betas)

  def alpha_bar(self, t: ArrayLike, index: str) -> ArrayLike:
    """Alpha-bar seen by the transfer at (possibly fractional) timestep t.

    `paper`: A[trunc(t) + 1] (the reference's one-index shift, t=-1 -> A[0]).
    `consistent`: the training alpha-bar A[t], log-linearly interpolated between
    integers with A[-1] := 1. Works on numpy (host, float64) and jax arrays
    (traced, e.g. inside an analytic eps_fn).
    """
    check_choice("index convention", index, INDEX_CONVENTIONS)
    xp = jnp if isinstance(t, jax.Array) else np
    table = self.alphas_cumprod
    if index == "paper":
      return xp.asarray(table)[xp.trunc(t).astype(xp.int32) + 1]
    log_table = xp.asarray(np.concatenate([[0.0], np.log(table)]))
    u = xp.clip(xp.asarray(t) + 1.0, 0.0, float(self.num_timesteps))
    lo = xp.minimum(xp.floor(u), self.num_timesteps - 1).astype(xp.int32)
    frac = u - lo
    return xp.exp((1.0 - frac) * log_table[lo] + frac * log_table[lo + 1])


def make_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
  """The schedule `name` (one of SCHEDULES) over `num_timesteps` training steps."""
  return Schedule(name, num_timesteps)


def timesteps(num_timesteps: int, num_steps: int, grid: str = "uniform",
              index: str = "paper") -> tuple[np.ndarray, np.ndarray]:
  """The (t, t_next) pairs a sampler walks, largest t first, as float64 arrays.

  `uniform` is the reference's skip grid: skip = N // S, t in {0, skip, ...} < N,
  t_next the previous entry or -1; it has ceil(N / skip) steps, which is S when S
  divides N. `linspace` takes round(linspace(N-1, 0, S)) and ends at -1; it starts
  at N-1, which `paper` would read past the table, so it is `consistent` only.
  """
  check_choice("grid", grid, GRIDS)
  check_choice("index convention", index, INDEX_CONVENTIONS)
  n = num_timesteps
  if not 1 <= num_steps <= n:
    raise ValueError(f"num_steps must be in [1, {n}] (the schedule's num_timesteps), "
                     f"got {num_steps}")
  if grid == "uniform":
    seq = np.arange(0, n, n // num_steps)
    t = seq[::-1]
  else:
    if index == "paper":
      raise ValueError("grid 'linspace' starts at t = N-1, which the 'paper' convention "
                       "would read past the table (A[N]); use index='consistent' or "
                       "grid='uniform'")
    t = np.round(np.linspace(n - 1, 0, num_steps))
  t_next = np.concatenate([t[1:], [-1]])
  if index == "paper" and t[0] + 1 > n - 1:
    raise ValueError(f"num_steps={num_steps} (skip {n // num_steps}) starts at t={int(t[0])}, "
                     f"where the 'paper' convention reads A[{int(t[0]) + 1}], past the table "
                     f"of {n}; choose another num_steps or index='consistent'")
  return t.astype(np.float64), t_next.astype(np.float64)
