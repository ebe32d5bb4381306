"""The probability-flow ODE of the continuous VP-SDE, solved adaptively (docs/methods.md §7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pndm_jax import schedules
from pndm_jax.samplers.methods import ProbabilityFlow
from pndm_jax.samplers.model_call import EpsFn, call_eps, state_dtype

# Dopri5 is first-same-as-last: one evaluation to start, six per step (accepted
# or rejected); tests check this against a count of actual calls.
_EVALS_PER_STEP = 6


def sample_probability_flow(eps_fn: EpsFn, x_T: jax.Array, method: ProbabilityFlow,
                            schedule: schedules.Schedule) -> tuple[jax.Array, jax.Array]:
  """Integrates dx/dt = -beta(t)/2 (x - eps/std) from t=1 to t_min; returns (x, nfe).

  Needs only the schedule (no grid, no alpha-bar convention: the solver picks
  its own steps). The discrete linear schedule is read as beta(t) = (beta_0 +
  t (beta_{N-1} - beta_0)) N, and the model is fed the timestep t (N-1).
  """
  import diffrax  # here: ~0.5 s to import, and only this method uses it

  if schedule.name != "linear":
    raise ValueError(f"method 'pf' needs the 'linear' schedule (the VP-SDE it "
                     f"integrates), got {schedule.name!r}")
  n = schedule.num_timesteps
  beta_0, beta_1 = schedule.betas[0] * n, schedule.betas[-1] * n

  def drift(t, x, args):
    log_mean = -t**2 * (beta_1 - beta_0) / 4 - t * beta_0 / 2
    std = jnp.sqrt(-jnp.expm1(2 * log_mean))
    eps = call_eps(eps_fn, x, t * (n - 1))
    return (-0.5 * (beta_0 + t * (beta_1 - beta_0)) * (x - eps / std)).astype(x.dtype)

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(drift), diffrax.Dopri5(), t0=1.0, t1=method.t_min, dt0=None,
      y0=x_T.astype(state_dtype(x_T)), saveat=diffrax.SaveAt(t1=True), max_steps=method.max_steps,
      stepsize_controller=diffrax.PIDController(rtol=method.rtol, atol=method.atol))
  nfe = _EVALS_PER_STEP * solution.stats["num_steps"] + 1
  return solution.ys[-1], nfe
