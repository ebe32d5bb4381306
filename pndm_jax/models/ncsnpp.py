"""score_sde's NCSN++ / DDPM++ network (the PNDM paper's "deep, continuous" model) in Flax linen.

NHWC. score_sde's PyTorch model keeps every layer in one flat list `all_modules`, so its
state_dict keys are `all_modules.{i}.{layer}.{leaf}`; here the i-th layer is the submodule
`all_modules_{i}` with the same inner layer names (`GroupNorm_0`, `Conv_0`, `Dense_0`, `NIN_0`,
...), created in the same order, so `pndm_jax.convert_ncsnpp` maps checkpoints by name.
Parameters are float32; `dtype` sets the computation dtype (GroupNorm statistics and the
attention softmax stay float32).

`labels` (the second argument) is exactly score_sde's `time_cond`: for the positional (DDPM++)
embedding the continuous time times 999, for the Fourier (NCSN++ VE) embedding the noise level
sigma. `labels_from_timestep` gives what the PNDM reference passes for a DDPM timestep index.
"""

import math
import numbers
from collections.abc import Mapping
from typing import Any, NoReturn

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pndm_jax.models import config_checks, layers
from pndm_jax.models.unet import Dropout

_EPS = 1e-6
RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("positional", "fourier")


def _groups(channels: int) -> int:
  """score_sde's GroupNorm group count: min(C // 4, 32)."""
  return min(channels // 4, 32)


def _group_norm(channels: int, dtype: Any, name: str) -> layers.GroupNorm:
  return layers.GroupNorm(_groups(channels), _EPS, dtype, name=name)


def positional_embedding(labels: jax.Array, dim: int) -> jax.Array:
  """score_sde's `get_timestep_embedding` [B] -> [B, dim]: [sin, cos], w_k = e^(-ln(1e4) k/(h-1)).

  The frequency table follows PyTorch's float32 operation order (float32 arange times the
  float32-rounded step) with a correctly rounded exp.
  """
  half = dim // 2
  step = np.float32(-math.log(10000.0) / (half - 1))
  freqs = np.exp((np.arange(half, dtype=np.float32) * step).astype(np.float64)).astype(np.float32)
  args = labels.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _fir_kernel(taps: tuple[int, ...], gain: float) -> np.ndarray:
  k = np.asarray(taps, dtype=np.float32)
  k = np.outer(k, k)
  return (k / np.sum(k) * gain).astype(np.float32)


def _upfirdn(x: jax.Array, k: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> jax.Array:
  """StyleGAN2's upfirdn2d on NHWC: zero-insert by `up`, pad, convolve with k, keep every `down`."""
  b, h, w, c = x.shape
  if up > 1:
    x = x.reshape(b, h, 1, w, 1, c)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, up - 1), (0, 0), (0, up - 1), (0, 0)))
    x = x.reshape(b, h * up, w * up, c)
  x = jnp.pad(x, ((0, 0), pad, pad, (0, 0)))
  kernel = jnp.asarray(np.ascontiguousarray(k[::-1, ::-1]), x.dtype)  # a true convolution
  kernel = jnp.tile(kernel[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(x, kernel, (down, down), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=c)


def fir_upsample(x: jax.Array, taps: tuple[int, ...]) -> jax.Array:
  """score_sde's `upsample_2d` (factor 2, gain 1) on NHWC."""
  k = _fir_kernel(taps, 4.0)
  p = k.shape[0] - 2
  return _upfirdn(x, k, 2, 1, ((p + 1) // 2 + 1, p // 2))


def fir_downsample(x: jax.Array, taps: tuple[int, ...]) -> jax.Array:
  """score_sde's `downsample_2d` (factor 2, gain 1) on NHWC."""
  k = _fir_kernel(taps, 1.0)
  p = k.shape[0] - 2
  return _upfirdn(x, k, 1, 2, ((p + 1) // 2, p // 2))


def naive_upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 (score_sde's `naive_upsample_2d` and `F.interpolate(.., 'nearest')`)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def naive_downsample(x: jax.Array) -> jax.Array:
  """2x2 mean (score_sde's `naive_downsample_2d`; also its pad + avg_pool on even sizes)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class NIN(nn.Module):
  """score_sde's NIN: a dense over channels with W [in, out] and b [out] (PyTorch's own layout)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("W", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
    b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.einsum("...c,cd->...d", x, w.astype(self.dtype)) + b.astype(self.dtype)


class FourierProjection(nn.Module):
  """Gaussian Fourier features of log(labels): [sin, cos](2 pi W log sigma), W ~ N(0, scale^2).

  W is fixed in score_sde (requires_grad=False); here it is an ordinary param that checkpoints
  set. Its initial value (N(0, scale^2)) only matters for untrained models.
  """
  size: int
  scale: float

  @nn.compact
  def __call__(self, labels: jax.Array) -> jax.Array:
    w = self.param("W", lambda key, shape: jax.random.normal(key, shape) * self.scale,
                   (self.size,))
    proj = jnp.log(labels.astype(jnp.float32))[:, None] * w[None, :] * 2 * np.pi
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class AttnBlockpp(nn.Module):
  """Single-head self-attention over positions with NIN q/k/v/out (score_sde's AttnBlockpp)."""
  skip_rescale: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = _group_norm(c, self.dtype, "GroupNorm_0")(x)
    q = NIN(c, self.dtype, name="NIN_0")(h)
    k = NIN(c, self.dtype, name="NIN_1")(h)
    v = NIN(c, self.dtype, name="NIN_2")(h)
    w = jnp.einsum("bhwc,bijc->bhwij", q, k).astype(jnp.float32) * (c ** -0.5)
    w = jax.nn.softmax(w.reshape(b, hh, ww, hh * ww), axis=-1).reshape(b, hh, ww, hh, ww)
    h = jnp.einsum("bhwij,bijc->bhwc", w.astype(self.dtype), v)
    h = NIN(c, self.dtype, name="NIN_3")(h)
    return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


def _conv_time_conv(h: jax.Array, temb: jax.Array | None, out_ch: int, dropout: float,
                    dtype: Any, train: bool) -> jax.Array:
  """The middle both residual blocks share: Conv_0, + Dense_0(temb), GroupNorm_1, SiLU,
  Dropout_0, Conv_1 (call it in a block's compact method: the layers are the block's)."""
  h = layers.Conv(out_ch, 3, dtype=dtype, name="Conv_0")(h)
  if temb is not None:
    h = layers.add_per_example(h, nn.Dense(out_ch, dtype=dtype, name="Dense_0")(nn.swish(temb)))
  h = nn.swish(_group_norm(out_ch, dtype, "GroupNorm_1")(h))
  h = Dropout(dropout, name="Dropout_0")(h, deterministic=not train)
  return layers.Conv(out_ch, 3, dtype=dtype, name="Conv_1")(h)


class ResnetBlockDDPMpp(nn.Module):
  """score_sde's ResnetBlockDDPMpp; a NIN shortcut when the channel count changes."""
  out_ch: int
  dropout: float
  skip_rescale: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
    in_ch = x.shape[-1]
    h = nn.swish(_group_norm(in_ch, self.dtype, "GroupNorm_0")(x))
    h = _conv_time_conv(h, temb, self.out_ch, self.dropout, self.dtype, train)
    if in_ch != self.out_ch:
      x = NIN(self.out_ch, self.dtype, name="NIN_0")(x)
    return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
  """score_sde's ResnetBlockBigGANpp: optional up/down (naive or FIR) on both paths, 1x1 skip."""
  out_ch: int
  dropout: float
  skip_rescale: bool
  fir: bool
  fir_kernel: tuple[int, ...]
  up: bool = False
  down: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
    in_ch = x.shape[-1]
    h = nn.swish(_group_norm(in_ch, self.dtype, "GroupNorm_0")(x))
    if self.up:
      resample = (lambda a: fir_upsample(a, self.fir_kernel)) if self.fir else naive_upsample
    elif self.down:
      resample = (lambda a: fir_downsample(a, self.fir_kernel)) if self.fir else naive_downsample
    else:
      resample = None
    if resample is not None:
      h, x = resample(h), resample(x)
    h = _conv_time_conv(h, temb, self.out_ch, self.dropout, self.dtype, train)
    if in_ch != self.out_ch or self.up or self.down:
      x = layers.Conv(self.out_ch, 1, dtype=self.dtype, name="Conv_2")(x)
    return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


class Upsample(nn.Module):
  """score_sde's layerspp.Upsample without FIR: nearest x2, then an optional 3x3 conv."""
  out_ch: int
  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = naive_upsample(x)
    return layers.Conv(self.out_ch, 3, dtype=self.dtype, name="Conv_0")(h) if self.with_conv else h


class Downsample(nn.Module):
  """score_sde's layerspp.Downsample: pad (0, 1) + stride-2 3x3 conv, 2x2 mean, or FIR."""
  out_ch: int
  with_conv: bool
  fir: bool
  fir_kernel: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.fir:
      if self.with_conv:  # conv_downsample_2d: FIR blur with padding 2, then a stride-2 3x3 conv
        k = _fir_kernel(self.fir_kernel, 1.0)
        p = (k.shape[0] - 2) + 2
        h = _upfirdn(x, k, 1, 1, ((p + 1) // 2, p // 2))
        return layers.Conv(self.out_ch, 3, strides=2, padding=0, dtype=self.dtype,
                           name="Conv2d_0")(h)
      return fir_downsample(x, self.fir_kernel)
    if self.with_conv:
      return layers.Conv(self.out_ch, 3, strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                         name="Conv_0")(x)
    return naive_downsample(x)


class Combine(nn.Module):
  """score_sde's Combine: a 1x1 conv of the pyramid input, then summed with or prepended to h."""
  out_ch: int
  method: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    h = layers.Conv(self.out_ch, 1, dtype=self.dtype, name="Conv")(x)
    return jnp.concatenate([h, y], axis=-1) if self.method == "cat" else h + y


class NCSNpp(nn.Module):
  """score_sde's NCSNpp (NCSN++ / DDPM++), NHWC; `labels` is score_sde's `time_cond`.

  Field names follow score_sde's `config.model` (`ch` is `nf`); the defaults are the DDPM++ deep
  continuous CIFAR-10 model of the PNDM paper (docs/methods.md §8).
  Only the swish nonlinearity exists (all score_sde configs use it). Unsupported: FIR with a
  convolution on the upsampling side (score_sde_pytorch's `upsample_conv_2d` cannot run: it
  slices with a negative step), `scale_by_sigma` with the positional embedding (it needs the
  discrete sigma table of NCSN models). Module i of score_sde's `all_modules` is `all_modules_{i}`.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 8
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive: str = "none"
  progressive_input: str = "none"
  progressive_combine: str = "sum"
  embedding_type: str = "positional"
  fourier_scale: float = 16.0
  centered: bool = True
  conditional: bool = True
  scale_by_sigma: bool = False
  in_channels: int = 3
  image_size: int = 32
  dtype: Any = jnp.float32

  def _validate(self) -> None:
    for name, value, valid in (("resblock_type", self.resblock_type, RESBLOCK_TYPES),
                               ("progressive", self.progressive, PROGRESSIVE),
                               ("progressive_input", self.progressive_input, PROGRESSIVE_INPUT),
                               ("progressive_combine", self.progressive_combine, COMBINE),
                               ("embedding_type", self.embedding_type, EMBEDDING_TYPES)):
      if value not in valid:
        raise ValueError(f"NCSNpp.{name}={value!r} is not valid; valid: {', '.join(valid)}")
    why = _unsupported(self.fir, self.resamp_with_conv, self.resblock_type, self.progressive,
                       self.scale_by_sigma, self.embedding_type)
    if why:
      raise ValueError(f"NCSNpp: {why}")

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
    self._validate()
    dt = self.dtype
    nf = self.ch
    levels = len(self.ch_mult)
    counter = iter(range(10 ** 6))
    name = lambda: f"all_modules_{next(counter)}"
    labels = jnp.broadcast_to(jnp.asarray(labels), (x.shape[0],))

    def resblock(h, temb, out_ch=None, up=False, down=False):
      out_ch = out_ch or h.shape[-1]
      if self.resblock_type == "ddpm":
        block = ResnetBlockDDPMpp(out_ch, self.dropout, self.skip_rescale, dt, name=name())
      else:
        block = ResnetBlockBigGANpp(out_ch, self.dropout, self.skip_rescale, self.fir,
                                    tuple(self.fir_kernel), up, down, dt, name=name())
      return block(h, temb, train)

    def attn(h):
      return AttnBlockpp(self.skip_rescale, dt, name=name())(h)

    if self.embedding_type == "fourier":
      temb = FourierProjection(nf, self.fourier_scale, name=name())(labels)
    else:
      temb = positional_embedding(labels, nf)
    if self.conditional:
      temb = nn.Dense(nf * 4, dtype=dt, name=name())(temb.astype(dt))
      temb = nn.Dense(nf * 4, dtype=dt, name=name())(nn.swish(temb))
    else:
      temb = None

    x = x.astype(dt)
    if not self.centered:
      x = 2 * x - 1.0
    input_pyramid = x if self.progressive_input != "none" else None

    hs = [layers.Conv(nf, 3, dtype=dt, name=name())(x)]
    for i_level in range(levels):
      for _ in range(self.num_res_blocks):
        h = resblock(hs[-1], temb, nf * self.ch_mult[i_level])
        if h.shape[2] in self.attn_resolutions:
          h = attn(h)
        hs.append(h)
      if i_level != levels - 1:
        if self.resblock_type == "ddpm":
          h = Downsample(hs[-1].shape[-1], self.resamp_with_conv, self.fir,
                         tuple(self.fir_kernel), dt, name=name())(hs[-1])
        else:
          h = resblock(hs[-1], temb, down=True)
        if self.progressive_input == "input_skip":
          input_pyramid = Downsample(input_pyramid.shape[-1], False, self.fir,
                                     tuple(self.fir_kernel), dt, name=name())(input_pyramid)
          h = Combine(h.shape[-1], self.progressive_combine, dt, name=name())(input_pyramid, h)
        elif self.progressive_input == "residual":
          input_pyramid = Downsample(h.shape[-1], True, self.fir, tuple(self.fir_kernel), dt,
                                     name=name())(input_pyramid)
          input_pyramid = input_pyramid + h
          if self.skip_rescale:
            input_pyramid = input_pyramid / np.sqrt(2.0)
          h = input_pyramid
        hs.append(h)

    h = resblock(hs[-1], temb)
    h = attn(h)
    h = resblock(h, temb)

    pyramid = None
    for i_level in reversed(range(levels)):
      for _ in range(self.num_res_blocks + 1):
        h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), temb, nf * self.ch_mult[i_level])
      if h.shape[2] in self.attn_resolutions:
        h = attn(h)
      if self.progressive != "none":
        c = h.shape[-1]
        if i_level == levels - 1:
          pyramid = nn.swish(_group_norm(c, dt, name())(h))
          out = self.in_channels if self.progressive == "output_skip" else c
          pyramid = layers.Conv(out, 3, dtype=dt, name=name())(pyramid)
        elif self.progressive == "output_skip":
          name()  # score_sde's parameterless pyramid upsampler still takes an index
          pyramid = fir_upsample(pyramid, tuple(self.fir_kernel)) if self.fir \
              else naive_upsample(pyramid)
          pyramid_h = nn.swish(_group_norm(c, dt, name())(h))
          pyramid = pyramid + layers.Conv(self.in_channels, 3, dtype=dt, name=name())(pyramid_h)
        else:  # residual
          pyramid = Upsample(c, True, dt, name=name())(pyramid)
          pyramid = pyramid + h
          if self.skip_rescale:
            pyramid = pyramid / np.sqrt(2.0)
          h = pyramid
      if i_level != 0:
        if self.resblock_type == "ddpm":
          h = Upsample(h.shape[-1], self.resamp_with_conv, dt, name=name())(h)
        else:
          h = resblock(h, temb, up=True)

    if self.progressive == "output_skip":
      h = pyramid
    else:
      h = nn.swish(_group_norm(h.shape[-1], dt, name())(h))
      h = layers.Conv(self.in_channels, 3, dtype=dt, name=name())(h)
    if self.scale_by_sigma:
      h = h / labels.astype(h.dtype)[:, None, None, None]
    return h


def _unsupported(fir: bool, resamp_with_conv: bool, resblock_type: str, progressive: str,
                 scale_by_sigma: bool, embedding_type: str) -> str | None:
  """Why a combination cannot be built here (None if it can)."""
  if fir and progressive == "residual":
    return ("fir=True with progressive='residual' needs score_sde's FIR upsampling convolution "
            "(upsample_conv_2d), which score_sde_pytorch cannot run; not supported")
  if fir and resblock_type == "ddpm" and resamp_with_conv:
    return ("fir=True with resblock_type='ddpm' and resamp_with_conv=True needs score_sde's FIR "
            "upsampling convolution (upsample_conv_2d), which score_sde_pytorch cannot run; "
            "not supported")
  if scale_by_sigma and embedding_type != "fourier":
    return ("scale_by_sigma=True is supported only with embedding_type='fourier' (labels are the "
            "sigmas); with 'positional' it needs NCSN's discrete sigma table")
  return None



def _norm_widths(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 progressive_input: str, combine: str) -> set[int]:
  """Every channel count a GroupNorm sees (score_sde's hs_c bookkeeping)."""
  widths = set()
  hs_c = [ch]
  in_ch = ch
  for i, m in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      widths.update((in_ch, ch * m))
      in_ch = ch * m
      hs_c.append(in_ch)
    if i != len(ch_mult) - 1:
      widths.add(in_ch)
      if progressive_input == "input_skip" and combine == "cat":
        in_ch *= 2
      hs_c.append(in_ch)
  in_ch = hs_c[-1]
  widths.add(in_ch)
  for i in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      widths.add(in_ch + hs_c.pop())
      in_ch = ch * ch_mult[i]
      widths.add(in_ch)
  return widths


# Fields of config.model with their defaults when absent (the NCSNpp defaults).
_DEFAULTS = {f: NCSNpp.__dataclass_fields__[f].default for f in (
    "resamp_with_conv", "fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive",
    "progressive_input", "progressive_combine", "embedding_type", "fourier_scale", "centered",
    "conditional", "scale_by_sigma")}
_REQUIRED = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "dtype")


def _get(model_cfg: Mapping[str, Any], field: str) -> Any:
  return model_cfg[field] if field in model_cfg else _DEFAULTS[field]


def check_ncsnpp_config(model_cfg: Mapping[str, Any], image_size: int, num_channels: int,
                        prefix: str = "config.model.") -> None:
  """Raises a ValueError naming the first `model` field that cannot build an NCSNpp, and why.

  Cheap (no tracing). Required: ch, ch_mult, num_res_blocks, attn_resolutions, dropout, dtype;
  the rest default to the DDPM++ deep continuous values. `nonlinearity` (if present) must be
  'swish'; `init_scale` is accepted and ignored (initialisation only).
  """
  def fail(field: str, value: Any, why: str, valid: str) -> NoReturn:
    config_checks.fail(prefix, field, value, why, valid)

  for field in _REQUIRED:
    if field not in model_cfg:
      raise ValueError(f"{prefix}{field} is missing: NCSNpp needs it; valid: see "
                       "pndm_jax.models.ncsnpp.NCSNpp")
  config_checks.check_shared(model_cfg.__getitem__, image_size, num_channels, prefix)
  ch = model_cfg["ch"]
  if not config_checks.is_int(ch) or ch < 4 or ch % 4:
    fail("ch", ch, "GroupNorm's min(C // 4, 32) groups need a positive multiple of 4",
         "4, 8, ... (128 in the score_sde CIFAR-10 models)")
  config_checks.check_bools(lambda field: _get(model_cfg, field),
                            ("resamp_with_conv", "fir", "skip_rescale", "centered", "conditional",
                             "scale_by_sigma"), prefix)
  taps = _get(model_cfg, "fir_kernel")
  if (not isinstance(taps, (tuple, list)) or len(taps) < 2 or len(taps) % 2
      or not all(isinstance(t, numbers.Real) for t in taps) or sum(taps) == 0):
    fail("fir_kernel", taps, "not an even-length sequence of numbers with a non-zero sum",
         "e.g. (1, 3, 3, 1)")
  for field, valid in (("resblock_type", RESBLOCK_TYPES), ("progressive", PROGRESSIVE),
                       ("progressive_input", PROGRESSIVE_INPUT),
                       ("progressive_combine", COMBINE), ("embedding_type", EMBEDDING_TYPES)):
    value = _get(model_cfg, field)
    if not isinstance(value, str) or value.lower() not in valid:
      fail(field, value, "not one of score_sde's choices", ", ".join(valid))
  scale = _get(model_cfg, "fourier_scale")
  if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not scale > 0:
    fail("fourier_scale", scale, "not a positive number", "e.g. 16.0")
  if "nonlinearity" in model_cfg and str(model_cfg["nonlinearity"]).lower() != "swish":
    fail("nonlinearity", model_cfg["nonlinearity"], "NCSN++/DDPM++ use swish only", "'swish'")
  if "conv_size" in model_cfg and model_cfg["conv_size"] != 3:
    fail("conv_size", model_cfg["conv_size"], "score_sde's NCSNpp uses 3x3 convolutions", "3")
  why = _unsupported(_get(model_cfg, "fir"), _get(model_cfg, "resamp_with_conv"),
                     _get(model_cfg, "resblock_type").lower(),
                     _get(model_cfg, "progressive").lower(), _get(model_cfg, "scale_by_sigma"),
                     _get(model_cfg, "embedding_type").lower())
  if why:
    field = "scale_by_sigma" if why.startswith("scale_by_sigma") else "fir"
    fail(field, _get(model_cfg, field), why, "a combination NCSNpp supports (fir=False does)")
  for width in sorted(_norm_widths(ch, tuple(model_cfg["ch_mult"]), model_cfg["num_res_blocks"],
                                   _get(model_cfg, "progressive_input").lower(),
                                   _get(model_cfg, "progressive_combine").lower())):
    if width % _groups(width):
      fail("ch", ch, f"a GroupNorm over {width} channels has min({width} // 4, 32) = "
           f"{_groups(width)} groups, which do not divide it", "a multiple of 32, e.g. 128")


def ncsnpp_from_config(model_cfg: Mapping[str, Any], image_size: int,
                       num_channels: int) -> NCSNpp:
  """Builds the NCSNpp of a config's `model` section (dict or ConfigDict) for the given data.

  Raises the ValueError of `check_ncsnpp_config` for a field that cannot build one.
  """
  check_ncsnpp_config(model_cfg, image_size, num_channels)
  return NCSNpp(
      **config_checks.shared_fields(model_cfg.__getitem__),
      resamp_with_conv=_get(model_cfg, "resamp_with_conv"),
      fir=_get(model_cfg, "fir"),
      fir_kernel=tuple(_get(model_cfg, "fir_kernel")),
      skip_rescale=_get(model_cfg, "skip_rescale"),
      resblock_type=_get(model_cfg, "resblock_type").lower(),
      progressive=_get(model_cfg, "progressive").lower(),
      progressive_input=_get(model_cfg, "progressive_input").lower(),
      progressive_combine=_get(model_cfg, "progressive_combine").lower(),
      embedding_type=_get(model_cfg, "embedding_type").lower(),
      fourier_scale=float(_get(model_cfg, "fourier_scale")),
      centered=_get(model_cfg, "centered"),
      conditional=_get(model_cfg, "conditional"),
      scale_by_sigma=_get(model_cfg, "scale_by_sigma"),
      in_channels=num_channels,
      image_size=image_size,
  )


def labels_from_timestep(t: jax.Array, num_timesteps: int, embedding_type: str) -> jax.Array:
  """The `time_cond` the PNDM reference feeds score_sde's network for DDPM timestep index t.

  The reference's DDIM/PNDM methods call the network with the float timestep index itself and
  use its output as eps; its probability flow calls it with t_c (N - 1) for continuous t_c and
  takes score = -output / std(t_c), as score_sde's VP models do (labels = 999 t_c). So the
  labels are t itself (float32), index t is continuous time t / (N - 1), and the output is eps
  (docs/methods.md §8). Only the positional (VP, DDPM++) embedding takes such labels; Fourier
  (VE NCSN++) models take sigma, so 'fourier' raises.
  """
  if embedding_type != "positional":
    raise ValueError(f"embedding_type={embedding_type!r}: only 'positional' (VP DDPM++) models are "
                     "conditioned on a DDPM timestep; 'fourier' (VE NCSN++) models take sigma")
  if not config_checks.is_int(num_timesteps) or num_timesteps < 2:
    raise ValueError(f"num_timesteps={num_timesteps!r} is not valid: need an integer >= 2")
  return jnp.asarray(t, jnp.float32)
