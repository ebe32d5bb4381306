"""Image grids as PNG files (training sample grids, the sampling CLI)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Model-space images in [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_image_grid(images: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
  """Tiles uint8 NHWC images into one HWC image, `nrow` images per row, with black gaps."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"expected uint8 NHWC images, got {images.dtype} of shape {images.shape}")
  n, h, w, c = images.shape
  cols = max(1, min(nrow, n))
  rows = math.ceil(n / cols)
  grid = np.zeros((padding + rows * (h + padding), padding + cols * (w + padding), c), np.uint8)
  for i, image in enumerate(images):
    top = padding + (i // cols) * (h + padding)
    left = padding + (i % cols) * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def save_image_grid(images: np.ndarray, path: str, nrow: int = 8, padding: int = 2) -> None:
  """Writes uint8 NHWC images (1 or 3 channels) to `path` as one PNG grid."""
  grid = make_image_grid(images, nrow, padding)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
