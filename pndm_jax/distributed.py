"""Several processes as one JAX runtime: `jax.distributed` set up from flags or the cluster.

On a TPU VM pod slice one process per host (every worker runs the same command),
under SLURM one task per GPU; all devices of all processes form one global mesh.
A single process needs no flags and no setup. What each mode shares out and how
is in docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on a Cloud TPU VM


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the runtime (main.py's flags).

  With `coordinator_address` all three of address, count and id are given
  explicitly; without it, a SLURM job step of several tasks or a Cloud TPU VM is
  detected and JAX reads the rest from the cluster; otherwise the process runs alone.
  """

  coordinator_address: str = ""
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300  # to reach the coordinator, for all to join, and for a heartbeat


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """"slurm" inside an srun step of several tasks, "tpu" on a Cloud TPU VM, else None."""
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in environ for k in slurm) and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return "tpu"
    except OSError:
      continue
  return None


def check_launch(launch: Launch) -> None:
  """Raises a ValueError naming an incomplete or inconsistent set of flags."""
  explicit = {"--coordinator_address": launch.coordinator_address or None,
              "--num_processes": launch.num_processes, "--process_id": launch.process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) != 3:
    missing = [k for k in explicit if k not in given]
    raise ValueError(f"{', '.join(given)} given without {', '.join(missing)}: an explicit "
                     "launch names all three (e.g. --coordinator_address=10.0.0.1:1234 "
                     "--num_processes=2 --process_id=0)")
  if launch.timeout_s <= 0:
    raise ValueError(f"--distributed_timeout={launch.timeout_s}: must be a positive number "
                     "of seconds")
  if not given:
    return
  host, _, port = launch.coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address={launch.coordinator_address}: expected HOST:PORT "
                     "(the address of process 0 and a free port on it)")
  if launch.num_processes < 1 or not 0 <= launch.process_id < launch.num_processes:
    raise ValueError(f"--num_processes={launch.num_processes} --process_id={launch.process_id}:"
                     " the id must be one of 0..num_processes-1, num_processes at least 1")


def initialize(launch: Launch = Launch()) -> str:
  """Joins the runtime before any other JAX call; returns how ("single", "explicit", "slurm",
  "tpu").

  A process that is not the coordinator first waits up to `launch.timeout_s` for
  the coordinator's port to open and raises ConnectionError if it does not: a
  wrong address or a missing process 0 ends with a message, not a hang.
  """
  check_launch(launch)
  how = "explicit" if launch.coordinator_address else detect_cluster()
  if how is None or (how == "explicit" and launch.num_processes == 1):
    return "single"
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
  kwargs = dict(initialization_timeout=launch.timeout_s,
                heartbeat_timeout_seconds=launch.timeout_s)
  if how == "explicit":
    if launch.process_id != 0:
      _wait_for_coordinator(launch)
    kwargs.update(coordinator_address=launch.coordinator_address,
                  num_processes=launch.num_processes, process_id=launch.process_id)
  logging.info("joining the %s runtime (waiting up to %d s for every process)", how,
               launch.timeout_s)
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d: %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return how


def _wait_for_coordinator(launch: Launch) -> None:
  host, _, port = launch.coordinator_address.rpartition(":")
  deadline = time.monotonic() + launch.timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConnectionError(
            f"process {launch.process_id} of {launch.num_processes} cannot reach the "
            f"coordinator at --coordinator_address={launch.coordinator_address} within "
            f"{launch.timeout_s} s ({e.strerror or e}): start process 0 with the same address, "
            "and check that this host can reach that port") from e
      time.sleep(0.5)


# ----------------------------------------------------------------------------- sharing out work


def is_chief() -> bool:
  """Process 0 writes what is written once (summaries, statistics, logs, images)."""
  return jax.process_index() == 0


def to_host(array: jax.Array) -> np.ndarray:
  """The whole of a global array as numpy, on every process (gathered where it spans several)."""
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def gather(array: np.ndarray) -> np.ndarray:
  """[process_count, ...]: every process's `array` (same shape and dtype), bit for bit.

  Arrays travel as uint32 words, so float64 arrays arrive whole without x64.
  """
  array = np.array(array, order="C")
  if jax.process_count() == 1:
    return array[None]
  words = array.reshape(-1).view(np.uint8)
  words = np.pad(words, (0, -len(words) % 4)).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words))
  return np.stack([g.view(np.uint8)[:array.nbytes].view(array.dtype).reshape(array.shape)
                   for g in gathered])
