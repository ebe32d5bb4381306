"""The scan driver for deterministic methods (DDIM, S-PNDM, F-PNDM, FON, ablations).

A multistep method runs as two scans sharing one carry: the warm-up steps with
their single-step rule (e.g. 4 evaluations for pseudo RK4), then the 1-eval
multistep steps. No step pays for evaluations it does not make, nothing
branches on traced values, and compile time does not grow with the step count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers import gradients, methods, transfer
from pndm_jax.samplers.model_call import EpsFn, call_eps, per_step_arrays

def _gradient(c: dict, x: jax.Array, e: jax.Array) -> jax.Array:
  """g = P x + Q e for the classical transfer, g = e for the pseudo one."""
  return c["P"] * x + c["Q"] * e if "P" in c else e

def _move(c: dict, x: jax.Array, g: jax.Array, target: str) -> jax.Array:
  return x + c[f"R_{target}"] * x + c[f"S_{target}"] * g

def _single_step_body(eps_fn: EpsFn, rule: str, write_ring: bool):
  """One step of a single-step rule; its first gradient goes to the ring if asked."""
  targets, weights = gradients.SINGLE_STEP_RULES[rule]

  def body(carry, c):
    x, ring = carry
    g = _gradient(c, x, call_eps(eps_fn, x, c["t"]))
    g_first, g_sum = g, weights[0] * g
    for target, w in zip(targets, weights[1:]):
      g = _gradient(c, x, call_eps(eps_fn, _move(c, x, g, target), c[target]))
      g_sum = g_sum + w * g
    if write_ring:
      ring = jax.lax.dynamic_update_index_in_dim(ring, g_first, c["slot"], 0)
    return (_move(c, x, g_sum, "next"), ring), None

  return body

def _multistep_body(eps_fn: EpsFn):
  """One linear-multistep step: evaluate once, write the ring, combine with weights."""

  def body(carry, c):
    x, ring = carry
    g = _gradient(c, x, call_eps(eps_fn, x, c["t"]))
    ring = jax.lax.dynamic_update_index_in_dim(ring, g, c["slot"], 0)
    g_comb = jnp.tensordot(c["weights"], ring, axes=1)
    return (_move(c, x, g_comb, "next"), ring), None

  return body

def sample(eps_fn: EpsFn, x_T: jax.Array, schedule: schedules.Schedule,
           method: methods.Deterministic, t: np.ndarray, t_next: np.ndarray,
           index: str) -> jax.Array:
  """Runs `method` over the grid (t, t_next) from x_T; returns x at the last t_next."""
  coefficients = transfer.step_coefficients(schedule, method.transfer, t, t_next, index)
  times = dict(t=t, mid=(t + t_next) / 2, next=t_next)
  if method.gradient in methods.SINGLE_STEP:
    steps = per_step_arrays(x_T, coefficients, times)
    body = _single_step_body(eps_fn, method.gradient, write_ring=False)
    (x, _), _ = jax.lax.scan(body, (x_T, None), steps)
    return x

  nodes = None
  if method.gradient.startswith("v"):  # integrate in sigma, the pseudo transfer's variable
    a = schedule.alpha_bar(np.append(t, t_next[-1]), index)
    nodes = np.sqrt((1.0 - a) / a)
  slots, weights = gradients.ring_weights(method.order, len(t), method.warmup == "ramp", nodes)
  steps = per_step_arrays(x_T, {**coefficients, "weights": weights}, times)
  steps["slot"] = jnp.asarray(slots)
  ring = jnp.zeros((method.order,) + x_T.shape, x_T.dtype)
  warm = method.warmup_steps
  split = lambda lo, hi: {k: v[lo:hi] for k, v in steps.items()}
  carry = (x_T, ring)
  if warm:
    body = _single_step_body(eps_fn, method.warmup, write_ring=True)
    carry, _ = jax.lax.scan(body, carry, split(0, warm))
  (x, _), _ = jax.lax.scan(_multistep_body(eps_fn), carry, split(warm, None))
  return x
