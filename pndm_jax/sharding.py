"""Data parallelism shared by training, sampling and evaluation: one batch axis over devices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) whose single axis shards the batch."""
  return Mesh(np.asarray(list(devices) if devices is not None else jax.devices()),
              (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def round_up(batch_size: int, mesh: Mesh) -> int:
  """The smallest multiple of the device count that holds `batch_size`."""
  return math.ceil(batch_size / mesh.size) * mesh.size


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` by repeating the last entry (callers drop the padding)."""
  return np.pad(batch, [(0, size - len(batch))] + [(0, 0)] * (batch.ndim - 1), mode="edge")
