"""One entry point for callers that hold any method value: picks the family's sampler."""

from __future__ import annotations

import jax

from pndm_jax import schedules
from pndm_jax.samplers.ancestral import sample_ancestral
from pndm_jax.samplers.deterministic import sample_deterministic
from pndm_jax.samplers.methods import Ancestral, Method, ProbabilityFlow
from pndm_jax.samplers.model_call import EpsFn
from pndm_jax.samplers.probability_flow import sample_probability_flow


def run_sampler(eps_fn: EpsFn, x_T: jax.Array, method: Method,
                discretization: schedules.Discretization, rng: jax.Array | None = None
                ) -> tuple[jax.Array, int | jax.Array]:
  """Draws x0 from x_T ~ N(0, I) with `method`; returns (x0, model evaluations made).

  eps_fn(x, t): x shaped like x_T ([B, ...]), t float [B] model timesteps
  (fractional at RK midpoints). Probability flow reads only the discretization's
  schedule. `rng` (a jax.random key, or one per image) is needed by stochastic
  methods only. Jittable with eps_fn, method and discretization static. The
  sampler's state, and x0, have x_T's dtype but at least float32, whatever
  dtype the network computes in (docs/methods.md §4). The count is an int
  except for probability flow (a traced count of the adaptive solver's
  evaluations).
  """
  if isinstance(method, ProbabilityFlow):
    return sample_probability_flow(eps_fn, x_T, method, discretization.schedule)
  if isinstance(method, Ancestral):
    if rng is None:
      raise ValueError(f"method {method} is stochastic: pass rng=jax.random.key(seed)")
    x0 = sample_ancestral(eps_fn, x_T, method, discretization, rng)
  else:
    x0 = sample_deterministic(eps_fn, x_T, method, discretization)
  return x0, method.num_evals(discretization)
