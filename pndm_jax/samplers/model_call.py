"""How every sampler calls the model, and how host tables reach the device."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def state_dtype(x: jax.Array) -> jnp.dtype:
  """The dtype a sampler's state, coefficients, history and model times take: x's, but at
  least float32. A bfloat16 network computes in bfloat16 inside eps_fn; its steps' sums of
  small increments would not survive bfloat16 (nor would t = 981)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def call_eps(eps_fn: EpsFn, x: jax.Array, t: jax.Array) -> jax.Array:
  """eps_fn(x, t) with the scalar timestep t broadcast to shape [B]; eps in x's dtype."""
  return eps_fn(x, jnp.full((x.shape[0],), t, state_dtype(x))).astype(x.dtype)


def per_step_arrays(x: jax.Array, coefficients: dict[str, np.ndarray],
                    times: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Float64 host tables as scan inputs: coefficients in x's dtype, times in state_dtype."""
  out = {k: jnp.asarray(v, x.dtype) for k, v in coefficients.items()}
  out.update({k: jnp.asarray(v, state_dtype(x)) for k, v in times.items()})
  return out
