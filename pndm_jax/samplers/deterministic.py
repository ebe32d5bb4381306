"""The scan driver for deterministic methods (DDIM, PNDM, DPM-Solver++, UniPC, DEIS, ...).

One `lax.scan` over the method's model evaluations (`evaluations`, docs/methods.md
§4): every iteration calls the network once and combines x and the gradient
buffer with that evaluation's coefficients. Nothing branches on traced values,
the compiled program holds the network once whatever the method (F-PNDM's RK4
warm-up included), and neither compile time nor memory grows with the step count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax import schedules
from pndm_jax.samplers.evaluations import Evaluations, evaluations
from pndm_jax.samplers.methods import Deterministic
from pndm_jax.samplers.model_call import EpsFn, call_eps, per_step_arrays, state_dtype
from pndm_jax.samplers.thresholding import thresholded


def _body(eps_fn: EpsFn, tables: Evaluations):
  """The scan body of `tables`; terms whose coefficients are all zero are left out."""
  used = {k for k, v in tables.coefficients.items() if np.any(v)}
  corrector = bool(tables.correct.any())

  def combine(c, *terms):
    return sum((c[name] * value for name, value in terms if name in used), start=0.0)

  def body(carry, c):
    x, x_prev, buffer = carry
    x_eval = x + combine(c, ("R_in", x), ("S_in", buffer[c["source"]]))
    e = call_eps(eps_fn, x_eval, c["t"])
    g = combine(c, ("gx", x), ("gxe", x_eval), ("ge", e))
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, g, c["slot"], 0)
    if corrector:
      redone = x_prev + combine(c, ("Rc", x_prev),
                                ("Sc", jnp.tensordot(c["corrector"], buffer, axes=1)))
      x = jnp.where(c["correct"], redone, x)
      x_prev = jnp.where(c["ends"], x, x_prev)
    x = x + combine(c, ("R_out", x), ("S_out", jnp.tensordot(c["weights"], buffer, axes=1)))
    return (x, x_prev, buffer), None

  return body


def sample_deterministic(eps_fn: EpsFn, x_T: jax.Array, method: Deterministic,
                         discretization: schedules.Discretization) -> jax.Array:
  """Runs `method` over the grid from x_T; returns x at the grid's end.

  The state, coefficients and history are in x_T's dtype, at least float32
  (`state_dtype`), and so is the result; eps_fn computes in its own dtype.
  """
  d = discretization
  tables = evaluations(method, d)
  if method.thresholding:
    eps_fn = thresholded(eps_fn, method.thresholding, d.alpha_bar)
  x = x_T.astype(state_dtype(x_T))
  steps = per_step_arrays(x, tables.coefficients, dict(t=tables.t))
  steps.update(source=jnp.asarray(tables.source), slot=jnp.asarray(tables.slot),
               correct=jnp.asarray(tables.correct), ends=jnp.asarray(tables.ends))
  buffer = jnp.zeros((tables.coefficients["weights"].shape[1],) + x.shape, x.dtype)
  (x, _, _), _ = jax.lax.scan(_body(eps_fn, tables), (x, x, buffer), steps)
  return x
