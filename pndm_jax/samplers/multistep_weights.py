"""Per-step weights of linear multistep rules over their history (docs/methods.md §5).

Host-side float64 numpy. Every function returns, for one step, the weights w_j
(newest evaluation first) of the combination G = sum_j w_j g_j that the step's
transfer move x' = x + R x + S G uses; they sum to one, so a constant history is
moved exactly. The pseudo-transfer rules (eps history) integrate a Lagrange
interpolant of eps over [sigma, sigma'] in the variable they interpolate in; the
data-transfer rules (DPM-Solver++, UniPC; data-prediction history) are written
in the half log-SNR lambda = log(alpha / sigma), as their papers do.
"""

from __future__ import annotations

import math

import numpy as np

from pndm_jax import schedules

# order -> Adams-Bashforth weights, newest evaluation first (equal steps)
ADAMS_BASHFORTH: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(6)


def lagrange_basis(nodes: np.ndarray, x: np.ndarray) -> np.ndarray:
  """[len(x), k]: the Lagrange basis polynomials through `nodes` (k of them) at the points x."""
  nodes, x = np.asarray(nodes, np.float64), np.asarray(x, np.float64)[:, None]
  basis = np.ones((x.shape[0], len(nodes)))
  for j, node in enumerate(nodes):
    for m, other in enumerate(nodes):
      if m != j:
        basis[:, j] *= (x[:, 0] - other) / (node - other)
  return basis


def sigma_weights(nodes: np.ndarray, start: float, end: float) -> np.ndarray:
  """Weights with sum_j w_j e(nodes[j]) = mean over [start, end] of the interpolant of e.

  The exact integral of the Lagrange polynomial through (nodes[j], e_j): the
  Adams-Bashforth weights for arbitrary node spacing (equal spacing gives back
  ADAMS_BASHFORTH). Computed relative to `start` for conditioning.
  """
  nodes = np.asarray(nodes, np.float64) - start
  weights = []
  for j, node in enumerate(nodes):
    others = np.delete(nodes, j)
    basis = np.polynomial.Polynomial(np.atleast_1d(np.poly(others))[::-1]) / np.prod(node - others)
    weights.append(basis.integ()(end - start) / (end - start))
  return np.array(weights)


def log_sigma_weights(nodes: np.ndarray, start: float, end: float) -> np.ndarray:
  """Weights of the interpolant of e in u = log sigma, integrated over sigma in [start, end].

  diffusers' DEISMultistepScheduler ('logrho'). With u measured from log(start),
  sigma = start e^u and the integral of p(u) e^u is e^u sum_m (-1)^m p^(m)(u),
  exact for any degree; an end at sigma = 0 is the limit u -> -inf.
  """
  u = np.log(np.asarray(nodes, np.float64)) - np.log(start)
  ratio = end / start  # e^H, H = log(end / start)
  weights = []
  for j, node in enumerate(u):
    others = np.delete(u, j)
    p = np.polynomial.Polynomial(np.atleast_1d(np.poly(others))[::-1]) / np.prod(node - others)
    antiderivative_factor = lambda v, p=p: sum((-1) ** m * p.deriv(m)(v)
                                               for m in range(len(u)))
    at_end = ratio * antiderivative_factor(np.log(ratio)) if ratio > 0 else 0.0
    weights.append((at_end - antiderivative_factor(0.0)) / (ratio - 1.0))
  return np.array(weights)


def time_weights(schedule: schedules.Schedule, nodes: np.ndarray, start: float,
                 end: float) -> np.ndarray:
  """Weights of the interpolant of e in t (DEIS's tAB), integrated over sigma(t) from the step's
  start time to its end time, under the `consistent` alpha-bar.

  sigma is smooth in t between integer timesteps, so the integral is a sum of
  6-point Gauss-Legendre rules in sigma over those pieces, with t(sigma) the
  exact inverse of the log-linear alpha-bar.
  """
  sigma_of = lambda t: np.sqrt(1.0 / schedule.alpha_bar(np.asarray(t, np.float64), "consistent")
                               - 1.0)
  inner = np.arange(np.floor(start), end, -1.0)
  inner = inner[(inner < start) & (inner > end)]
  breaks = sigma_of(np.concatenate([[start], inner, [end]]))
  lo, hi = breaks[:-1, None], breaks[1:, None]
  sigma = (lo + hi) / 2 + (hi - lo) / 2 * _GAUSS_NODES
  t = schedule.time_of_alpha_bar(1.0 / (1.0 + sigma.reshape(-1) ** 2))
  integrand = lagrange_basis(nodes, t).reshape(*sigma.shape, len(nodes))
  integral = np.einsum("pq,pqj->j", (hi - lo) / 2 * _GAUSS_WEIGHTS, integrand)
  return integral / (breaks[-1] - breaks[0])


def dpm_solver_weights(log_snr: np.ndarray, end: float) -> np.ndarray:
  """DPM-Solver++ multistep (2M 'midpoint', 3M) weights over data predictions at half
  log-SNRs `log_snr` (newest first), for a step to `end`; as the reference code computes them."""
  k = len(log_snr)
  h = end - log_snr[0]
  if k == 1:
    return np.ones(1)
  r0 = (log_snr[0] - log_snr[1]) / h
  if k == 2:
    return np.array([1 + 1 / (2 * r0), -1 / (2 * r0)])
  r1 = (log_snr[1] - log_snr[2]) / h
  scale = -np.expm1(-h)  # the move's S / alpha'
  c1 = (np.expm1(-h) / h + 1) / scale
  c2 = -((np.expm1(-h) + h) / h**2 - 0.5) / scale
  d10, d11 = np.array([1, -1, 0]) / r0, np.array([0, 1, -1]) / r1
  d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
  d2 = (d10 - d11) / (r0 + r1)
  return np.array([1.0, 0, 0]) + c1 * d1 + c2 * d2


def _unipc_coefficients(ratios: np.ndarray, h: float, variant: str,
                        corrector: bool) -> tuple[np.ndarray, float]:
  """UniPC's rhos (B(h) version, data prediction) for nodes at ratios r_k = (lambda_k -
  lambda_0) / h of the older evaluations, and beta = B(h) / (1 - e^-h)."""
  order = len(ratios) + 1
  hh = -h
  h_phi_1 = np.expm1(hh)
  b_h = hh if variant == "bh1" else h_phi_1
  rks = np.append(ratios, 1.0)
  h_phi_k, rows, b = h_phi_1 / hh - 1, [], []
  for i in range(1, order + 1):
    rows.append(rks ** (i - 1))
    b.append(h_phi_k * math.factorial(i) / b_h)
    h_phi_k = h_phi_k / hh - 1 / math.factorial(i + 1)
  rows, b = np.array(rows), np.array(b)
  if corrector:
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(rows, b)
  elif order == 1:
    rhos = np.zeros(0)
  else:
    rhos = np.array([0.5]) if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
  return rhos, b_h / -h_phi_1


def unipc_predictor_weights(log_snr: np.ndarray, end: float, variant: str) -> np.ndarray:
  """UniP-k weights over data predictions at `log_snr` (newest first; k of them) for a step
  to `end`; `variant` is 'bh1' or 'bh2'."""
  h = end - log_snr[0]
  ratios = (log_snr[1:] - log_snr[0]) / h
  rhos, beta = _unipc_coefficients(ratios, h, variant, corrector=False)
  weights = np.zeros(len(log_snr))
  weights[0] = 1 + beta * np.sum(rhos / ratios)
  weights[1:] = -beta * rhos / ratios
  return weights


def unipc_corrector_weights(log_snr: np.ndarray, end: float, variant: str) -> np.ndarray:
  """UniC-k weights over data predictions [the new one at `end`, then those at `log_snr`
  (newest first; k of them)] that redo the step from log_snr[0] to `end`."""
  h = end - log_snr[0]
  ratios = (log_snr[1:] - log_snr[0]) / h
  rhos, beta = _unipc_coefficients(ratios, h, variant, corrector=True)
  weights = np.zeros(len(log_snr) + 1)
  weights[0] = -beta * rhos[-1]
  weights[1] = 1 + beta * (np.sum(rhos[:-1] / ratios) + rhos[-1])
  weights[2:] = -beta * rhos[:-1] / ratios
  return weights
