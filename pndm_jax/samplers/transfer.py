"""Transfers as values that compute their per-step affine coefficients (docs/methods.md §4).

Every deterministic step has the same shape. A model evaluation e at some
stage becomes the transfer's gradient quantity g (x the state at the start of
the step), and move k of the step (to RK stage k+1, or the last: to the step's
end) takes x to

    x_k = x + R_k x + S_k g.

Where each move starts and ends is the discretization's `StepPlan`. For the
pseudo transfer g = e and (R_k, S_k) are phi's coefficients between the
move's two alpha-bars, in the reference's cancellation-free difference form.
For the classical transfer g = P x + Q e is the per-unit increment
phi(x, e, t -> t-1) - x at the step's start and the move is linear in t:
R_k = 0, S_k = (its start - its end). Samplers only ever see these float64
arrays (cast to the data's dtype) and `gradient`, so one scan body serves both.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
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

  integrates_in_sigma: ClassVar[bool] = True

  def coefficients(self, discretization: schedules.Discretization,
                   plan: schedules.StepPlan) -> dict[str, np.ndarray]:
    """R, S [S, K]: the plan's moves."""
    alpha_bar = discretization.alpha_bar
    r, s = pseudo_coefficients(alpha_bar(plan.from_t), alpha_bar(plan.to_t))
    return dict(R=r, S=s)

  def gradient(self, c: dict[str, jax.Array], x: jax.Array, e: jax.Array) -> jax.Array:
    """g = e."""
    return e


@dataclasses.dataclass(frozen=True)
class Classical:
  """A linear step in t of the per-unit increment phi(x, e, t -> t-1) - x (FON's transfer)."""

  integrates_in_sigma: ClassVar[bool] = False

  def coefficients(self, discretization: schedules.Discretization,
                   plan: schedules.StepPlan) -> dict[str, np.ndarray]:
    """P, Q [S] at each step's start and R, S [S, K]: the plan's moves."""
    d = discretization
    p, q = pseudo_coefficients(d.alpha_bar(d.t), d.alpha_bar(d.t - 1))
    return dict(P=p, Q=q, R=np.zeros(plan.from_t.shape), S=plan.from_t - plan.to_t)

  def gradient(self, c: dict[str, jax.Array], x: jax.Array, e: jax.Array) -> jax.Array:
    """g = P x + Q e = phi(x, e, t -> t-1) - x."""
    return c["P"] * x + c["Q"] * e


PSEUDO = Pseudo()
CLASSICAL = Classical()

Transfer = Pseudo | Classical
