"""Networks that predict x0 or v instead of eps, converted to eps at the model boundary.

Every sampler consumes `eps_fn(x, t) -> eps`. A network trained to predict the clean
sample (`sample`) or v = sqrt(a) eps - sqrt(1 - a) x0 (`v_prediction`, as in diffusers and
Imagen Video) becomes such a function here, with a = the alpha-bar the network was trained
with at its (possibly fractional) timestep t: `schedule.alpha_bar(t, "consistent")`, which
is A[t] at integers and log-linear in between, whatever convention the sampler reads.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pndm_jax import choices, schedules

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

OutputFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, t) -> the network's output


def check_prediction_type(prediction_type: str, kind: str = "prediction type") -> str:
  """Returns `prediction_type` if it is one of PREDICTION_TYPES, else a ValueError listing them."""
  return choices.check(kind, prediction_type, PREDICTION_TYPES)


def check_conversion(prediction_type: str, schedule: schedules.Schedule | None) -> str:
  """Validates `prediction_type`; any but `epsilon` needs the network's training `schedule`."""
  check_prediction_type(prediction_type)
  if prediction_type != "epsilon" and schedule is None:
    raise ValueError(f"prediction type {prediction_type!r} needs the schedule the network was "
                     "trained with, to convert its output to eps")
  return prediction_type


def to_eps(output: jax.Array, x: jax.Array, alpha_bar: jax.Array | float,
           prediction_type: str) -> jax.Array:
  """eps from a network's `output` at input `x`, trained with alpha-bar `alpha_bar`.

  epsilon: out; sample: (x - sqrt(a) out) / sqrt(1 - a); v_prediction: sqrt(a) out +
  sqrt(1 - a) x. `alpha_bar` broadcasts against x (a scalar, or shaped [B, 1, ...]). The
  conversion runs in at least float32 (and at least x's precision); the result has x's dtype.
  `epsilon` returns `output` unchanged.
  """
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return output
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  out, xc = jnp.asarray(output).astype(dtype), x.astype(dtype)
  a = jnp.asarray(alpha_bar).astype(dtype)
  if prediction_type == "sample":
    eps = (xc - jnp.sqrt(a) * out) / jnp.sqrt(1.0 - a)
  else:
    eps = jnp.sqrt(a) * out + jnp.sqrt(1.0 - a) * xc
  return eps.astype(x.dtype)


def eps_from_output(output_fn: OutputFn, schedule: schedules.Schedule | None,
                    prediction_type: str) -> OutputFn:
  """The sampler's eps_fn(x, t) for a network function output_fn(x, t) of `prediction_type`.

  `schedule` (a `schedules.Schedule`) is the one the network was trained with; t is a scalar
  or one timestep per image ([B]). `epsilon` returns `output_fn` itself (no schedule needed).
  """
  if check_conversion(prediction_type, schedule) == "epsilon":
    return output_fn

  def eps_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    tc = jnp.asarray(t)
    tc = tc.astype(jnp.promote_types(tc.dtype, jnp.promote_types(x.dtype, jnp.float32)))
    a = schedule.alpha_bar(tc, "consistent")
    a = jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))  # [B] -> [B, 1, ...]
    return to_eps(output_fn(x, t), x, a, prediction_type)

  return eps_fn
