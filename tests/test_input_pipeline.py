"""Input pipeline: tfds (mock data) and offline sources, determinism, sharding, bad input."""

import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from configs import default
from pndm_jax import input_pipeline


def data_config(**overrides):
  data = default.get_config().data
  data.update(overrides)
  return data


def first_batch(data, batch=8, seed=0, steps_per_call=1, start=0):
  """The first device batch of `data` on all (8 fake) devices, as numpy."""
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("batch",)), P(None, "batch"))
  it = input_pipeline.device_batches(input_pipeline.create_dataset(data, batch, seed),
                                     start, steps_per_call, sharding)
  try:
    x = next(it)
  finally:
    it.close()
  assert x.sharding.is_equivalent_to(sharding, x.ndim)
  return np.asarray(x)


def test_cifar10_mock_end_to_end():
  with tfds.testing.mock_data(num_examples=20):
    x = first_batch(data_config(dataset="cifar10", image_size=32), steps_per_call=2)
  assert x.shape == (2, 8, 32, 32, 3) and x.dtype == np.float32
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.1


def test_celeb_a_mock_end_to_end_and_crop():
  with tfds.testing.mock_data(num_examples=20):
    x = first_batch(data_config(dataset="celeb_a", image_size=64))
    record = tfds.data_source("celeb_a", split="train")[0]
  assert x.shape == (1, 8, 64, 64, 3) and x.min() >= -1.0 and x.max() <= 1.0
  # The DDIM crop: rows 57..184, columns 25..152 of the 218x178 image, then resize.
  image = record["image"]
  assert image.shape == (218, 178, 3)
  expected = np.asarray(Image.fromarray(image[57:185, 25:153]).resize((64, 64), Image.BILINEAR))
  got = input_pipeline.preprocess_celeb_a(record, 64)
  np.testing.assert_allclose(got, expected / 127.5 - 1.0, atol=1.01 / 127.5)
  # Only the box matters: white inside, black outside -> all white.
  boxed = np.zeros_like(image)
  boxed[57:185, 25:153] = 255
  np.testing.assert_array_equal(input_pipeline.preprocess_celeb_a({"image": boxed}, 64), 1.0)


@pytest.mark.parametrize("dataset", ["lsun_church", "lsun_bedroom"])
def test_lsun_mock_end_to_end(dataset):
  with tfds.testing.mock_data(num_examples=20):
    x = first_batch(data_config(dataset=dataset, image_size=16))
  assert x.shape == (1, 8, 16, 16, 3) and x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.1


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (40, 63), (37, 37)])
def test_lsun_preprocessing_is_ddims_resize_then_centre_crop(shape):
  """DDIM's LSUN transform: the shorter side to the size (the longer to int(size * long /
  short)), then the centred square, its offset rounded as torchvision's CenterCrop."""
  h, w = shape
  size = 20
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  got = input_pipeline.preprocess_lsun({"image": image}, size)
  assert got.shape == (size, size, 3) and got.dtype == np.float32
  rh, rw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  resized = np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                                 .resize((rw, rh), Image.BILINEAR)) for c in range(3)], -1)
  top, left = round((rh - size) / 2), round((rw - size) / 2)
  np.testing.assert_allclose(got, resized[top:top + size, left:left + size] / 127.5 - 1.0,
                             atol=1e-5)
  # Only the centred square (with a 4-pixel margin for the filter and the rounding) matters:
  # white there, black elsewhere -> all white.
  boxed = np.zeros_like(image)
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  boxed[max(top - 4, 0):top + side + 4, max(left - 4, 0):left + side + 4] = 255
  np.testing.assert_allclose(input_pipeline.preprocess_lsun({"image": boxed}, size), 1.0,
                             atol=1e-5)


def test_digits_source():
  x8 = input_pipeline.load_digits(8)
  assert x8.shape == (1797, 8, 8, 1) and x8.min() == -1.0 and x8.max() == 1.0
  assert len(np.unique(x8)) == 17  # 17 grey levels, /16 -> [-1, 1]
  padded = input_pipeline.load_digits(16, "pad")
  assert padded.shape == (1797, 16, 16, 1)
  np.testing.assert_array_equal(padded[:, 4:12, 4:12], x8)
  assert (padded[:, :4] == -1.0).all()
  resized = input_pipeline.load_digits(16, "resize")
  assert resized.shape == (1797, 16, 16, 1) and resized.min() >= -1.0 and resized.max() <= 1.0
  x = first_batch(data_config(dataset="digits", image_size=8, num_channels=1), batch=16)
  assert x.shape == (1, 16, 8, 8, 1)


def test_shuffling_is_deterministic_and_covers_each_epoch(tmp_path):
  images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
  np.savez(tmp_path / "a.npz", images=images)
  data = data_config(dataset="npz", path=str(tmp_path / "a.npz"), image_size=4)
  ids = lambda ds, i: np.round((ds[i][:, 0, 0, 0] + 1.0) * 127.5).astype(int).tolist()
  ds = input_pipeline.create_dataset(data, 5, seed=3, num_devices=1)
  again = input_pipeline.create_dataset(data, 5, seed=3, num_devices=1)
  other = input_pipeline.create_dataset(data, 5, seed=4, num_devices=1)
  epoch0 = ids(ds, 0) + ids(ds, 1)
  epoch1 = ids(ds, 2) + ids(ds, 3)
  assert sorted(epoch0) == sorted(epoch1) == list(range(10))
  assert epoch0 != epoch1  # reshuffled each epoch
  assert [ids(again, i) for i in range(4)] == [ids(ds, i) for i in range(4)]
  assert [ids(other, i) for i in range(4)] != [ids(ds, i) for i in range(4)]


def test_processes_hold_their_block_of_each_global_batch(tmp_path, monkeypatch):
  images = np.arange(16, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  np.savez(tmp_path / "a.npz", images=images)
  data = data_config(dataset="npz", path=str(tmp_path / "a.npz"), image_size=4, num_channels=1)
  whole = input_pipeline.create_dataset(data, 8, seed=0, num_devices=2)
  ids = lambda batch: np.round((batch[:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    parts.append(input_pipeline.create_dataset(data, 8, seed=0, num_devices=2))
  for step in range(3):
    assert parts[0][step].shape == (4, 4, 4, 1)  # the per-process half of the global batch
    first, second = ids(parts[0][step]), ids(parts[1][step])
    assert not set(first) & set(second)
    assert first + second == ids(whole[step])  # rows in the order one process has them
  assert sorted(ids(parts[0][0]) + ids(parts[1][0]) + ids(parts[0][1]) + ids(parts[1][1])
                ) == list(range(16))


def test_image_folder_and_npz_sources(tmp_path):
  folder = tmp_path / "images"
  (folder / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.integers(0, 256, (12, 12), np.uint8)).save(folder / "sub" / "b.jpg")
  (folder / "notes.txt").write_text("not an image")
  source = input_pipeline.ImageFolder(str(folder), 8, 3)
  assert len(source) == 2 and source[0].shape == source[1].shape == (8, 8, 3)
  x = first_batch(data_config(dataset="image_folder", path=str(folder), image_size=8))
  assert x.shape == (1, 8, 8, 8, 3) and x.min() >= -1.0 and x.max() <= 1.0

  np.savez(tmp_path / "f.npz", x=rng.uniform(-1, 1, (6, 8, 8)).astype(np.float32))
  x = input_pipeline.load_npz(str(tmp_path / "f.npz"), "", 8)
  assert x.shape == (6, 8, 8, 1)
  batches = list(input_pipeline.evaluation_batches(
      data_config(dataset="npz", path=str(tmp_path / "f.npz"), image_size=8, num_channels=1), 4))
  assert [b.shape[0] for b in batches] == [4, 2]
  np.testing.assert_allclose(np.concatenate(batches), x)


@pytest.mark.parametrize("overrides, batch, message", [
    (dict(dataset="mnist"), 8, "unknown dataset 'mnist'"),
    (dict(dataset="digits", num_channels=1), 12, "not divisible by the device count 8"),
    (dict(dataset="digits", num_channels=3), 8, "has 1 channels but data.num_channels is 3"),
    (dict(dataset="image_folder", path="EMPTY"), 8, "contains no images"),
    (dict(dataset="image_folder", path="/nonexistent/folder"), 8, "does not exist"),
    (dict(dataset="npz", path="TWO"), 8, "set data.npz_key"),
    (dict(dataset="npz", path="RANGE"), 8, "must lie in [-1, 1]"),
])
def test_bad_input_is_a_clear_error(tmp_path, overrides, batch, message):
  (tmp_path / "empty").mkdir()
  np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4, 3)), b=np.zeros((2, 4, 4, 3)))
  np.savez(tmp_path / "range.npz", a=np.full((2, 4, 4, 3), 2.0))
  paths = {"EMPTY": tmp_path / "empty", "TWO": tmp_path / "two.npz",
           "RANGE": tmp_path / "range.npz"}
  if overrides.get("path") in paths:
    overrides = dict(overrides, path=str(paths[overrides["path"]]))
  with pytest.raises(ValueError, match=re.escape(message)):
    input_pipeline.create_dataset(data_config(**overrides), batch, seed=0)


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
  data = data_config(dataset="cifar10", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="tfds build cifar10 --file_format=array_record"):
    input_pipeline.create_dataset(data, 8, seed=0)
