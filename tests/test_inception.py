"""FID Inception-v3: pytorch-fid key layout, parity with a torch reference,
resize, and batch-size / device-count invariance (random weights)."""

import re

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pndm_jax.evaluation import fid, inception

# pytorch-fid's FID Inception-v3, written down independently of the module:
# (layer, in, out, kernel, stride, padding) for every BasicConv2d.


def _block_a(cin, pool):
  return [("branch1x1", cin, 64, (1, 1), 1, (0, 0)),
          ("branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
          ("branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
          ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
          ("branch_pool", cin, pool, (1, 1), 1, (0, 0))]


def _block_b(cin):
  return [("branch3x3", cin, 384, (3, 3), 2, (0, 0)),
          ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0))]


def _block_c(c7):
  return [("branch1x1", 768, 192, (1, 1), 1, (0, 0)),
          ("branch7x7_1", 768, c7, (1, 1), 1, (0, 0)),
          ("branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
          ("branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_1", 768, c7, (1, 1), 1, (0, 0)),
          ("branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
          ("branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
          ("branch_pool", 768, 192, (1, 1), 1, (0, 0))]


def _block_d(cin):
  return [("branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
          ("branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
          ("branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
          ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
          ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
          ("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0))]


def _block_e(cin):
  return [("branch1x1", cin, 320, (1, 1), 1, (0, 0)),
          ("branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
          ("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
          ("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
          ("branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
          ("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
          ("branch_pool", cin, 192, (1, 1), 1, (0, 0))]


_BLOCKS = [("Mixed_5b", _block_a(192, 32)), ("Mixed_5c", _block_a(256, 64)),
           ("Mixed_5d", _block_a(288, 64)), ("Mixed_6a", _block_b(288)),
           ("Mixed_6b", _block_c(128)), ("Mixed_6c", _block_c(160)),
           ("Mixed_6d", _block_c(160)), ("Mixed_6e", _block_c(192)),
           ("Mixed_7a", _block_d(768)), ("Mixed_7b", _block_e(1280)),
           ("Mixed_7c", _block_e(2048))]
LAYERS = {name: spec for name, *spec in [
    ("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
] + [(f"{block}.{branch}", *spec) for block, specs in _BLOCKS
     for branch, *spec in specs]}


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
  """pytorch-fid's state_dict keys and shapes, random values that keep the
  activations O(1) through the 94 layers."""
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for name, (cin, cout, (kh, kw), _, _) in LAYERS.items():
    fan_in = cin * kh * kw
    sd[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=g) * (2 / fan_in) ** 0.5
    sd[f"{name}.bn.weight"] = 0.8 + 0.4 * torch.rand(cout, generator=g)
    sd[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=g)
    sd[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=g)
    sd[f"{name}.bn.running_var"] = 0.5 + torch.rand(cout, generator=g)
    sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
  sd["fc.weight"] = 0.01 * torch.randn(1008, 2048, generator=g)
  sd["fc.bias"] = torch.zeros(1008)
  return sd


def torch_reference(sd: dict[str, torch.Tensor], images01: torch.Tensor) -> torch.Tensor:
  """pytorch-fid's forward (resize, normalise, FID blocks, pool3) on NCHW [0, 1]."""

  def conv(name, x):
    _, _, _, stride, padding = LAYERS[name]
    x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                     sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], eps=1e-3)
    return F.relu(x)

  def chain(block, x, *names):
    for n in names:
      x = conv(f"{block}.{n}", x)
    return x

  avg = lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  def block_a(b, x):
    return torch.cat([chain(b, x, "branch1x1"), chain(b, x, "branch5x5_1", "branch5x5_2"),
                      chain(b, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                      chain(b, avg(x), "branch_pool")], 1)

  def block_c(b, x):
    return torch.cat([chain(b, x, "branch1x1"),
                      chain(b, x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                      chain(b, x, *[f"branch7x7dbl_{i}" for i in range(1, 6)]),
                      chain(b, avg(x), "branch_pool")], 1)

  def block_e(b, x, pool):
    b3 = chain(b, x, "branch3x3_1")
    bd = chain(b, x, "branch3x3dbl_1", "branch3x3dbl_2")
    return torch.cat([chain(b, x, "branch1x1"), chain(b, b3, "branch3x3_2a"),
                      chain(b, b3, "branch3x3_2b"), chain(b, bd, "branch3x3dbl_3a"),
                      chain(b, bd, "branch3x3dbl_3b"), chain(b, pool(x), "branch_pool")], 1)

  x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
  x = 2 * x - 1
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = conv(name, x)
  x = F.max_pool2d(x, 3, 2)
  x = conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x))
  x = F.max_pool2d(x, 3, 2)
  for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = block_a(b, x)
  x = torch.cat([chain("Mixed_6a", x, "branch3x3"),
                 chain("Mixed_6a", x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                 F.max_pool2d(x, 3, 2)], 1)
  for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = block_c(b, x)
  x = torch.cat([chain("Mixed_7a", x, "branch3x3_1", "branch3x3_2"),
                 chain("Mixed_7a", x, *[f"branch7x7x3_{i}" for i in range(1, 5)]),
                 F.max_pool2d(x, 3, 2)], 1)
  x = block_e("Mixed_7b", x, avg)
  x = block_e("Mixed_7c", x, lambda y: F.max_pool2d(y, 3, 1, 1))
  return x.mean(dim=(2, 3))


IMAGES = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict()


@pytest.fixture(scope="module")
def weights_pth(state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "pt_inception-test.pth"
  torch.save(state_dict, path)
  return str(path)


@pytest.fixture(scope="module")
def one_device_features(weights_pth):
  """Features of IMAGES from the .pth file, 1 device, 1 image per batch, twice."""
  extract = fid.inception_feature_fn(weights_pth, batch_size=1, devices=jax.devices()[:1])
  return extract(IMAGES), extract(IMAGES)


def _numpy(sd):
  return {k: v.numpy() for k, v in sd.items()}


def test_layer_list_is_pytorch_fids():
  assert sorted(inception.conv_layer_names()) == sorted(LAYERS)
  assert len(LAYERS) == 94


def test_state_dict_maps_every_key(state_dict):
  variables = inception.variables_from_torch_state_dict(_numpy(state_dict))
  got = jax.tree.map(np.shape, variables)
  want = jax.tree.map(lambda s: s.shape, inception.variable_shapes())
  assert got == want
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  np.testing.assert_array_equal(
      kernel, state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
      state_dict["Conv2d_1a_3x3.bn.running_var"].numpy())


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("Mixed_7c.branch_pool.bn.running_var"),
     "1 missing keys: Mixed_7c.branch_pool.bn.running_var"),
    (lambda sd: sd.update({"AuxLogits.fc.weight": np.zeros(3)}),
     "1 unexpected keys: AuxLogits.fc.weight"),
    (lambda sd: sd.update({"Mixed_5b.branch1x1.conv.weight": np.zeros((64, 192, 3, 3))}),
     "Mixed_5b.branch1x1.conv.weight: got (64, 192, 3, 3)"),
])
def test_state_dict_mismatch_is_a_clear_error(state_dict, change, message):
  sd = _numpy(state_dict)
  change(sd)
  with pytest.raises(ValueError, match=re.escape(message)):
    inception.variables_from_torch_state_dict(sd)


def test_flax_pickle_layout_matches_state_dict(state_dict):
  """jax-fid's nested pickle (HWIO kernels, scale/bias/mean/var) gives the same variables."""
  tree = {}
  for name in LAYERS:
    node = tree
    for part in name.split("."):
      node = node.setdefault(part, {})
    w = lambda suffix, name=name: state_dict[f"{name}.{suffix}"].numpy()
    node["conv"] = {"kernel": w("conv.weight").transpose(2, 3, 1, 0),
                    "bias": np.zeros(w("conv.weight").shape[0], np.float32)}
    node["bn"] = {"scale": w("bn.weight"), "bias": w("bn.bias"),
                  "mean": w("bn.running_mean"), "var": w("bn.running_var")}
  from_pickle = inception.variables_from_flax_pickle(tree)
  from_torch = inception.variables_from_torch_state_dict(_numpy(state_dict))
  jax.tree.map(np.testing.assert_array_equal, from_pickle, from_torch)
  tree["Conv2d_1a_3x3"]["conv"]["bias"] = np.ones(32)
  with pytest.raises(ValueError, match="unexpected keys: Conv2d_1a_3x3.conv.bias"):
    inception.variables_from_flax_pickle(tree)


def test_missing_weights_file_names_file_and_config_field(tmp_path):
  path = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  with pytest.raises(FileNotFoundError, match="config.eval.inception_weights") as e:
    inception.load_inception(path)
  assert path in str(e.value)
  with pytest.raises(FileNotFoundError, match="config.eval.inception_weights"):
    inception.load_inception("")


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (1, 37, 320, 3), (1, 299, 299, 3)])
def test_preprocess_matches_pytorch_fid_resize(shape):
  images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  ours = np.asarray(inception.preprocess(images))
  t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  ref = 2 * F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_grey_input_is_repeated_to_rgb():
  grey = np.random.default_rng(2).uniform(-1, 1, (1, 8, 8, 1)).astype(np.float32)
  x = np.asarray(inception.preprocess(grey))
  # the channels are one image resized three times: equal up to how XLA rounds each vector lane
  # (1 ulp apart on an AVX2 CPU), so a stated tolerance, not bitwise equality
  resized = np.asarray(jax.image.resize(grey, (1, inception.INPUT_SIZE, inception.INPUT_SIZE, 1),
                                        method="bilinear", antialias=False))[..., 0]
  for channel in range(3):
    np.testing.assert_allclose(x[..., channel], resized, rtol=0, atol=1e-6)


def test_features_shape_and_determinism(one_device_features):
  first, second = one_device_features
  assert first.shape == (3, inception.FEATURE_DIM) and first.dtype == np.float32
  assert np.isfinite(first).all() and first.std() > 0
  np.testing.assert_array_equal(first, second)


def test_matches_torch_reference(state_dict, one_device_features):
  images01 = torch.from_numpy(IMAGES).permute(0, 3, 1, 2).float() / 255
  with torch.no_grad():
    ref = torch_reference(state_dict, images01).numpy()
  np.testing.assert_allclose(one_device_features[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_batch_size_and_device_count_invariance(weights_pth, one_device_features):
  assert len(jax.devices()) == 8
  reference = one_device_features[0]
  one_device_batch2 = fid.inception_feature_fn(weights_pth, 2, jax.devices()[:1])
  all_devices = fid.inception_feature_fn(weights_pth, 8)
  tol = dict(rtol=1e-5, atol=1e-5 * np.abs(reference).max())
  np.testing.assert_allclose(one_device_batch2(IMAGES), reference, **tol)
  np.testing.assert_allclose(all_devices(IMAGES), reference, **tol)
