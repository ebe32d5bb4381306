"""Variance schedules, alpha-bar conventions and sampling grids (docs/methods.md §1-§3).

Everything here runs on the host in float64: the tables are exact to the last
bit, and samplers cast the per-step coefficients they derive from them to the
dtype of the data only at the very end.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pndm_jax import choices

SCHEDULES = ("linear", "scaled_linear", "cosine", "trained")
# other names for the same schedules: the paper's `quad`, diffusers' `squaredcos_cap_v2`
SCHEDULE_ALIASES = {"quad": "scaled_linear", "squaredcos_cap_v2": "cosine"}
BETA_START, BETA_END = 1e-4, 0.02  # the DDPM endpoints of `linear` and `scaled_linear`
CONVENTIONS = ("paper", "consistent", "diffusers")
SPACINGS = ("uniform", "linspace", "leading", "trailing",
            "quadratic", "time_uniform", "logsnr", "karras")
# spacings with fractional timesteps: they need the continuous (`consistent`) alpha-bar
CONTINUOUS_SPACINGS = ("quadratic", "time_uniform", "logsnr", "karras")
KARRAS_RHO = 7.0  # Karras et al. (2022)'s rho
# where the last step of a `consistent` grid ends: sigma = 0, or A[0] (t = 0)
GRID_ENDS = ("zero", "sigma_min")
# the variable in which a Runge-Kutta step's stage nodes c are fractions of the step
STAGE_VARIABLES = ("t", "sigma", "log_snr")

ArrayLike = np.ndarray | jax.Array | float


def beta_schedule(name: str, num_timesteps: int, beta_start: float = BETA_START,
                  beta_end: float = BETA_END) -> np.ndarray:
  """The float64 betas of schedule `name` (or an alias) for `num_timesteps` training steps.

  `beta_start` and `beta_end` are the endpoints of `linear` and `scaled_linear`
  (the latter is linear in sqrt(beta)); `cosine` has none.
  """
  name = SCHEDULE_ALIASES.get(name, name)
  choices.check("schedule", name, SCHEDULES[:-1])
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  if name == "cosine":
    if (beta_start, beta_end) != (BETA_START, BETA_END):
      raise ValueError(f"beta_start/beta_end ({beta_start}, {beta_end}) apply to the 'linear' "
                       f"and 'scaled_linear' schedules only, not 'cosine'")
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.arange(num_timesteps, dtype=np.float64)
    return np.minimum(1.0 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999)
  if not 0 < beta_start <= beta_end < 1:
    raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
  if name == "linear":
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete variance schedule of `num_timesteps` training steps (docs/methods.md §1).

  `name` is one of SCHEDULES or an alias (stored under its canonical name);
  `trained` takes the betas themselves (`Schedule.from_betas`). Hashable, so it
  can be a static jit argument.
  """

  name: str
  num_timesteps: int = 1000
  beta_start: float = BETA_START
  beta_end: float = BETA_END
  trained_betas: tuple[float, ...] | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    choices.check("schedule", self.name, SCHEDULES + tuple(SCHEDULE_ALIASES))
    object.__setattr__(self, "name", SCHEDULE_ALIASES.get(self.name, self.name))
    if self.name != "trained" and self.trained_betas is None:
      beta_schedule(self.name, self.num_timesteps, self.beta_start, self.beta_end)  # validates
      return
    if self.name != "trained" or self.trained_betas is None:
      raise ValueError("explicit betas need the schedule name 'trained' (Schedule.from_betas), "
                       f"got name {self.name!r} with"
                       f"{'out' if self.trained_betas is None else ''} betas")
    if (self.beta_start, self.beta_end) != (BETA_START, BETA_END):
      raise ValueError("beta_start/beta_end do not apply to a 'trained' schedule")
    betas = np.asarray(self.trained_betas, np.float64)
    if betas.ndim != 1 or len(betas) != self.num_timesteps or not np.all((betas > 0) & (betas < 1)):
      raise ValueError(f"trained betas must be {self.num_timesteps} (num_timesteps) values in "
                       f"(0, 1), got shape {betas.shape}, range [{betas.min()}, {betas.max()}]")

  @classmethod
  def from_betas(cls, betas: np.ndarray) -> Schedule:
    """The `trained` schedule with these betas (read as float64)."""
    betas = np.asarray(betas, np.float64).reshape(-1)
    return cls("trained", len(betas), trained_betas=tuple(float(b) for b in betas))

  @functools.cached_property
  def betas(self) -> np.ndarray:
    if self.trained_betas is not None:
      return np.asarray(self.trained_betas, np.float64)
    return beta_schedule(self.name, self.num_timesteps, self.beta_start, self.beta_end)

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    """A[k] = prod_{i<=k} (1 - beta_i), float64, shape [N]."""
    return np.cumprod(1.0 - self.betas)

  def settings(self) -> dict[str, Any]:
    """What defines the betas, as JSON values (trained betas by their sha256)."""
    settings = dict(schedule=self.name, num_timesteps=self.num_timesteps)
    if self.name in ("linear", "scaled_linear"):
      settings.update(beta_start=self.beta_start, beta_end=self.beta_end)
    if self.name == "trained":
      settings["betas_sha256"] = hashlib.sha256(self.betas.tobytes()).hexdigest()
    return settings

  def alpha_bar(self, t: ArrayLike, convention: str) -> ArrayLike:
    """Alpha-bar seen by the transfer at (possibly fractional) timestep t.

    `paper`: A[trunc(t) + 1] (the reference's one-index shift, t=-1 -> A[0]).
    `consistent`: the training alpha-bar A[t] (exactly, at integers), log-linearly
    interpolated between integers with A[-1] := 1. Works on numpy (host, float64)
    and jax arrays (traced, e.g. inside an analytic eps_fn). (`diffusers` also
    depends on the grid: see `Discretization.alpha_bar`.)
    """
    choices.check("alpha-bar convention", convention, ("paper", "consistent"))
    xp = jnp if isinstance(t, jax.Array) else np
    table = self.alphas_cumprod
    if convention == "paper":
      return xp.asarray(table)[xp.trunc(t).astype(xp.int32) + 1]
    with_one = np.concatenate([[1.0], table])
    log_table = xp.asarray(np.log(with_one))
    u = xp.clip(xp.asarray(t) + 1.0, 0.0, float(self.num_timesteps))
    lo = xp.minimum(xp.floor(u), self.num_timesteps - 1).astype(xp.int32)
    frac = u - lo
    between = xp.exp((1.0 - frac) * log_table[lo] + frac * log_table[lo + 1])
    return xp.where(u == xp.floor(u), xp.asarray(with_one)[xp.floor(u).astype(xp.int32)], between)

  def time_of_alpha_bar(self, a: ArrayLike) -> ArrayLike:
    """The t in [-1, N-1] whose `consistent` alpha-bar is `a` (numpy: host, float64; a jax
    array: traced, in its dtype).

    Inverts the log-linear interpolation of log A between integers (A[-1] = 1), which is
    monotone; alpha-bars outside [A[N-1], 1] are clipped to the ends.
    """
    xp = jnp if isinstance(a, jax.Array) else np
    with_one = np.concatenate([[1.0], self.alphas_cumprod])
    t = np.arange(-1.0, self.num_timesteps)
    a = a if xp is jnp else np.asarray(a, np.float64)
    return xp.interp(-xp.log(a), xp.asarray(-np.log(with_one), a.dtype), xp.asarray(t, a.dtype))


def from_config(diffusion: ml_collections.ConfigDict) -> Schedule:
  """The schedule `config.diffusion` names; `trained` reads its betas from a .npy or text file."""
  if diffusion.schedule != "trained":
    if diffusion.trained_betas:
      raise ValueError(f"config.diffusion.trained_betas is set ({diffusion.trained_betas!r}): "
                       f"set config.diffusion.schedule='trained' to use it")
    return Schedule(diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start,
                    diffusion.beta_end)
  path = diffusion.trained_betas
  if not path:
    raise ValueError("schedule 'trained' needs config.diffusion.trained_betas=PATH "
                     "(a .npy file or a text file of betas)")
  betas = np.load(path) if path.endswith(".npy") else np.loadtxt(path, dtype=np.float64)
  schedule = Schedule.from_betas(betas)
  if schedule.num_timesteps != diffusion.num_timesteps:
    raise ValueError(f"{path} holds {schedule.num_timesteps} betas but "
                     f"config.diffusion.num_timesteps is {diffusion.num_timesteps}")
  return schedule


class StepPlan(NamedTuple):
  """Where each step of a rule with stage nodes c evaluates the model and moves x.

  All [S, K] timesteps (K = len(c)): stage k is evaluated at `eval_t[:, k]`;
  move k < K-1 takes the step's start point from `from_t[:, k]` to `to_t[:, k]`
  (stage k+1's point) and move K-1 is the step's end.
  """

  eval_t: np.ndarray
  from_t: np.ndarray
  to_t: np.ndarray


@dataclasses.dataclass(frozen=True)
class Discretization:
  """The grid a sampler walks over `schedule` and how its transfers read it (docs/methods.md §2-§3).

  `t` (the model's timestep at each step's start) and `t_next` (where a
  one-evaluation step moves to), float64, read-only, largest t first, are built
  and checked on construction; equality and the hash cover the defining fields,
  so a Discretization is a static jit argument. `spacing`:
  - `uniform` is the reference's skip grid: skip = N // S, t in {0, skip, ...} < N;
    it has ceil(N / skip) steps, which is S (`num_steps`) when S divides N.
  - `linspace`: round(linspace(0, N-1, S)); `leading`: (0, k, ..., (S-1) k) +
    `steps_offset` with k = N // S; `trailing`: round(N - i N / S) - 1 for
    i < S. These have exactly S steps.
  `convention` `paper` / `consistent` step from each t to the next one (the last
  to -1); `diffusers` steps from t to t - N // S and reads A[t], or for t < 0
  A[0] (1 with `set_alpha_to_one`), as diffusers' PNDMScheduler does.
  `end="sigma_min"` (`consistent`, fractional spacings): the spacing places S + 1
  times and the last step ends at t = 0 (A[0]) instead of at sigma = 0, as
  DPM-Solver's discrete-time grids do (docs/methods.md §2).
  """

  schedule: Schedule
  num_steps: int
  spacing: str = "uniform"
  convention: str = "paper"
  steps_offset: int = 0
  set_alpha_to_one: bool = False
  end: str = "zero"
  t: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  t_next: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    choices.check("spacing", self.spacing, SPACINGS)
    choices.check("alpha-bar convention", self.convention, CONVENTIONS)
    n, s = self.schedule.num_timesteps, self.num_steps
    if not 1 <= s <= n:
      raise ValueError(f"num_steps must be in [1, {n}] (the schedule's num_timesteps), got {s}")
    if self.steps_offset and self.spacing != "leading":
      raise ValueError(f"steps_offset ({self.steps_offset}) applies to spacing 'leading' only, "
                       f"got spacing {self.spacing!r}")
    if self.set_alpha_to_one and self.convention != "diffusers":
      raise ValueError(f"set_alpha_to_one applies to convention 'diffusers' only; "
                       f"{self.convention!r} defines its own final alpha-bar (docs/methods.md §3)")
    if self.convention == "diffusers" and self.spacing not in ("leading", "trailing", "linspace"):
      raise ValueError(f"convention 'diffusers' takes spacing 'leading', 'trailing' or "
                       f"'linspace' (diffusers' timestep_spacing), got {self.spacing!r}")
    if self.spacing in CONTINUOUS_SPACINGS and self.convention != "consistent":
      raise ValueError(f"spacing {self.spacing!r} has fractional timesteps, which only the "
                       f"'consistent' convention reads continuously; got {self.convention!r}")
    choices.check("grid end", self.end, GRID_ENDS)
    if self.end == "sigma_min":
      if self.convention != "consistent" or self.spacing not in CONTINUOUS_SPACINGS:
        raise ValueError(f"end 'sigma_min' needs convention 'consistent' and one of the spacings "
                         f"{', '.join(CONTINUOUS_SPACINGS)}; got {self.convention!r}, "
                         f"{self.spacing!r} (convention 'diffusers' ends at A[0] without "
                         f"set_alpha_to_one)")
      t_all = _grid(self.spacing, self.schedule, s + 1, self.steps_offset)
      t, t_next = t_all[:-1], t_all[1:]
    else:
      t = _grid(self.spacing, self.schedule, s, self.steps_offset)
      t_next = t - n // s if self.convention == "diffusers" else np.concatenate([t[1:], [-1]])
    first_read = t[0] + (self.convention == "paper")
    if first_read > n - 1:
      fix = "choose another num_steps or convention='consistent'"
      if self.spacing == "leading":
        fix = "lower steps_offset or num_steps"
      raise ValueError(f"num_steps={s} with spacing {self.spacing!r} starts at t={int(t[0])}, "
                       f"where the {self.convention!r} convention reads A[{int(first_read)}], "
                       f"past the table of {n}; {fix}")
    for name, value in (("t", t), ("t_next", t_next)):
      value = value.astype(np.float64)
      value.flags.writeable = False
      object.__setattr__(self, name, value)

  def settings(self) -> dict[str, Any]:
    """What defines the grid and what the transfers read, as JSON values (and the schedule's)."""
    settings = dict(num_steps=self.num_steps, spacing=self.spacing, convention=self.convention,
                    **self.schedule.settings())
    if self.spacing == "leading":
      settings["steps_offset"] = self.steps_offset
    if self.convention == "diffusers":
      settings["set_alpha_to_one"] = self.set_alpha_to_one
    if self.end != "zero":
      settings["end"] = self.end
    return settings

  def alpha_bar(self, t: ArrayLike) -> ArrayLike:
    """Alpha-bar at (possibly fractional) timesteps t under this grid's convention."""
    if self.convention != "diffusers":
      return self.schedule.alpha_bar(t, self.convention)
    xp = jnp if isinstance(t, jax.Array) else np
    final = 1.0 if self.set_alpha_to_one else self.schedule.alphas_cumprod[0]
    return xp.where(xp.asarray(t) >= 0, self.schedule.alpha_bar(t, "consistent"), final)

  def plan(self, c: Sequence[float], restart: bool = False, nodes: str = "t",
           num_steps: int | None = None) -> StepPlan:
    """Where each of the first `num_steps` steps (all by default) with stage nodes `c`
    (c[0] = 0) evaluates the model and moves x.

    `paper` / `consistent`: stage k at the fraction c[k] of the step in `nodes`
    (t; or, `consistent` only, sigma or log-SNR, docs/methods.md §5), every move from t.
    `diffusers` (its PRK rule, docs/methods.md §3): with k = N // S and t' the
    next step's t, stage k > 0 is evaluated at t' + floor((1 - c[k]) k), the
    first move goes to t - floor(c[1] k), later ones to the stage they reach,
    the end of a multi-stage step to t' and a one-stage step to t_next.
    `restart` (diffusers' PLMS start) makes the end move start at t' + k
    instead (which is t itself under `paper` / `consistent`).
    """
    c = np.asarray(c, np.float64)
    if c.ndim != 1 or not len(c) or c[0] != 0:
      raise ValueError(f"stage nodes must start with 0, got {tuple(c)}")
    choices.check("stage variable", nodes, STAGE_VARIABLES)
    if nodes != "t" and self.convention != "consistent":
      raise ValueError(f"stages placed in {nodes} need the continuous alpha-bar of convention "
                       f"'consistent', got {self.convention!r}")
    rows = slice(num_steps)
    t, t_next = self.t[rows, None], self.t_next[rows, None]
    if self.convention != "diffusers":
      eval_t = t + c * (t_next - t) if nodes == "t" else self._stage_times(c, nodes, t, t_next)
      to_t = np.concatenate([eval_t[:, 1:], t_next], axis=1)
      return _read_only(StepPlan(eval_t, np.broadcast_to(t, eval_t.shape), to_t))
    if len(c) == 1:
      return _read_only(StepPlan(t, t, t_next))
    t, t_next = self.t[:, None], self.t_next[:, None]
    skip = self.schedule.num_timesteps // self.num_steps
    t_grid = np.concatenate([t[1:], t_next[-1:]])
    eval_t = np.concatenate([t, t_grid + np.floor((1.0 - c[1:]) * skip)], axis=1)
    to_t = np.concatenate([t - np.floor(c[1] * skip), eval_t[:, 2:], t_grid], axis=1)
    from_t = np.repeat(t, len(c), axis=1)
    if restart:
      from_t[:, -1:] = t_grid + skip
    if from_t.max() > self.schedule.num_timesteps - 1:
      raise ValueError(f"this grid's steps would read alpha-bar at t={int(from_t.max())}, past "
                       f"the table of {self.schedule.num_timesteps}; choose another num_steps")
    return _read_only(StepPlan(eval_t[rows], from_t[rows], to_t[rows]))

  def _stage_times(self, c: np.ndarray, nodes: str, t: np.ndarray,
                   t_next: np.ndarray) -> np.ndarray:
    """[S, K] times of the stages at fractions c of steps t -> t_next ([S, 1]) in sigma or
    log-SNR (consistent)."""
    a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
    inner = (c > 0) & (c < 1)
    if nodes == "sigma":
      sigma = lambda a: np.sqrt((1.0 - a) / a)
      stage_sigma = sigma(a) + c * (sigma(a_next) - sigma(a))
      stage_a = 1.0 / (1.0 + stage_sigma**2)
    else:
      if np.any(a_next == 1.0) and inner.any():
        raise ValueError("stages placed in log-SNR cannot divide a step that ends at sigma = 0 "
                         "(infinite log-SNR): take the last step with a first-order rule "
                         "(lower_order_final)")
      with np.errstate(divide="ignore", invalid="ignore"):  # only where c is 0 or 1
        log_snr = lambda a: np.log(a) - np.log1p(-a)
        stage_log_snr = log_snr(a) + c * (log_snr(a_next) - log_snr(a))
        stage_a = 1.0 / (1.0 + np.exp(-stage_log_snr))
    stage_t = self.schedule.time_of_alpha_bar(np.nan_to_num(stage_a, nan=1.0))
    return np.where(c == 0, t, np.where(c == 1, t_next, stage_t))


def _grid(spacing: str, schedule: Schedule, s: int, offset: int) -> np.ndarray:
  """The model's timesteps of `spacing`, largest first (as float64)."""
  n = schedule.num_timesteps
  if spacing == "uniform":
    t = np.arange(0, n, n // s)
  elif spacing == "linspace":
    t = np.linspace(0, n - 1, s).round()
  elif spacing == "leading":
    t = np.arange(s) * (n // s) + offset
  elif spacing == "trailing":  # diffusers' float arange, whose length can round up to S + 1
    return np.round(np.arange(n, 0, -n / s))[:s] - 1.0
  elif spacing == "quadratic":  # DDIM's, kept fractional (its int cast repeats t from S = 30)
    t = np.linspace(np.sqrt(0.8 * n), 0, s) ** 2
    t[0] = 0.8 * n  # exactly, not sqrt(0.8 n)^2
    return t
  elif spacing == "time_uniform":
    return np.linspace(n - 1, 0, s)
  else:  # uniform in log-SNR, or in sigma^(1/rho), between the table's ends
    log_snr = np.log(schedule.alphas_cumprod / (1.0 - schedule.alphas_cumprod))
    ends = log_snr[[0, -1]]
    if spacing == "karras":
      root_sigma = np.exp(-ends / (2 * KARRAS_RHO))
      ends = -2 * KARRAS_RHO * np.log(np.linspace(*root_sigma, s))
      t = schedule.time_of_alpha_bar(1.0 / (1.0 + np.exp(-ends)))
    else:
      t = schedule.time_of_alpha_bar(1.0 / (1.0 + np.exp(-np.linspace(*ends, s))))
    t[[0, -1]] = 0, n - 1  # exact ends, whatever the inversion's rounding (S = 1: the top)
  return t[::-1].astype(np.float64)


def _read_only(plan: StepPlan) -> StepPlan:
  arrays = [np.array(a, np.float64) for a in plan]
  for a in arrays:
    a.flags.writeable = False
  return StepPlan(*arrays)
