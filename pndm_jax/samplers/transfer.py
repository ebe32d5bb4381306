"""Transfers as values that compute their per-step affine coefficients (docs/methods.md §4).

Every deterministic step has the same shape. A model evaluation e at some
stage becomes the transfer's gradient quantity g, and move k of the step (to
RK stage k+1, or the last: to the step's end) takes the step's start x to

    x_k = x + R_k x + S_k g.

Where each move starts and ends is the discretization's `StepPlan`. For the
pseudo transfer g = e and (R_k, S_k) are phi's coefficients between the
move's two alpha-bars, in the reference's cancellation-free difference form.
For the classical transfer g = P x + Q e is the per-unit increment
phi(x, e, t -> t-1) - x at the step's start and the move is linear in t:
R_k = 0, S_k = (its start - its end). The data transfer (DPM-Solver++,
UniPC) has g = D, the data prediction (x_e - sigma_e e) / alpha_e at the
evaluated point x_e, and moves exactly for a constant D:
x_k = (sigma_k / sigma) x + (alpha_k - alpha sigma_k / sigma) g.
Each transfer gives g as float64 terms too, g = gx x + gxe x_e + ge e, so the
samplers see only tables (`evaluations`) and one scan body serves all.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pndm_jax import schedules


def pseudo_coefficients(a: np.ndarray, a_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(R, S) with phi(x, e, a -> a_to) = x + R x + S e, in the difference form."""
  diff = a_to - a
  r = diff / (np.sqrt(a) * (np.sqrt(a) + np.sqrt(a_to)))
  s = -diff / (np.sqrt(a) * (np.sqrt((1.0 - a_to) * a) + np.sqrt((1.0 - a) * a_to)))
  return r, s


@dataclasses.dataclass(frozen=True)
class Pseudo:
  """DDIM's phi: exact in sigma for a constant eps, so multistep parts may integrate in sigma."""

  def coefficients(self, discretization: schedules.Discretization,
                   plan: schedules.StepPlan) -> dict[str, np.ndarray]:
    """R, S [S, K]: the plan's moves."""
    alpha_bar = discretization.alpha_bar
    r, s = pseudo_coefficients(alpha_bar(plan.from_t), alpha_bar(plan.to_t))
    return dict(R=r, S=s)

  def gradient_terms(self, c: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """g = e."""
    return 0.0, 0.0, 1.0


@dataclasses.dataclass(frozen=True)
class Classical:
  """A linear step in t of the per-unit increment phi(x, e, t -> t-1) - x (FON's transfer)."""

  def coefficients(self, discretization: schedules.Discretization,
                   plan: schedules.StepPlan) -> dict[str, np.ndarray]:
    """P, Q [S] at each step's start and R, S [S, K]: the plan's moves."""
    d, t = discretization, plan.from_t[:, 0]  # each step's start
    p, q = pseudo_coefficients(d.alpha_bar(t), d.alpha_bar(t - 1))
    return dict(P=p, Q=q, R=np.zeros(plan.from_t.shape), S=plan.from_t - plan.to_t)

  def gradient_terms(self, c: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """g = P x + Q e = phi(x, e, t -> t-1) - x, at the step's start x."""
    return c["P"][:, None], 0.0, c["Q"][:, None]


@dataclasses.dataclass(frozen=True)
class Data:
  """Moves exact for a constant data prediction D (DPM-Solver++'s first-order step, = DDIM)."""

  def coefficients(self, discretization: schedules.Discretization,
                   plan: schedules.StepPlan) -> dict[str, np.ndarray]:
    """P, Q [S, K] (D = P x_e + Q e at each stage) and R, S [S, K]: the plan's moves."""
    alpha_bar = discretization.alpha_bar
    a, a_to, a_eval = alpha_bar(plan.from_t), alpha_bar(plan.to_t), alpha_bar(plan.eval_t)
    sigma, sigma_to = np.sqrt(1.0 - a), np.sqrt(1.0 - a_to)
    return dict(P=1.0 / np.sqrt(a_eval), Q=-np.sqrt((1.0 - a_eval) / a_eval),
                R=(sigma_to - sigma) / sigma, S=np.sqrt(a_to) - np.sqrt(a) * sigma_to / sigma)

  def gradient_terms(self, c: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """g = D = P x_e + Q e, the data prediction at the evaluated point."""
    return 0.0, c["P"], c["Q"]


PSEUDO = Pseudo()
CLASSICAL = Classical()
DATA = Data()

Transfer = Pseudo | Classical | Data
