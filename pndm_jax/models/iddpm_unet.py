"""The improved-DDPM U-Net (Nichol & Dhariwal 2021) in Flax linen, NHWC (docs/methods.md §8).

The network PNDM samples for its improved-DDPM CIFAR-10 results: scale-shift ("FiLM") timestep
conditioning, multi-head attention at chosen resolutions, and (with `learn_sigma`) a 2C-channel
output whose FIRST half is eps and second half the variance interpolation. It also covers the
guided-diffusion extensions `num_head_channels` and `resblock_updown` (legacy attention order
only: heads are split before q/k/v, as in improved-diffusion).

Module names mirror the improved-diffusion state_dict (`input_blocks_3_0` <-> `input_blocks.3.0`,
`in_layers_2` <-> `in_layers.2`) so that `pndm_jax.convert_iddpm` maps keys by name. Parameters
are always float32; `dtype` sets the computation dtype, with GroupNorm computed in float32 (as
the original's GroupNorm32) and the attention softmax in float32.
"""

import math
from collections.abc import Mapping
from typing import Any, NoReturn

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax.models import config_checks, layers
from pndm_jax.models.unet import Dropout, UpsampledConv, check_input_channels, time_mlp

# GroupNorm32: 32 groups, PyTorch's default eps, statistics in float32.
_NORM_GROUPS = 32
_NORM_EPS = 1e-5
# Defaults: the improved-DDPM CIFAR-10 network the PNDM paper samples (docs/methods.md §8).
DEFAULTS: dict[str, Any] = dict(
    ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.3,
    resamp_with_conv=True, num_heads=4, num_head_channels=-1, num_heads_upsample=-1,
    use_scale_shift_norm=True, resblock_updown=False, learn_sigma=True, dtype="float32")


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """improved-diffusion's sinusoidal embedding [B] -> [B, dim] (float32), t possibly fractional.

  [cos(t w_k), sin(t w_k)] with w_k = exp(-ln(10000) k / half), half = dim // 2 (cos FIRST, and
  the divisor is half, not half - 1 as in the DDPM embedding); an odd dim is zero-padded. The
  frequency table is built in float32 in PyTorch's operation order with a correctly rounded exp.
  """
  half = dim // 2
  exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)
  exponent /= np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _norm(name: str) -> layers.GroupNorm:
  """GroupNorm32: computed in float32, the output in the input's dtype."""
  return layers.GroupNorm(_NORM_GROUPS, _NORM_EPS, name=name)


def _nearest_up(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_down(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
  """in_layers (norm, SiLU, conv3x3), emb_layers (SiLU, Linear), out_layers (norm, SiLU,
  dropout, conv3x3); scale-shift: norm(h) * (1 + scale) + shift, else h + emb before out_layers.

  `updown` "up"/"down" resamples h (between the in_layers' SiLU and conv) and the skip input,
  without parameters, as guided-diffusion's `resblock_updown`.
  """
  out_ch: int
  dropout: float
  use_scale_shift_norm: bool
  dtype: Any
  updown: str = ""

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    dt = self.dtype
    h = nn.silu(_norm("in_layers_0")(x))
    if self.updown:
      resample = _nearest_up if self.updown == "up" else _avg_down
      h, x = resample(h), resample(x)
    h = layers.Conv(self.out_ch, 3, dtype=dt, name="in_layers_2")(h)
    width = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
    e = nn.Dense(width, dtype=dt, name="emb_layers_1")(nn.silu(emb))
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e[:, None, None, :], 2, axis=-1)
      h = _norm("out_layers_0")(h) * (1 + scale) + shift
    else:
      h = _norm("out_layers_0")(layers.add_per_example(h, e))
    h = Dropout(self.dropout, name="out_layers_2")(nn.silu(h), deterministic=not train)
    h = layers.Conv(self.out_ch, 3, dtype=dt, name="out_layers_3")(h)
    if x.shape[-1] != self.out_ch:
      x = layers.Conv(self.out_ch, 1, dtype=dt, name="skip_connection")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all positions with a residual connection.

  Legacy (improved-diffusion) head order: the 3C qkv channels are [head, (q|k|v), d]; q and k
  are each scaled by d**-1/4 before the product, the softmax is float32.
  """
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"{c} attention channels do not split into {self.num_heads} heads")
    d = c // self.num_heads
    h = _norm("norm")(x).reshape(b, hgt * wid, c)
    qkv = layers.Dense(3 * c, self.dtype, name="qkv")(h)
    qkv = qkv.reshape(b, hgt * wid, self.num_heads, 3, d)
    scale = 1.0 / math.sqrt(math.sqrt(d))
    q, k, v = qkv[:, :, :, 0] * scale, qkv[:, :, :, 1] * scale, qkv[:, :, :, 2]
    logits = jnp.einsum("bthd,bshd->bhts", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    a = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, hgt * wid, c)
    out = layers.Dense(c, self.dtype, name="proj_out")(a)
    return x + out.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """Halves the resolution: stride-2 3x3 conv with padding 1 on each side, or 2x2 mean pool."""
  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return layers.Conv(x.shape[-1], 3, strides=2, dtype=self.dtype, name="op")(x)
    return _avg_down(x)


class Upsample(nn.Module):
  """Doubles the resolution: nearest neighbour, then (optionally) a 3x3 conv."""
  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return UpsampledConv(x.shape[-1], self.dtype, name="conv")(x)
    return _nearest_up(x)


class IDDPMUNet(nn.Module):
  """improved-diffusion's `UNetModel`: out(x, t), x [B, H, W, C] NHWC, t float [B] or a scalar.

  t is the timestep index exactly as improved-diffusion's network receives it (fractional is
  fine). Returns the FULL output [B, H, W, 2C] with `learn_sigma` (eps first, then the variance
  values), else [B, H, W, C], in `dtype`. `train=True` turns dropout on (rng "dropout").
  Attention sits at the `attn_resolutions` (resolutions, e.g. 16 and 8 at image size 32, not
  improved-diffusion's downsample rates) and always in the middle block.
  """
  ch: int = DEFAULTS["ch"]
  ch_mult: tuple[int, ...] = DEFAULTS["ch_mult"]
  num_res_blocks: int = DEFAULTS["num_res_blocks"]
  attn_resolutions: tuple[int, ...] = DEFAULTS["attn_resolutions"]
  dropout: float = DEFAULTS["dropout"]
  resamp_with_conv: bool = DEFAULTS["resamp_with_conv"]
  num_heads: int = DEFAULTS["num_heads"]
  num_head_channels: int = DEFAULTS["num_head_channels"]
  num_heads_upsample: int = DEFAULTS["num_heads_upsample"]
  use_scale_shift_norm: bool = DEFAULTS["use_scale_shift_norm"]
  resblock_updown: bool = DEFAULTS["resblock_updown"]
  learn_sigma: bool = DEFAULTS["learn_sigma"]
  in_channels: int = 3
  image_size: int = 32
  dtype: Any = jnp.float32

  def __post_init__(self) -> None:
    # Sequences as tuples (hashable; e.g. lists from JSON), so modules can key caches.
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
    super().__post_init__()

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def heads(self, width: int, upsample: bool = False) -> int:
    """Attention heads of a `width`-channel attention block (output blocks: `upsample`)."""
    if self.num_head_channels != -1:
      return width // self.num_head_channels
    if upsample and self.num_heads_upsample != -1:
      return self.num_heads_upsample
    return self.num_heads

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    check_input_channels(x, self.in_channels)
    dt = self.dtype
    levels = len(self.ch_mult)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    emb = time_mlp(timestep_embedding(t, self.ch), self.ch, dt, ("time_embed_0", "time_embed_2"))

    def res(h: jax.Array, out_ch: int, name: str, updown: str = "") -> jax.Array:
      return ResBlock(out_ch, self.dropout, self.use_scale_shift_norm, dt, updown,
                      name=name)(h, emb, train)

    def attn(h: jax.Array, name: str, upsample: bool = False) -> jax.Array:
      return AttentionBlock(self.heads(h.shape[-1], upsample), dt, name=name)(h)

    hs = [layers.Conv(self.ch * self.ch_mult[0], 3, dtype=dt,
                      name="input_blocks_0_0")(x.astype(dt))]
    size, k = self.image_size, 1
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res(hs[-1], self.ch * mult, f"input_blocks_{k}_0")
        if size in self.attn_resolutions:
          h = attn(h, f"input_blocks_{k}_1")
        hs.append(h)
        k += 1
      if level != levels - 1:
        if self.resblock_updown:
          h = res(hs[-1], hs[-1].shape[-1], f"input_blocks_{k}_0", "down")
        else:
          h = Downsample(self.resamp_with_conv, dt, name=f"input_blocks_{k}_0")(hs[-1])
        hs.append(h)
        k += 1
        size //= 2

    h = res(hs[-1], hs[-1].shape[-1], "middle_block_0")
    h = attn(h, "middle_block_1")
    h = res(h, h.shape[-1], "middle_block_2")

    k = 0
    for level in reversed(range(levels)):
      for i in range(self.num_res_blocks + 1):
        h = res(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[level],
                f"output_blocks_{k}_0")
        sub = 1
        if size in self.attn_resolutions:
          h = attn(h, f"output_blocks_{k}_1", upsample=True)
          sub = 2
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{k}_{sub}"
          if self.resblock_updown:
            h = res(h, h.shape[-1], name, "up")
          else:
            h = Upsample(self.resamp_with_conv, dt, name=name)(h)
          size *= 2
        k += 1

    h = nn.silu(_norm("out_0")(h))
    return layers.Conv(self.out_channels, 3, dtype=dt, name="out_2")(h)


def _field(model_cfg: Mapping[str, Any], name: str) -> Any:
  return model_cfg[name] if name in model_cfg else DEFAULTS[name]


def check_iddpm_config(model_cfg: Mapping[str, Any], image_size: int, num_channels: int,
                       prefix: str = "config.model.") -> None:
  """Raises a ValueError naming the first field that cannot build an IDDPMUNet, and why.

  Cheap (no tracing). Fields absent from `model_cfg` take their `DEFAULTS` (the PNDM
  improved-DDPM CIFAR-10 network); `image_size` and `num_channels` are the data's.
  """
  get = lambda field: _field(model_cfg, field)

  def fail(field: str, why: str, valid: str) -> NoReturn:
    config_checks.fail(prefix, field, get(field), why, valid)

  resolutions = config_checks.check_shared(get, image_size, num_channels, prefix)
  ch, ch_mult, attn = get("ch"), get("ch_mult"), get("attn_resolutions")
  if not config_checks.is_int(ch) or ch < 1:
    fail("ch", "not a positive integer", f"{_NORM_GROUPS}, {2 * _NORM_GROUPS}, ... (128 for "
         "improved DDPM's CIFAR-10 network)")
  widths = [ch * m for m in ch_mult]
  if any(w % _NORM_GROUPS for w in widths):
    fail("ch", f"the level widths ch * ch_mult = {widths} must be multiples of GroupNorm's "
         f"{_NORM_GROUPS} groups", f"a multiple of {_NORM_GROUPS}, e.g. 128")
  levels = len(ch_mult)
  config_checks.check_bools(get, ("resamp_with_conv", "use_scale_shift_norm", "resblock_updown",
                                  "learn_sigma"), prefix)
  # Attention widths: down and middle blocks use num_heads, up blocks num_heads_upsample.
  down_widths = sorted({ch * ch_mult[i] for i in range(levels) if resolutions[i] in attn}
                       | {widths[-1]})
  up_widths = sorted({ch * ch_mult[i] for i in range(levels) if resolutions[i] in attn})
  head_ch = _field(model_cfg, "num_head_channels")
  if not config_checks.is_int(head_ch) or (head_ch != -1 and head_ch < 1):
    fail("num_head_channels", "neither -1 (use num_heads) nor a positive integer",
         "-1, or a divisor of every attention width")
  if head_ch != -1:
    bad = [w for w in down_widths if w % head_ch]
    if bad:
      fail("num_head_channels", f"does not divide the attention widths {bad}",
           f"-1, or a common divisor of {down_widths}")
  heads = _field(model_cfg, "num_heads")
  if not config_checks.is_int(heads) or heads < 1:
    fail("num_heads", "not a positive integer", "1, 2, 4, ...")
  if head_ch == -1 and any(w % heads for w in down_widths):
    fail("num_heads", f"does not divide the attention widths {down_widths}",
         f"a common divisor of {down_widths}")
  heads_up = _field(model_cfg, "num_heads_upsample")
  if not config_checks.is_int(heads_up) or (heads_up != -1 and heads_up < 1):
    fail("num_heads_upsample", "neither -1 (use num_heads) nor a positive integer",
         "-1, 1, 2, 4, ...")
  if head_ch == -1 and heads_up != -1 and any(w % heads_up for w in up_widths):
    fail("num_heads_upsample", f"does not divide the upsampling attention widths {up_widths}",
         f"-1, or a common divisor of {up_widths}")


def iddpm_from_config(model_cfg: Mapping[str, Any], image_size: int,
                      num_channels: int) -> IDDPMUNet:
  """The IDDPMUNet of a config's `model` section (dict or ConfigDict) for the given data.

  Raises the ValueError of `check_iddpm_config` for a field that cannot build one.
  """
  check_iddpm_config(model_cfg, image_size, num_channels)
  f = lambda name: _field(model_cfg, name)
  return IDDPMUNet(
      **config_checks.shared_fields(f),
      resamp_with_conv=f("resamp_with_conv"),
      num_heads=int(f("num_heads")),
      num_head_channels=int(f("num_head_channels")),
      num_heads_upsample=int(f("num_heads_upsample")),
      use_scale_shift_norm=f("use_scale_shift_norm"),
      resblock_updown=f("resblock_updown"),
      learn_sigma=f("learn_sigma"),
      in_channels=num_channels,
      image_size=image_size,
  )
