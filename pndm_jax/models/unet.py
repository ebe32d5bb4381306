"""The DDPM/DDIM epsilon-prediction U-Net (docs/methods.md §8) in Flax linen, NHWC.

Module names follow the DDIM state_dict layout (`down_{i}_block_{j}`, `up_{i}_attn_{j}`, ...) so
that `pndm_jax.convert` maps PyTorch checkpoints onto this tree by name. Parameters are always
float32; `dtype` only sets the computation dtype (bfloat16 on accelerators).
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax.models import config_checks, layers
from pndm_jax.models.prediction import check_prediction_type

# GroupNorm as in DDIM/diffusers: 32 groups, eps 1e-6. Two-pass variance for float32 parity.
_NORM_GROUPS = 32
_NORM_EPS = 1e-6


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding [B] -> [B, dim] (float32) of a possibly fractional t.

  The DDIM/DDPM embedding, as diffusers' `get_timestep_embedding` (flip_sin_to_cos=False,
  freq_shift=1): [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2 - 1)). The frequency table is a
  trace-time constant built with diffusers' float32 operation order and a correctly rounded exp,
  which reproduces PyTorch's table bit for bit at dims 32 and 128; at t ~ 1000 one ulp of w_k moves
  the embedding by ~3e-5.
  """
  half = dim // 2
  exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)
  exponent /= np.float32(half - 1)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def check_input_channels(x: jax.Array, in_channels: int) -> None:
  if x.shape[-1] != in_channels:
    raise ValueError(f"expected {in_channels} input channels (NHWC), got x of shape {x.shape}")


def time_mlp(embedding: jax.Array, ch: int, dtype: Any, names: tuple[str, str]) -> jax.Array:
  """The time embedding [B, 4 ch] from a sinusoidal one: Dense, SiLU, Dense, the two layers
  named as the family's checkpoints name them (call it in a compact method)."""
  emb = nn.Dense(4 * ch, dtype=dtype, name=names[0])(embedding.astype(dtype))
  return nn.Dense(4 * ch, dtype=dtype, name=names[1])(nn.silu(emb))


def _norm(dtype: Any, name: str) -> layers.GroupNorm:
  return layers.GroupNorm(_NORM_GROUPS, _NORM_EPS, dtype, name=name)


class Dropout(nn.Module):
  """flax's `nn.Dropout` (same rng stream, masks and scaling), drawn with a float32 keep rate.

  flax passes `1 - rate` to `jax.random.bernoulli` as a Python float, which draws the mask in
  float64 under `jax_enable_x64`; here the draw is float32 and the scaling in the input's dtype.
  The module name matches flax's (`Dropout_0`), so the masks are flax's draws.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if self.rate == 0.0 or deterministic:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), jnp.float32(keep), x.shape)
    return jax.lax.select(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv twice, timestep embedding added after the first conv."""
  out_ch: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = nn.swish(_norm(self.dtype, "norm1")(x))
    h = layers.Conv(self.out_ch, 3, dtype=self.dtype, name="conv1")(h)
    temb = nn.Dense(self.out_ch, dtype=self.dtype, name="temb_proj")(nn.swish(temb))
    h = layers.add_per_example(h, temb)
    h = nn.swish(_norm(self.dtype, "norm2")(h))
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = layers.Conv(self.out_ch, 3, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = layers.Conv(self.out_ch, 1, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, with a residual connection."""
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = _norm(self.dtype, "norm")(x)
    q, k, v = (layers.Dense(c, self.dtype, name=n)(h).reshape(b, hgt * wid, c)
               for n in ("q", "k", "v"))
    logits = jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hgt, wid, c)
    return x + layers.Dense(c, self.dtype, name="proj_out")(h)


class Downsample(nn.Module):
  """Halves the resolution: pad right/bottom by one then stride-2 3x3 conv, or 2x2 mean pool."""
  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return layers.Conv(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                         name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


# Output row 2i + a of a 3x3 conv of a 2x nearest-upsampled input reads input rows (i - 1, i)
# with kernel rows (w0, w1 + w2) for a = 0, and rows (i, i + 1) with (w0 + w1, w2) for a = 1.
_UPSAMPLED_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


class UpsampledConv(nn.Module):
  """The 3x3 'same' conv of the 2x nearest-upsampled input, computed at the input's resolution.

  Each of the four output phases (row and column parity) is a 2x2 conv of the input with
  summed kernel taps: 16 taps per input pixel instead of 36, the same function (up to float
  rounding) and the same parameters as `nn.Conv` (kernel [3, 3, in, out], bias); see
  docs/performance.md.
  """
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),  # nn.Conv's, float32
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    taps = jnp.asarray(_UPSAMPLED_TAPS, self.dtype)
    phases = [[jax.lax.conv_general_dilated(
        x, jnp.einsum("ik,jl,klco->ijco", taps[a], taps[b], kernel), (1, 1),
        ((1 - a, a), (1 - b, b)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
               for b in range(2)] for a in range(2)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B, H, 2, W, 2, out]
    b, h, _, w, _, c = y.shape
    return layers.add_channel_bias(y.reshape(b, 2 * h, 2 * w, c), bias)


class Upsample(nn.Module):
  """Doubles the resolution: nearest neighbour, then (optionally) a 3x3 conv."""
  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return UpsampledConv(x.shape[-1], self.dtype, name="conv")(x)
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(nn.Module):
  """eps(x, t): x [B, H, W, C] NHWC, t float [B] (or a scalar; fractional t is fine).

  Returns eps in `dtype`. With `train=True` dropout is active and needs a "dropout" rng.
  Attention is placed at the levels whose resolution (from `image_size`) is in
  `attn_resolutions`, as in the DDIM repository.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  in_channels: int = 3
  out_channels: int = 3
  image_size: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    check_input_channels(x, self.in_channels)
    dt = self.dtype
    levels = len(self.ch_mult)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    temb = time_mlp(timestep_embedding(t, self.ch), self.ch, dt, ("temb_dense0", "temb_dense1"))

    def block(h: jax.Array, out_ch: int, name: str) -> jax.Array:
      return ResnetBlock(out_ch, self.dropout, dt, name=name)(h, temb, train)

    hs = [layers.Conv(self.ch, 3, dtype=dt, name="conv_in")(x.astype(dt))]
    res = self.image_size
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = block(hs[-1], self.ch * mult, f"down_{i}_block_{j}")
        if res in self.attn_resolutions:
          h = AttnBlock(dt, name=f"down_{i}_attn_{j}")(h)
        hs.append(h)
      if i != levels - 1:
        hs.append(Downsample(self.resamp_with_conv, dt, name=f"down_{i}_downsample")(hs[-1]))
        res //= 2

    mid_ch = hs[-1].shape[-1]
    h = block(hs[-1], mid_ch, "mid_block_1")
    h = AttnBlock(dt, name="mid_attn_1")(h)
    h = block(h, mid_ch, "mid_block_2")

    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = block(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[i],
                  f"up_{i}_block_{j}")
        if res in self.attn_resolutions:
          h = AttnBlock(dt, name=f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = Upsample(self.resamp_with_conv, dt, name=f"up_{i}_upsample")(h)
        res *= 2

    h = nn.swish(_norm(dt, "norm_out")(h))
    return layers.Conv(self.out_channels, 3, dtype=dt, name="conv_out")(h)


def check_model_config(model_config: Mapping[str, Any], image_size: int, num_channels: int,
                       prefix: str = "config.model.") -> None:
  """Raises a ValueError naming the first `model` field that cannot build a UNet, and why.

  Cheap (no tracing), so the CLI can call it before any compute; `unet_from_config` calls it.
  `image_size` and `num_channels` are the data's; `prefix` names the fields in the message.
  `prediction_type` (what the network outputs) is checked where present: checkpoints do not
  record it.
  """
  get = model_config.__getitem__
  config_checks.check_shared(get, image_size, num_channels, prefix)
  ch = get("ch")
  if not config_checks.is_int(ch) or ch < 1 or ch % _NORM_GROUPS:
    config_checks.fail(prefix, "ch", ch, f"GroupNorm's {_NORM_GROUPS} groups need a positive "
                       f"multiple of {_NORM_GROUPS}", f"{_NORM_GROUPS}, {2 * _NORM_GROUPS}, ... "
                       "(128 in the DDPM/DDIM networks)")
  config_checks.check_bools(get, ("resamp_with_conv",), prefix)
  if "prediction_type" in model_config:
    check_prediction_type(model_config["prediction_type"], f"{prefix}prediction_type")


def unet_from_config(model_cfg: Mapping[str, Any], image_size: int, num_channels: int) -> UNet:
  """Builds the UNet of a config's `model` section (a ConfigDict or dict) for the given data.

  Raises the ValueError of `check_model_config` for a field that cannot build one.
  """
  check_model_config(model_cfg, image_size, num_channels)
  return UNet(
      **config_checks.shared_fields(model_cfg.__getitem__),
      resamp_with_conv=model_cfg["resamp_with_conv"],
      in_channels=num_channels,
      out_channels=num_channels,
      image_size=image_size,
  )
