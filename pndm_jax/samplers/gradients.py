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


def ring_weights(order: int, num_steps: int, ramp: bool) -> tuple[np.ndarray, np.ndarray]:
  """Per-step ring slots and weights for a multistep part of `order`.

  Step i writes its evaluation into slot i % order; the evaluation of step i-j
  sits in slot (i-j) % order and gets weight MULTISTEP_WEIGHTS[k][j]. With
  `ramp` the first steps use the orders their history allows (1, 2, ...);
  otherwise every step uses `order` (a single-step warm-up fills the history).
  Returns slots [S] (int32) and weights [S, order] (float64).
  """
  steps = np.arange(num_steps)
  weights = np.zeros((num_steps, order))
  for i in steps:
    k = min(i + 1, order) if ramp else order
    for j, w in enumerate(MULTISTEP_WEIGHTS[k]):
      weights[i, (i - j) % order] = w
  return (steps % order).astype(np.int32), weights
