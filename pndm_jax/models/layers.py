"""GroupNorm, conv and dense layers whose per-channel sums are matrix products on CPU.

The gradients of a normalisation's scale and bias, of a bias and of a per-image embedding
added to every pixel all sum a [B, H, W, C] array over its pixels. XLA:CPU runs such a
reduction, which keeps the minor dimension, on one thread that walks the array with a stride
of C, and it fuses the elementwise chain producing the array into that walk: at
[8, 32, 32, 384] it takes ~30 ms, against ~2 ms for the same sums as a product with a vector
of ones (docs/performance.md). These layers take every such sum through `pixel_sums`, which
is that product on CPU and a plain reduction on other backends, with hand-written gradients
where autodiff would make the reduction itself. Their parameters are flax's `nn.GroupNorm`,
`nn.Conv` and `nn.Dense`'s (names, shapes, initialisers, float32), so checkpoints, converters
and initial weights are unchanged.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def sums_by_product(x: jax.Array) -> jax.Array:
  """[B, P, C] -> [B, C]: the sums over P as a product with ones, in at least float32."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.einsum("bp,bpc->bc", jnp.ones(x.shape[:2], x.dtype), x,
                    precision=jax.lax.Precision.HIGHEST, preferred_element_type=dtype)


def sums_by_reduction(x: jax.Array) -> jax.Array:
  """[B, P, C] -> [B, C]: the sums over P as a reduction, in at least float32."""
  return jnp.sum(x, axis=1, dtype=jnp.promote_types(x.dtype, jnp.float32))


def pixel_sums(x: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, C]: each example's per-channel sums over its positions, in at least
  float32; a product with ones on CPU, a reduction elsewhere."""
  x = x.reshape(x.shape[0], -1, x.shape[-1])
  return jax.lax.platform_dependent(x, cpu=sums_by_product, default=sums_by_reduction)


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
  """v [B, C] shaped to broadcast against a [B, ..., C] array of `ndim` axes."""
  return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[1:])


def add_per_example(x: jax.Array, v: jax.Array) -> jax.Array:
  """x [B, ..., C] + v [B, C] (cast to x's dtype) at every position; v's gradient is
  `pixel_sums`'."""
  return _add_per_example(x, v.astype(x.dtype))


@jax.custom_vjp
def _add_per_example(x: jax.Array, v: jax.Array) -> jax.Array:
  return x + _per_example(v, x.ndim)


def _add_per_example_fwd(x, v):
  return _add_per_example(x, v), None


def _add_per_example_bwd(_, dy):
  return dy, pixel_sums(dy).astype(dy.dtype)


_add_per_example.defvjp(_add_per_example_fwd, _add_per_example_bwd)


def add_channel_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x [B, ..., C] + bias [C] (cast to x's dtype), through `add_per_example`."""
  return add_per_example(x, jnp.broadcast_to(bias, (x.shape[0], x.shape[-1])))


def _group_means(sums: jax.Array, groups: int, count: int) -> jax.Array:
  """Per-example channel sums [B, C] -> [B, C]: each channel's group total over `count`."""
  b, c = sums.shape
  means = sums.reshape(b, groups, c // groups).sum(-1) / count
  return jnp.repeat(means, c // groups, axis=-1)


def _group_stats(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
  """Each group's mean and 1 / sqrt(variance + eps) per example and channel, [B, C];
  the variance in two passes, as PyTorch's."""
  count = x[0].size // groups
  mean = _group_means(pixel_sums(x), groups, count)
  var = _group_means(pixel_sums(jnp.square(x - _per_example(mean, x.ndim))), groups, count)
  return mean, jax.lax.rsqrt(var + eps)


def _normalize(x: jax.Array, mean: jax.Array, rstd: jax.Array) -> jax.Array:
  return (x - _per_example(mean, x.ndim)) * _per_example(rstd, x.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               eps: float) -> jax.Array:
  """x [B, ..., C] normalised over each example's positions and the channels of each of
  `groups` channel groups, then * scale + bias per channel; all arrays in one dtype."""
  return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
  mean, rstd = _group_stats(x, groups, eps)
  return _normalize(x, mean, rstd) * scale + bias, (x, mean, rstd, scale)


def _group_norm_bwd(groups, eps, residuals, dy):
  """With x_hat = normalised x and g = dy * scale, the gradient of x is
  rstd (g - mean(g) - x_hat mean(g x_hat)), the means over each example's group."""
  del eps
  x, mean, rstd, scale = residuals
  count = x[0].size // groups
  x_hat = _normalize(x, mean, rstd)
  dbias, dscale = pixel_sums(dy), pixel_sums(dy * x_hat)  # [B, C] each
  mean_g = _group_means(dbias * scale, groups, count)
  mean_g_x_hat = _group_means(dscale * scale, groups, count)
  dx = _per_example(rstd, x.ndim) * (dy * scale - _per_example(mean_g, x.ndim)
                                     - x_hat * _per_example(mean_g_x_hat, x.ndim))
  return dx, dscale.sum(0), dbias.sum(0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """flax's `nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)` over the last axis of
  [B, ..., C] input: statistics and arithmetic in at least float32, the output in `dtype`
  (None: the input's)."""
  num_groups: int
  epsilon: float
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = group_norm(x.astype(compute), scale.astype(compute), bias.astype(compute),
                   self.num_groups, self.epsilon)
    return y.astype(x.dtype if self.dtype is None else self.dtype)


class Conv(nn.Module):
  """flax's `nn.Conv` on NHWC input with a square kernel: kernel [k, k, in, out] (LeCun
  normal) and bias [out] (zeros), float32, computed in `dtype`. `padding` is k // 2 on each
  side (None), an int for each side, or ((top, bottom), (left, right))."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    pad = k // 2 if self.padding is None else self.padding
    pad = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                     (self.strides, self.strides), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return add_channel_bias(y, bias)


class Dense(nn.Module):
  """flax's `nn.Dense` over the last axis of [B, ..., C] input: kernel [C, features] (LeCun
  normal) and bias (zeros), float32, computed in `dtype`."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    return add_channel_bias(y, bias)
