"""Gradient parts: a step's gradient estimate from model evaluations (docs/methods.md §5).

Single-step parts are Runge-Kutta tableaux: stage i evaluates the model a
fraction c[i] of the way through the step, at the point the previous stage's
gradient moves the step's start x to, and the step moves with the b-weighted
sum of all stage gradients. Multistep parts (PLMS and its lower orders)
combine the current evaluation with a fixed-size history kept as a ring buffer;
their per-step ring weights are precomputed here so the scan body never branches.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from pndm_jax import schedules

# order -> Adams-Bashforth weights, newest evaluation first
MULTISTEP_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@dataclasses.dataclass(frozen=True)
class RungeKutta:
  """An explicit tableau whose stage i moves from x with stage i-1's gradient only.

  `c`: the stage nodes as fractions of the step (c[0] = 0); `b`: the weights of
  the stage gradients in the step. Its Butcher matrix is a[i][i-1] = c[i], which
  covers Euler, Heun (improved Euler) and classical RK4.
  """

  c: tuple[float, ...]
  b: tuple[float, ...]

  def __post_init__(self):
    if len(self.c) != len(self.b) or not self.c or self.c[0] != 0:
      raise ValueError(f"a tableau needs as many nodes c as weights b and c[0] = 0, "
                       f"got c={self.c}, b={self.b}")

  @property
  def num_stages(self) -> int:
    """Model evaluations one step makes."""
    return len(self.c)


EULER = RungeKutta(c=(0.0,), b=(1.0,))
HEUN = RungeKutta(c=(0.0, 1.0), b=(1 / 2, 1 / 2))
RK4 = RungeKutta(c=(0.0, 1 / 2, 1 / 2, 1.0), b=(1 / 6, 2 / 6, 2 / 6, 1 / 6))


@dataclasses.dataclass(frozen=True)
class LinearMultistep:
  """Adams-Bashforth over the last `order` evaluations, one evaluation a step.

  Constant-step weights are the paper's PLMS coefficients (equal steps assumed);
  `variable_step` weights integrate the eps interpolant exactly over the actual
  spacing in sigma (pseudo transfer only).
  """

  order: int
  variable_step: bool = False

  def __post_init__(self):
    if self.order not in MULTISTEP_WEIGHTS:
      raise ValueError(f"multistep order must be one of {tuple(MULTISTEP_WEIGHTS)}, "
                       f"got {self.order}")

  def ring_weights(self, discretization: schedules.Discretization,
                   ramp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-step ring slots [S] (int32) and weights [S, order] (float64) over the grid.

    Step i writes its evaluation into slot i % order; the evaluation of step i-j
    sits in slot (i-j) % order and gets the j-th weight of order k. With `ramp`
    the first steps use the orders their history allows (1, 2, ...); otherwise
    every step uses `order` (a single-step warm-up fills the history).
    """
    d = discretization
    num_steps = len(d.t)
    sigma = lambda a: np.sqrt((1.0 - a) / a)
    start, end = sigma(d.alpha_bar(d.t)), sigma(d.alpha_bar(d.t_next))  # nodes: the steps' starts
    steps = np.arange(num_steps)
    weights = np.zeros((num_steps, self.order))
    for i in steps:
      k = min(i + 1, self.order) if ramp else self.order
      if self.variable_step:
        w = variable_step_weights(start[i - np.arange(k)], start[i], end[i])
      else:
        w = MULTISTEP_WEIGHTS[k]
      for j in range(k):
        weights[i, (i - j) % self.order] = w[j]
    return (steps % self.order).astype(np.int32), weights


@dataclasses.dataclass(frozen=True)
class Ramp:
  """A multistep part's warm-up by lower-order multistep steps (1 evaluation a step)."""


@dataclasses.dataclass(frozen=True)
class HeunRamp:
  """diffusers' PLMS start: one improved-Euler (Heun) step, then lower orders from 2.

  Only the Heun step's first evaluation enters the history. Under the
  `diffusers` convention its end move restarts a nominal step before the next
  grid time, as PNDMScheduler does (docs/methods.md §5).
  """

  rule: ClassVar[RungeKutta] = HEUN


RAMP = Ramp()
HEUN_RAMP = HeunRamp()

GradientPart = RungeKutta | LinearMultistep
Warmup = RungeKutta | Ramp | HeunRamp


def variable_step_weights(nodes: np.ndarray, start: float, end: float) -> np.ndarray:
  """Weights w_j with sum_j w_j e(nodes[j]) = mean of the interpolant of e over [start, end].

  The exact integral of the Lagrange polynomial through (nodes[j], e_j): the
  Adams-Bashforth weights for arbitrary node spacing (equal spacing gives back
  MULTISTEP_WEIGHTS). Computed relative to `start` for conditioning.
  """
  nodes = np.asarray(nodes, np.float64) - start
  weights = []
  for j, node in enumerate(nodes):
    others = np.delete(nodes, j)
    basis = np.polynomial.Polynomial(np.atleast_1d(np.poly(others))[::-1]) / np.prod(node - others)
    weights.append(basis.integ()(end - start) / (end - start))
  return np.array(weights)
