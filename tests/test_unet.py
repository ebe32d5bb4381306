"""The Flax U-Net: size, timestep embedding, dtypes, dropout and the eps_fn adapter.

Forward parity with diffusers/PyTorch lives in test_convert.py (it needs the converter).
"""

import importlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from pndm_jax import models
from pndm_jax.convert import abstract_params
from pndm_jax.models import UNet, eps_fn, unet_from_config
from pndm_jax.models.unet import UpsampledConv, timestep_embedding

TINY = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.5,
            image_size=8)


def _count(model: UNet) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(abstract_params(model)))


def test_cifar10_param_count():
  assert _count(UNet()) == 35_746_307  # the published 35.7M


def test_params_are_float32_for_any_compute_dtype():
  dtypes = {p.dtype for p in jax.tree.leaves(abstract_params(TINY.clone(dtype=jnp.bfloat16)))}
  assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("dim", [32, 33, 128])
def test_timestep_embedding_matches_diffusers(dim):
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers.models import embeddings  # pylint: disable=import-outside-toplevel
  t = np.array([0.0, 1.0, 1.5, 17.0, 499.25, 998.75, 999.0], np.float32)
  want = embeddings.get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=False,
                                           downscale_freq_shift=1).numpy()
  got = np.asarray(timestep_embedding(jnp.asarray(t), dim))
  assert got.shape == (len(t), dim)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)


def test_unet_from_config():
  cfg = get_config().model
  cfg.dtype = "bfloat16"
  model = unet_from_config(cfg, image_size=64, num_channels=1)
  assert model == UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                       dropout=0.1, resamp_with_conv=True, in_channels=1, out_channels=1,
                       image_size=64, dtype=jnp.bfloat16)


@pytest.fixture(scope="module")
def tiny_params():
  """Random params of TINY from numpy (compiling `TINY.init` on CPU takes ~20 s)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
                                 ).astype(np.float32), abstract_params(TINY))


@pytest.fixture(scope="module")
def outputs(tiny_params):
  """TINY's outputs on one batch, every variant the tests compare, from a single compile.

  Compiled at XLA backend optimisation level 0, which halves the compile time on CPU.
  """
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  t = jnp.array([3.0, 700.5])

  def run(params, x, t, keys):
    apply = lambda train, key, **kw: TINY.clone(**kw).apply(  # noqa: E731
        {"params": params}, x, t, train=train, rngs={"dropout": key})
    nchw = eps_fn(TINY, params, data_format="NCHW")(jnp.transpose(x, (0, 3, 1, 2)), t)
    return {
        "eval": [apply(False, k) for k in keys], "train": [apply(True, k) for k in keys],
        "nhwc": eps_fn(TINY, params)(x, t), "nchw": jnp.transpose(nchw, (0, 2, 3, 1)),
        "scalar_t": eps_fn(TINY, params)(x, t[1]),
        "bf16_raw": apply(False, keys[0], dtype=jnp.bfloat16),
        "bf16": eps_fn(TINY.clone(dtype=jnp.bfloat16), params)(x, t),
    }

  keys = [jax.random.key(0), jax.random.key(1)]
  compiled = jax.jit(run).lower(tiny_params, x, t, keys).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return compiled(tiny_params, x, t, keys)


def test_eval_is_deterministic_and_dropout_needs_train(outputs):
  (ev0, ev1), (tr0, tr1) = outputs["eval"], outputs["train"]
  np.testing.assert_array_equal(ev0, ev1)
  assert not np.allclose(tr0, tr1) and not np.allclose(tr0, ev0)


def test_eps_fn_layouts_and_scalar_t(tiny_params, outputs):
  ref = outputs["eval"][0]
  np.testing.assert_allclose(outputs["nhwc"], ref, atol=1e-5)
  np.testing.assert_allclose(outputs["nchw"], ref, atol=1e-5)
  np.testing.assert_allclose(outputs["scalar_t"][1], ref[1], atol=1e-5)  # t broadcast over B
  with pytest.raises(ValueError, match="data_format"):
    eps_fn(TINY, tiny_params, data_format="CHW")


def test_bfloat16_compute_tracks_float32(outputs):
  ref, out = outputs["eval"][0], outputs["bf16"]
  assert outputs["bf16_raw"].dtype == jnp.bfloat16
  assert out.dtype == jnp.float32  # eps_fn casts back to x.dtype
  err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  assert err < 0.05, err


def test_wrong_channel_count_is_an_error(tiny_params):
  with pytest.raises(ValueError, match="input channels"):
    jax.eval_shape(lambda p: TINY.apply({"params": p}, jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,))),
                   tiny_params)


def test_unet_from_config_rejects_a_dtype_typo():
  cfg = get_config().model
  cfg.dtype = "bfloat"
  with pytest.raises(ValueError) as err:
    unet_from_config(cfg, image_size=32, num_channels=3)
  assert str(err.value) == ("config.model.dtype='bfloat' is not valid: not a computation dtype "
                            "the networks support; valid: float32, bfloat16, float16, float64")


@pytest.mark.parametrize("field,value,why", [
    ("ch", 0, "GroupNorm's 32 groups need a positive multiple of 32"),
    ("ch", 48, "GroupNorm's 32 groups"),
    ("ch", 128.0, "GroupNorm's 32 groups"),
    ("ch_mult", (), "not a non-empty sequence of positive integers"),
    ("ch_mult", (1, 0, 2), "not a non-empty sequence of positive integers"),
    ("ch_mult", (1, 2, 2, 2, 4, 4, 4),
     "its 7 levels halve the image 6 times, so image_size 32 would have to be a multiple of 64"),
    ("num_res_blocks", 0, "not a positive integer"),
    ("attn_resolutions", (15,), r"not a sequence of the network's resolutions \(32, 16, 8, 4\)"),
    ("attn_resolutions", (16.0,), "not a sequence of the network's resolutions"),
    ("attn_resolutions", 16, "not a sequence of the network's resolutions"),
    ("dropout", 1.0, r"not a probability in \[0, 1\)"),
    ("dropout", -0.1, r"not a probability in \[0, 1\)"),
    ("resamp_with_conv", "yes", "not a bool"),
    ("dtype", "float", "not a computation dtype"),
])
def test_check_model_config_names_the_bad_field(field, value, why):
  cfg = dict(get_config().model.to_dict(), **{field: value})
  with pytest.raises(ValueError, match=rf"^config\.model\.{field}={re.escape(repr(value))} is "
                     rf"not valid: {why}.*; valid: ."):
    models.check_model_config(cfg, 32, 3)


def test_check_model_config_image_size_and_levels():
  cfg = dict(get_config().model.to_dict(), ch_mult=(1, 2, 2, 2), attn_resolutions=())
  models.check_model_config(cfg, 24, 3)  # 24 -> 12 -> 6 -> 3
  with pytest.raises(ValueError, match=r"ch_mult=\(1, 2, 2, 2\) is not valid: .* multiple of 8; "
                     r"valid: at most 3 levels for image_size 20$"):
    models.check_model_config(cfg, 20, 3)
  for bad in (0, 32.0):
    with pytest.raises(ValueError, match=rf"^image_size={bad!r} is not valid"):
      models.check_model_config(cfg, bad, 3)
  with pytest.raises(ValueError, match=r"^num_channels=0 is not valid"):
    models.check_model_config(cfg, 32, 0)


@pytest.mark.parametrize("name", ["default", "cifar10_pndm", "cifar10_ddpm", "celeba_pndm",
                                  "lsun_church_pndm", "lsun_bedroom_pndm", "digits_train",
                                  "digits_pndm"])
def test_shipped_unet_configs_pass_the_model_check(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.model.name == "unet"
  models.check_model_config(config.model, config.data.image_size, config.data.num_channels)


@pytest.mark.parametrize("size", [1, 4, 5])
def test_upsampled_conv_is_a_conv_of_the_nearest_upsampled_input(x64, size):
  """The four 2x2 phase convs equal nearest-neighbour upsampling then nn.Conv's 3x3 'same'
  conv with the same parameters (float64: to rounding), odd sizes and 1x1 included."""
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3), jnp.float64)
  module = UpsampledConv(4, jnp.float64)
  params = module.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape,
                                                              p.dtype), params)
  upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  expected = nn.Conv(4, (3, 3), padding=1, dtype=jnp.float64).apply(params, upsampled)
  np.testing.assert_allclose(module.apply(params, x), expected, rtol=0, atol=1e-12)
