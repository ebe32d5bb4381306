"""Gradient parts: how a step's gradient estimate is built from model evaluations.

Single-step parts are explicit stage rules: each stage moves from the step's
start x toward a target using the previous stage's gradient, then evaluates the
model there. Multistep parts (PLMS and its lower orders) combine the current
evaluation with a fixed-size history kept as a ring buffer; their per-step ring
weights are precomputed here so the scan body never branches.
"""

from __future__ import annotations

import numpy as np

# name -> (stage targets after the first evaluation, weights of all evaluations)
SINGLE_STEP_RULES: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "euler": ((), (1.0,)),
    "heun": (("next",), (1 / 2, 1 / 2)),
    "rk4": (("mid", "mid", "next"), (1 / 6, 2 / 6, 2 / 6, 1 / 6)),
}

# order -> Adams-Bashforth weights, newest evaluation first
MULTISTEP_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def evals_per_step(rule: str) -> int:
  """Model evaluations one step of single-step rule `rule` makes."""
  return len(SINGLE_STEP_RULES[rule][0]) + 1


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


def ring_weights(order: int, num_steps: int, ramp: bool,
                 nodes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-step ring slots and weights for a multistep part of `order`.

  Step i writes its evaluation into slot i % order; the evaluation of step i-j
  sits in slot (i-j) % order and gets weight MULTISTEP_WEIGHTS[k][j]. With
  `ramp` the first steps use the orders their history allows (1, 2, ...);
  otherwise every step uses `order` (a single-step warm-up fills the history).
  With `nodes` (the integration variable at each step's start, then at the
  end: [S + 1]) the weights are the variable-step ones over those nodes.
  Returns slots [S] (int32) and weights [S, order] (float64).
  """
  steps = np.arange(num_steps)
  weights = np.zeros((num_steps, order))
  for i in steps:
    k = min(i + 1, order) if ramp else order
    if nodes is None:
      w = MULTISTEP_WEIGHTS[k]
    else:
      w = variable_step_weights(nodes[i - np.arange(k)], nodes[i], nodes[i + 1])
    for j in range(k):
      weights[i, (i - j) % order] = w[j]
  return (steps % order).astype(np.int32), weights
