"""The scan driver for deterministic methods (DDIM, S-PNDM, F-PNDM, FON, ablations).

A multistep method runs as two scans sharing one carry: the warm-up steps with
their Runge-Kutta tableau (e.g. 4 evaluations for pseudo RK4), then the 1-eval
multistep steps. No step pays for evaluations it does not make, nothing
branches on traced values, and compile time does not grow with the step count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers.gradients import HeunRamp, RungeKutta
from pndm_jax.samplers.methods import Deterministic
from pndm_jax.samplers.model_call import EpsFn, call_eps, per_step_arrays
from pndm_jax.samplers.transfer import Transfer


def _move(c: dict, x: jax.Array, g: jax.Array, move: int) -> jax.Array:
  """x moved with gradient g by the step's move-th move (to a stage, or the last: the end)."""
  return x + c["R"][move] * x + c["S"][move] * g


def _single_step_body(eps_fn: EpsFn, transfer: Transfer, rule: RungeKutta, write_ring: bool):
  """One step of tableau `rule`; its first gradient goes to the ring if asked."""

  def body(carry, c):
    x, ring = carry
    g = transfer.gradient(c, x, call_eps(eps_fn, x, c["eval_t"][0]))
    g_first, g_sum = g, rule.b[0] * g
    for stage, w in enumerate(rule.b[1:], start=1):
      x_stage = _move(c, x, g, stage - 1)
      g = transfer.gradient(c, x, call_eps(eps_fn, x_stage, c["eval_t"][stage]))
      g_sum = g_sum + w * g
    if write_ring:
      ring = jax.lax.dynamic_update_index_in_dim(ring, g_first, c["slot"], 0)
    return (_move(c, x, g_sum, rule.num_stages - 1), ring), None

  return body


def _multistep_body(eps_fn: EpsFn, transfer: Transfer):
  """One linear-multistep step: evaluate once, write the ring, combine with weights."""

  def body(carry, c):
    x, ring = carry
    g = transfer.gradient(c, x, call_eps(eps_fn, x, c["eval_t"][0]))
    ring = jax.lax.dynamic_update_index_in_dim(ring, g, c["slot"], 0)
    g_comb = jnp.tensordot(c["weights"], ring, axes=1)
    return (_move(c, x, g_comb, 0), ring), None

  return body


def _step_arrays(x: jax.Array, transfer: Transfer, d: schedules.Discretization,
                 plan: schedules.StepPlan, **extra: np.ndarray) -> dict[str, jax.Array]:
  """The scan inputs of steps that follow `plan`: move coefficients, model times, `extra`."""
  return per_step_arrays(x, {**transfer.coefficients(d, plan), **extra}, dict(eval_t=plan.eval_t))


def sample_deterministic(eps_fn: EpsFn, x_T: jax.Array, method: Deterministic,
                         discretization: schedules.Discretization) -> jax.Array:
  """Runs `method` over the grid from x_T; returns x at the last t_next (x_T's dtype)."""
  method.check_steps(discretization)
  d, transfer = discretization, method.transfer
  if isinstance(method.gradient, RungeKutta):
    steps = _step_arrays(x_T, transfer, d, d.plan(method.gradient.c))
    body = _single_step_body(eps_fn, transfer, method.gradient, write_ring=False)
    (x, _), _ = jax.lax.scan(body, (x_T, None), steps)
    return x

  warm = method.warmup_steps
  slots, weights = method.gradient.ring_weights(d, ramp=not isinstance(method.warmup,
                                                                       RungeKutta))
  rows = lambda steps, lo, hi: {k: v[lo:hi] for k, v in steps.items()}
  carry = (x_T, jnp.zeros((method.gradient.order,) + x_T.shape, x_T.dtype))
  if warm:
    rule = method.warmup_rule
    plan = d.plan(rule.c, restart=isinstance(method.warmup, HeunRamp))
    steps = _step_arrays(x_T, transfer, d, plan)
    steps["slot"] = jnp.asarray(slots)
    body = _single_step_body(eps_fn, transfer, rule, write_ring=True)
    carry, _ = jax.lax.scan(body, carry, rows(steps, 0, warm))
  steps = _step_arrays(x_T, transfer, d, d.plan((0.0,)), weights=weights)
  steps["slot"] = jnp.asarray(slots)
  (x, _), _ = jax.lax.scan(_multistep_body(eps_fn, transfer), carry, rows(steps, warm, None))
  return x
