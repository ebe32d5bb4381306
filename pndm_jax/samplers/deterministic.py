"""The scan driver for deterministic methods (DDIM, PNDM, DPM-Solver++, UniPC, DEIS, ...).

A multistep method runs as two scans sharing one carry: the warm-up steps with
their Runge-Kutta tableau (e.g. 4 evaluations for pseudo RK4), then the 1-eval
multistep steps (UniPC's corrector reuses each step's evaluation). A
single-step method is one scan, plus its last step alone when that step is
Euler. No step pays for evaluations it does not make, nothing branches on
traced values, and compile time does not grow with the step count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers.gradients import EULER, HeunRamp, RungeKutta
from pndm_jax.samplers.methods import Deterministic, final_alpha_bar
from pndm_jax.samplers.model_call import EpsFn, call_eps, per_step_arrays
from pndm_jax.samplers.thresholding import thresholded
from pndm_jax.samplers.transfer import Transfer


def _move(c: dict, x: jax.Array, g: jax.Array, move: int) -> jax.Array:
  """x moved with gradient g by the step's move-th move (to a stage, or the last: the end)."""
  return x + c["R"][move] * x + c["S"][move] * g


def _single_step_body(eps_fn: EpsFn, transfer: Transfer, rule: RungeKutta, write_ring: bool):
  """One step of tableau `rule`; its first gradient goes to the ring if asked."""

  def body(carry, c):
    x, ring = carry
    g = transfer.gradient(c, 0, x, x, call_eps(eps_fn, x, c["eval_t"][0]))
    g_first, g_sum = g, rule.b[0] * g
    for stage, w in enumerate(rule.b[1:], start=1):
      x_stage = _move(c, x, g, stage - 1)
      g = transfer.gradient(c, stage, x, x_stage, call_eps(eps_fn, x_stage, c["eval_t"][stage]))
      g_sum = g_sum + w * g
    if write_ring:
      ring = jax.lax.dynamic_update_index_in_dim(ring, g_first, c["slot"], 0)
    return (_move(c, x, g_sum, rule.num_stages - 1), ring), None

  return body


def _multistep_body(eps_fn: EpsFn, transfer: Transfer, corrector: bool):
  """One multistep step: evaluate once, write the ring, (correct,) combine with weights.

  With `corrector` (UniPC) the carry also holds the previous step's corrected
  start, and where `correct` is set the evaluated point is first replaced by
  that step redone with the new evaluation (its move R_c, S_c and weights).
  """

  def body(carry, c):
    x, x_prev, ring = carry
    g = transfer.gradient(c, 0, x, x, call_eps(eps_fn, x, c["eval_t"][0]))
    ring = jax.lax.dynamic_update_index_in_dim(ring, g, c["slot"], 0)
    if corrector:
      redone = x_prev + c["Rc"] * x_prev + c["Sc"] * jnp.tensordot(c["corrector"], ring, axes=1)
      x = jnp.where(c["correct"], redone, x)
    x_next = _move(c, x, jnp.tensordot(c["weights"], ring, axes=1), 0)
    return (x_next, x, ring), None

  return body


def _step_arrays(x: jax.Array, transfer: Transfer, d: schedules.Discretization,
                 plan: schedules.StepPlan, **extra: np.ndarray) -> dict[str, jax.Array]:
  """The scan inputs of steps that follow `plan`: move coefficients, model times, `extra`."""
  return per_step_arrays(x, {**transfer.coefficients(d, plan), **extra}, dict(eval_t=plan.eval_t))


def _single_steps(eps_fn: EpsFn, x: jax.Array, transfer: Transfer, rule: RungeKutta,
                  d: schedules.Discretization, lo: int, hi: int) -> jax.Array:
  """Steps lo..hi-1 of the grid with tableau `rule`."""
  steps = _step_arrays(x, transfer, d, d.plan(rule.c, nodes=rule.nodes, num_steps=hi))
  steps = {k: v[lo:hi] for k, v in steps.items()}
  (x, _), _ = jax.lax.scan(_single_step_body(eps_fn, transfer, rule, write_ring=False),
                           (x, None), steps)
  return x


def _multistep(eps_fn: EpsFn, x_T: jax.Array, method: Deterministic,
               d: schedules.Discretization) -> jax.Array:
  """The warm-up scan, then the multistep scan."""
  transfer, gradient, warm = method.transfer, method.gradient, method.warmup_steps
  tables = gradient.ring_weights(d, ramp=not isinstance(method.warmup, RungeKutta),
                                 lower_order_final=method.lower_order_final)
  slots = jnp.asarray(tables.slots)
  carry = (x_T, jnp.zeros((gradient.ring_size,) + x_T.shape, x_T.dtype))
  if warm:
    rule = method.warmup_rule
    plan = d.plan(rule.c, restart=isinstance(method.warmup, HeunRamp), nodes=rule.nodes,
                  num_steps=warm)
    steps = dict(_step_arrays(x_T, transfer, d, plan), slot=slots[:warm])
    carry, _ = jax.lax.scan(_single_step_body(eps_fn, transfer, rule, write_ring=True), carry,
                            steps)
  plan = d.plan((0.0,))
  arrays = dict(transfer.coefficients(d, plan), weights=tables.weights)
  if gradient.corrector:  # step i redoes step i-1: its move coefficients, shifted by one
    previous = lambda v: np.concatenate([v[:1, 0], v[:-1, 0]])
    arrays.update(Rc=previous(arrays["R"]), Sc=previous(arrays["S"]), corrector=tables.corrector)
  steps = per_step_arrays(x_T, arrays, dict(eval_t=plan.eval_t))
  steps["slot"] = slots
  if gradient.corrector:
    steps["correct"] = jnp.asarray(tables.correct)
  steps = {k: v[warm:] for k, v in steps.items()}
  x, ring = carry
  (x, _, _), _ = jax.lax.scan(_multistep_body(eps_fn, transfer, gradient.corrector),
                              (x, x, ring), steps)
  return x


def sample_deterministic(eps_fn: EpsFn, x_T: jax.Array, method: Deterministic,
                         discretization: schedules.Discretization) -> jax.Array:
  """Runs `method` over the grid from x_T; returns x at the last t_next (x_T's dtype)."""
  method.check_steps(discretization)
  d = discretization
  if method.thresholding:
    eps_fn = thresholded(eps_fn, method.thresholding, d.alpha_bar)
  if isinstance(method.gradient, RungeKutta):
    num_steps, final = len(d.t), method.final_euler_steps
    x = _single_steps(eps_fn, x_T, method.transfer, method.gradient, d, 0, num_steps - final)
    if final:
      x = _single_steps(eps_fn, x, method.transfer, EULER, d, num_steps - final, num_steps)
  else:
    x = _multistep(eps_fn, x_T, method, d)
  if method.denoise_to_zero:
    x = _denoise(eps_fn, x, d)
  return x


def _denoise(eps_fn: EpsFn, x: jax.Array, d: schedules.Discretization) -> jax.Array:
  """The data prediction at the grid's end alpha-bar A[0], asked of the model at t = 0."""
  a = final_alpha_bar(d)
  c = per_step_arrays(x, dict(P=1.0 / np.sqrt(a), Q=-np.sqrt((1.0 - a) / a)),
                      dict(t=d.schedule.time_of_alpha_bar(a)))
  return c["P"] * x + c["Q"] * call_eps(eps_fn, x, c["t"])
