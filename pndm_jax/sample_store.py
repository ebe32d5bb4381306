"""The sample directory format: settings, chunks, claims, and verified reads.

A sample directory holds

  sampling.json        the settings that determine its images (written once; a run
                       with other settings is refused, `num_samples` may grow)
  samples_XXXXX.npz    chunk k: uint8 NHWC `images`, int `indices` = k*S, k*S+1, ...
                       (S = chunk_size) and `nfe`, the model evaluations per image
  samples_XXXXX.claim  while a process makes chunk k: its host and pid (an atomic
                       create; a dead claimant's chunk is taken over)
  summary.json, grid.png   written when the directory is complete

Chunks are written under a hidden temporary name and renamed when complete, and
every finished chunk is verified (it loads, holds the right indices) before it
is trusted: by a resuming sampler, which remakes a bad one, and by evaluation,
which names it. Image i depends only on (settings, i), so chunks made by
different runs or processes of the same settings belong together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from pndm_jax import files

SETTINGS_FILE = "sampling.json"
SUMMARY_FILE = "summary.json"
CHUNK_PATTERN = "samples_{:05d}.npz"
CLAIM_PATTERN = "samples_{:05d}.claim"
GROWABLE = ("num_samples",)  # settings that may change between runs on one directory


class SampleDirError(ValueError):
  """A sample directory that cannot be used as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Chunk:
  images: np.ndarray | None  # uint8 [n, H, W, C] (None when only the header was read)
  indices: np.ndarray           # int [n], consecutive
  nfe: int | None            # model evaluations per image (None if the chunk does not say)


def chunk_path(sample_dir: str, k: int) -> str:
  return os.path.join(sample_dir, CHUNK_PATTERN.format(k))


def chunk_indices(k: int, chunk_size: int, num_samples: int) -> np.ndarray:
  """The image indices chunk k holds for a directory of `num_samples` images."""
  return np.arange(k * chunk_size, min((k + 1) * chunk_size, num_samples))


def num_chunks(chunk_size: int, num_samples: int) -> int:
  return -(-num_samples // chunk_size)


def write_chunk(sample_dir: str, k: int, images: np.ndarray, indices: np.ndarray,
                nfe: int | None) -> None:
  """Chunk k, written under a hidden temporary name and renamed: it exists only when complete."""
  path = chunk_path(sample_dir, k)
  tmp = files.temporary_name(path)
  with open(tmp, "wb") as f:
    np.savez(f, images=images, indices=indices, nfe=np.asarray(-1 if nfe is None else nfe))
  os.replace(tmp, path)


def _images_header(npz: Any) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of the `images` member without reading its data."""
  with npz.zip.open("images.npy") as member:
    version = np.lib.format.read_magic(member)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(member)
  return shape, dtype


def read_chunk(path: str, load_images: bool = True) -> Chunk:
  """Chunk at `path`, checked for form; a SampleDirError names the file and what is wrong."""
  try:
    with np.load(path) as f:
      missing = {"images", "indices"} - set(f.files)
      if missing:
        raise SampleDirError(f"bad chunk {path}: it lacks {sorted(missing)}")
      indices = f["indices"]
      nfe = int(f["nfe"]) if "nfe" in f.files else -1
      images = f["images"] if load_images else None
      shape, dtype = (images.shape, images.dtype) if load_images else _images_header(f)
  except SampleDirError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
    raise SampleDirError(f"bad chunk {path}: cannot be read ({type(e).__name__}: {e}); "
                         f"it is truncated or corrupt") from e
  if dtype != np.uint8 or len(shape) != 4:
    raise SampleDirError(f"bad chunk {path}: images are {dtype} {shape}, "
                         "not uint8 (N, H, W, C)")
  if indices.shape != shape[:1] or (len(indices) and np.any(
      indices != indices[0] + np.arange(len(indices)))):
    raise SampleDirError(f"bad chunk {path}: its indices are not {shape[0]} consecutive "
                         "image indices")
  return Chunk(images, indices.astype(np.int64), None if nfe < 0 else nfe)


def _chunk_names(sample_dir: str) -> list[str]:
  """The finished chunk files in `sample_dir`, in index order."""
  if not os.path.isdir(sample_dir):
    return []
  return sorted(f for f in os.listdir(sample_dir) if f.startswith("samples_")
                and f.endswith(".npz"))


def check_chunk(sample_dir: str, k: int, chunk_size: int, num_samples: int) -> str | None:
  """None if chunk k holds every image it must for `num_samples`, else why not.

  The reason is "missing", "short: ..." (a good chunk of a smaller num_samples,
  to be made whole) or "bad chunk ..." (unreadable, or the wrong images).
  """
  path = chunk_path(sample_dir, k)
  if not os.path.exists(path):
    return "missing"
  try:
    chunk = read_chunk(path)
  except SampleDirError as e:
    return str(e)
  want = chunk_indices(k, chunk_size, num_samples)
  span = f"{chunk.indices[0]}..{chunk.indices[-1]}" if len(chunk.indices) else "none"
  if not len(chunk.indices) or chunk.indices[0] != want[0]:
    return f"bad chunk {path}: it holds images {span}, not {want[0]}..{want[-1]}"
  if len(chunk.indices) < len(want):
    return f"short: {path} holds images {span} of {want[0]}..{want[-1]}"
  return None


# ----------------------------------------------------------------------------- settings


def read_settings(sample_dir: str) -> dict[str, Any] | None:
  path = os.path.join(sample_dir, SETTINGS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise SampleDirError(f"{path} cannot be read ({e}); it is not a sample directory's "
                         "settings file") from e


def check_settings(sample_dir: str, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
  """Raises a SampleDirError naming every setting (but the growable ones) that differs."""
  settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
  changed = sorted(k for k in settings if k not in GROWABLE and recorded.get(k) != settings[k])
  if changed:
    detail = "; ".join(f"{k}: directory {recorded.get(k)!r}, now {settings[k]!r}"
                       for k in changed[:6])
    raise SampleDirError(f"{sample_dir} holds samples made with other settings ({detail}); "
                         "use the settings they were made with, or another directory "
                         "(--config.sampler.sample_dir)")


def open_for_writing(sample_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
  """Creates `sample_dir` with `settings`, or checks an existing one has them; returns them.

  Loses nothing: a directory of other settings is refused, never changed.
  A larger `num_samples` is recorded; a smaller one leaves the record as it is.
  """
  recorded = read_settings(sample_dir)
  if recorded is None:
    if _chunk_names(sample_dir):
      raise SampleDirError(f"{sample_dir} holds sample chunks but no {SETTINGS_FILE}: their "
                           "settings are unknown; sample into another directory")
    os.makedirs(sample_dir, exist_ok=True)
    files.write_json_atomically(os.path.join(sample_dir, SETTINGS_FILE), settings)
    return json.loads(json.dumps(settings))
  check_settings(sample_dir, recorded, settings)
  if settings["num_samples"] > recorded["num_samples"]:
    recorded["num_samples"] = settings["num_samples"]
    files.write_json_atomically(os.path.join(sample_dir, SETTINGS_FILE), recorded)
  return recorded


# ----------------------------------------------------------------------------- claims


def _process_alive(pid: int) -> bool:
  """Whether process `pid` of this host runs (a killed one its parent has not reaped is dead)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[0] != "Z"
  except OSError:  # no /proc: trust the signal
    return True


def claimant(sample_dir: str, k: int) -> dict[str, Any] | None:
  """Who claimed chunk k ({"host", "pid"}), or None; an unreadable claim counts as a dead one."""
  return _read_claim(os.path.join(sample_dir, CLAIM_PATTERN.format(k)))


def _read_claim(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {"host": socket.gethostname(), "pid": -1}


def claim_is_live(claim: dict[str, Any]) -> bool:
  """A claim from this host is live while its process runs; one from another host is trusted."""
  if claim.get("host") != socket.gethostname():
    return True
  pid = int(claim.get("pid", -1))
  return pid > 0 and _process_alive(pid)


def try_claim(sample_dir: str, k: int) -> bool:
  """Claims chunk k for this process (atomically); takes over a dead claimant's claim.

  The claim is written to a file of this process's own and linked into place, so
  other processes see a whole claim or none (never an empty file they would take
  for a dead one). The winner removes any temporary file a dead writer of chunk k
  left behind.
  """
  path = os.path.join(sample_dir, CLAIM_PATTERN.format(k))
  mine = {"host": socket.gethostname(), "pid": os.getpid()}
  draft = os.path.join(sample_dir, f".{CLAIM_PATTERN.format(k)}.{mine['host']}.{mine['pid']}")
  with open(draft, "w") as f:
    json.dump(mine, f)
  try:
    for _ in range(2):
      try:
        os.link(draft, path)
      except FileExistsError:
        if not _take_over(path, claimant(sample_dir, k)):
          return False
        continue
      for name in os.listdir(sample_dir):
        if name.startswith(f".{CHUNK_PATTERN.format(k)}.tmp"):
          os.remove(os.path.join(sample_dir, name))
      return True
    return False
  finally:
    os.remove(draft)


def _take_over(path: str, claim: dict[str, Any] | None) -> bool:
  """Removes the claim at `path` if `claim`, read from it, is dead; False if it is live.

  Only one process wins the rename. If what it moved is no longer the dead claim
  it read (a live process claimed in between), it puts that claim back.
  """
  if claim is not None and claim_is_live(claim):
    return False
  moved = f"{path}.stale{os.getpid()}"
  try:
    os.rename(path, moved)
  except FileNotFoundError:
    return True
  now = _read_claim(moved)
  if now != claim and claim_is_live(now):
    try:
      os.link(moved, path)
    except FileExistsError:
      pass
    os.remove(moved)
    return False
  os.remove(moved)
  return True


def release_claim(sample_dir: str, k: int) -> None:
  try:
    os.remove(os.path.join(sample_dir, CLAIM_PATTERN.format(k)))
  except FileNotFoundError:
    pass


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Contents:
  """What a directory holds for a request of `num_requested` images."""

  paths: list[str]
  num_images: int          # images 0..num_images-1, all present
  num_requested: int
  settings: dict[str, Any] | None
  nfe_per_image: int | None  # as the chunks record it (None: unrecorded or varying)

  def images(self) -> Iterator[np.ndarray]:
    """The uint8 images 0..num_images-1, chunk by chunk (each re-verified as it is read)."""
    left = self.num_images
    for path in self.paths:
      images = read_chunk(path).images[:left]
      left -= len(images)
      yield images


def contents(sample_dir: str, num_requested: int | None = None,
             allow_subset: bool = False) -> Contents:
  """The verified chunks holding images 0..N-1, N = `num_requested` (default: all recorded).

  A bad chunk is a SampleDirError naming it. Fewer images than requested is a
  SampleDirError unless `allow_subset`, when the leading complete run of images is used.
  """
  settings = read_settings(sample_dir)
  names = _chunk_names(sample_dir)
  if not names:
    raise SampleDirError(f"no sample chunks (samples_XXXXX.npz) in {sample_dir}; make them "
                         "with --mode=sample and the same config")
  if num_requested is None:
    num_requested = settings["num_samples"] if settings else None
  paths, count, nfes = [], 0, set()
  for name in names:
    path = os.path.join(sample_dir, name)
    chunk = read_chunk(path, load_images=False)
    if chunk.indices[0] != count:
      break  # a gap: images from `count` on are missing
    paths.append(path)
    count += len(chunk.indices)
    nfes.add(chunk.nfe)
    if num_requested is not None and count >= num_requested:
      break
  if num_requested is None:
    num_requested = count
  if count < num_requested and not allow_subset:
    raise SampleDirError(f"{sample_dir} holds images 0..{count - 1} of the {num_requested} "
                         "requested: finish it with --mode=sample (same config), or score the "
                         "subset with --config.eval.subset=True")
  return Contents(paths, min(count, num_requested), num_requested, settings,
                  nfes.pop() if len(nfes) == 1 else None)
