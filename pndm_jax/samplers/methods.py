"""Sampling methods as values, their names and their NFE (docs/methods.md §6).

A deterministic method is a transfer (how x moves given a gradient estimate)
times a gradient part (how the estimate is built from model evaluations); the
paper's methods are four points of that space. Stochastic and probability-flow
samplers are values of their own. Method values are frozen and hashable
(static jit arguments); names exist only here, in the presets and the tables
`get_method` parses `TRANSFER-GRADIENT[-WARMUP]` with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pndm_jax import choices, schedules
from pndm_jax.samplers.ancestral import FixedLarge, FixedSmall, Variance
from pndm_jax.samplers.gradients import (
  EULER,
  HEUN,
  HEUN_RAMP,
  RAMP,
  RK4,
  GradientPart,
  HeunRamp,
  LinearMultistep,
  Ramp,
  RungeKutta,
  Warmup,
)
from pndm_jax.samplers.transfer import CLASSICAL, PSEUDO, Classical, Pseudo, Transfer


@dataclasses.dataclass(frozen=True)
class Deterministic:
  """transfer x gradient part; a multistep part names how its history is warmed up.

  `warmup` is a Runge-Kutta tableau run for the first order-1 steps, RAMP
  (lower-order multistep steps) or HEUN_RAMP (one Heun step, then lower orders
  from 2: diffusers' PLMS start); single-step parts take none.
  """

  transfer: Transfer = PSEUDO
  gradient: GradientPart = EULER
  warmup: Warmup | None = None

  def __post_init__(self):
    for part, kinds, what in ((self.transfer, (Pseudo, Classical), "transfer"),
                              (self.gradient, (RungeKutta, LinearMultistep), "gradient part"),
                              (self.warmup, (RungeKutta, Ramp, HeunRamp, type(None)), "warmup")):
      if not isinstance(part, kinds):
        raise TypeError(f"{what} must be a value ({', '.join(k.__name__ for k in kinds)}), "
                        f"got {part!r}; get_method parses names")
    if isinstance(self.gradient, LinearMultistep):
      if self.warmup is None:
        raise ValueError(f"multistep gradient part {_name(self.gradient)!r} needs a warmup; "
                         f"valid choices: {', '.join(WARMUPS)}")
      if self.gradient.variable_step and not self.transfer.integrates_in_sigma:
        constant = dataclasses.replace(self.gradient, variable_step=False)
        raise ValueError(f"{_name(self.gradient)!r} integrates in sigma, the pseudo transfer's "
                         f"variable; use transfer 'pseudo' or gradient {_name(constant)!r}")
    elif self.warmup is not None:
      raise ValueError(f"single-step gradient part {_name(self.gradient)!r} takes no warmup, "
                       f"got {_name(self.warmup)!r}")

  @property
  def warmup_rule(self) -> RungeKutta | None:
    """The single-step rule of the warm-up steps (None: they are multistep steps)."""
    if isinstance(self.warmup, HeunRamp):
      return self.warmup.rule
    return self.warmup if isinstance(self.warmup, RungeKutta) else None

  @property
  def warmup_steps(self) -> int:
    """Steps taken by the single-step warm-up rule before the multistep rule starts."""
    if isinstance(self.warmup, HeunRamp):
      return 1
    return self.gradient.order - 1 if isinstance(self.warmup, RungeKutta) else 0

  def check_steps(self, discretization: schedules.Discretization) -> None:
    """Multistep methods need their warm-up steps plus at least one more."""
    warm = self.warmup_steps
    if 0 < warm >= discretization.num_steps:
      raise ValueError(
          f"{_name(self.gradient)} with a {_name(self.warmup)} warm-up needs at least "
          f"{warm + 1} steps ({warm} warm-up steps plus one), got {discretization.num_steps}")

  def num_evals(self, discretization: schedules.Discretization) -> int:
    """Model evaluations a run over `discretization` makes."""
    self.check_steps(discretization)
    num_steps = len(discretization.t)
    if isinstance(self.gradient, RungeKutta):
      return num_steps * self.gradient.num_stages
    warm = self.warmup_steps
    return (warm * self.warmup_rule.num_stages if warm else 0) + num_steps - warm


@dataclasses.dataclass(frozen=True)
class Ancestral:
  """DDPM / DDIM-with-eta posterior sampling with the noise `variance` says.

  `clip_x0` clamps the predicted x0 to [-1, 1] as image samplers of the
  reference do.
  """

  variance: Variance = FixedSmall()
  clip_x0: bool = False

  def num_evals(self, discretization: schedules.Discretization) -> int:
    """Model evaluations a run over `discretization` makes: one a step."""
    return len(discretization.t)


@dataclasses.dataclass(frozen=True)
class ProbabilityFlow:
  """The VP-SDE probability-flow ODE solved adaptively (Dopri5 + PID controller)."""

  rtol: float = 1e-5
  atol: float = 1e-5
  t_min: float = 1e-3
  max_steps: int = 100_000

  def num_evals(self, discretization: schedules.Discretization) -> None:
    """None: the solver adapts its steps (and ignores the grid); only a run knows."""
    return None


Method = Deterministic | Ancestral | ProbabilityFlow

PRESETS: dict[str, Method] = {
    "ddpm": Ancestral(FixedLarge()),
    "ddim": Deterministic(PSEUDO, EULER),
    "s-pndm": Deterministic(PSEUDO, LinearMultistep(2), HEUN),
    "f-pndm": Deterministic(PSEUDO, LinearMultistep(4), RK4),
    "fon": Deterministic(CLASSICAL, LinearMultistep(4), RK4),
    "plms": Deterministic(PSEUDO, LinearMultistep(4), HEUN_RAMP),  # diffusers' skip_prk_steps
    "pf": ProbabilityFlow(),
}
# diffusers' name for F-PNDM (PNDMScheduler with its PRK warm-up)
ALIASES: dict[str, str] = {"pndm": "f-pndm"}

TRANSFERS: dict[str, Transfer] = {"pseudo": PSEUDO, "classical": CLASSICAL}
_SINGLE_STEP: dict[str, RungeKutta] = {"euler": EULER, "heun": HEUN, "rk4": RK4}
# lmsK: the paper's PLMS coefficients (equal steps assumed); vlmsK: variable-step weights that
# integrate the eps interpolant exactly over [sigma, sigma'] (pseudo transfer only).
GRADIENTS: dict[str, GradientPart] = {
    **_SINGLE_STEP,
    **{f"lms{k}": LinearMultistep(k) for k in (2, 3, 4)},
    **{f"vlms{k}": LinearMultistep(k, variable_step=True) for k in (2, 3, 4)},
}
# ramp: 1 eval per step; heunramp: one Heun step, then ramp from order 2
WARMUPS: dict[str, Warmup] = {**_SINGLE_STEP, "ramp": RAMP, "heunramp": HEUN_RAMP}


def _name(part: Any) -> str:
  """The name a method part has in method names (its repr if it has none), for messages."""
  for table in (TRANSFERS, GRADIENTS, WARMUPS):
    for name, value in table.items():
      if value == part:
        return name
  return repr(part)


def canonical_name(name: str) -> str:
  """The lower-case name a run records: aliases (diffusers' `pndm`) become the preset's."""
  return ALIASES.get(name.lower(), name.lower())


def get_method(name: str, eta: float = 0.0) -> Method:
  """The method a preset or ablation name stands for.

  Ablation names read `TRANSFER-GRADIENT[-WARMUP]`, e.g. `classical-rk4` or
  `pseudo-lms3-heun`. Names are case-insensitive, so the reference's `DDIM`,
  `S-PNDM`, `F-PNDM`, `FON` and `PF` and diffusers' `PNDM` and `PLMS` work too.
  `eta` > 0 is only meaningful for `ddim`, which then samples stochastically.
  """
  name = canonical_name(name)
  if eta:
    if name != "ddim":
      raise ValueError(f"eta={eta} applies to method 'ddim' only, got {name!r}")
    return Ancestral(FixedSmall(eta))
  if name in PRESETS:
    return PRESETS[name]
  parts = name.split("-")
  if 2 <= len(parts) <= 3 and parts[0] in TRANSFERS:
    gradient = GRADIENTS[choices.check("gradient part", parts[1], GRADIENTS)]
    warmup = (WARMUPS[choices.check("warmup", parts[2], WARMUPS)]
              if len(parts) == 3 else None)
    return Deterministic(TRANSFERS[parts[0]], gradient, warmup)
  raise ValueError(
      f"unknown method {name!r}; valid choices: {', '.join([*PRESETS, *ALIASES])}, or "
      f"TRANSFER-GRADIENT[-WARMUP] with TRANSFER in {{{', '.join(TRANSFERS)}}}, "
      f"GRADIENT in {{{', '.join(GRADIENTS)}}}, WARMUP in {{{', '.join(WARMUPS)}}} "
      f"(multistep only)")
