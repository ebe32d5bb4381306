"""The improved-DDPM U-Net and its improved-diffusion checkpoint converter.

The reference is an independent PyTorch implementation of improved-diffusion's `UNetModel`
written below (with guided-diffusion's `num_head_channels`, `resblock_updown` and parameter-free
2x2 mean-pool downsampling), laid out so that its `state_dict()` keys are the original's. Random
weights (every layer non-zero, norms included) are converted and the outputs compared.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pndm_jax import convert_iddpm
from pndm_jax.convert import CheckpointError, abstract_params
from pndm_jax.models.iddpm_unet import IDDPMUNet, check_iddpm_config, iddpm_from_config

# ----------------------------------------------------------------------------- torch reference


class _Norm(nn.GroupNorm):
  """32-group norm evaluated in float32."""

  def __init__(self, channels):
    super().__init__(32, channels)

  def forward(self, x):
    return super().forward(x.float()).type(x.dtype)


def _sinusoid(t, dim):
  half = dim // 2
  w = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
  a = t.float()[:, None] * w[None]
  e = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
  return F.pad(e, (0, dim % 2))


class _Res(nn.Module):
  def __init__(self, cin, emb, cout, scale_shift, updown=""):
    super().__init__()
    self.scale_shift, self.updown = scale_shift, updown
    self.in_layers = nn.Sequential(_Norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
    self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout * (2 if scale_shift else 1)))
    self.out_layers = nn.Sequential(_Norm(cout), nn.SiLU(), nn.Dropout(0.0),
                                    nn.Conv2d(cout, cout, 3, padding=1))
    self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

  def forward(self, x, emb):
    h = self.in_layers[1](self.in_layers[0](x))
    if self.updown == "up":
      h, x = (F.interpolate(v, scale_factor=2, mode="nearest") for v in (h, x))
    elif self.updown == "down":
      h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = self.in_layers[2](h)
    e = self.emb_layers(emb)[:, :, None, None]
    if self.scale_shift:
      scale, shift = e.chunk(2, dim=1)
      h = self.out_layers[0](h) * (1 + scale) + shift
    else:
      h = self.out_layers[0](h + e)
    for layer in self.out_layers[1:]:
      h = layer(h)
    return self.skip_connection(x) + h


class _Attn(nn.Module):
  def __init__(self, channels, heads):
    super().__init__()
    self.heads = heads
    self.norm = _Norm(channels)
    self.qkv = nn.Conv1d(channels, 3 * channels, 1)
    self.proj_out = nn.Conv1d(channels, channels, 1)

  def forward(self, x):
    b, c, hgt, wid = x.shape
    x = x.reshape(b, c, hgt * wid)
    d = c // self.heads
    qkv = self.qkv(self.norm(x)).reshape(b * self.heads, 3 * d, hgt * wid)
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    s = d ** -0.25
    w = torch.softmax(torch.einsum("nct,ncs->nts", q * s, k * s).float(), dim=-1)
    a = torch.einsum("nts,ncs->nct", w, v).reshape(b, c, hgt * wid)
    return (x + self.proj_out(a)).reshape(b, c, hgt, wid)


class _Up(nn.Module):
  def __init__(self, channels, use_conv):
    super().__init__()
    if use_conv:
      self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return self.conv(x) if hasattr(self, "conv") else x


class _Down(nn.Module):
  def __init__(self, channels, use_conv):
    super().__init__()
    self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

  def forward(self, x):
    return self.op(x)


class _Seq(nn.Sequential):
  def forward(self, x, emb):
    for layer in self:
      x = layer(x, emb) if isinstance(layer, _Res) else layer(x)
    return x


class TorchUNet(nn.Module):
  """improved-diffusion's UNetModel; `rates` are downsample rates (as the original takes)."""

  def __init__(self, in_ch, ch, out_ch, nrb, rates, ch_mult, conv_resample=True, num_heads=1,
               num_head_channels=-1, num_heads_upsample=-1, scale_shift=False, updown=False):
    super().__init__()
    self.ch = ch
    heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample

    def attn(c, heads):
      return _Attn(c, c // num_head_channels if num_head_channels != -1 else heads)

    emb = 4 * ch
    res = lambda cin, cout, ud="": _Res(cin, emb, cout, scale_shift, ud)
    self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
    c = ch * ch_mult[0]
    self.input_blocks = nn.ModuleList([_Seq(nn.Conv2d(in_ch, c, 3, padding=1))])
    skips, ds = [c], 1
    for level, mult in enumerate(ch_mult):
      for _ in range(nrb):
        layers = [res(c, ch * mult)]
        c = ch * mult
        if ds in rates:
          layers.append(attn(c, num_heads))
        self.input_blocks.append(_Seq(*layers))
        skips.append(c)
      if level != len(ch_mult) - 1:
        self.input_blocks.append(_Seq(res(c, c, "down") if updown else _Down(c, conv_resample)))
        skips.append(c)
        ds *= 2
    self.middle_block = _Seq(res(c, c), attn(c, num_heads), res(c, c))
    self.output_blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(ch_mult))):
      for i in range(nrb + 1):
        layers = [res(c + skips.pop(), ch * mult)]
        c = ch * mult
        if ds in rates:
          layers.append(attn(c, heads_up))
        if level and i == nrb:
          layers.append(res(c, c, "up") if updown else _Up(c, conv_resample))
          ds //= 2
        self.output_blocks.append(_Seq(*layers))
    self.out = nn.Sequential(_Norm(c), nn.SiLU(), nn.Conv2d(ch * ch_mult[0], out_ch, 3, padding=1))

  def forward(self, x, t):
    emb = self.time_embed(_sinusoid(t, self.ch))
    hs, h = [], x
    for block in self.input_blocks:
      h = block(h, emb)
      hs.append(h)
    h = self.middle_block(h, emb)
    for block in self.output_blocks:
      h = block(torch.cat([h, hs.pop()], dim=1), emb)
    return self.out(h)


def torch_model(m: IDDPMUNet, seed: int = 0) -> TorchUNet:
  """The reference network of a Flax one, with random non-zero weights (norms included)."""
  torch.manual_seed(seed)
  rates = [m.image_size // r for r in m.attn_resolutions]
  net = TorchUNet(m.in_channels, m.ch, m.out_channels, m.num_res_blocks, rates, m.ch_mult,
                  m.resamp_with_conv, m.num_heads, m.num_head_channels, m.num_heads_upsample,
                  m.use_scale_shift_norm, m.resblock_updown)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if p.ndim == 1:  # norms and biases: away from the identity / zero init
        p.copy_(0.1 * torch.randn_like(p) + (1.0 if _is_norm(net, name) else 0.0))
  return net.eval()


def _is_norm(net, name):
  return isinstance(net.get_submodule(name.rsplit(".", 1)[0]), nn.GroupNorm)


def numpy_sd(net: nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- configs

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, dropout=0.0, image_size=16)
CONFIGS = {
    # PNDM's improved-DDPM CIFAR-10 network in tiny form.
    "pndm_cifar10": IDDPMUNet(**TINY, attn_resolutions=(8,), num_heads=2,
                              use_scale_shift_norm=True, learn_sigma=True),
    "head_channels": IDDPMUNet(**TINY, attn_resolutions=(16,), num_head_channels=16,
                               use_scale_shift_norm=True, learn_sigma=True),
    "resblock_updown": IDDPMUNet(**TINY, attn_resolutions=(8,), num_heads=2, num_heads_upsample=4,
                                 resblock_updown=True, learn_sigma=True),
    "plain": IDDPMUNet(**TINY, attn_resolutions=(16,), num_heads=2, use_scale_shift_norm=False,
                       learn_sigma=False, resamp_with_conv=False),
}
FULL_CIFAR10 = IDDPMUNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3,
                         attn_resolutions=(16, 8), num_heads=4, use_scale_shift_norm=True,
                         learn_sigma=True, image_size=32)


def _inputs(m: IDDPMUNet, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, m.image_size, m.image_size, m.in_channels)).astype(np.float32)
  return x, np.array([3.7, 812.25], np.float32)  # fractional t, small and large


def _torch_out(net, x, t):
  with torch.no_grad():
    out = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t))
  return out.numpy().transpose(0, 2, 3, 1)


def _apply(m: IDDPMUNet, params, x, t):
  return np.asarray(jax.jit(lambda p, x, t: m.apply({"params": p}, x, t))(params, x, t))


@pytest.fixture(scope="module")
def converted():
  """name -> (torch net, numpy state_dict, Flax params)."""
  out = {}
  for name, m in CONFIGS.items():
    net = torch_model(m)
    sd = numpy_sd(net)
    out[name] = (net, sd, convert_iddpm.from_state_dict(sd, m))
  return out


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_key_table_matches_torch(converted, name):
  _, sd, _ = converted[name]
  want = {k: tuple(v.shape) for k, v in sd.items()}
  assert convert_iddpm.state_dict_shapes(CONFIGS[name]) == want


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_parity_with_torch(converted, name):
  m = CONFIGS[name]
  net, _, params = converted[name]
  x, t = _inputs(m)
  want = _torch_out(net, x, t)
  got = _apply(m, params, x, t)
  assert got.shape == want.shape == (2, m.image_size, m.image_size, m.out_channels)
  assert np.abs(want).max() > 0.1  # a non-trivial output
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_scalar_t_broadcasts(converted):
  m = CONFIGS["pndm_cifar10"]
  _, _, params = converted["pndm_cifar10"]
  x, _ = _inputs(m)
  a = _apply(m, params, x, np.float32(250.5))
  b = _apply(m, params, x, np.array([250.5, 250.5], np.float32))
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip(converted, name):
  _, sd, params = converted[name]
  back = convert_iddpm.to_state_dict(params, CONFIGS[name])
  assert back.keys() == sd.keys()
  for k, v in sd.items():
    assert back[k].dtype == np.float32
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_infer_architecture(converted, name):
  m = CONFIGS[name]
  _, sd, _ = converted[name]
  got = convert_iddpm.infer_architecture(sd, m.image_size, num_heads=m.num_heads,
                                         num_head_channels=m.num_head_channels)
  want = convert_iddpm.architecture(m)
  want["num_heads_upsample"] = -1  # not readable from shapes
  assert got == want
  rebuilt = IDDPMUNet(**dict(got, ch_mult=list(got["ch_mult"])))  # lists as from JSON
  assert convert_iddpm.state_dict_shapes(rebuilt) == {k: v.shape for k, v in sd.items()}


def test_module_prefix_accepted(converted):
  _, sd, params = converted["pndm_cifar10"]
  prefixed = {f"module.{k}": v for k, v in sd.items()}
  got = convert_iddpm.from_state_dict(prefixed, CONFIGS["pndm_cifar10"])
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert convert_iddpm.infer_architecture(prefixed, 16)["ch"] == 32


# ----------------------------------------------------------------------------- bad checkpoints


def test_bad_checkpoints_list_every_bad_key(converted):
  m = CONFIGS["pndm_cifar10"]
  _, sd, _ = converted["pndm_cifar10"]
  bad = dict(sd)
  del bad["middle_block.1.qkv.weight"]
  bad["input_blocks.9.0.op.weight"] = np.zeros((3,), np.float32)
  bad["out.2.weight"] = np.zeros((3, 32, 3, 3), np.float32)
  with pytest.raises(CheckpointError) as e:
    convert_iddpm.from_state_dict(bad, m)
  msg = str(e.value)
  for part in ("missing keys (1)", "middle_block.1.qkv.weight", "unexpected keys (1)",
               "input_blocks.9.0.op.weight", "mis-shaped keys (1)",
               "out.2.weight: (3, 32, 3, 3), expected (6, 32, 3, 3)"):
    assert part in msg


@pytest.mark.parametrize("change", ["missing", "unknown", "misshaped"])
def test_each_bad_key_alone_raises(converted, change):
  m = CONFIGS["plain"]
  sd = dict(converted["plain"][1])
  key = "output_blocks.1.0.skip_connection.weight"
  if change == "missing":
    del sd[key]
  elif change == "unknown":
    key = "label_emb.weight"
    sd[key] = np.zeros((10, 128), np.float32)
  else:
    sd[key] = sd[key][:, :-1]
  with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
    convert_iddpm.from_state_dict(sd, m)


def test_other_architecture_raises(converted):
  _, sd, _ = converted["pndm_cifar10"]
  for other in (IDDPMUNet(**dict(TINY, ch=64), attn_resolutions=(8,), num_heads=2),
                IDDPMUNet(**TINY, attn_resolutions=(16,), num_heads=2),
                IDDPMUNet(**TINY, attn_resolutions=(8,), num_heads=2,
                          use_scale_shift_norm=False)):
    with pytest.raises(CheckpointError, match="does not match the network"):
      convert_iddpm.from_state_dict(sd, other)


def test_infer_architecture_rejects_foreign_state_dict():
  with pytest.raises(CheckpointError, match="time_embed.0.weight"):
    convert_iddpm.infer_architecture({"conv_in.weight": np.zeros((32, 3, 3, 3))}, 32)


# ----------------------------------------------------------------------------- full size


def test_full_cifar10_parameter_count():
  """PNDM's / improved-diffusion's CIFAR-10 network: Flax count (no weights materialised) equals
  the reference implementation's. No exact published count exists (the checkpoint is named
  `cifar10_uncond_50M_500K.pt`), so only that rounded figure is checked."""
  flax_shapes = convert_iddpm.state_dict_shapes(FULL_CIFAR10)  # via jax.eval_shape
  n_flax = sum(math.prod(s) for s in flax_shapes.values())
  abstract = abstract_params(FULL_CIFAR10)
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract)) == n_flax
  rates = [2, 4]  # improved-diffusion's attention_resolutions "16,8" at image size 32
  net = TorchUNet(3, 128, 6, 3, rates, (1, 2, 2, 2), num_heads=4, scale_shift=True)
  assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == flax_shapes
  n_torch = sum(p.numel() for p in net.parameters())
  assert n_flax == n_torch
  assert n_flax == 52_546_438  # docs/methods.md §8; "50M" in the released checkpoint's name


# ----------------------------------------------------------------------------- dtype, dropout


def test_bfloat16_close_to_float32(converted):
  m = CONFIGS["pndm_cifar10"]
  _, _, params = converted["pndm_cifar10"]
  x, t = _inputs(m)
  m16 = m.clone(dtype=jnp.bfloat16)
  init = jax.eval_shape(lambda: m16.init(jax.random.key(0), x, t)["params"])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(init))
  out16 = jax.jit(lambda p, x, t: m16.apply({"params": p}, x, t))(params, x, t)
  assert out16.dtype == jnp.bfloat16
  out32 = _apply(m, params, x, t)
  err = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert err <= 0.05 * np.abs(out32).max(), err


def test_dropout_only_in_training(converted):
  m = CONFIGS["pndm_cifar10"].clone(dropout=0.3)
  _, _, params = converted["pndm_cifar10"]
  x, t = _inputs(m)
  run = jax.jit(lambda p, x, t, k: m.apply({"params": p}, x, t, train=True, rngs={"dropout": k}))
  a, b = (np.asarray(run(params, x, t, jax.random.key(s))) for s in (0, 1))
  assert np.abs(a - b).max() > 1e-3
  np.testing.assert_allclose(_apply(m, params, x, t), _apply(CONFIGS["pndm_cifar10"], params,
                                                               x, t), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- config


def _cfg(**overrides):
  cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
             resamp_with_conv=True, num_heads=2, num_head_channels=-1, num_heads_upsample=-1,
             use_scale_shift_norm=True, resblock_updown=False, learn_sigma=True, dtype="float32")
  cfg.update(overrides)
  return cfg


def test_from_config_builds_the_network():
  m = iddpm_from_config(_cfg(ch_mult=[1, 2], attn_resolutions=[8]), 16, 3)
  assert m == IDDPMUNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                        dropout=0.1, num_heads=2, image_size=16)
  assert m.out_channels == 6
  full = iddpm_from_config({"dtype": "bfloat16"}, 32, 3)  # defaults: the CIFAR-10 network
  assert full.clone(dtype=jnp.float32) == FULL_CIFAR10.clone(dropout=0.3)
  assert full.dtype == jnp.bfloat16


@pytest.mark.parametrize("field,value,why", [
    ("dtype", "int8", "not a computation dtype"),
    ("ch", 48, "multiples of GroupNorm's 32 groups"),
    ("ch_mult", (1, 2, 2, 2, 2, 2), "would have to be a multiple of 32"),
    ("num_res_blocks", 0, "not a positive integer"),
    ("attn_resolutions", (2,), "not downsample rates"),
    ("dropout", 1.0, "not a probability"),
    ("learn_sigma", 1, "not a bool"),
    ("num_heads", 3, "does not divide the attention widths"),
    ("num_head_channels", 24, "does not divide the attention widths"),
    ("num_heads_upsample", 0, "neither -1"),
])
def test_check_config_names_the_bad_field(field, value, why):
  head = re.escape(f"config.model.{field}={value!r} is not valid")
  with pytest.raises(ValueError, match=head) as e:
    check_iddpm_config(_cfg(**{field: value}), 16, 3)
  assert why in str(e.value) and "valid:" in str(e.value)


def test_check_config_accepts_good_configs():
  check_iddpm_config(_cfg(), 16, 3)
  check_iddpm_config(_cfg(num_head_channels=16, resblock_updown=True), 16, 1)
  with pytest.raises(ValueError, match="image_size=0"):
    check_iddpm_config(_cfg(), 0, 3)

