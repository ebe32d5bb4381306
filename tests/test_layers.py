"""The networks' GroupNorm, conv and dense layers (pndm_jax/models/layers.py): values and
hand-written gradients against float64 code written here and against flax's own layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pndm_jax.models import layers


def _normal(key: int, shape, dtype=jnp.float32) -> jax.Array:
  return jax.random.normal(jax.random.key(key), shape, dtype)


@pytest.mark.parametrize("sums", [layers.sums_by_product, layers.sums_by_reduction])
def test_both_ways_of_summing_pixels_are_float64_sums(sums):
  x = np.random.default_rng(0).standard_normal((3, 50, 7)).astype(np.float32) + 4.0
  want = x.astype(np.float64).sum(axis=1)
  np.testing.assert_allclose(sums(jnp.asarray(x)), want, rtol=1e-5)
  half = sums(jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.float32  # bfloat16 values summed in float32
  np.testing.assert_allclose(half, x.astype(jnp.bfloat16).astype(np.float64).sum(1), rtol=1e-5)


def test_pixel_sums_of_images_and_of_sequences():
  x = _normal(0, (2, 3, 4, 5))
  np.testing.assert_allclose(layers.pixel_sums(x), x.sum((1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layers.pixel_sums(x.reshape(2, 12, 5)), x.sum((1, 2)), rtol=1e-5,
                             atol=1e-6)


def _numpy_group_norm(x: np.ndarray, scale, bias, groups: int, eps: float) -> np.ndarray:
  """GroupNorm in float64 numpy, two-pass variance."""
  b, c = x.shape[0], x.shape[-1]
  g = x.astype(np.float64).reshape(b, -1, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = np.square(g - mean).mean(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _jnp_group_norm(x, scale, bias, groups: int, eps: float):
  """The same in jnp, differentiated by autodiff."""
  b, c = x.shape[0], x.shape[-1]
  g = x.reshape(b, -1, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
  return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape,groups", [((2, 5, 3, 8), 4), ((3, 6, 12), 3), ((1, 2, 2, 4), 4)])
def test_group_norm_and_its_gradients_in_float64(x64, shape, groups):
  """Values against numpy, gradients of x, scale and bias against autodiff of plain jnp code,
  in float64 with an offset mean (where a one-pass variance would lose digits)."""
  x = 3.0 + _normal(0, shape, jnp.float64) * 0.1
  scale, bias = 1 + _normal(1, shape[-1:], jnp.float64), _normal(2, shape[-1:], jnp.float64)
  cotangent = _normal(3, shape, jnp.float64)
  eps = 1e-6
  got = layers.group_norm(x, scale, bias, groups, eps)
  np.testing.assert_allclose(got, _numpy_group_norm(np.asarray(x), np.asarray(scale),
                                                    np.asarray(bias), groups, eps),
                             rtol=0, atol=1e-12)

  def grads(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, groups, eps) * cotangent),
                            argnums=(0, 1, 2)))(x, scale, bias)

  for name, g, want in zip(("x", "scale", "bias"), grads(layers.group_norm),
                           grads(_jnp_group_norm)):
    assert np.abs(want).max() > 0.1, name
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-9 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, None])
def test_group_norm_module_is_flax_group_norm(dtype):
  """The same parameters as flax's nn.GroupNorm (two-pass variance), the same values and
  gradients (float32 to rounding), statistics in float32 for bfloat16 input."""
  x = 0.5 + _normal(0, (2, 4, 4, 16))
  ours = layers.GroupNorm(8, 1e-6, dtype)
  theirs = nn.GroupNorm(num_groups=8, epsilon=1e-6, use_fast_variance=False, dtype=dtype)
  params = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape,
                                                         theirs.init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + _normal(2, p.shape), params)
  cotangent = _normal(3, x.shape)
  for inputs in (x, x.astype(jnp.bfloat16)):
    y = ours.apply(params, inputs)
    assert y.dtype == (inputs.dtype if dtype is None else dtype)
    exact = y.dtype == inputs.dtype == jnp.float32
    tol = 1e-5 if exact else 2e-2  # bfloat16: a rounding of the output or of x's gradient
    np.testing.assert_allclose(y.astype(jnp.float32),
                               theirs.apply(params, inputs).astype(jnp.float32),
                               rtol=0, atol=tol * 4)

    def grads(module, inputs):
      return jax.jit(jax.grad(
          lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * cotangent),
          argnums=(0, 1)))(params, inputs)

    got, want = grads(ours, inputs), grads(theirs, inputs)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      scale = float(np.abs(np.asarray(w, np.float32)).max())
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=0,
                                 atol=tol * scale)


@pytest.mark.parametrize("kernel,strides,padding", [(3, 1, None), (1, 1, None),
                                                    (3, 2, ((0, 1), (0, 1))), (3, 2, 1)])
def test_conv_is_flax_conv(kernel, strides, padding):
  """Parameters initialised as nn.Conv's (same key, same values), the same outputs and
  gradients."""
  x = _normal(0, (2, 6, 5, 4))
  ours = layers.Conv(8, kernel, strides, padding)
  pad = kernel // 2 if padding is None else padding
  theirs = nn.Conv(8, (kernel, kernel), strides=strides, padding=pad)
  params = ours.init(jax.random.key(1), x)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theirs.init(jax.random.key(1), x))):
    np.testing.assert_array_equal(a, b)
  params = jax.tree.map(lambda p: p + _normal(2, p.shape), params)
  y, want = ours.apply(params, x), theirs.apply(params, x)
  np.testing.assert_allclose(y, want, rtol=0, atol=1e-6 * np.abs(want).max())
  cotangent = _normal(3, y.shape)

  def grads(module):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * cotangent),
                            argnums=(0, 1)))(params, x)

  for g, w in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(theirs))):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (2, 7, 6)])
def test_dense_is_flax_dense(shape):
  x = _normal(0, shape)
  ours, theirs = layers.Dense(5), nn.Dense(5)
  params = ours.init(jax.random.key(1), x)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theirs.init(jax.random.key(1), x))):
    np.testing.assert_array_equal(a, b)
  params = jax.tree.map(lambda p: p + _normal(2, p.shape), params)
  cotangent = _normal(3, shape[:-1] + (5,))

  def run(module):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(module.apply(p, x) * cotangent),
                                      argnums=(0, 1)))(params, x)

  for g, w in zip(jax.tree.leaves(run(ours)), jax.tree.leaves(run(theirs))):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_add_per_example_gradients_and_dtype():
  x, v = _normal(0, (3, 4, 5, 6)), _normal(1, (3, 6))
  cotangent = _normal(2, x.shape)
  got = jax.grad(lambda x, v: jnp.sum(layers.add_per_example(x, v) * cotangent), (0, 1))(x, v)
  want = jax.grad(lambda x, v: jnp.sum((x + v[:, None, None, :]) * cotangent), (0, 1))(x, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # v is added in x's dtype; its gradient comes back in v's
  half = layers.add_per_example(x.astype(jnp.bfloat16), v)
  assert half.dtype == jnp.bfloat16
  dv = jax.grad(lambda v: jnp.sum(layers.add_per_example(x.astype(jnp.bfloat16), v)
                                  .astype(jnp.float32)))(v)
  assert dv.dtype == jnp.float32
  np.testing.assert_allclose(dv, np.full(v.shape, 20.0), rtol=0, atol=0)
