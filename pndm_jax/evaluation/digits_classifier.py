"""A small CNN on scikit-learn's 8x8 digits whose features give "FD-digits".

The digits model has no Inception statistics (and Inception features of 8x8 grey digits would be
meaningless), so its samples are scored with the same Frechet machinery on the 64-d penultimate
features of this classifier. FD-digits values are only comparable when made with the same params
file (its SHA-256 is recorded); they are not FID.

Inputs: (N, H, W) or (N, H, W, 1) images, uint8 in [0, 255] or float in [-1, 1]; anything but 8x8 is
resized to 8x8 (linear, antialiased) at the boundary, so 16x16 digit samples (digits resized up) are
accepted too; digits padded onto a larger canvas would be shrunk, not cropped. The training data is
`sklearn.datasets.load_digits` (pixel values 0..16) scaled to [-1, 1].
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization

from pndm_jax import input_pipeline

IMAGE_SIZE = 8
FEATURE_DIM = 64
NUM_CLASSES = 10
SPLIT_SEED = 0      # the train/held-out split is fixed, whatever the init seed
HELD_OUT_FRACTION = 0.2

Params = dict


class DigitsCNN(nn.Module):
  """conv3x3(16) - avgpool2 - conv3x3(32) - dense(64) [features] - relu - dense(10).

  Tiny on purpose: it trains in seconds on a CPU and still reaches ~98% held-out accuracy. The
  features are the dense(64) pre-activations, which (unlike post-ReLU ones) have no dead,
  zero-variance coordinates.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[-1, 1] images (N, 8, 8, 1) -> (features (N, 64), logits (N, 10))."""
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    feats = nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1))
    return feats, nn.Dense(NUM_CLASSES)(nn.relu(feats))


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [-1, 1] grey images -> float32 (N, 8, 8, 1)."""
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"expected grey (N, H, W[, 1]) images, got {images.shape}")
  if images.dtype == jnp.uint8:
    x = 2.0 * (images.astype(jnp.float32) / 255.0) - 1.0
  else:
    x = images.astype(jnp.float32)
  if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), "linear")
  return x


def features(params: Params, images: jax.Array) -> jax.Array:
  """FD-digits features: the classifier's 64-d penultimate activations."""
  return DigitsCNN().apply({"params": params}, preprocess(images))[0]


def logits(params: Params, images: jax.Array) -> jax.Array:
  """Class logits (N, 10), for the accuracy check."""
  return DigitsCNN().apply({"params": params}, preprocess(images))[1]


def digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """A fixed (train, held-out) split of the digits, 80% / 20%."""
  x, y = input_pipeline.digits_with_labels()
  order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  n_test = int(round(HELD_OUT_FRACTION * len(x)))
  test, train = order[:n_test], order[n_test:]
  return (x[train], y[train]), (x[test], y[test])


def train_digits_classifier(seed: int = 0, num_steps: int = 400, batch_size: int = 64,
                            lr: float = 3e-3) -> Params:
  """Trains the classifier on the training split (seconds on a CPU)."""
  (x, y), _ = digits_split()
  x, y = jnp.asarray(x), jnp.asarray(y)
  init_key, data_key = jax.random.split(jax.random.key(seed))
  params = DigitsCNN().init(init_key, x[:1])["params"]
  tx = optax.adam(lr)

  def loss_fn(p, xb, yb):
    out = DigitsCNN().apply({"params": p}, xb)[1]
    return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()

  def step(carry, key):
    p, opt_state = carry
    idx = jax.random.choice(key, len(x), (batch_size,), replace=False)
    grads = jax.grad(loss_fn)(p, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  keys = jax.random.split(data_key, num_steps)
  (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, tx.init(params)), keys)
  return jax.tree.map(np.asarray, params)


def accuracy(params: Params, images: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of the classifier on `images`."""
  pred = np.asarray(jnp.argmax(jax.jit(logits)(params, images), axis=-1))
  return float(np.mean(pred == labels))


def save_digits_classifier(path: str, params: Params) -> None:
  """Writes the params as msgpack (atomically)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
  os.replace(tmp, path)


def load_digits_classifier(path: str) -> Params:
  """Reads a params file written by `save_digits_classifier`, checking shapes."""
  with open(path, "rb") as f:
    params = serialization.msgpack_restore(f.read())
  dummy = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32)
  want = jax.eval_shape(DigitsCNN().init, jax.random.key(0), dummy)["params"]
  got_shapes = jax.tree.map(np.shape, params)
  want_shapes = jax.tree.map(lambda s: s.shape, want)
  if got_shapes != want_shapes:
    raise ValueError(f"{path} is not a DigitsCNN params file")
  return params


def load_or_train_digits_classifier(path: str, seed: int = 0) -> Params:
  """Loads `path`, or trains with `seed` and saves there so every later statistics/evaluation run
  uses the very same classifier."""
  if not path:
    raise ValueError("FD-digits needs a classifier params path (it is created on first use)")
  if os.path.isfile(path):
    return load_digits_classifier(path)
  logging.info("training the FD-digits classifier (seed %d) -> %s", seed, path)
  params = train_digits_classifier(seed)
  save_digits_classifier(path, params)
  return params
