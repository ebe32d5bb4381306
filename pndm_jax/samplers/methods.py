"""Sampling methods as values, the named presets, and their NFE (METHODS §5).

A deterministic method is a transfer (how x moves given a gradient estimate)
times a gradient part (how the estimate is built from model evaluations); the
paper's methods are four points of that space. Stochastic and probability-flow
samplers are values of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from pndm_jax import schedules
from pndm_jax.samplers import gradients

TRANSFERS = ("pseudo", "classical")
SINGLE_STEP = tuple(gradients.SINGLE_STEP_RULES)
# lmsK: the paper's PLMS coefficients (equal steps assumed); vlmsK: variable-step weights that
# integrate the eps interpolant exactly over [sigma, sigma'] (pseudo transfer only).
MULTISTEP = ("lms2", "lms3", "lms4", "vlms2", "vlms3", "vlms4")
GRADIENTS = SINGLE_STEP + MULTISTEP
WARMUPS = SINGLE_STEP + ("ramp",)  # "ramp": lower-order multistep, 1 eval per step
VARIANCES = ("fixedsmall", "fixedlarge")


@dataclasses.dataclass(frozen=True)
class Deterministic:
  """transfer x gradient part; multistep parts name how their history is warmed up."""

  transfer: str = "pseudo"
  gradient: str = "euler"
  warmup: Optional[str] = None

  def __post_init__(self):
    schedules.check_choice("transfer", self.transfer, TRANSFERS)
    schedules.check_choice("gradient part", self.gradient, GRADIENTS)
    if self.gradient in MULTISTEP:
      if self.warmup is None:
        raise ValueError(f"multistep gradient part {self.gradient!r} needs a warmup; "
                         f"valid choices: {', '.join(WARMUPS)}")
      schedules.check_choice("warmup", self.warmup, WARMUPS)
    elif self.warmup is not None:
      raise ValueError(f"single-step gradient part {self.gradient!r} takes no warmup, "
                       f"got {self.warmup!r}")
    if self.gradient.startswith("v") and self.transfer != "pseudo":
      raise ValueError(f"{self.gradient!r} integrates in sigma, the pseudo transfer's variable; "
                       f"use transfer 'pseudo' or gradient {self.gradient[1:]!r}")

  @property
  def order(self) -> int:
    """History length of a multistep part (0 for single-step parts)."""
    return int(self.gradient[-1]) if self.gradient in MULTISTEP else 0

  @property
  def warmup_steps(self) -> int:
    """Steps taken by the single-step warm-up rule before the multistep rule starts."""
    return 0 if self.warmup in (None, "ramp") else self.order - 1

  def num_evals(self, num_grid_steps: int) -> int:
    if self.gradient in SINGLE_STEP:
      return num_grid_steps * gradients.evals_per_step(self.gradient)
    warm = self.warmup_steps
    per_warm_step = gradients.evals_per_step(self.warmup) if warm else 0
    return warm * per_warm_step + (num_grid_steps - warm)


@dataclasses.dataclass(frozen=True)
class Ancestral:
  """DDPM / DDIM-with-eta posterior sampling.

  `fixedsmall` draws with std eta * sqrt(posterior variance) (DDIM's sigma);
  `fixedlarge` is DDPM's choice, the posterior mean with std sqrt(1 - a/a'),
  no noise on the last step. `clip_x0` clamps the predicted x0 to [-1, 1] as
  image samplers of the reference do.
  """

  eta: float = 1.0
  variance: str = "fixedsmall"
  clip_x0: bool = False

  def __post_init__(self):
    schedules.check_choice("variance", self.variance, VARIANCES)
    if self.eta < 0:
      raise ValueError(f"eta must be >= 0, got {self.eta}")

  def num_evals(self, num_grid_steps: int) -> int:
    return num_grid_steps


@dataclasses.dataclass(frozen=True)
class ProbabilityFlow:
  """The VP-SDE probability-flow ODE solved adaptively (Dopri5 + PID controller)."""

  rtol: float = 1e-5
  atol: float = 1e-5
  t_min: float = 1e-3
  max_steps: int = 100_000

  def num_evals(self, num_grid_steps: int) -> None:
    return None  # adaptive: only the solver knows


Method = Union[Deterministic, Ancestral, ProbabilityFlow]

PRESETS: dict[str, Method] = {
    "ddpm": Ancestral(eta=1.0, variance="fixedlarge"),
    "ddim": Deterministic("pseudo", "euler"),
    "s-pndm": Deterministic("pseudo", "lms2", warmup="heun"),
    "f-pndm": Deterministic("pseudo", "lms4", warmup="rk4"),
    "fon": Deterministic("classical", "lms4", warmup="rk4"),
    "pf": ProbabilityFlow(),
}


def get_method(method: Union[str, Method], eta: float = 0.0) -> Method:
  """Resolves a preset name, an ablation name or a Method value to a Method.

  Ablation names read `TRANSFER-GRADIENT[-WARMUP]`, e.g. `classical-rk4` or
  `pseudo-lms3-heun`. Names are case-insensitive, so the reference's `DDIM`,
  `S-PNDM`, `F-PNDM`, `FON` and `PF` work too. `eta` > 0 is only meaningful for
  `ddim`, which then samples stochastically.
  """
  if not isinstance(method, str):
    if eta:
      raise ValueError("pass eta inside the method value, not beside it")
    return method
  method = method.lower()
  if eta:
    if method != "ddim":
      raise ValueError(f"eta={eta} applies to method 'ddim' only, got {method!r}")
    return Ancestral(eta=eta, variance="fixedsmall")
  if method in PRESETS:
    return PRESETS[method]
  parts = method.split("-")
  if 2 <= len(parts) <= 3 and parts[0] in TRANSFERS:
    return Deterministic(*parts)
  raise ValueError(
      f"unknown method {method!r}; valid choices: {', '.join(PRESETS)}, or "
      f"TRANSFER-GRADIENT[-WARMUP] with TRANSFER in {{{', '.join(TRANSFERS)}}}, "
      f"GRADIENT in {{{', '.join(GRADIENTS)}}}, WARMUP in {{{', '.join(WARMUPS)}}} "
      f"(multistep only)")


def check_num_steps(method: Method, num_steps: int) -> None:
  """Multistep methods need their warm-up steps plus at least one more."""
  if isinstance(method, Deterministic) and 0 < method.warmup_steps >= num_steps:
    raise ValueError(
        f"{method.gradient} with a {method.warmup} warm-up needs at least "
        f"{method.warmup_steps + 1} steps ({method.warmup_steps} warm-up steps plus one), "
        f"got {num_steps}")


def nfe(method: Union[str, Method], num_steps: int, *, num_timesteps: int = 1000,
        grid: str = "uniform", index: str = "paper", eta: float = 0.0) -> Optional[int]:
  """Model evaluations `sample` makes, without running anything (None for `pf`)."""
  resolved = get_method(method, eta)
  if isinstance(resolved, ProbabilityFlow):
    return None
  check_num_steps(resolved, num_steps)
  t, _ = schedules.timesteps(num_timesteps, num_steps, grid, index)
  return resolved.num_evals(len(t))
