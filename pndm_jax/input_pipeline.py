"""Training data: tfds and offline image sources -> deterministic, sharded grain batches.

Every source yields float32 HWC images in [-1, 1] of the configured size and
channel count. The batched dataset is random access: batch `i` is the batch of
global training step `i`, so resuming at step `s` is just reading from `s` on,
with no iterator state to checkpoint. Each process reads a disjoint slice of
the same globally shuffled stream; device placement assembles the per-process
slices into one global array sharded along the batch axis.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from pndm_jax import choices

DATASETS = ("cifar10", "celeb_a", "lsun_church", "lsun_bedroom", "digits", "image_folder", "npz")
# The tensorflow-datasets builders of the datasets read through tfds.
TFDS_NAMES = {"cifar10": "cifar10", "celeb_a": "celeb_a", "lsun_church": "lsun/church_outdoor",
              "lsun_bedroom": "lsun/bedroom"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DIGITS_FITS = ("resize", "pad")
# The DDIM CelebA preprocessing: a 128x128 box at (top 57, left 25), then resize.
CELEB_A_CROP = (57, 25, 128)


def check_global_batch(global_batch: int, num_devices: int, num_processes: int = 1) -> None:
  """Raises a ValueError unless the global batch splits evenly over devices and processes."""
  if global_batch < 1:
    raise ValueError(f"batch_size must be positive, got {global_batch}")
  if global_batch % num_devices:
    raise ValueError(f"global batch_size {global_batch} is not divisible by the device "
                     f"count {num_devices}; use a multiple of {num_devices}")
  if global_batch % num_processes:
    raise ValueError(f"global batch_size {global_batch} is not divisible by the process "
                     f"count {num_processes}")


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Bilinear (antialiased) resize of a float HWC image to size x size (or (height, width)),
  per channel."""
  height, width = (size, size) if isinstance(size, int) else size
  if image.shape[:2] == (height, width):
    return image.astype(np.float32)
  channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                         .resize((width, height), Image.BILINEAR))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


def center_square(image: np.ndarray) -> np.ndarray:
  """The largest centred square crop of an HWC image."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return image[top:top + s, left:left + s]


def preprocess_cifar10(record: dict, image_size: int) -> np.ndarray:
  """A tfds cifar10 record -> float32 [image_size, image_size, 3] in [-1, 1]."""
  return resize(to_float(record["image"]), image_size)


def preprocess_celeb_a(record: dict, image_size: int) -> np.ndarray:
  """A tfds celeb_a record -> the DDIM crop box, resized to image_size, in [-1, 1]."""
  top, left, size = CELEB_A_CROP
  return resize(to_float(record["image"][top:top + size, left:left + size]), image_size)


def preprocess_lsun(record: dict, image_size: int) -> np.ndarray:
  """A tfds lsun record -> the DDIM LSUN preprocessing, in [-1, 1]: the shorter side resized to
  image_size (the longer to int(image_size * long / short), as torchvision's Resize), then the
  centred image_size square (offsets rounded as torchvision's CenterCrop)."""
  image = to_float(record["image"])
  h, w = image.shape[:2]
  if h <= w:
    height, width = image_size, int(image_size * w / h)
  else:
    height, width = int(image_size * h / w), image_size
  image = resize(image, (height, width))
  top, left = (int(round((n - image_size) / 2.0)) for n in (height, width))
  return image[top:top + image_size, left:left + image_size]


class ImageFolder:
  """Random-access source over the image files under a folder (recursive, sorted)."""

  def __init__(self, path: str, image_size: int, num_channels: int):
    if num_channels not in (1, 3):
      raise ValueError(f"image folders load as 1 (L) or 3 (RGB) channels, got {num_channels}")
    if not os.path.isdir(path):
      raise ValueError(f"image folder {path!r} does not exist or is not a directory")
    self.files = sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS))
    if not self.files:
      raise ValueError(f"image folder {path!r} contains no images "
                       f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    self.image_size = image_size
    self.mode = {1: "L", 3: "RGB"}[num_channels]

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> np.ndarray:
    with Image.open(self.files[index]) as image:
      pixels = np.asarray(image.convert(self.mode))
    pixels = pixels.reshape(pixels.shape[:2] + (-1,))
    return resize(to_float(center_square(pixels)), self.image_size)


def digits_with_labels() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1797 8x8 digits (17 grey levels, /16 -> [-1, 1]) as [N, 8, 8, 1], labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] / 8.0 - 1.0
  return images, digits.target.astype(np.int32)


def load_digits(image_size: int, fit: str = "resize") -> np.ndarray:
  """The digits of `digits_with_labels` as [1797, S, S, 1].

  `fit` brings them to image_size > 8: `resize` (bilinear) or `pad` (centred on
  a background of -1, the digits' own background).
  """
  images, _ = digits_with_labels()
  if image_size == 8:
    return images
  if image_size < 8:
    raise ValueError(f"digits are 8x8; image_size must be >= 8, got {image_size}")
  choices.check("digits_fit", fit, DIGITS_FITS)
  if fit == "pad":
    lo = (image_size - 8) // 2
    pad = ((0, 0), (lo, image_size - 8 - lo), (lo, image_size - 8 - lo), (0, 0))
    return np.pad(images, pad, constant_values=-1.0)
  return np.stack([resize(image, image_size) for image in images])


def load_npz(path: str, key: str, image_size: int) -> np.ndarray:
  """Images from an .npz array: uint8 in [0, 255] or float in [-1, 1], NHW or NHWC."""
  if not os.path.isfile(path):
    raise ValueError(f"npz file {path!r} does not exist")
  with np.load(path) as archive:
    keys = list(archive.keys())
    if not key:
      if len(keys) != 1:
        raise ValueError(f"{path!r} holds arrays {keys}; set data.npz_key to pick one")
      key = keys[0]
    if key not in keys:
      raise ValueError(f"{path!r} has no array {key!r}; it holds {keys}")
    images = archive[key]
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or not len(images):
    raise ValueError(f"array {key!r} in {path!r} has shape {images.shape}; expected a "
                     "non-empty NHW or NHWC image array")
  if images.dtype == np.uint8:
    images = to_float(images)
  elif images.min() < -1.0 or images.max() > 1.0:
    raise ValueError(f"float array {key!r} in {path!r} has values in "
                     f"[{images.min()}, {images.max()}]; float images must lie in [-1, 1] "
                     "(or store uint8 in [0, 255])")
  return np.stack([resize(image, image_size) for image in images])


def _source(data: ml_collections.ConfigDict) -> tuple[Sequence, Callable, int]:
  """(random-access source, per-record preprocessing, channel count) for `data.dataset`."""
  size = data.image_size
  identity = lambda record: record
  if data.dataset in TFDS_NAMES:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    name = TFDS_NAMES[data.dataset]
    try:
      source = tfds.data_source(name, split="train", data_dir=data.data_dir or None,
                                download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"tensorflow-datasets {name!r} is not prepared for random access in "
          f"data_dir {data.data_dir or '(tfds default)'!r}: {type(e).__name__}: {e}. Prepare "
          f"it once where the network is reachable: `tfds build {name} "
          "--file_format=array_record` (set --data_dir and data.data_dir alike)") from e
    preprocess = {"cifar10": preprocess_cifar10,
                  "celeb_a": preprocess_celeb_a}.get(data.dataset, preprocess_lsun)
    return source, functools.partial(preprocess, image_size=size), 3
  if data.dataset == "digits":
    return load_digits(size, data.digits_fit), identity, 1
  if data.dataset == "image_folder":
    return ImageFolder(data.path, size, data.num_channels), identity, data.num_channels
  images = load_npz(data.path, data.npz_key, size)
  return images, identity, images.shape[-1]


def _checked_source(data: ml_collections.ConfigDict) -> tuple[Sequence, Callable]:
  """`_source` after validating the dataset name, channel count and non-emptiness."""
  choices.check("dataset", data.dataset, DATASETS)
  source, preprocess, channels = _source(data)
  if channels != data.num_channels:
    raise ValueError(f"dataset {data.dataset!r} has {channels} channels but "
                     f"data.num_channels is {data.num_channels}")
  if not len(source):
    raise ValueError(f"dataset {data.dataset!r} is empty")
  return source, preprocess


def create_dataset(data: ml_collections.ConfigDict, global_batch: int, seed: int,
                   num_devices: int | None = None) -> grain.MapDataset:
  """The infinite random-access dataset of this process's batches, one per training step.

  Validates everything it can (dataset name, batch split, channels, empty
  sources) before touching any accelerator. Each epoch is shuffled differently
  but deterministically from `seed`. With several processes, process i holds
  rows [i*b, (i+1)*b) of each global batch (b = global_batch / process count),
  which are the rows its devices hold in the global array, so every process
  count trains on the same global batches in the same order.
  """
  num_processes = jax.process_count()
  check_global_batch(global_batch, num_devices or jax.device_count(), num_processes)
  source, preprocess = _checked_source(data)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(preprocess)
  ds = ds.batch(global_batch // num_processes, drop_remainder=True)
  return ds[jax.process_index()::num_processes]


def device_batches(dataset: grain.MapDataset, start_step: int, steps_per_call: int,
                   sharding: jax.sharding.Sharding, *, num_threads: int = 4,
                   prefetch: int = 2) -> grain.DatasetIterator:
  """Global arrays [steps_per_call, global_batch, H, W, C] from step `start_step` on.

  Host batches are read ahead by `num_threads` grain threads; `prefetch` arrays
  are kept ahead on the devices. `sharding` places the global array; each
  process contributes its own slice of the batch axis (axis 1). Call `close()`
  on the iterator when done to stop the reader threads.
  """
  ds = dataset[start_step:].batch(steps_per_call, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=2 * prefetch))
  ds = ds.map(lambda local: jax.make_array_from_process_local_data(sharding, local))
  return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch))


def evaluation_batches(data: ml_collections.ConfigDict, batch_size: int, *,
                       num_threads: int = 4) -> grain.DatasetIterator:
  """One ordered pass over the whole training set as float32 NHWC batches in [-1, 1].

  For dataset statistics (FID): no shuffling, flips or process sharding; the
  last batch may be smaller.
  """
  source, preprocess = _checked_source(data)
  ds = grain.MapDataset.source(source).map(preprocess).batch(batch_size)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=num_threads)))
