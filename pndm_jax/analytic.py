"""Data distributions with exact eps, for tests and convergence ablations.

With y = x / sqrt(a) and sigma = sqrt((1 - a) / a), noising reads y = x0 + sigma z,
and every deterministic sampler here solves dy/dsigma = E[z | y] (docs/methods.md §4).
For a Gaussian mixture with diagonal covariances that expectation is exact, and
for a single Gaussian so is the ODE's solution:
y(sigma') - mu = (y(sigma) - mu) sqrt((s^2 + sigma'^2) / (s^2 + sigma^2)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import reference_ode, schedules


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
  """sum_k weights[k] N(means[k], diag(stds[k]^2)) over flattened data of size D."""

  weights: np.ndarray  # [K]
  means: np.ndarray  # [K, D]
  stds: np.ndarray  # [K, D]

  def __post_init__(self):
    k, d = np.shape(self.means)
    if np.shape(self.weights) != (k,) or np.shape(self.stds) != (k, d):
      raise ValueError(f"weights [K], means [K, D] and stds [K, D] disagree: "
                       f"{np.shape(self.weights)}, {(k, d)}, {np.shape(self.stds)}")
    if not np.isclose(np.sum(self.weights), 1.0) or np.any(np.asarray(self.stds) <= 0):
      raise ValueError("weights must sum to 1 and stds be positive")

  @property
  def dim(self) -> int:
    return np.shape(self.means)[1]

  def sample(self, key: jax.Array, num: int, dtype=jnp.float32) -> jax.Array:
    """num draws of x0, shape [num, D]."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, len(self.weights), (num,), p=jnp.asarray(self.weights))
    z = jax.random.normal(k_noise, (num, self.dim), dtype)
    return jnp.asarray(self.means, dtype)[comp] + jnp.asarray(self.stds, dtype)[comp] * z

  def _components(self, y: jax.Array, sigma: jax.Array):
    """Per-component log N(y; mean_k, s_k^2 + sigma^2) [B, K], y - mean_k and variances."""
    dtype = y.dtype
    sigma = jnp.broadcast_to(jnp.asarray(sigma, dtype), y.shape[:1])[:, None, None]
    var = jnp.asarray(self.stds, dtype)[None] ** 2 + sigma**2  # [B, K, D]
    diff = y[:, None, :] - jnp.asarray(self.means, dtype)[None]
    log_prob = -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
    return log_prob + jnp.log(jnp.asarray(self.weights, dtype)), diff, var, sigma

  def log_density_y(self, y: jax.Array, sigma: jax.Array) -> jax.Array:
    """log p(y) for y = x0 + sigma z, i.e. the noised data in the ODE's variable; [B]."""
    log_prob, _, _, _ = self._components(y, sigma)
    return jax.nn.logsumexp(log_prob, axis=-1)

  def eps_y(self, y: jax.Array, sigma: jax.Array) -> jax.Array:
    """E[z | y = x0 + sigma z]; y [B, D], sigma [B] (or scalar)."""
    log_prob, diff, var, sigma = self._components(y, sigma)
    resp = jax.nn.softmax(log_prob, axis=-1)
    return sigma[:, 0] * jnp.einsum("bk,bkd->bd", resp, diff / var)

  def eps_fn(self, alpha_bar: Callable[[jax.Array], jax.Array]) -> Callable:
    """The exact eps_fn(x, t) for data x [B, ...] when timestep t means alpha-bar `alpha_bar(t)`.

    Pass the sampler's `Discretization.alpha_bar`, so that sampler and model
    agree on what t means (docs/methods.md §3).
    """

    def eps(x: jax.Array, t: jax.Array) -> jax.Array:
      a = alpha_bar(t).astype(t.dtype)[:, None]
      flat = x.reshape(x.shape[0], -1).astype(t.dtype)
      out = self.eps_y(flat / jnp.sqrt(a), jnp.sqrt((1 - a) / a)[:, 0])
      return out.reshape(x.shape).astype(x.dtype)

    return eps

  def exact_solution(self, x_T: jax.Array, a_start: float, a_end: float) -> jax.Array:
    """The ODE solution from alpha-bar a_start to a_end in closed form (one Gaussian only)."""
    if len(self.weights) != 1:
      raise ValueError("the closed-form solution exists for a single Gaussian only; "
                       "use reference_solution for mixtures")
    var = np.asarray(self.stds[0], np.float64) ** 2
    sigma2 = lambda a: (1.0 - a) / a
    ratio = np.sqrt((var + sigma2(a_end)) / (var + sigma2(a_start)))
    mu = np.asarray(self.means[0], np.float64)
    flat = x_T.reshape(x_T.shape[0], -1)
    y_end = mu + (flat / np.sqrt(a_start) - mu) * jnp.asarray(ratio, x_T.dtype)
    return (np.sqrt(a_end) * y_end).reshape(x_T.shape).astype(x_T.dtype)

  def reference_solution(self, x_T: jax.Array, a_start: float, a_end: float,
                         num_steps: int = 2000) -> jax.Array:
    """A high-accuracy numerical ODE solution (`reference_ode.solve`), its floor far below
    every component's scale."""
    flat = x_T.reshape(x_T.shape[0], -1)
    y = reference_ode.solve(self.eps_y, flat, a_start, a_end,
                            floor=1e-6 * float(np.min(self.stds)), num_steps=num_steps)
    return y.reshape(x_T.shape)


def gaussian(dim: int = 8, seed: int = 0) -> GaussianMixture:
  """A diagonal Gaussian with varied means and scales (the closed-form test case)."""
  rng = np.random.default_rng(seed)
  return GaussianMixture(np.ones(1), rng.uniform(-0.5, 0.5, (1, dim)),
                         rng.uniform(0.1, 0.6, (1, dim)))


def gaussian_mixture(dim: int = 8, num_components: int = 4, seed: int = 0) -> GaussianMixture:
  """Well-separated, narrow components: a low-dimensional stand-in for a data manifold."""
  rng = np.random.default_rng(seed)
  return GaussianMixture(np.full(num_components, 1.0 / num_components),
                         rng.uniform(-0.8, 0.8, (num_components, dim)),
                         rng.uniform(0.05, 0.2, (num_components, dim)))


def ode_endpoints(discretization: schedules.Discretization) -> tuple[float, float]:
  """Alpha-bar where a sampler on this grid starts and where it ends."""
  d = discretization
  return float(d.alpha_bar(d.t[:1])[0]), float(d.alpha_bar(d.t_next[-1:])[0])
