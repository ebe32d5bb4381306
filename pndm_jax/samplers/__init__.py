"""PNDM-family samplers as pure, scanned JAX functions.

    x0, info = samplers.sample(eps_fn, x_T, sched, method="f-pndm", num_steps=50)
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax

from pndm_jax import schedules
from pndm_jax.samplers import ancestral, deterministic, methods, probability_flow
from pndm_jax.samplers.methods import (GRADIENTS, PRESETS, TRANSFERS, WARMUPS, Ancestral,
                                       Deterministic, Method, ProbabilityFlow, get_method,
                                       nfe)
from pndm_jax.samplers.model_call import EpsFn

__all__ = ["sample", "nfe", "get_method", "Method", "Deterministic", "Ancestral",
           "ProbabilityFlow", "PRESETS", "TRANSFERS", "GRADIENTS", "WARMUPS", "EpsFn"]


def sample(eps_fn: EpsFn, x_T: jax.Array, schedule: schedules.Schedule,
           method: Union[str, Method] = "f-pndm", num_steps: int = 50, *,
           index: str = "paper", grid: str = "uniform", rng: Optional[jax.Array] = None,
           eta: float = 0.0) -> tuple[jax.Array, dict[str, Any]]:
  """Draws x0 from x_T ~ N(0, I) with `method`; returns (x0, {"nfe": evaluations}).

  eps_fn(x, t): x shaped like x_T ([B, ...]), t float [B] model timesteps
  (fractional at RK midpoints). `index` is the alpha-bar convention
  ("paper" | "consistent"), `grid` the timestep grid ("uniform" | "linspace");
  `pf` ignores both and num_steps. `rng` (a jax.random key, or one per image) is
  needed by stochastic methods only. Jittable with eps_fn, schedule, method,
  num_steps, index, grid and eta static; the result has x_T's dtype.
  """
  resolved = get_method(method, eta)
  if isinstance(resolved, ProbabilityFlow):
    x0, count = probability_flow.sample(eps_fn, x_T, schedule, resolved)
    return x0, {"nfe": count}
  methods.check_num_steps(resolved, num_steps)
  t, t_next = schedules.timesteps(schedule.num_timesteps, num_steps, grid, index)
  if isinstance(resolved, Ancestral):
    if rng is None:
      raise ValueError(f"method {method!r} is stochastic: pass rng=jax.random.key(seed)")
    x0 = ancestral.sample(eps_fn, x_T, schedule, resolved, t, t_next, index, rng)
  else:
    x0 = deterministic.sample(eps_fn, x_T, schedule, resolved, t, t_next, index)
  return x0, {"nfe": resolved.num_evals(len(t))}
