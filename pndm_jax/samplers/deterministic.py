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
from pndm_jax.samplers.gradients import Ramp, RungeKutta
from pndm_jax.samplers.methods import Deterministic
from pndm_jax.samplers.model_call import EpsFn, call_eps, per_step_arrays
from pndm_jax.samplers.transfer import Transfer


def _move(c: dict, x: jax.Array, g: jax.Array, node: int) -> jax.Array:
  """x moved with gradient g to the node-th point of the step (a fraction of it)."""
  return x + c["R"][node] * x + c["S"][node] * g


def _single_step_body(eps_fn: EpsFn, transfer: Transfer, rule: RungeKutta,
                      nodes: tuple[float, ...], write_ring: bool):
  """One step of tableau `rule`; its first gradient goes to the ring if asked."""
  stage_nodes = [nodes.index(c) for c in rule.c[1:]]
  end = nodes.index(1.0)

  def body(carry, c):
    x, ring = carry
    g = transfer.gradient(c, x, call_eps(eps_fn, x, c["t"]))
    g_first, g_sum = g, rule.b[0] * g
    for node, w in zip(stage_nodes, rule.b[1:]):
      g = transfer.gradient(c, x, call_eps(eps_fn, _move(c, x, g, node), c["times"][node]))
      g_sum = g_sum + w * g
    if write_ring:
      ring = jax.lax.dynamic_update_index_in_dim(ring, g_first, c["slot"], 0)
    return (_move(c, x, g_sum, end), ring), None

  return body


def _multistep_body(eps_fn: EpsFn, transfer: Transfer, end: int):
  """One linear-multistep step: evaluate once, write the ring, combine with weights."""

  def body(carry, c):
    x, ring = carry
    g = transfer.gradient(c, x, call_eps(eps_fn, x, c["t"]))
    ring = jax.lax.dynamic_update_index_in_dim(ring, g, c["slot"], 0)
    g_comb = jnp.tensordot(c["weights"], ring, axes=1)
    return (_move(c, x, g_comb, end), ring), None

  return body


def sample_deterministic(eps_fn: EpsFn, x_T: jax.Array, method: Deterministic,
                         discretization: schedules.Discretization) -> jax.Array:
  """Runs `method` over the grid from x_T; returns x at the last t_next (x_T's dtype)."""
  method.check_steps(discretization)
  d = discretization
  rules = [r for r in (method.gradient, method.warmup) if isinstance(r, RungeKutta)]
  # every fraction of a step that a stage or the step's end moves to
  nodes = tuple(sorted({c for rule in rules for c in rule.c[1:]} | {1.0}))
  coefficients = method.transfer.coefficients(d, nodes)
  times = dict(t=d.t, times=np.stack([d.times(c) for c in nodes], axis=1))
  if isinstance(method.gradient, RungeKutta):
    steps = per_step_arrays(x_T, coefficients, times)
    body = _single_step_body(eps_fn, method.transfer, method.gradient, nodes, write_ring=False)
    (x, _), _ = jax.lax.scan(body, (x_T, None), steps)
    return x

  warm = method.warmup_steps
  slots, weights = method.gradient.ring_weights(d, ramp=isinstance(method.warmup, Ramp))
  steps = per_step_arrays(x_T, {**coefficients, "weights": weights}, times)
  steps["slot"] = jnp.asarray(slots)
  split = lambda lo, hi: {k: v[lo:hi] for k, v in steps.items()}
  carry = (x_T, jnp.zeros((method.gradient.order,) + x_T.shape, x_T.dtype))
  if warm:
    body = _single_step_body(eps_fn, method.transfer, method.warmup, nodes, write_ring=True)
    carry, _ = jax.lax.scan(body, carry, split(0, warm))
  body = _multistep_body(eps_fn, method.transfer, end=nodes.index(1.0))
  (x, _), _ = jax.lax.scan(body, carry, split(warm, None))
  return x
