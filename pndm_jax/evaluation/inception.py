"""pytorch-fid's Inception-v3 (the 2015-12-05 TensorFlow graph) in Flax, NHWC.

FID numbers are only comparable when they come from this exact network: pytorch-fid rebuilds
torchvision's Inception3 with FID-specific blocks (`FIDInceptionA/C/E_1/E_2`: average pools that
ignore the padding, and a max pool in the last block, as the TF graph has), bilinearly resizes every
input to 299x299 (`align_corners=False`, no antialiasing) and returns the 2048-d global average pool
of `Mixed_7c`. This module reproduces that graph; submodule names follow the PyTorch attribute names
so weights map one to one.

Weights are never downloaded. Two files are accepted (see `load_inception`):
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state_dict (needs torch, imported only
    then): `<layer>.conv.weight` (O, I, kh, kw),
    `<layer>.bn.{weight,bias,running_mean,running_var}`; optional `<layer>.bn.num_batches_tracked`
    and the unused classifier `fc.{weight,bias}`.
  * the Flax pickle of the JAX FID ports (matthias-wright/jax-fid,
    `inception_v3_weights_fid.pickle`): a nested dict `{layer: {branch: {"conv": {"kernel":
    (kh, kw, I, O)}, "bn": {"scale", "bias", "mean", "var"}}}}` (stem layers have no branch level);
    optional all-zero `conv.bias` and the unused `fc.{kernel,bias}`.
`<layer>` is e.g. `Conv2d_1a_3x3` or `Mixed_5b.branch1x1`.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
WEIGHTS_CONFIG_FIELD = "config.eval.inception_weights"
PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth")

Variables = dict[str, Any]


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: bias-free conv, BatchNorm(eps=1e-3), ReLU.

  Convolutions run at HIGHEST precision so accelerators compute the float32 network pytorch-fid's
  statistics were made with (no TF32/bf16 passes).
  """

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3/1 average pool, padding 1, padded zeros not counted (FID blocks)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3/1 max pool, padding 1 (the TF graph's quirk in the last block)."""
  return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2))


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: torchvision's InceptionA with a padding-excluding avg pool."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17 (unchanged by pytorch-fid)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 convs, padding-excluding avg pool."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8 (unchanged by pytorch-fid)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (avg pool without padding, `FIDInceptionE_1`) and Mixed_7c (max pool,
  `FIDInceptionE_2`): expanded filter-bank outputs."""

  pool: Callable[[jax.Array], jax.Array]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(self.pool(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array) -> jax.Array:
  """Maps images to what pytorch-fid's network sees: float32 NHWC RGB in [-1, 1] at 299x299.

  uint8 images are scaled as ToTensor then `2x - 1` do; float images must already be in [-1, 1].
  Grey images (C = 1) are repeated to RGB, as PIL's `convert("RGB")` does. Resizing is bilinear with
  half-pixel centres and no antialiasing, which matches `F.interpolate(..., mode="bilinear",
  align_corners=False)`; a 299x299 input is left untouched (torch's identity).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
  if images.dtype == jnp.uint8:
    x = 2.0 * (images.astype(jnp.float32) / 255.0) - 1.0
  else:
    x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), method="bilinear",
                         antialias=False)
  return x


class FIDInceptionV3(nn.Module):
  """Images (N, H, W, C), uint8 or float in [-1, 1] -> (N, 2048) pool features."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = preprocess(images)
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = FIDInceptionA(32, name="Mixed_5b")(x)
    x = FIDInceptionA(64, name="Mixed_5c")(x)
    x = FIDInceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = FIDInceptionC(128, name="Mixed_6b")(x)
    x = FIDInceptionC(160, name="Mixed_6c")(x)
    x = FIDInceptionC(160, name="Mixed_6d")(x)
    x = FIDInceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = FIDInceptionE(_avg_pool_3x3, name="Mixed_7b")(x)
    x = FIDInceptionE(_max_pool_3x3, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------- weights

# Per conv layer: (source suffix, collection, Flax path suffix, kernel?) for the two file layouts;
# "kernel" entries need the torch OIHW -> Flax HWIO transpose.
_TORCH_LAYER = (("conv.weight", "params", ("conv", "kernel"), True),
                ("bn.weight", "params", ("bn", "scale"), False),
                ("bn.bias", "params", ("bn", "bias"), False),
                ("bn.running_mean", "batch_stats", ("bn", "mean"), False),
                ("bn.running_var", "batch_stats", ("bn", "var"), False))
_PICKLE_LAYER = (("conv.kernel", "params", ("conv", "kernel"), False),
                 ("bn.scale", "params", ("bn", "scale"), False),
                 ("bn.bias", "params", ("bn", "bias"), False),
                 ("bn.mean", "batch_stats", ("bn", "mean"), False),
                 ("bn.var", "batch_stats", ("bn", "var"), False))


@functools.cache
def variable_shapes() -> Variables:
  """The module's variables as a tree of ShapeDtypeStructs (no compute)."""
  dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), dummy)


def conv_layer_names() -> list[str]:
  """The dotted names of all 94 BasicConv2d layers, e.g. `Mixed_5b.branch1x1`."""
  names = []

  def walk(tree, prefix):
    if "conv" in tree:
      names.append(".".join(prefix))
      return
    for key, sub in tree.items():
      walk(sub, prefix + (key,))

  walk(variable_shapes()["params"], ())
  return names


def _convert(flat: Mapping[str, np.ndarray], layer_spec, optional) -> Variables:
  """Builds Flax variables from a flat `name -> array` dict.

  Every expected key must be present with the expected shape; keys that are neither expected nor
  accepted by `optional(key, value)` are an error.
  """
  shapes = variable_shapes()
  variables = {"params": {}, "batch_stats": {}}
  expected = set()
  missing, bad_shape = [], []
  for layer in conv_layer_names():
    path = tuple(layer.split("."))
    for suffix, collection, leaf, is_kernel in layer_spec:
      key = f"{layer}.{suffix}"
      expected.add(key)
      if key not in flat:
        missing.append(key)
        continue
      value = np.asarray(flat[key], dtype=np.float32)
      if is_kernel and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
      want = shapes[collection]
      for name in path + leaf:
        want = want[name]
      if value.shape != want.shape:
        bad_shape.append(f"{key}: got {tuple(flat[key].shape)}, expected {want.shape} after "
                         "layout conversion")
        continue
      node = variables[collection]
      for name in path + leaf[:-1]:
        node = node.setdefault(name, {})
      node[leaf[-1]] = value
  unexpected = sorted(k for k in flat if k not in expected and not optional(k, flat[k]))
  problems = []
  for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("wrong shapes", bad_shape)):
    if items:
      shown = ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")
      problems.append(f"{len(items)} {title}: {shown}")
  if problems:
    raise ValueError("Inception weights do not match pytorch-fid's FID Inception-v3: "
                     + "; ".join(problems))
  return variables


def _torch_optional(key: str, value: Any) -> bool:
  del value
  return key in ("fc.weight", "fc.bias") or key.endswith(".bn.num_batches_tracked")


def _pickle_optional(key: str, value: Any) -> bool:
  if key.endswith(".conv.bias"):  # bias-free convs; a non-zero bias is an error
    return not np.any(np.asarray(value))
  return key in ("fc.kernel", "fc.bias")


def variables_from_torch_state_dict(state_dict: Mapping[str, Any]) -> Variables:
  """pytorch-fid state_dict (tensors or arrays) -> Flax variables."""
  flat = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in state_dict.items()}
  return _convert(flat, _TORCH_LAYER, _torch_optional)


def variables_from_flax_pickle(tree: Mapping[str, Any]) -> Variables:
  """jax-fid's nested weights dict -> Flax variables."""
  flat = {}

  def walk(node, prefix):
    for key, sub in node.items():
      name = f"{prefix}.{key}" if prefix else str(key)
      if isinstance(sub, Mapping):
        walk(sub, name)
      else:
        flat[name] = np.asarray(sub)

  walk(tree, "")
  return _convert(flat, _PICKLE_LAYER, _pickle_optional)


def load_inception(weights_path: str) -> tuple[FIDInceptionV3, Variables]:
  """Loads the FID Inception weights file; returns (module, variables).

  `.pth`/`.pt` files are pytorch-fid state_dicts (read with torch); `.pickle`/`.pkl` files are the
  jax-fid Flax pickle.
  """
  if not weights_path or not os.path.isfile(weights_path):
    raise FileNotFoundError(
        f"FID Inception weights file {weights_path!r} not found. Set {WEIGHTS_CONFIG_FIELD} to "
        f"pytorch-fid's pt_inception-2015-12-05-6726825d.pth (published at "
        f"{PYTORCH_FID_WEIGHTS_URL}) or to jax-fid's inception_v3_weights_fid.pickle; nothing is "
        f"downloaded at run time.")
  ext = os.path.splitext(weights_path)[1].lower()
  if ext in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"reading {weights_path} (a PyTorch state_dict) needs torch; install it or use the "
          "jax-fid Flax pickle instead") from e
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    variables = variables_from_torch_state_dict(state_dict)
  elif ext in (".pickle", ".pkl"):
    with open(weights_path, "rb") as f:
      variables = variables_from_flax_pickle(pickle.load(f))
  else:
    raise ValueError(f"unknown Inception weights format {ext!r} for {weights_path}: expected "
                     ".pth/.pt (pytorch-fid) or .pickle/.pkl (jax-fid)")
  return FIDInceptionV3(), variables
