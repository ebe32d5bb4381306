"""NCSNpp (score_sde's NCSN++ / DDPM++) and its checkpoint converter.

Parity against (a) diffusers' UNet2DModel in its NCSN++ (VE, Fourier, FIR, skip) form and (b) an
independent compact PyTorch NCSNpp written here, whose `all_modules` list has score_sde's keys.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

from pndm_jax import convert_ncsnpp  # noqa: E402
from pndm_jax.convert import CheckpointError  # noqa: E402
from pndm_jax.models.ncsnpp import (  # noqa: E402
  NCSNpp,
  check_ncsnpp_config,
  labels_from_timestep,
  ncsnpp_from_config,
)

# ---------------------------------------------------------------------------------------------
# An independent PyTorch NCSNpp (non-FIR paths), modules appended in score_sde's creation order.


def _gn(c):
  return tnn.GroupNorm(min(c // 4, 32), c, eps=1e-6)


class TNIN(tnn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.W = tnn.Parameter(torch.zeros(cin, cout))
    self.b = tnn.Parameter(torch.zeros(cout))

  def forward(self, x):
    return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class TAttn(tnn.Module):
  def __init__(self, c, skip_rescale):
    super().__init__()
    self.GroupNorm_0 = _gn(c)
    self.NIN_0, self.NIN_1, self.NIN_2, self.NIN_3 = (TNIN(c, c) for _ in range(4))
    self.skip_rescale = skip_rescale

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.GroupNorm_0(x)
    q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
    q = q.flatten(2).transpose(1, 2)
    k = k.flatten(2)
    att = torch.softmax(q @ k / math.sqrt(c), dim=-1)  # [b, hw, hw]
    out = (v.flatten(2) @ att.transpose(1, 2)).reshape(b, c, hh, ww)
    out = x + self.NIN_3(out)
    return out / math.sqrt(2) if self.skip_rescale else out


def _resample(x, up, down):
  if up:
    return F.interpolate(x, scale_factor=2, mode="nearest")
  if down:
    return F.avg_pool2d(x, 2)
  return x


class TResBlock(tnn.Module):
  def __init__(self, kind, cin, cout, temb_dim, skip_rescale, up=False, down=False):
    super().__init__()
    cout = cout or cin
    self.GroupNorm_0 = _gn(cin)
    self.Conv_0 = tnn.Conv2d(cin, cout, 3, padding=1)
    if temb_dim:
      self.Dense_0 = tnn.Linear(temb_dim, cout)
    self.GroupNorm_1 = _gn(cout)
    self.Conv_1 = tnn.Conv2d(cout, cout, 3, padding=1)
    self.kind, self.up, self.down, self.skip_rescale = kind, up, down, skip_rescale
    self.shortcut = cin != cout or up or down
    if self.shortcut:
      if kind == "biggan":
        self.Conv_2 = tnn.Conv2d(cin, cout, 1)
      else:
        self.NIN_0 = TNIN(cin, cout)

  def forward(self, x, temb):
    h = F.silu(self.GroupNorm_0(x))
    h, x = _resample(h, self.up, self.down), _resample(x, self.up, self.down)
    h = self.Conv_0(h)
    if temb is not None:
      h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
    h = self.Conv_1(F.silu(self.GroupNorm_1(h)))
    if self.shortcut:
      x = self.Conv_2(x) if self.kind == "biggan" else self.NIN_0(x.permute(0, 1, 2, 3))
    return (x + h) / math.sqrt(2) if self.skip_rescale else x + h


class TUp(tnn.Module):
  def __init__(self, cin, cout, with_conv):
    super().__init__()
    if with_conv:
      self.Conv_0 = tnn.Conv2d(cin, cout, 3, padding=1)
    self.with_conv = with_conv

  def forward(self, x):
    h = F.interpolate(x, scale_factor=2, mode="nearest")
    return self.Conv_0(h) if self.with_conv else h


class TDown(tnn.Module):
  def __init__(self, cin, cout, with_conv):
    super().__init__()
    if with_conv:
      self.Conv_0 = tnn.Conv2d(cin, cout, 3, stride=2)
    self.with_conv = with_conv

  def forward(self, x):
    x = F.pad(x, (0, 1, 0, 1))
    return self.Conv_0(x) if self.with_conv else F.avg_pool2d(x, 2)


class TCombine(tnn.Module):
  def __init__(self, c1, c2, method):
    super().__init__()
    self.Conv = tnn.Conv2d(c1, c2, 1)
    self.method = method

  def forward(self, x, y):
    h = self.Conv(x)
    return torch.cat([h, y], 1) if self.method == "cat" else h + y


class TFourier(tnn.Module):
  def __init__(self, n):
    super().__init__()
    self.W = tnn.Parameter(torch.randn(n) * 16, requires_grad=False)

  def forward(self, s):
    p = torch.log(s)[:, None] * self.W[None] * 2 * math.pi
    return torch.cat([torch.sin(p), torch.cos(p)], -1)


class TorchNCSNpp(tnn.Module):
  """Takes the Flax NCSNpp's fields; builds score_sde's module list (non-FIR)."""

  def __init__(self, m: NCSNpp):
    super().__init__()
    self.m = m
    nf, mods = m.ch, []
    levels = len(m.ch_mult)
    if m.embedding_type == "fourier":
      mods.append(TFourier(nf))
    mods += [tnn.Linear(2 * nf if m.embedding_type == "fourier" else nf, 4 * nf),
             tnn.Linear(4 * nf, 4 * nf)]
    res = lambda cin, cout=None, **kw: TResBlock(m.resblock_type, cin, cout, 4 * nf,
                                                m.skip_rescale, **kw)
    mods.append(tnn.Conv2d(m.in_channels, nf, 3, padding=1))
    hs_c, in_ch, pyr_ch = [nf], nf, m.in_channels
    for i in range(levels):
      for _ in range(m.num_res_blocks):
        mods.append(res(in_ch, nf * m.ch_mult[i]))
        in_ch = nf * m.ch_mult[i]
        if m.image_size // 2 ** i in m.attn_resolutions:
          mods.append(TAttn(in_ch, m.skip_rescale))
        hs_c.append(in_ch)
      if i != levels - 1:
        mods.append(TDown(in_ch, in_ch, m.resamp_with_conv) if m.resblock_type == "ddpm"
                    else res(in_ch, down=True))
        if m.progressive_input == "input_skip":
          mods += [TDown(pyr_ch, pyr_ch, False), TCombine(pyr_ch, in_ch, m.progressive_combine)]
          if m.progressive_combine == "cat":
            in_ch *= 2
        elif m.progressive_input == "residual":
          mods.append(TDown(pyr_ch, in_ch, True))
          pyr_ch = in_ch
        hs_c.append(in_ch)
    in_ch = hs_c[-1]
    mods += [res(in_ch), TAttn(in_ch, m.skip_rescale), res(in_ch)]
    pyramid_ch = 0
    for i in reversed(range(levels)):
      for _ in range(m.num_res_blocks + 1):
        mods.append(res(in_ch + hs_c.pop(), nf * m.ch_mult[i]))
        in_ch = nf * m.ch_mult[i]
      if m.image_size // 2 ** i in m.attn_resolutions:
        mods.append(TAttn(in_ch, m.skip_rescale))
      if m.progressive != "none":
        out = m.in_channels if m.progressive == "output_skip" else in_ch
        if i == levels - 1:
          mods += [_gn(in_ch), tnn.Conv2d(in_ch, out, 3, padding=1)]
        elif m.progressive == "output_skip":
          mods += [TUp(pyramid_ch, pyramid_ch, False), _gn(in_ch),
                   tnn.Conv2d(in_ch, out, 3, padding=1)]
        else:
          mods.append(TUp(pyramid_ch, in_ch, True))
        pyramid_ch = out
      if i != 0:
        mods.append(TUp(in_ch, in_ch, m.resamp_with_conv) if m.resblock_type == "ddpm"
                    else res(in_ch, up=True))
    if m.progressive != "output_skip":
      mods += [_gn(in_ch), tnn.Conv2d(in_ch, m.in_channels, 3, padding=1)]
    self.all_modules = tnn.ModuleList(mods)

  def forward(self, x, labels):
    m, mods = self.m, iter(self.all_modules)
    levels = len(m.ch_mult)
    if m.embedding_type == "fourier":
      temb = next(mods)(labels)
    else:
      half = m.ch // 2
      freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
      a = labels.float()[:, None] * freqs[None]
      temb = torch.cat([torch.sin(a), torch.cos(a)], 1)
    temb = next(mods)(temb)
    temb = next(mods)(F.silu(temb))
    if not m.centered:
      x = 2 * x - 1
    pyr_in = x
    hs = [next(mods)(x)]
    for i in range(levels):
      for _ in range(m.num_res_blocks):
        h = next(mods)(hs[-1], temb)
        if m.image_size // 2 ** i in m.attn_resolutions:
          h = next(mods)(h)
        hs.append(h)
      if i != levels - 1:
        h = next(mods)(hs[-1]) if m.resblock_type == "ddpm" else next(mods)(hs[-1], temb)
        if m.progressive_input == "input_skip":
          pyr_in = next(mods)(pyr_in)
          h = next(mods)(pyr_in, h)
        elif m.progressive_input == "residual":
          pyr_in = next(mods)(pyr_in) + h
          pyr_in = pyr_in / math.sqrt(2) if m.skip_rescale else pyr_in
          h = pyr_in
        hs.append(h)
    h = next(mods)(hs[-1], temb)
    h = next(mods)(h)
    h = next(mods)(h, temb)
    pyramid = None
    for i in reversed(range(levels)):
      for _ in range(m.num_res_blocks + 1):
        h = next(mods)(torch.cat([h, hs.pop()], 1), temb)
      if m.image_size // 2 ** i in m.attn_resolutions:
        h = next(mods)(h)
      if m.progressive != "none":
        if i == levels - 1:
          norm, conv = next(mods), next(mods)
          pyramid = conv(F.silu(norm(h)))
        elif m.progressive == "output_skip":
          pyramid = next(mods)(pyramid)
          norm, conv = next(mods), next(mods)
          pyramid = pyramid + conv(F.silu(norm(h)))
        else:
          pyramid = next(mods)(pyramid) + h
          pyramid = pyramid / math.sqrt(2) if m.skip_rescale else pyramid
          h = pyramid
      if i != 0:
        h = next(mods)(h) if m.resblock_type == "ddpm" else next(mods)(h, temb)
    if m.progressive == "output_skip":
      h = pyramid
    else:
      norm, conv = next(mods), next(mods)
      h = conv(F.silu(norm(h)))
    assert next(mods, None) is None
    if m.scale_by_sigma:
      h = h / labels[:, None, None, None]
    return h


def _randomize(module, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p[0].numel(), 1))))
      if p.ndim == 1 and p.numel() > 1:
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _apply(model, params, x_nchw, labels):
  out = model.apply({"params": params}, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
                    jnp.asarray(labels))
  return np.asarray(out).transpose(0, 3, 1, 2)


TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), image_size=8,
            dropout=0.0)
VARIANTS = {
    "ddpmpp_deep_continuous": dict(TINY),
    "ddpm_blocks_skip_cat_fourier": dict(TINY, resblock_type="ddpm", progressive="output_skip",
                                         progressive_input="input_skip", progressive_combine="cat",
                                         embedding_type="fourier", centered=False,
                                         scale_by_sigma=True, num_res_blocks=1),
    "residual_pyramids": dict(TINY, progressive="residual", progressive_input="residual",
                              skip_rescale=False, num_res_blocks=1),
}


def _labels(model, n, rng):
  if model.embedding_type == "fourier":
    return rng.uniform(0.05, 50.0, n).astype(np.float32)
  return rng.uniform(0, 999, n).astype(np.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_independent_torch_parity_and_keys(variant):
  model = NCSNpp(**VARIANTS[variant])
  torch.manual_seed(0)
  tmodel = TorchNCSNpp(model).eval()
  _randomize(tmodel, 1)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  shapes = convert_ncsnpp.state_dict_shapes(model)
  assert list(shapes) == list(sd)  # same keys in the same (creation) order
  assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
  params = convert_ncsnpp.from_state_dict(sd, model)
  back = convert_ncsnpp.to_state_dict(params, model)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  rng = np.random.default_rng(2)
  x = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
  labels = _labels(model, 2, rng)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x), torch.from_numpy(labels)).numpy()
  out = _apply(model, params, x, labels)
  assert out.shape == ref.shape
  err = np.max(np.abs(out - ref))
  assert err <= 1e-4 * max(1.0, np.max(np.abs(ref))), err
  assert np.std(ref) > 1e-2  # random weights make a non-trivial output


def test_fixed_fourier_w_is_not_trainable():
  tmodel = TorchNCSNpp(NCSNpp(**VARIANTS["ddpm_blocks_skip_cat_fourier"]))
  names = [n for n, p in tmodel.named_parameters() if not p.requires_grad]
  assert names == ["all_modules.0.W"]
  assert len(list(tmodel.buffers())) == 0


def test_score_sde_checkpoint_uses_ema_and_strips_prefix():
  for variant in ("ddpmpp_deep_continuous", "ddpm_blocks_skip_cat_fourier"):
    model = NCSNpp(**VARIANTS[variant])
    tmodel = TorchNCSNpp(model)
    _randomize(tmodel, 3)
    sd = tmodel.state_dict()
    shadow = [p.detach() + 1.0 for p in tmodel.parameters() if p.requires_grad]
    ckpt = {"model": {"module." + k: v for k, v in sd.items()},
            "ema": {"shadow_params": shadow, "decay": 0.9999, "num_updates": 1}, "step": 1,
            "optimizer": {}}
    ema_params = convert_ncsnpp.from_score_sde_checkpoint(ckpt, model)
    raw_params = convert_ncsnpp.from_score_sde_checkpoint(ckpt, model, use_ema=False)
    ema_sd = convert_ncsnpp.to_state_dict(ema_params, model)
    raw_sd = convert_ncsnpp.to_state_dict(raw_params, model)
    trainable = [n for n, p in tmodel.named_parameters() if p.requires_grad]
    for name, value in zip(trainable, shadow):
      np.testing.assert_allclose(ema_sd[name], value.numpy(), rtol=0, atol=0)
    for name in sd:
      np.testing.assert_array_equal(raw_sd[name], sd[name].numpy())
      if name not in trainable:  # the fixed Fourier W comes from 'model'
        np.testing.assert_array_equal(ema_sd[name], sd[name].numpy())
    with pytest.raises(CheckpointError, match="EMA holds"):
      convert_ncsnpp.from_score_sde_checkpoint(
          dict(ckpt, ema=dict(ckpt["ema"], shadow_params=shadow[:-1])), model)
    bad = list(shadow)
    bad[3] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"shadow_params\[3\]"):
      convert_ncsnpp.from_score_sde_checkpoint(dict(ckpt, ema=dict(ckpt["ema"],
                                                                   shadow_params=bad)), model)
    with pytest.raises(CheckpointError, match="no 'ema'"):
      convert_ncsnpp.from_score_sde_checkpoint({"model": ckpt["model"]}, model)


def test_bad_state_dicts_raise_naming_keys():
  model = NCSNpp(**VARIANTS["ddpmpp_deep_continuous"])
  sd = {k: np.zeros(s, np.float32) for k, s in convert_ncsnpp.state_dict_shapes(model).items()}
  missing = dict(sd)
  del missing["all_modules.5.Conv_1.bias"]
  with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    all_modules.5.Conv_1.bias"):
    convert_ncsnpp.from_state_dict(missing, model)
  with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    all_modules.99.foo"):
    convert_ncsnpp.from_state_dict(dict(sd, **{"all_modules.99.foo": np.zeros(1)}), model)
  shaped = dict(sd, **{"all_modules.2.weight": np.zeros((32, 3, 1, 1))})
  with pytest.raises(CheckpointError, match=r"mis-shaped keys \(1\):\n    all_modules.2.weight"):
    convert_ncsnpp.from_state_dict(shaped, model)
  both = dict(missing, **{"all_modules.99.foo": np.zeros(1)})
  with pytest.raises(CheckpointError) as info:
    convert_ncsnpp.from_state_dict(both, model)
  assert "all_modules.5.Conv_1.bias" in str(info.value) and "all_modules.99.foo" in str(info.value)
  with pytest.raises(CheckpointError, match="no 'model'"):
    convert_ncsnpp.from_score_sde_checkpoint({"ema": {}}, model)


# ---------------------------------------------------------------------------------------------
# diffusers' NCSN++ (VE): Fourier embedding, FIR BigGAN blocks, output/input skip, sigma scaling.


def _diffusers_ncsnpp():
  diffusers = pytest.importorskip("diffusers")
  return diffusers.UNet2DModel(
      sample_size=8, in_channels=3, out_channels=3, center_input_sample=True,
      time_embedding_type="fourier", block_out_channels=(128, 256), layers_per_block=1,
      down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
      up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), mid_block_scale_factor=math.sqrt(2.0),
      norm_num_groups=None, norm_eps=1e-6, attention_head_dim=None, act_fn="silu").eval()


def _diffusers_key_map():
  """score_sde module index (tiny VE config below) -> diffusers module prefix."""
  res = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj",
         "GroupNorm_1": "norm2", "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
  att = {"GroupNorm_0": "group_norm", "NIN_0": "to_q", "NIN_1": "to_k", "NIN_2": "to_v",
         "NIN_3": "to_out.0"}
  return {
      0: ("time_proj", None), 1: ("time_embedding.linear_1", None),
      2: ("time_embedding.linear_2", None), 3: ("conv_in", None),
      4: ("down_blocks.0.resnets.0", res), 5: ("down_blocks.0.resnet_down", res),
      7: ("down_blocks.0.skip_conv", None), 8: ("down_blocks.1.resnets.0", res),
      9: ("down_blocks.1.attentions.0", att), 10: ("mid_block.resnets.0", res),
      11: ("mid_block.attentions.0", att), 12: ("mid_block.resnets.1", res),
      13: ("up_blocks.0.resnets.0", res), 14: ("up_blocks.0.resnets.1", res),
      15: ("up_blocks.0.attentions.0", att), 16: ("up_blocks.0.skip_norm", None),
      17: ("up_blocks.0.skip_conv", None), 18: ("up_blocks.0.resnet_up", res),
      19: ("up_blocks.1.resnets.0", res), 20: ("up_blocks.1.resnets.1", res),
      22: ("conv_norm_out", None), 23: ("conv_out", None),
  }


def test_diffusers_ncsnpp_ve_parity():
  model = NCSNpp(ch=128, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                 fir=True, resblock_type="biggan", progressive="output_skip",
                 progressive_input="input_skip", progressive_combine="sum",
                 embedding_type="fourier", centered=False, scale_by_sigma=True, image_size=8)
  dmodel = _diffusers_ncsnpp()
  rng = np.random.default_rng(5)
  sd = {k: (rng.standard_normal(s) / math.sqrt(np.prod(s[1:]) if len(s) > 1 else 1.0) * 0.7
            + (0.1 * rng.standard_normal(s) if len(s) == 1 else 0)).astype(np.float32)
        for k, s in convert_ncsnpp.state_dict_shapes(model).items()}
  sd["all_modules.0.W"] = (rng.standard_normal(128) * 16).astype(np.float32)
  params = convert_ncsnpp.from_state_dict(sd, model)
  mapping = _diffusers_key_map()
  dsd = {}
  for key, value in sd.items():
    parts = key.split(".")
    prefix, inner = mapping[int(parts[1])]
    if inner is None:
      name = f"{prefix}.{'weight' if parts[-1] == 'W' else parts[-1]}"
    else:
      leaf = {"W": "weight", "b": "bias"}.get(parts[-1], parts[-1])
      name = f"{prefix}.{inner[parts[2]]}.{leaf}"
      if parts[2].startswith("NIN"):
        value = value.T if parts[-1] == "W" else value
    dsd[name] = torch.from_numpy(np.ascontiguousarray(value))
  expected = dmodel.state_dict()
  assert set(dsd) == set(expected), (set(dsd) ^ set(expected))
  dmodel.load_state_dict(dsd, strict=True)
  x = rng.uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)
  sigmas = np.asarray([0.3, 20.0], np.float32)
  with torch.no_grad():
    ref = dmodel(torch.from_numpy(x), torch.from_numpy(sigmas)).sample.numpy()
  out = _apply(model, params, x, sigmas)
  err = np.max(np.abs(out - ref))
  assert err <= 1e-4 * max(1.0, np.max(np.abs(ref))), (err, np.max(np.abs(ref)))
  assert np.std(ref) > 1e-3


# ---------------------------------------------------------------------------------------------


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_full_ddpmpp_deep_continuous_parameter_count():
  cfg = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,),
             dropout=0.1, resamp_with_conv=True, fir=False, fir_kernel=(1, 3, 3, 1),
             skip_rescale=True, resblock_type="biggan", progressive="none",
             progressive_input="none", progressive_combine="sum", embedding_type="positional",
             fourier_scale=16.0, centered=True, conditional=True, nonlinearity="swish",
             dtype="float32")
  model = ncsnpp_from_config(cfg, 32, 3)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.ones((1,)))
  n = _count(shapes["params"])
  tmodel = TorchNCSNpp(model)
  assert n == sum(p.numel() for p in tmodel.parameters())
  assert list(convert_ncsnpp.state_dict_shapes(model)) == list(tmodel.state_dict())
  # Computed here and by the independent PyTorch model above; no published figure was found.
  assert n == 106_632_579


def test_config_checks_and_labels():
  good = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
              dtype="float32")
  check_ncsnpp_config(good, 8, 3)
  for field, value, match in (("ch", 30, "config.model.ch=30"),
                              ("resblock_type", "res", "resblock_type='res'.*biggan, ddpm"),
                              ("progressive", "x", "progressive='x'"),
                              ("attn_resolutions", (5,), "attn_resolutions"),
                              ("dtype", "int8", "dtype"),
                              ("nonlinearity", "elu", "nonlinearity"),
                              ("scale_by_sigma", True, "scale_by_sigma=True")):
    with pytest.raises(ValueError, match=match):
      check_ncsnpp_config(dict(good, **{field: value}), 8, 3)
  with pytest.raises(ValueError, match="fir=True"):
    check_ncsnpp_config(dict(good, fir=True, progressive="residual"), 8, 3)
  with pytest.raises(ValueError, match="num_res_blocks is missing"):
    check_ncsnpp_config({k: v for k, v in good.items() if k != "num_res_blocks"}, 8, 3)
  t = jnp.asarray([0.0, 10.0, 999.0])
  np.testing.assert_array_equal(np.asarray(labels_from_timestep(t, 1000, "positional")),
                                [0.0, 10.0, 999.0])
  with pytest.raises(ValueError, match="fourier"):
    labels_from_timestep(t, 1000, "fourier")


def test_dropout_only_in_training():
  model = NCSNpp(**dict(TINY, dropout=0.5, num_res_blocks=1))
  x = jnp.ones((1, 8, 8, 3)) * 0.3
  labels = jnp.asarray([10.0])
  # random params of the traced shapes, and a compiled apply: running init, or apply op by op,
  # takes seconds for this network
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, labels)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32), shapes)
  apply = jax.jit(model.apply, static_argnames="train")
  a = apply({"params": params}, x, labels)
  b = apply({"params": params}, x, labels)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = apply({"params": params}, x, labels, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert float(jnp.max(jnp.abs(c - a))) > 0
  assert c.shape == a.shape
  bf_model = NCSNpp(**dict(TINY, num_res_blocks=1, dtype=jnp.bfloat16))
  bf = jax.jit(bf_model.apply)({"params": params}, x, labels)
  assert bf.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(a)))
  assert float(jnp.max(jnp.abs(bf.astype(jnp.float32) - a))) < 0.1 * scale + 0.1


# ----------------------------------------------------------------------------- score_sde's DDPM


class _Nin(torch.nn.Module):
  """A dense layer over channels with weight W [in, out] (score_sde's NIN)."""

  def __init__(self, cin, cout):
    super().__init__()
    self.W = torch.nn.Parameter(torch.zeros(cin, cout))
    self.b = torch.nn.Parameter(torch.zeros(cout))

  def forward(self, x):
    return torch.einsum("bchw,co->bohw", x, self.W) + self.b[:, None, None]


class _DDPMRes(torch.nn.Module):
  def __init__(self, cin, cout, temb):
    super().__init__()
    self.GroupNorm_0 = torch.nn.GroupNorm(32, cin, eps=1e-6)
    self.Conv_0 = torch.nn.Conv2d(cin, cout, 3, padding=1)
    self.Dense_0 = torch.nn.Linear(temb, cout)
    self.GroupNorm_1 = torch.nn.GroupNorm(32, cout, eps=1e-6)
    self.Conv_1 = torch.nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.NIN_0 = _Nin(cin, cout)

  def forward(self, x, temb):
    h = self.Conv_0(F.silu(self.GroupNorm_0(x))) + self.Dense_0(F.silu(temb))[:, :, None, None]
    h = self.Conv_1(F.silu(self.GroupNorm_1(h)))
    return (self.NIN_0(x) if hasattr(self, "NIN_0") else x) + h


class _DDPMAttn(torch.nn.Module):
  def __init__(self, c):
    super().__init__()
    self.GroupNorm_0 = torch.nn.GroupNorm(32, c, eps=1e-6)
    for i in range(4):
      setattr(self, f"NIN_{i}", _Nin(c, c))

  def forward(self, x):
    b, c, hgt, wid = x.shape
    h = self.GroupNorm_0(x)
    q, k, v = (getattr(self, f"NIN_{i}")(h).reshape(b, c, -1) for i in range(3))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=-1)
    return x + self.NIN_3(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hgt, wid))


class _Resample(torch.nn.Module):
  def __init__(self, c, down):
    super().__init__()
    self.down = down
    self.Conv_0 = torch.nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

  def forward(self, x):
    if self.down:
      return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
    return self.Conv_0(F.interpolate(x, scale_factor=2, mode="nearest"))


class ScoreSdeDDPM(torch.nn.Module):
  """score_sde's PyTorch DDPM model, written here from its structure: one flat `all_modules`
  list; attention after every down block at attention resolutions but once per level on the
  way up; DDIM's timestep embedding; data assumed centred."""

  def __init__(self, nf, ch_mult, num_res_blocks, attn_resolutions, image_size, channels=3):
    super().__init__()
    self.nf, self.nrb, self.attn = nf, num_res_blocks, attn_resolutions
    self.levels = len(ch_mult)
    m = [torch.nn.Linear(nf, 4 * nf), torch.nn.Linear(4 * nf, 4 * nf),
         torch.nn.Conv2d(channels, nf, 3, padding=1)]
    hs, cin, res = [nf], nf, image_size
    for i, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        m.append(_DDPMRes(cin, nf * mult, 4 * nf))
        cin = nf * mult
        if res in attn_resolutions:
          m.append(_DDPMAttn(cin))
        hs.append(cin)
      if i != self.levels - 1:
        m.append(_Resample(cin, down=True))
        hs.append(cin)
        res //= 2
    m += [_DDPMRes(cin, cin, 4 * nf), _DDPMAttn(cin), _DDPMRes(cin, cin, 4 * nf)]
    for i in reversed(range(self.levels)):
      for _ in range(num_res_blocks + 1):
        m.append(_DDPMRes(cin + hs.pop(), nf * ch_mult[i], 4 * nf))
        cin = nf * ch_mult[i]
      if res in attn_resolutions:
        m.append(_DDPMAttn(cin))
      if i != 0:
        m.append(_Resample(cin, down=False))
        res *= 2
    m += [torch.nn.GroupNorm(32, cin, eps=1e-6), torch.nn.Conv2d(cin, channels, 3, padding=1)]
    self.all_modules = torch.nn.ModuleList(m)

  def forward(self, x, labels):
    m = iter(self.all_modules)
    half = self.nf // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = labels[:, None].float() * freqs[None]
    temb = next(m)(torch.cat([torch.sin(args), torch.cos(args)], dim=1))
    temb = next(m)(F.silu(temb))
    hs = [next(m)(x)]
    for i in range(self.levels):
      for _ in range(self.nrb):
        h = next(m)(hs[-1], temb)
        if h.shape[-1] in self.attn:
          h = next(m)(h)
        hs.append(h)
      if i != self.levels - 1:
        hs.append(next(m)(hs[-1]))
    h = next(m)(hs[-1], temb)
    h = next(m)(h)
    h = next(m)(h, temb)
    for i in reversed(range(self.levels)):
      for _ in range(self.nrb + 1):
        h = next(m)(torch.cat([h, hs.pop()], dim=1), temb)
      if h.shape[-1] in self.attn:
        h = next(m)(h)
      if i != 0:
        h = next(m)(h)
    norm, conv = next(m), next(m)
    return conv(F.silu(norm(h)))


def test_score_sde_ddpm_is_the_ddpm_form_of_ncsnpp():
  """configs/cifar10_ddpm_pf.py reads score_sde's DDPM model as NCSN++ with DDPM blocks: same
  keys in the same order, same function (from 128 channels on, where the group counts agree),
  and at full size the same key/shape table."""
  from configs import cifar10_ddpm_pf

  cfg = cifar10_ddpm_pf.get_config().model
  small = dict(ch=128, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
  model = ncsnpp_from_config({**cfg.to_dict(), **small}, 8, 3)
  torch.manual_seed(0)
  ref_model = ScoreSdeDDPM(128, (1, 1), 1, (4,), 8).eval()
  _randomize(ref_model, 3)
  sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  assert list(convert_ncsnpp.state_dict_shapes(model)) == list(sd)
  params = convert_ncsnpp.from_state_dict(sd, model)
  rng = np.random.default_rng(4)
  x = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
  labels = np.array([3.0, 870.5], np.float32)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x), torch.from_numpy(labels)).numpy()
  out = _apply(model, params, x, labels)
  assert np.std(ref) > 1e-2
  assert np.max(np.abs(out - ref)) <= 1e-4 * max(1.0, np.max(np.abs(ref)))
  full = ncsnpp_from_config(cfg, 32, 3)
  want = ScoreSdeDDPM(128, (1, 2, 2, 2), 2, (16,), 32)
  assert convert_ncsnpp.state_dict_shapes(full) == {k: tuple(v.shape)
                                                    for k, v in want.state_dict().items()}
  assert sum(p.numel() for p in want.parameters()) == 35_218_947  # docs/methods.md §8
