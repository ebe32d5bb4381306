"""The trained toy model of the manifold and order experiments: ring data and a small eps-MLP.

The data is a ring of narrow Gaussians in a 2-D plane of R^D (D = 2: the plane itself), turned
by a random rotation so that no coordinate axis is special. Its eps is known exactly (the
analytic mixture, rotated), which gives the contrast; the network `models.mlp.EpsMLP` is
trained on draws of it by the project's own training step (`train.make_train_fn`), with the
same objective, optimizer and EMA as the U-Nets (docs/experiments.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import stats

from pndm_jax import analytic, schedules, sharding, train
from pndm_jax.models.mlp import EpsMLP

RING_RADIUS = 0.7
RING_STD = 0.03  # in the plane
OFF_PLANE_STD = 0.003  # across it, for D > 2
ON_DATA_PROBABILITY = 0.9999  # 'on data': inside this Mahalanobis ellipsoid of a component


@dataclasses.dataclass(frozen=True, eq=False)
class Ring:
  """8 Gaussians on a circle in a 2-D plane of R^dim: x = rotation @ z, z an axis-aligned mixture
  (std RING_STD in the plane's two coordinates, OFF_PLANE_STD in the others)."""

  mixture: analytic.GaussianMixture
  rotation: np.ndarray  # [dim, dim], orthogonal

  @property
  def dim(self) -> int:
    return self.mixture.dim

  def sample(self, key: jax.Array, num: int, dtype=jnp.float32) -> jax.Array:
    return self.mixture.sample(key, num, dtype) @ jnp.asarray(self.rotation.T, dtype)

  def to_axes(self, x: jax.Array) -> jax.Array:
    """The mixture's own coordinates of x [B, dim] (the plane first)."""
    return x @ jnp.asarray(self.rotation, x.dtype)

  def eps_fn(self, alpha_bar: Callable[[jax.Array], jax.Array]) -> Callable:
    """The exact eps (noise is isotropic, so eps turns with the data)."""
    eps = self.mixture.eps_fn(alpha_bar)
    return lambda x, t: eps(self.to_axes(x), t) @ jnp.asarray(self.rotation.T, x.dtype)

  def log_density_y(self, y: jax.Array, sigma: jax.Array) -> jax.Array:
    return self.mixture.log_density_y(self.to_axes(y), sigma)

  def on_data(self, x: np.ndarray) -> np.ndarray:
    """Whether each sample lies inside the ON_DATA_PROBABILITY ellipsoid of some component."""
    z = np.asarray(self.to_axes(jnp.asarray(x, jnp.float64)))
    d2 = np.sum(((z[:, None] - self.mixture.means[None]) / self.mixture.stds[None]) ** 2, -1)
    return np.min(d2, axis=1) < stats.chi2.ppf(ON_DATA_PROBABILITY, self.dim)

  def ring_distance(self, x: np.ndarray) -> np.ndarray:
    """Distance of each sample from the circle the components sit on (the data's manifold)."""
    z = np.asarray(self.to_axes(jnp.asarray(x, jnp.float64)))
    in_plane = np.linalg.norm(z[:, :2], axis=-1) - RING_RADIUS
    return np.sqrt(in_plane**2 + np.sum(z[:, 2:] ** 2, axis=-1))


def ring(dim: int = 2, seed: int = 0) -> Ring:
  """The ring in R^dim, turned by a rotation drawn from `seed` (none for dim = 2)."""
  angles = 2 * np.pi * np.arange(8) / 8
  means = np.zeros((8, dim))
  means[:, :2] = RING_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  stds = np.full((8, dim), OFF_PLANE_STD)
  stds[:, :2] = RING_STD
  rotation = np.eye(dim)
  if dim > 2:
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
  return Ring(analytic.GaussianMixture(np.full(8, 1 / 8), means, stds), rotation)


def train_eps_mlp(data: Ring, schedule: schedules.Schedule, num_steps: int, *,
                  batch_size: int = 512, lr: float = 1e-3, seed: int = 0,
                  steps_per_call: int = 500) -> tuple[EpsMLP, Any, float]:
  """(network, EMA params, mean loss of the last call) after `num_steps` training steps on fresh
  draws of `data` (every batch new: the data distribution itself, not a finite set)."""
  model = EpsMLP()
  warmup = min(500, num_steps // 10)
  tx = train.make_optimizer(ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=warmup, beta1=0.9, beta2=0.999, adam_eps=1e-8, grad_clip=1.0)))
  settings = train.StepSettings(loss="l2", random_flip=False, ema_decay=0.999, lr=lr,
                                warmup_steps=warmup)
  mesh = sharding.batch_mesh(jax.devices()[:1])
  init_key, train_key, data_key = jax.random.split(jax.random.key(seed), 3)
  state = train.create_train_state(model, tx, init_key, (data.dim,), mesh)
  train_fn = train.make_train_fn(model, tx, schedule, settings, mesh, train_key, loop="scan")
  draw = jax.jit(lambda key, k: data.sample(key, k * batch_size).reshape(k, batch_size, -1),
                 static_argnums=1)
  loss = np.nan
  for call, start in enumerate(range(0, num_steps, steps_per_call)):
    k = min(steps_per_call, num_steps - start)
    state, metrics = train_fn(state, draw(jax.random.fold_in(data_key, call), k))
    loss = float(np.mean(metrics["loss"]))
  return model, state.ema_params, loss

