"""A small eps-network for vectors: the trained toy model of the manifold and order experiments.

Low-dimensional data (a ring in 2-D, or the same ring in a plane of a higher-dimensional space)
lets a network be trained in a minute on CPU, so the paper's argument, that a *network's* eps is
ill-defined off the data manifold and classical steps that leave it are punished, can be tested
where an exact eps cannot show it (docs/experiments.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pndm_jax.models.unet import timestep_embedding


class EpsMLP(nn.Module):
  """eps(x [B, D], t [B] or scalar) -> [B, D]: residual SiLU blocks whose LayerNorm the timestep
  scales and shifts, plus a timestep-dependent multiple of x itself.

  The multiple of x matters: across a thin manifold, eps is x / sqrt(1 - a) (and more, near the
  data), a product of x and a function of t, which additive time conditioning cannot express.
  t is the training timestep in [0, N-1] (fractional between steps), embedded as the DDPM U-Net
  embeds it; `train` is accepted (and ignored) so the training loss calls it as any network.
  """

  features: int = 128
  num_blocks: int = 3
  embed_dim: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    del train
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    temb = nn.silu(dense(self.features, "time")(timestep_embedding(t, self.embed_dim)))
    h = dense(self.features, "input")(x)
    for i in range(self.num_blocks):
      scale, shift = jnp.split(dense(2 * self.features, f"time_{i}")(temb), 2, axis=-1)
      r = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(h) * (1 + scale) + shift
      h = h + dense(self.features, f"block_{i}")(nn.silu(r))
    gain = dense(1, "x_gain")(temb)
    return (dense(x.shape[-1], "output")(nn.silu(h)) + gain * x).astype(x.dtype)
