"""Transfers as values that compute their per-step affine coefficients (docs/methods.md §4).

Every deterministic step has the same shape. A model evaluation e at some
stage becomes the transfer's gradient quantity g (x the state at the start of
the step), and the state moves to the point a fraction c of the way through the
step (an RK stage node, or 1: the step's end) as

    x_c = x + R_c x + S_c g.

For the pseudo transfer (DDIM's phi) g = e and (R_c, S_c) are phi's
coefficients from t to that point, in the reference's cancellation-free
difference form. For the classical transfer g = P x + Q e is the per-unit
increment phi(x, e, t -> t-1) - x and the move is linear in t: R_c = 0,
S_c = c (t - t_next). Samplers only ever see these float64 arrays (cast to the
data's dtype) and `gradient`, so one scan body serves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
                   nodes: Sequence[float]) -> dict[str, np.ndarray]:
    """R, S [S, len(nodes)]: the moves to each fraction c of a step in `nodes`."""
    d = discretization
    a = d.alpha_bar(d.t)
    moves = [pseudo_coefficients(a, d.alpha_bar(d.times(c))) for c in nodes]
    return dict(R=np.stack([r for r, _ in moves], 1), S=np.stack([s for _, s in moves], 1))

  def gradient(self, c: dict[str, jax.Array], x: jax.Array, e: jax.Array) -> jax.Array:
    """g = e."""
    return e


@dataclasses.dataclass(frozen=True)
class Classical:
  """A linear step in t of the per-unit increment phi(x, e, t -> t-1) - x (FON's transfer)."""

  integrates_in_sigma: ClassVar[bool] = False

  def coefficients(self, discretization: schedules.Discretization,
                   nodes: Sequence[float]) -> dict[str, np.ndarray]:
    """P, Q [S] and R, S [S, len(nodes)]: the moves to each fraction c of a step in `nodes`."""
    d = discretization
    p, q = pseudo_coefficients(d.alpha_bar(d.t), d.alpha_bar(d.t - 1))
    h = d.t - d.t_next
    return dict(P=p, Q=q, R=np.zeros((len(h), len(nodes))), S=np.outer(h, nodes))

  def gradient(self, c: dict[str, jax.Array], x: jax.Array, e: jax.Array) -> jax.Array:
    """g = P x + Q e = phi(x, e, t -> t-1) - x."""
    return c["P"] * x + c["Q"] * e


PSEUDO = Pseudo()
CLASSICAL = Classical()

Transfer = Pseudo | Classical
