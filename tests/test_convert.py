"""Checkpoint conversion: diffusers and DDIM layouts -> Flax, forward parity, failure modes.

diffusers models are built locally with random weights in the ddpm-cifar10-32 architecture
(scaled down) and saved with `save_pretrained`; nothing is downloaded.
"""

import json
import math
import os
import re
import shutil
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers_models import DDPM_SETTINGS, diffusers_unet

from pndm_jax import checkpoints, convert
from pndm_jax.models import UNet, eps_fn

D, AD, U, AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
CIFAR = dict(block_out_channels=(128, 256, 256, 256), down_block_types=(D, AD, D, D),
             up_block_types=(U, U, AU, U), sample_size=32)
CELEBA = dict(block_out_channels=(128, 256, 256, 256, 512), down_block_types=(D, D, AD, D, D),
              up_block_types=(U, U, AU, U, U), sample_size=64)
# Scaled down: ch 32 and half the image size (attention stays at the same level).
TINY = {
    "cifar10": dict(CIFAR, block_out_channels=(32, 64, 64, 64), sample_size=16),
    "celeba": dict(CELEBA, block_out_channels=(32, 64, 64, 64, 128), sample_size=32),
}
CIFAR_TINY_UNET = UNet(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(8,), dropout=0.0,
                       image_size=16)


def _numpy_sd(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (torch model, folder saved as safetensors); cifar10 also as .bin."""
  root = tmp_path_factory.mktemp("diffusers")
  out = {}
  for name, arch in TINY.items():
    model = diffusers_unet(arch)
    model.save_pretrained(root / name)
    out[name] = (model, str(root / name))
  out["cifar10_bin"] = (out["cifar10"][0], str(root / "cifar10_bin"))
  out["cifar10"][0].save_pretrained(root / "cifar10_bin", safe_serialization=False)
  return out


def _assert_trees_equal(a, b):
  fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["cifar10", "celeba"])
def test_forward_parity_with_diffusers(saved, name):
  torch_model, folder = saved[name]
  model, params = convert.read_pytorch(folder)
  assert len(model.ch_mult) == len(TINY[name]["block_out_channels"])
  size = TINY[name]["sample_size"]
  x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
  t = np.array([0.0, 1.5, 499.25, 999.0], np.float32)  # several t, fractional included
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
  run = jax.jit(lambda p, x, t: eps_fn(model, p, data_format="NCHW")(x, t))
  # XLA backend optimisation level 0 halves the compile time on CPU.
  got = run.lower(params, x, t).compile(
      compiler_options={"xla_backend_optimization_level": 0})(params, x, t)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)


def test_gradient_parity_with_diffusers(saved):
  """The gradients of every parameter and of x agree with PyTorch autograd through diffusers'
  UNet2DModel: the networks' layers compute their own (pndm_jax/models/layers.py)."""
  torch_model, folder = saved["cifar10"]
  model, params = convert.read_pytorch(folder)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  cotangent = rng.standard_normal(x.shape).astype(np.float32)
  t = np.array([3.0, 700.0], np.float32)
  x_torch = torch.from_numpy(x).requires_grad_()
  torch_model.zero_grad()
  (torch_model(x_torch, torch.from_numpy(t)).sample * torch.from_numpy(cotangent)).sum().backward()
  want = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}

  def loss(params, x):
    return jnp.sum(eps_fn(model, params, data_format="NCHW")(x, t) * cotangent)

  grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  got = convert.to_state_dict(grads, model, "diffusers")
  assert sorted(got) == sorted(want)
  # Some gradients are zero in exact arithmetic (a key's bias under the softmax; the biases
  # before a GroupNorm of one channel per group) and rounding noise on both sides: the floor.
  floor = 1e-6 * max(np.abs(w).max() for w in want.values())
  for key, g in got.items():
    np.testing.assert_allclose(g, want[key], rtol=0, atol=1e-4 * np.abs(want[key]).max() + floor,
                               err_msg=key)
  np.testing.assert_allclose(dx, x_torch.grad.numpy(), rtol=0,
                             atol=1e-4 * np.abs(x_torch.grad.numpy()).max())


def test_bin_and_safetensors_give_identical_params(saved):
  m1, p1 = convert.read_pytorch(saved["cifar10"][1])
  m2, p2 = convert.read_pytorch(saved["cifar10_bin"][1])
  assert m1 == m2 == CIFAR_TINY_UNET
  _assert_trees_equal(p1, p2)


def test_key_table_round_trips(saved):
  torch_model, folder = saved["cifar10"]
  model, params = convert.read_pytorch(folder)
  # Flax -> diffusers reproduces the PyTorch state_dict exactly.
  back = convert.to_state_dict(params, model, "diffusers")
  want = _numpy_sd(torch_model)
  assert back.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)
  # Flax -> DDIM -> Flax is the identity.
  ddim = convert.to_state_dict(params, model, "ddim")
  _assert_trees_equal(convert.from_state_dict(ddim, model, "ddim"), params)


# ----------------------------------------------------------------------------- DDIM layout


def _ddim_from_diffusers(sd: dict, levels: int) -> dict:
  """Renames a diffusers UNet2DModel state_dict into the DDIM repository layout.

  Written independently of pndm_jax.convert's table (by string rewriting), as a test oracle.
  """
  out = {}
  for key, value in sd.items():
    k = re.sub(r"^time_embedding\.linear_(\d)", lambda m: f"temb.dense.{int(m[1]) - 1}", key)
    k = re.sub(r"^up_blocks\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.", k)
    k = re.sub(r"^down_blocks\.", "down.", k)
    k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace(
        "mid_block.resnets.1.", "mid.block_2.").replace("mid_block.attentions.0.", "mid.attn_1.")
    for old, new in ((".resnets.", ".block."), (".attentions.", ".attn."),
                     (".downsamplers.0.", ".downsample."), (".upsamplers.0.", ".upsample."),
                     ("time_emb_proj", "temb_proj"), ("conv_shortcut", "nin_shortcut"),
                     ("group_norm", "norm"), ("to_out.0", "proj_out"), ("to_q", "q"),
                     ("to_k", "k"), ("to_v", "v"), ("conv_norm_out", "norm_out")):
      k = k.replace(old, new)
    is_attn_proj = re.search(r"attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", k)
    out[k] = value[:, :, None, None] if is_attn_proj else value
  return out


def _torch_sd(sd: dict, prefix: str = "") -> dict:
  return {prefix + k: torch.from_numpy(v) for k, v in sd.items()}


@pytest.fixture(scope="module")
def ddim_sd(saved):
  return _ddim_from_diffusers(_numpy_sd(saved["cifar10"][0]), levels=4)


def test_ddim_checkpoints_convert_to_the_diffusers_params(saved, ddim_sd, tmp_path):
  _, want = convert.read_pytorch(saved["cifar10"][1])
  other = _torch_sd({k: v + 1 for k, v in ddim_sd.items()})
  variants = {  # file -> list_entry
      "plain.ckpt": (_torch_sd(ddim_sd), 0),
      "data_parallel.ckpt": (_torch_sd(ddim_sd, "module."), 0),
      "train_list.ckpt": ([_torch_sd(ddim_sd, "module."), {"state": {}}, 3, 1000], 0),
      "ema_last.ckpt": ([other, {"state": {}}, 3, 1000, _torch_sd(ddim_sd, "module.")], -1),
  }
  for name, (obj, entry) in variants.items():
    torch.save(obj, tmp_path / name)
    model, params = convert.read_pytorch(str(tmp_path / name), image_size=16, list_entry=entry)
    assert model == CIFAR_TINY_UNET.clone(dropout=UNet.dropout), name
    _assert_trees_equal(params, want)


def _ddim_oracle_shapes(ch, ch_mult, nrb, attn_levels, in_ch=3, out_ch=3) -> dict:
  """Keys/shapes of the DDIM repository's Model, enumerated from its structure.

  The layout is docs/methods.md §8.
  """
  shapes = {}

  def conv(name, cin, cout, k=3):
    shapes.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

  def linear(name, cin, cout):
    shapes.update({f"{name}.weight": (cout, cin), f"{name}.bias": (cout,)})

  def norm(name, c):
    shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

  def resblock(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cin, cout)
    linear(f"{name}.temb_proj", 4 * ch, cout)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout)
    if cin != cout:
      conv(f"{name}.nin_shortcut", cin, cout, k=1)

  def attn(name, c):
    norm(f"{name}.norm", c)
    for p in ("q", "k", "v", "proj_out"):
      conv(f"{name}.{p}", c, c, k=1)

  linear("temb.dense.0", ch, 4 * ch)
  linear("temb.dense.1", 4 * ch, 4 * ch)
  conv("conv_in", in_ch, ch)
  skips, c = [ch], ch
  for i, m in enumerate(ch_mult):
    for j in range(nrb):
      resblock(f"down.{i}.block.{j}", c, ch * m)
      c = ch * m
      if i in attn_levels:
        attn(f"down.{i}.attn.{j}", c)
      skips.append(c)
    if i != len(ch_mult) - 1:
      conv(f"down.{i}.downsample.conv", c, c)
      skips.append(c)
  resblock("mid.block_1", c, c)
  attn("mid.attn_1", c)
  resblock("mid.block_2", c, c)
  for i in reversed(range(len(ch_mult))):
    for j in range(nrb + 1):
      resblock(f"up.{i}.block.{j}", c + skips.pop(), ch * ch_mult[i])
      c = ch * ch_mult[i]
      if i in attn_levels:
        attn(f"up.{i}.attn.{j}", c)
    if i != 0:
      conv(f"up.{i}.upsample.conv", c, c)
  norm("norm_out", c)
  conv("conv_out", c, out_ch)
  return shapes


@pytest.mark.parametrize("name,arch,attn_level,count", [
    ("cifar10", CIFAR, 1, 35_746_307), ("celeba", CELEBA, 2, None)])
def test_full_config_layouts(name, arch, attn_level, count):
  ch_mult = tuple(c // 128 for c in arch["block_out_channels"])
  model = UNet(ch_mult=ch_mult, image_size=arch["sample_size"])
  ddim = convert.state_dict_shapes(model, "ddim")
  assert ddim == _ddim_oracle_shapes(128, ch_mult, 2, {attn_level}), name
  with torch.device("meta"):  # shapes only, no allocation
    reference = diffusers.UNet2DModel(**arch, **DDPM_SETTINGS)
  want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert convert.state_dict_shapes(model, "diffusers") == want
  n_flax = sum(math.prod(p.shape) for p in jax.tree.leaves(convert.abstract_params(model)))
  assert sum(math.prod(s) for s in ddim.values()) == n_flax == (count or n_flax)
  assert len(ddim) == len(want) == len(jax.tree.leaves(convert.abstract_params(model)))
  with torch.device("meta"):  # the config convert writes for this network builds the same one
    exported = diffusers.UNet2DModel(**convert.diffusers_config(model))
  assert {k: tuple(v.shape) for k, v in exported.state_dict().items()} == want
  assert convert._diffusers_fields(exported.config) == convert.architecture(model)


def test_old_diffusers_attention_names_in_a_pipeline_folder(saved, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  folder = saved["cifar10"][1]
  old = {re.sub(r"\.to_q\.", ".query.", re.sub(r"\.to_out\.0\.", ".proj_attn.", k)): v
         for k, v in _numpy_sd(saved["cifar10"][0]).items()}
  assert any(".proj_attn." in k for k in old)
  os.makedirs(tmp_path / "pipe" / "unet")
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "pipe" / "unet")
  save_file(old, str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
  _, want = convert.read_pytorch(folder)
  _assert_trees_equal(convert.read_pytorch(str(tmp_path / "pipe"))[1], want)


# ----------------------------------------------------------------------------- bad input


def _copy_folder(src: str, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def test_truncated_files(saved, ddim_sd, tmp_path):
  ckpt = tmp_path / "model.ckpt"
  torch.save(_torch_sd(ddim_sd), ckpt)
  ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
  with pytest.raises(checkpoints.CheckpointError, match="cannot read the PyTorch checkpoint"):
    convert.read_pytorch(str(ckpt), image_size=16)
  folder = _copy_folder(saved["cifar10"][1], tmp_path / "st")
  st = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  with open(st, "r+b") as f:
    f.truncate(os.path.getsize(st) // 2)
  with pytest.raises(checkpoints.CheckpointError, match="cannot read"):
    convert.read_pytorch(folder)


def test_wrong_architecture(saved, ddim_sd, tmp_path):
  expected = CIFAR_TINY_UNET.clone(ch_mult=(1, 2, 2, 4))
  with pytest.raises(checkpoints.CheckpointError, match=r"ch_mult: checkpoint \(1, 2, 2, 2\)"):
    convert.read_pytorch(saved["cifar10"][1], expected=expected)
  torch.save(_torch_sd(ddim_sd), tmp_path / "m.ckpt")
  with pytest.raises(checkpoints.CheckpointError, match="attn_resolutions"):
    convert.read_pytorch(str(tmp_path / "m.ckpt"), expected=CIFAR_TINY_UNET.clone(
        attn_resolutions=(16,)))
  with pytest.raises(checkpoints.CheckpointError, match="is for 16x16 images, not 32"):
    convert.read_pytorch(saved["cifar10"][1], image_size=32)
  with pytest.raises(checkpoints.CheckpointError, match="pass image_size"):
    convert.read_pytorch(str(tmp_path / "m.ckpt"))
  folder = _copy_folder(saved["cifar10"][1], tmp_path / "flip")
  cfg_path = os.path.join(folder, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(flip_sin_to_cos=True, attention_head_dim=8)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(checkpoints.CheckpointError, match="flip_sin_to_cos=True") as err:
    convert.read_pytorch(folder)
  assert "attention_head_dim=8" in str(err.value)


def test_missing_unexpected_and_misshaped_keys_are_listed(ddim_sd, tmp_path):
  sd = dict(ddim_sd)
  del sd["up.1.attn.2.k.bias"]
  sd["logvar"] = np.zeros(1000, np.float32)
  sd["mid.block_1.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  torch.save(_torch_sd(sd), tmp_path / "bad.ckpt")
  with pytest.raises(checkpoints.CheckpointError) as err:
    convert.read_pytorch(str(tmp_path / "bad.ckpt"), image_size=16)
  msg = str(err.value)
  assert "missing keys (1):\n    up.1.attn.2.k.bias" in msg
  assert "unexpected keys (1):\n    logvar" in msg
  assert "mid.block_1.conv2.weight: (64, 64, 1, 1), expected (64, 64, 3, 3)" in msg
  torch.save({**_torch_sd(ddim_sd), "step": torch.tensor(3)}, tmp_path / "int.ckpt")
  with pytest.raises(checkpoints.CheckpointError, match="not floating-point tensors"):
    convert.read_pytorch(str(tmp_path / "int.ckpt"), image_size=16)


def test_missing_torch_is_a_clear_error_and_safetensors_need_none(saved, ddim_sd, tmp_path,
                                                                   monkeypatch):
  torch.save(_torch_sd(ddim_sd), tmp_path / "m.ckpt")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(checkpoints.CheckpointError, match=r"pip install torch==2\.13\.0"):
    convert.read_pytorch(str(tmp_path / "m.ckpt"), image_size=16)
  assert convert.read_pytorch(saved["cifar10"][1])[0] == CIFAR_TINY_UNET


# ----------------------------------------------------------------------------- output


def convert_to(src, dst, **kwargs):
  """What --mode=convert does: read a PyTorch checkpoint, save it as a params directory."""
  model, params = convert.read_pytorch(src, **kwargs)
  checkpoints.save_params(dst, model, params)
  return model


def _snapshot(path) -> dict:
  return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(path) for f in files}


def test_convert_save_load_round_trip(saved, tmp_path):
  dst = str(tmp_path / "out" / "cifar_tiny")
  model = convert_to(saved["cifar10"][1], dst)
  _, want = convert.read_pytorch(saved["cifar10"][1])
  loaded_model, loaded = checkpoints.load_params(dst)
  assert loaded_model == model == CIFAR_TINY_UNET
  _assert_trees_equal(loaded, want)
  assert checkpoints.load_params(dst, dtype="bfloat16")[0].dtype == jnp.bfloat16
  expected = CIFAR_TINY_UNET.clone(dtype=jnp.bfloat16, dropout=0.1)
  assert checkpoints.load_weights(dst, expected=expected)[0] is expected
  with pytest.raises(checkpoints.CheckpointError, match="different architecture"):
    checkpoints.load_weights(dst, expected=expected.clone(ch=64))
  # Converting again replaces the checkpoint.
  convert_to(saved["cifar10_bin"][1], dst)
  _assert_trees_equal(checkpoints.load_params(dst)[1], want)


def test_failed_conversion_leaves_existing_output_untouched(saved, ddim_sd, tmp_path,
                                                            monkeypatch):
  dst = tmp_path / "ckpt"
  convert_to(saved["cifar10"][1], str(dst))
  before = _snapshot(dst)
  sd = dict(ddim_sd)
  del sd["conv_out.bias"]
  torch.save(_torch_sd(sd), tmp_path / "bad.ckpt")
  with pytest.raises(checkpoints.CheckpointError, match="conv_out.bias"):
    convert_to(str(tmp_path / "bad.ckpt"), str(dst), image_size=16)
  # A failure while writing (after orbax saved the params) cleans up and keeps the old one.
  def fail(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(checkpoints.json, "dump", fail)
  with pytest.raises(OSError, match="disk full"):
    convert_to(saved["cifar10_bin"][1], str(dst))
  assert _snapshot(dst) == before
  assert sorted(os.listdir(tmp_path)) == ["bad.ckpt", "ckpt"]
  # Anything that is not a converted checkpoint is never replaced.
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  monkeypatch.undo()
  with pytest.raises(checkpoints.CheckpointError, match="refusing to replace"):
    convert_to(saved["cifar10"][1], str(tmp_path / "mine"))
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- list checkpoints


def test_list_checkpoint_reads_the_ema_entry_by_default(saved, ddim_sd, tmp_path, caplog):
  """DDIM saves [model, optimizer, epoch, step, ema]; its samples come from the EMA entry."""
  _, ema = convert.read_pytorch(saved["cifar10"][1])
  raw_sd = {k: v + 1 for k, v in ddim_sd.items()}
  raw = convert.from_state_dict(raw_sd, CIFAR_TINY_UNET, "ddim")
  optimizer = {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}
  ckpt = str(tmp_path / "celeba.ckpt")
  torch.save([_torch_sd(raw_sd, "module."), optimizer, 3, 1000, _torch_sd(ddim_sd, "module.")],
             ckpt)
  lines = []
  with caplog.at_level("INFO"):
    _assert_trees_equal(convert.read_pytorch(ckpt, image_size=16, report=lines.append)[1], ema)
  assert lines == [f"read entry 4 of 5 (EMA) of {ckpt}"]
  assert lines[0] in caplog.text
  _assert_trees_equal(convert.read_pytorch(ckpt, image_size=16, list_entry=0,
                                           report=lines.append)[1], raw)
  assert lines[1] == f"read entry 0 of 5 of {ckpt}"
  with pytest.raises(checkpoints.CheckpointError, match=r"\(entry 1\): entries that are not"):
    convert.read_pytorch(ckpt, image_size=16, list_entry=1)
  # The default everywhere, --mode=convert's route included, is the EMA entry.
  convert_to(ckpt, str(tmp_path / "out"), image_size=16)
  _assert_trees_equal(checkpoints.load_params(str(tmp_path / "out"))[1], ema)
  # A plain state_dict ignores list_entry.
  torch.save(_torch_sd(ddim_sd), tmp_path / "plain.ckpt")
  _assert_trees_equal(convert.read_pytorch(str(tmp_path / "plain.ckpt"), image_size=16,
                                           report=lines.append)[1], ema)
  assert "list_entry ignored" in lines[2]


def test_list_checkpoint_without_an_ema_entry_is_an_error(ddim_sd, tmp_path):
  ckpt = str(tmp_path / "no_ema.ckpt")
  torch.save([_torch_sd(ddim_sd), {"state": {}, "param_groups": []}, 3, 1000], ckpt)
  with pytest.raises(checkpoints.CheckpointError, match="no EMA entry") as err:
    convert.read_pytorch(ckpt, image_size=16)
  msg = str(err.value)
  assert ckpt in msg
  assert f"entries: state_dict ({len(ddim_sd)} keys), optimizer state, int, int" in msg
  assert "--config.sampler.checkpoint_list_entry=0" in msg
  assert convert.read_pytorch(ckpt, image_size=16, list_entry=0)[0].ch == 32
  with pytest.raises(checkpoints.CheckpointError, match="list of 4 entries .*; no entry 4"):
    convert.read_pytorch(ckpt, image_size=16, list_entry=4)


# ----------------------------------------------------------------------------- damaged params


@pytest.fixture(scope="module")
def params_dir(saved, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("params") / "cifar_tiny")
  convert_to(saved["cifar10"][1], dst)
  return dst


def _data_files(path) -> list[str]:
  """The array data files orbax wrote under params/, largest first."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "params"))
           for f in fs if os.path.basename(d) == "d"]
  assert files
  return sorted(files, key=os.path.getsize, reverse=True)


def test_truncated_or_missing_params_files_are_named(params_dir, tmp_path):
  damaged = _copy_folder(params_dir, tmp_path / "truncated")
  big = _data_files(damaged)[0]
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)
  with pytest.raises(checkpoints.CheckpointError, match="is truncated or corrupt") as err:
    checkpoints.load_params(damaged)
  msg = str(err.value)
  assert damaged in msg and os.path.relpath(big, damaged) in msg and "--mode=convert" in msg
  os.remove(big)
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(
      f"{os.path.relpath(big, damaged)}: missing")):
    checkpoints.load_weights(damaged)


def test_corrupt_params_that_orbax_cannot_restore(params_dir, tmp_path):
  damaged = _copy_folder(params_dir, tmp_path / "garbage")
  metadata = os.path.join(damaged, "params", "_METADATA")
  with open(metadata, "r+b") as f:  # same size, so only orbax can tell
    f.write(b"\0" * os.path.getsize(metadata))
  with pytest.raises(checkpoints.CheckpointError, match="cannot be restored") as err:
    checkpoints.load_params(damaged)
  assert damaged in str(err.value) and "--mode=convert" in str(err.value)


def test_checkpoints_without_recorded_file_sizes_still_load(params_dir, tmp_path):
  """model.json of older checkpoints (assets/digits_unet among them) has no `files` table."""
  old = _copy_folder(params_dir, tmp_path / "old")
  with open(os.path.join(old, "model.json")) as f:
    meta = json.load(f)
  del meta["files"]
  with open(os.path.join(old, "model.json"), "w") as f:
    json.dump(meta, f)
  _assert_trees_equal(checkpoints.load_params(old)[1], checkpoints.load_params(params_dir)[1])


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("ch_mult"), r"missing fields \['ch_mult'\]"),
    (lambda m: m.update(heads=4), r"unknown fields \['heads'\]"),
    (lambda m: m.update(ch="128"), r"ch='128' is not valid"),
    (lambda m: m.update(dtype="bfloat"), r"dtype='bfloat' is not valid"),
    (lambda m: m.update(ch_mult=5), r"ch_mult=5 is not valid"),
    (lambda m: m.update(files=[1, 2]), r"files=\[1, 2\] is not a name -> size table"),
], ids=["missing", "unknown", "ch", "dtype", "ch_mult", "files"])
def test_model_json_with_wrong_or_missing_fields(params_dir, tmp_path, edit, match):
  bad = _copy_folder(params_dir, tmp_path / "bad")
  file = os.path.join(bad, "model.json")
  with open(file) as f:
    meta = json.load(f)
  edit(meta)
  with open(file, "w") as f:
    json.dump(meta, f)
  with pytest.raises(checkpoints.CheckpointError, match=match) as err:
    checkpoints.load_params(bad)
  assert str(err.value).startswith(f"{file} is corrupt")


def test_truncated_model_json(params_dir, tmp_path):
  bad = _copy_folder(params_dir, tmp_path / "bad")
  file = os.path.join(bad, "model.json")
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) // 2)
  with pytest.raises(checkpoints.CheckpointError, match="truncated or corrupt") as err:
    checkpoints.load_params(bad)
  assert file in str(err.value)
