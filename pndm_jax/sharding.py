"""Data parallelism shared by training, sampling and evaluation: one batch axis over devices."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

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


def put_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host batch, the same on every process, as a batch-sharded array over `mesh` (whose
  devices may span processes: each process places the rows its devices hold)."""
  return jax.make_array_from_callback(batch.shape, batch_sharding(mesh), lambda i: batch[i])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def round_up(batch_size: int, mesh: Mesh) -> int:
  """The smallest multiple of the device count that holds `batch_size`."""
  return math.ceil(batch_size / mesh.size) * mesh.size


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` by repeating the last entry (callers drop the padding)."""
  return np.pad(batch, [(0, size - len(batch))] + [(0, 0)] * (batch.ndim - 1), mode="edge")


def map_padded(fn: Callable[[np.ndarray], Any], arrays: Iterable[np.ndarray], batch_size: int
               ) -> Iterator[tuple[Any, int]]:
  """(fn(batch), rows that are real) for every `batch_size` rows of `arrays`, in order.

  Each batch is padded to exactly `batch_size` (one compiled shape) and
  dispatched before the previous output is handed on, so the host's work on
  that output overlaps the devices computing the next (JAX dispatch is
  asynchronous). Sampling and feature extraction both run their batches so.
  """
  pending = None
  for array in arrays:
    for lo in range(0, len(array), batch_size):
      batch = array[lo:lo + batch_size]
      out = fn(pad_batch(batch, batch_size))
      if pending is not None:
        yield pending
      pending = (out, len(batch))
  if pending is not None:
    yield pending
