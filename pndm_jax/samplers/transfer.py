"""Transfers as per-step affine coefficients, computed on the host in float64.

Every deterministic step here has the same shape. A model evaluation e at some
stage becomes a gradient quantity g = P x + Q e (x the state at the start of the
step), and the state moves to a target (the RK midpoint m or t_next) as

    x_target = x + R x + S g,

with R, S depending on the target. For the pseudo transfer (DDIM's phi, METHODS
§4) g = e and (R, S) are phi's coefficients from t to the target, in the
reference's cancellation-free difference form. For the classical transfer g is
the per-unit increment phi(x, e, t -> t-1) - x and the move is linear,
R = 0, S = (t - target). Samplers only ever see these arrays, so one scan body
serves both transfers.
"""

from __future__ import annotations

import numpy as np

from pndm_jax import schedules


def pseudo_coefficients(a: np.ndarray, a_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(R, S) with phi(x, e, a -> a_to) = x + R x + S e, in the difference form."""
  diff = a_to - a
  r = diff / (np.sqrt(a) * (np.sqrt(a) + np.sqrt(a_to)))
  s = -diff / (np.sqrt(a) * (np.sqrt((1.0 - a_to) * a) + np.sqrt((1.0 - a) * a_to)))
  return r, s


def step_coefficients(schedule: schedules.Schedule, transfer: str, t: np.ndarray,
                      t_next: np.ndarray, index: str) -> dict[str, np.ndarray]:
  """Per-step float64 arrays P, Q (classical only), R_mid, S_mid, R_next, S_next."""
  alpha = lambda u: schedule.alpha_bar(u, index)
  a = alpha(t)
  mid = (t + t_next) / 2
  if transfer == "pseudo":
    r_mid, s_mid = pseudo_coefficients(a, alpha(mid))
    r_next, s_next = pseudo_coefficients(a, alpha(t_next))
    return dict(R_mid=r_mid, S_mid=s_mid, R_next=r_next, S_next=s_next)
  p, q = pseudo_coefficients(a, alpha(t - 1))
  h = t - t_next
  zero = np.zeros_like(h)
  return dict(P=p, Q=q, R_mid=zero, S_mid=h / 2, R_next=zero, S_next=h)
