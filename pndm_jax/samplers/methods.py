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
  LOG_SNR_MIDPOINT,
  MULTISTEP_RULES,
  RAMP,
  RK4,
  SIGMA_RK4,
  GradientPart,
  HeunRamp,
  LinearMultistep,
  Ramp,
  RungeKutta,
  Warmup,
)
from pndm_jax.samplers.thresholding import Thresholding
from pndm_jax.samplers.transfer import CLASSICAL, DATA, PSEUDO, Classical, Data, Pseudo, Transfer


@dataclasses.dataclass(frozen=True)
class Deterministic:
  """transfer x gradient part; a multistep part names how its history is warmed up.

  `warmup` is a Runge-Kutta tableau run for the first order-1 steps, RAMP
  (lower-order multistep steps) or HEUN_RAMP (one Heun step, then lower orders
  from 2: diffusers' PLMS start); single-step parts take none. Options
  (docs/methods.md §6): `lower_order_final` lowers the last steps' order (a
  single-step rule's last step is Euler: EDM's rule; multistep: as diffusers
  does), `denoise_to_zero` spends one more evaluation to jump from a grid that
  ends at A[0] to the data prediction there, and `thresholding` clips every
  evaluation's data prediction.
  """

  transfer: Transfer = PSEUDO
  gradient: GradientPart = EULER
  warmup: Warmup | None = None
  lower_order_final: bool = False
  denoise_to_zero: bool = False
  thresholding: Thresholding | None = None

  def __post_init__(self):
    for part, kinds, what in ((self.transfer, (Pseudo, Classical, Data), "transfer"),
                              (self.gradient, (RungeKutta, LinearMultistep), "gradient part"),
                              (self.warmup, (RungeKutta, Ramp, HeunRamp, type(None)), "warmup"),
                              (self.thresholding, (Thresholding, type(None)), "thresholding")):
      if not isinstance(part, kinds):
        raise TypeError(f"{what} must be a value ({', '.join(k.__name__ for k in kinds)}), "
                        f"got {part!r}; get_method parses names")
    if isinstance(self.gradient, LinearMultistep):
      if self.warmup is None:
        raise ValueError(f"multistep gradient part {_name(self.gradient)!r} needs a warmup; "
                         f"valid choices: {', '.join(WARMUPS)}")
      kind = self.gradient.transfer_kind
      if kind is not None and not isinstance(self.transfer, kind):
        fits = [name for name, value in TRANSFERS.items() if isinstance(value, kind)]
        raise ValueError(f"multistep rule {self.gradient.rule!r} ({_name(self.gradient)}) is "
                         f"written for the {fits[0]!r} transfer, got {_name(self.transfer)!r}")
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

  @property
  def final_euler_steps(self) -> int:
    """Last steps a single-step rule takes with its first stage only (lower_order_final)."""
    return int(self.lower_order_final and isinstance(self.gradient, RungeKutta))

  def check_steps(self, discretization: schedules.Discretization) -> None:
    """Multistep methods need their warm-up steps plus at least one more; the options need a
    grid they apply to."""
    warm = self.warmup_steps
    if 0 < warm >= discretization.num_steps:
      raise ValueError(
          f"{_name(self.gradient)} with a {_name(self.warmup)} warm-up needs at least "
          f"{warm + 1} steps ({warm} warm-up steps plus one), got {discretization.num_steps}")
    if self.denoise_to_zero and final_alpha_bar(discretization) == 1.0:
      raise ValueError("denoise_to_zero: this grid already ends at alpha-bar 1 (sigma = 0); it "
                       "applies where the last step ends at A[0] (convention 'paper', "
                       "'diffusers' without set_alpha_to_one, or end 'sigma_min')")

  def num_evals(self, discretization: schedules.Discretization) -> int:
    """Model evaluations a run over `discretization` makes."""
    self.check_steps(discretization)
    num_steps = len(discretization.t)
    if isinstance(self.gradient, RungeKutta):
      final = self.final_euler_steps
      evals = (num_steps - final) * self.gradient.num_stages + final
    else:
      warm = self.warmup_steps
      evals = (warm * self.warmup_rule.num_stages if warm else 0) + num_steps - warm
    return evals + self.denoise_to_zero


def method_options(method: Method) -> dict[str, Any]:
  """The deterministic options `method` has on, as JSON values (nothing when all are off)."""
  if not isinstance(method, Deterministic):
    return {}
  options = dict(lower_order_final=method.lower_order_final,
                 denoise_to_zero=method.denoise_to_zero,
                 thresholding=dataclasses.asdict(method.thresholding) if method.thresholding
                 else None)
  return {k: v for k, v in options.items() if v}


def final_alpha_bar(discretization: schedules.Discretization) -> float:
  """The alpha-bar the grid's last step ends at (1: sigma = 0; A[0] under `paper`)."""
  return float(discretization.alpha_bar(discretization.t_next[-1:])[0])


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



def _multistep(transfer: Transfer, order: int, rule: str) -> Deterministic:
  """A ramped multistep method with lower final orders, as the reference implementations run."""
  return Deterministic(transfer, LinearMultistep(order, rule), RAMP, lower_order_final=True)


PRESETS: dict[str, Method] = {
    "ddpm": Ancestral(FixedLarge()),
    "ddim": Deterministic(PSEUDO, EULER),
    "s-pndm": Deterministic(PSEUDO, LinearMultistep(2), HEUN),
    "f-pndm": Deterministic(PSEUDO, LinearMultistep(4), RK4),
    "fon": Deterministic(CLASSICAL, LinearMultistep(4), RK4),
    "plms": Deterministic(PSEUDO, LinearMultistep(4), HEUN_RAMP),  # diffusers' skip_prk_steps
    # variable-step pseudo linear multistep (docs/methods.md §5)
    "pndm-v": Deterministic(PSEUDO, LinearMultistep(4, "sigma"), SIGMA_RK4),
    "pndm-v-ramp": Deterministic(PSEUDO, LinearMultistep(4, "sigma"), RAMP),
    # the post-2022 fast samplers (docs/methods.md §6)
    "ipndm": Deterministic(PSEUDO, LinearMultistep(4), RAMP),
    **{f"deis{k}": _multistep(PSEUDO, k, "t") for k in (1, 2, 3)},
    "dpm++2m": _multistep(DATA, 2, "dpm_solver"),
    "dpm++3m": _multistep(DATA, 3, "dpm_solver"),
    "dpm++2s": Deterministic(DATA, LOG_SNR_MIDPOINT, lower_order_final=True),
    **{f"unipc{k}": _multistep(DATA, k, "unipc_bh2") for k in (2, 3)},
    **{f"unipc{k}-bh1": _multistep(DATA, k, "unipc_bh1") for k in (2, 3)},
    "edm-heun": Deterministic(PSEUDO, HEUN, lower_order_final=True),
    "pf": ProbabilityFlow(),
}
# diffusers' name for F-PNDM (PNDMScheduler with its PRK warm-up)
ALIASES: dict[str, str] = {"pndm": "f-pndm"}

TRANSFERS: dict[str, Transfer] = {"pseudo": PSEUDO, "classical": CLASSICAL, "data": DATA}
_SINGLE_STEP: dict[str, RungeKutta] = {"euler": EULER, "heun": HEUN, "rk4": RK4,
                                       "srk4": SIGMA_RK4, "lmid": LOG_SNR_MIDPOINT}
# GRADIENT names: lmsK the paper's PLMS coefficients (equal steps assumed); vlmsK, logrhoK, tabK
# integrate the eps interpolant in sigma, log sigma, t (pseudo transfer); dpmK, unipcK[bh1]
# DPM-Solver++ and UniPC, llmsK the data interpolant in log-SNR integrated exactly (data transfer).
_RULE_NAMES = {"lms": "plms", "vlms": "sigma", "logrho": "log_sigma", "tab": "t",
               "dpm": "dpm_solver", "llms": "log_snr", "unipc": "unipc_bh2"}
GRADIENTS: dict[str, GradientPart] = {
    **_SINGLE_STEP,
    **{f"{prefix}{k}": LinearMultistep(k, rule) for prefix, rule in _RULE_NAMES.items()
       for k in range(1, 5) if k <= MULTISTEP_RULES[rule][1] and (k > 1 or prefix != "lms")},
    **{f"unipc{k}bh1": LinearMultistep(k, "unipc_bh1") for k in (1, 2, 3)},
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


def get_method(name: str, eta: float = 0.0, *, lower_order_final: bool | None = None,
               denoise_to_zero: bool = False,
               thresholding: Thresholding | None = None) -> Method:
  """The method a preset or ablation name stands for, with the deterministic options.

  Ablation names read `TRANSFER-GRADIENT[-WARMUP]`, e.g. `classical-rk4` or
  `pseudo-lms3-heun`. Names are case-insensitive, so the reference's `DDIM`,
  `S-PNDM`, `F-PNDM`, `FON` and `PF` and diffusers' `PNDM` and `PLMS` work too.
  `eta` > 0 is only meaningful for `ddim`, which then samples stochastically.
  `lower_order_final` None keeps the preset's own (on for the post-2022
  samplers, off otherwise).
  """
  name = canonical_name(name)
  if eta:
    if name != "ddim":
      raise ValueError(f"eta={eta} applies to method 'ddim' only, got {name!r}")
    method = Ancestral(FixedSmall(eta))
  elif name in PRESETS:
    method = PRESETS[name]
  else:
    method = _parse(name)
  options = dict(denoise_to_zero=denoise_to_zero, thresholding=thresholding)
  if lower_order_final is not None:
    options["lower_order_final"] = lower_order_final
  if isinstance(method, Deterministic):
    return dataclasses.replace(method, **options)
  if lower_order_final or denoise_to_zero or thresholding:
    raise ValueError(f"lower_order_final, denoise_to_zero and thresholding apply to "
                     f"deterministic methods, not {name!r}")
  return method


def _parse(name: str) -> Deterministic:
  """The Deterministic value of an ablation name."""
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
