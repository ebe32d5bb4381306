"""Variance schedules, alpha-bar conventions and sampling grids (docs/methods.md §1-§3).

Everything here runs on the host in float64: the tables are exact to the last
bit, and samplers cast the per-step coefficients they derive from them to the
dtype of the data only at the very end.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import choices

SCHEDULES = ("linear", "quad", "cosine")
CONVENTIONS = ("paper", "consistent")
SPACINGS = ("uniform", "linspace")

ArrayLike = np.ndarray | jax.Array | float


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """The float64 betas of schedule `name` for `num_timesteps` training steps."""
  choices.check("schedule", name, SCHEDULES)
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
  """A discrete variance schedule (one of SCHEDULES over `num_timesteps` training steps).

  Hashable, so it can be a static jit argument.
  """

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

  def alpha_bar(self, t: ArrayLike, convention: str) -> ArrayLike:
    """Alpha-bar seen by the transfer at (possibly fractional) timestep t.

    `paper`: A[trunc(t) + 1] (the reference's one-index shift, t=-1 -> A[0]).
    `consistent`: the training alpha-bar A[t], log-linearly interpolated between
    integers with A[-1] := 1. Works on numpy (host, float64) and jax arrays
    (traced, e.g. inside an analytic eps_fn).
    """
    choices.check("alpha-bar convention", convention, CONVENTIONS)
    xp = jnp if isinstance(t, jax.Array) else np
    table = self.alphas_cumprod
    if convention == "paper":
      return xp.asarray(table)[xp.trunc(t).astype(xp.int32) + 1]
    log_table = xp.asarray(np.concatenate([[0.0], np.log(table)]))
    u = xp.clip(xp.asarray(t) + 1.0, 0.0, float(self.num_timesteps))
    lo = xp.minimum(xp.floor(u), self.num_timesteps - 1).astype(xp.int32)
    frac = u - lo
    return xp.exp((1.0 - frac) * log_table[lo] + frac * log_table[lo + 1])


@dataclasses.dataclass(frozen=True)
class Discretization:
  """The grid a sampler walks over `schedule` and the alpha-bar convention it reads.

  `t` and `t_next` (float64, read-only, largest t first) are built and checked
  on construction; equality and the hash cover the four defining fields, so a
  Discretization is a static jit argument. `spacing`:
  - `uniform` is the reference's skip grid: skip = N // S, t in {0, skip, ...} < N,
    t_next the previous entry or -1; it has ceil(N / skip) steps, which is S
    (`num_steps`) when S divides N.
  - `linspace` takes round(linspace(N-1, 0, S)) and ends at -1; it starts at
    N-1, which `paper` would read past the table, so it is `consistent` only.
  """

  schedule: Schedule
  num_steps: int
  spacing: str = "uniform"
  convention: str = "paper"
  t: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  t_next: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    choices.check("spacing", self.spacing, SPACINGS)
    choices.check("alpha-bar convention", self.convention, CONVENTIONS)
    n, s = self.schedule.num_timesteps, self.num_steps
    if not 1 <= s <= n:
      raise ValueError(f"num_steps must be in [1, {n}] (the schedule's num_timesteps), got {s}")
    if self.spacing == "uniform":
      t = np.arange(0, n, n // s)[::-1]
    else:
      if self.convention == "paper":
        raise ValueError("spacing 'linspace' starts at t = N-1, which the 'paper' convention "
                         "would read past the table (A[N]); use convention='consistent' or "
                         "spacing='uniform'")
      t = np.round(np.linspace(n - 1, 0, s))
    if self.convention == "paper" and t[0] + 1 > n - 1:
      raise ValueError(f"num_steps={s} (skip {n // s}) starts at t={int(t[0])}, where the "
                       f"'paper' convention reads A[{int(t[0]) + 1}], past the table of {n}; "
                       f"choose another num_steps or convention='consistent'")
    t_next = np.concatenate([t[1:], [-1]])
    for name, value in (("t", t), ("t_next", t_next)):
      value = value.astype(np.float64)
      value.flags.writeable = False
      object.__setattr__(self, name, value)

  def alpha_bar(self, t: ArrayLike) -> ArrayLike:
    """Alpha-bar at (possibly fractional) timesteps t under this grid's convention."""
    return self.schedule.alpha_bar(t, self.convention)

  def times(self, c: float) -> np.ndarray:
    """The timestep a fraction c of the way through each step: t at 0, t_next at 1."""
    return self.t + c * (self.t_next - self.t)
