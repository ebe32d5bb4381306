"""Sharded, resumable sample generation (`generation`) and the `main.py --mode=sample` command."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import gmm_pndm
from pndm_jax import checkpoints, eps_models, generation, models, sample_store, sharding
from pndm_jax.sampler_spec import from_config as spec_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gmm_config(**sampler):
  config = gmm_pndm.get_config()
  config.sampler.update(dict(num_samples=21, chunk_size=8, batch_size=8, num_steps=10))
  config.sampler.update(sampler)
  return config


def load_model(config):
  return eps_models.load(config, spec_of(config), "")


def sample_dir_of(workdir):
  """The one sample directory a CLI run made under <workdir>/samples."""
  (name,) = os.listdir(os.path.join(workdir, "samples"))
  return os.path.join(workdir, "samples", name)


def read_all(sample_dir):
  chunks = sorted(f for f in os.listdir(sample_dir) if f.startswith("samples_"))
  loaded = [np.load(os.path.join(sample_dir, f)) for f in chunks]
  return (np.concatenate([s["images"] for s in loaded]),
          np.concatenate([s["indices"] for s in loaded]))


def test_chunks_hold_every_image_once(tmp_path):
  config = gmm_config()
  summary = generation.generate_samples(load_model(config), spec_of(config), str(tmp_path))
  images, indices = read_all(tmp_path)
  assert images.dtype == np.uint8 and images.shape == (21, 8, 8, 1)
  assert list(indices) == list(range(21))
  assert sorted(os.listdir(tmp_path)) == ["grid.png", "samples_00000.npz", "samples_00001.npz",
                                          "samples_00002.npz", "sampling.json", "summary.json"]
  assert summary["nfe_per_image"] == 19 and summary["images_made_now"] == 21
  assert summary["num_images"] == 21 and summary["complete"]
  assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))


def test_batches_stop_at_the_chunk_compile_once_and_params_stay_on_device(tmp_path,
                                                                          monkeypatch):
  """batch_size 64 for chunks of 8: batches of 8 (not 64 to keep 8), one compiled size for
  the short last chunk too, and the parameters put on the devices once, not per call."""
  config = gmm_config(batch_size=64)
  model = load_model(config)
  model = generation.EpsModel(model.apply, {"scale": np.ones(())}, model.image_shape,
                              model.source)
  made, calls = [], []

  def recording(*args):
    generate = make_generate_fn(*args)
    made.append(generate)

    def call(params, indices):
      calls.append((params["scale"], indices.shape))
      return generate(params, indices)
    return call

  make_generate_fn = generation.make_generate_fn
  monkeypatch.setattr(generation, "make_generate_fn", recording)
  summary = generation.generate_samples(model, spec_of(config), str(tmp_path), jax.devices()[:2])
  assert summary["batch_size"] == 8 and summary["num_images"] == 21
  assert [shape for _, shape in calls] == [(8,)] * 3
  assert made[0]._cache_size() == 1
  scale = calls[0][0]
  assert isinstance(scale, jax.Array) and all(p is scale for p, _ in calls)
  assert scale.sharding.is_equivalent_to(sharding.replicated(sharding.batch_mesh(
      jax.devices()[:2])), 0)
  spec = spec_of(gmm_config(batch_size=64, num_samples=5, method="pf"))
  assert spec_of(gmm_config(batch_size=64, num_samples=5)).device_batch(8) == 8
  assert spec_of(gmm_config(batch_size=6, chunk_size=100)).device_batch(4) == 8
  assert spec.device_batch(8) == 64  # pf: the batch size is one of its image settings


# Images agree across batch shapes and device counts to within this many levels of 255:
# XLA promises no bitwise-equal floats across batch shapes, device counts or CPU kernels.
IMAGE_LEVELS = 1
FLOAT_ATOL = 1e-4  # the float outputs in [-1, 1] (seen: 1.6e-5 after 50 F-PNDM steps)


@pytest.mark.parametrize("method", ["f-pndm", "ddpm"])
def test_device_count_and_batch_size_invariance_gmm(tmp_path, method):
  devices = jax.devices()
  assert len(devices) == 8
  runs = []
  for name, devs, batch in [("one", devices[:1], 8), ("eight", devices, 16), ("odd", devices, 5)]:
    config = gmm_config(method=method, batch_size=batch)
    generation.generate_samples(load_model(config), spec_of(config), str(tmp_path / name), devs)
    runs.append(read_all(tmp_path / name)[0].astype(int))
  for other in runs[1:]:
    assert np.max(np.abs(other - runs[0])) <= IMAGE_LEVELS
    assert np.mean(other != runs[0]) < 0.01  # off by one level at rare rounding ties only


@pytest.mark.parametrize("method", ["f-pndm", "ddpm"])
def test_float_outputs_agree_across_batch_shapes_and_devices(method):
  config = gmm_config(method=method)
  model = load_model(config)
  indices = np.arange(10, 15)
  outputs = []
  for devs, batch in [(jax.devices()[:1], 5), (jax.devices(), 8), (jax.devices()[:2], 16)]:
    mesh = sharding.batch_mesh(devs)
    generate = generation.make_generate_fn(model, spec_of(config), mesh)
    x0, _ = generate(model.params, sharding.pad_batch(indices, batch).astype(np.int32))
    outputs.append(np.asarray(x0)[:len(indices)])
  assert np.abs(outputs[0]).max() > 0.5  # real images, not zeros
  for other in outputs[1:]:
    np.testing.assert_allclose(other, outputs[0], rtol=0, atol=FLOAT_ATOL)


def test_device_count_invariance_unet(tmp_path):
  unet = models.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     dropout=0.0, in_channels=1, out_channels=1, image_size=8)
  params = unet.init(jax.random.key(0), np.zeros((1, 8, 8, 1)), np.zeros((1,)))["params"]
  model = generation.network_model(unet, params)
  config = gmm_config(num_samples=16, chunk_size=16, num_steps=5, method="ddim")
  outs = []
  for name, devs in [("one", jax.devices()[:1]), ("eight", jax.devices())]:
    generation.generate_samples(model, spec_of(config), str(tmp_path / name), devs)
    outs.append(read_all(tmp_path / name)[0].astype(int))
  assert np.max(np.abs(outs[0] - outs[1])) <= IMAGE_LEVELS


def test_interrupted_run_resumes_to_the_same_set(tmp_path, monkeypatch):
  config = gmm_config()
  model = load_model(config)
  generation.generate_samples(model, spec_of(config), str(tmp_path / "straight"))

  real_savez, calls = np.savez, []

  def crash_on_second_chunk(file, **arrays):
    calls.append(file)
    if len(calls) == 2:
      file.write(b"PK\x03\x04 half a chunk")
      raise KeyboardInterrupt("killed mid-write")
    real_savez(file, **arrays)

  monkeypatch.setattr(np, "savez", crash_on_second_chunk)
  with pytest.raises(KeyboardInterrupt):
    generation.generate_samples(model, spec_of(config), str(tmp_path / "resumed"))
  done = sorted(f for f in os.listdir(tmp_path / "resumed") if f.startswith("samples_"))
  assert done == ["samples_00000.npz"]
  monkeypatch.setattr(np, "savez", real_savez)
  summary = generation.generate_samples(model, spec_of(config), str(tmp_path / "resumed"))
  assert summary["images_made_now"] == 13  # chunks 1 and 2 only
  straight, resumed = read_all(tmp_path / "straight"), read_all(tmp_path / "resumed")
  assert np.array_equal(straight[0], resumed[0]) and np.array_equal(straight[1], resumed[1])


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
  config = gmm_config()
  generation.generate_samples(load_model(config), spec_of(config), str(tmp_path))
  before = {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)}
  other = gmm_config(num_steps=20)
  with pytest.raises(ValueError, match="num_steps"):
    generation.generate_samples(load_model(other), spec_of(other), str(tmp_path))
  assert {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)} == before


def test_resume_verifies_chunks_and_remakes_bad_ones(tmp_path):
  config = gmm_config()
  model = load_model(config)
  generation.generate_samples(model, spec_of(config), str(tmp_path / "straight"))
  generation.generate_samples(model, spec_of(config), str(tmp_path / "damaged"))
  chunk1, chunk2 = (sample_store.chunk_path(str(tmp_path / "damaged"), k) for k in (1, 2))
  with open(chunk1, "r+b") as f:
    f.truncate(100)  # a chunk cut short by a full disk or a copy
  with np.load(chunk2) as f:
    np.savez(chunk2, images=f["images"], indices=f["indices"] - 16)  # the wrong images
  with pytest.raises(sample_store.SampleDirError, match="bad chunk .*samples_00001.npz"):
    sample_store.contents(str(tmp_path / "damaged"))
  summary = generation.generate_samples(model, spec_of(config), str(tmp_path / "damaged"))
  assert summary["images_made_now"] == 13  # chunks 1 and 2 again, chunk 0 kept
  straight, repaired = read_all(tmp_path / "straight"), read_all(tmp_path / "damaged")
  assert np.array_equal(straight[0], repaired[0]) and np.array_equal(straight[1], repaired[1])


def test_num_samples_can_grow_and_shrink(tmp_path):
  model = load_model(gmm_config())
  make = lambda n, name: generation.generate_samples(model, spec_of(gmm_config(num_samples=n)),
                                                     str(tmp_path / name))
  make(30, "straight")
  make(21, "grown")
  summary = make(30, "grown")
  assert summary["images_made_now"] == 14  # the short chunk 2 made whole, then chunk 3
  assert summary["num_images"] == 30 and summary["complete"]
  straight, grown = read_all(tmp_path / "straight"), read_all(tmp_path / "grown")
  assert np.array_equal(straight[0], grown[0]) and np.array_equal(straight[1], grown[1])
  summary = make(10, "grown")
  assert summary["images_made_now"] == 0 and summary["num_images"] == 10
  assert json.load(open(tmp_path / "grown" / "sampling.json"))["num_samples"] == 30


def test_a_dead_processs_claim_is_taken_over(tmp_path):
  config = gmm_config()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  with open(tmp_path / "samples_00001.claim", "w") as f:
    json.dump({"host": socket.gethostname(), "pid": int(dead.stdout)}, f)
  summary = generation.generate_samples(load_model(config), spec_of(config), str(tmp_path))
  assert summary["images_made_now"] == 21 and summary["complete"]
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".claim")]


def _claim_all(sample_dir: str, num_chunks: int, start, won, done) -> None:
  dump = json.dump
  def slow_dump(*args, **kwargs):  # a claimant descheduled while it writes its claim
    time.sleep(0.002)
    dump(*args, **kwargs)
  json.dump = slow_dump
  start.wait()
  won.put([k for k in range(num_chunks) if sample_store.try_claim(sample_dir, k)])
  done.wait()  # alive until every process has tried: a dead one's claims may be taken over


def test_racing_claims_give_each_chunk_one_claimant(tmp_path):
  """Live processes claiming the same chunks at once, each slow to write its claim:
  one wins each (an empty claim file caught mid-write once read as a dead
  claimant's, so two processes made that chunk)."""
  ctx, num_chunks = multiprocessing.get_context("spawn"), 100
  start, won, done = ctx.Event(), ctx.Queue(), ctx.Event()
  procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), num_chunks, start, won, done))
           for _ in range(4)]
  for p in procs:
    p.start()
  start.set()
  claimed = [won.get(timeout=120) for _ in procs]
  done.set()
  for p in procs:
    p.join(timeout=60)
  assert sorted(sum(claimed, [])) == list(range(num_chunks)), [len(c) for c in claimed]
  assert len(os.listdir(tmp_path)) == num_chunks  # the claims only, no drafts left


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
  config = gmm_config()
  config.model.name = "unet"
  with pytest.raises(checkpoints.CheckpointError, match="(?s)--mode=train.*--mode=convert"):
    eps_models.load(config, spec_of(config), str(tmp_path))


# --- main.py end to end ---


def run_main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600,
                        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})


def test_main_sample_gmm_with_overrides(tmp_path):
  result = run_main("--config=configs/gmm_pndm.py", "--mode=sample", f"--workdir={tmp_path}",
                    "--config.sampler.method=s-pndm", "--config.sampler.num_steps=20",
                    "--config.sampler.num_samples=10", "--config.sampler.save_pngs=True")
  assert result.returncode == 0, result.stderr
  sample_dir = sample_dir_of(tmp_path)
  assert os.path.basename(sample_dir).startswith("s-pndm-20-seed0-")
  summary = json.load(open(os.path.join(sample_dir, "summary.json")))
  assert summary["nfe_per_image"] == 21 and summary["settings"]["method"] == "s-pndm"
  resolved = json.load(open(tmp_path / "config_sample.json"))
  assert resolved["sampler"]["method"] == "s-pndm" and resolved["sampler"]["num_steps"] == 20
  images, _ = read_all(sample_dir)
  assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
  pngs = sorted(os.listdir(os.path.join(sample_dir, "png")))
  assert pngs == [f"{i:06d}.png" for i in range(10)]
  assert np.array_equal(np.asarray(Image.open(os.path.join(sample_dir, "png", pngs[3]))),
                        images[3, :, :, 0])
  with Image.open(os.path.join(sample_dir, "grid.png")) as grid:
    assert grid.size[0] > 8 and np.asarray(grid).std() > 0


def test_main_sample_shipped_digits_model(tmp_path):
  result = run_main("--config=configs/digits_pndm.py", f"--workdir={tmp_path}",
                    "--config.sampler.num_samples=16", "--config.sampler.num_steps=10")
  assert result.returncode == 0, result.stderr
  images, indices = read_all(sample_dir_of(tmp_path))
  assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8
  assert list(indices) == list(range(16)) and images.std() > 10
  with Image.open(os.path.join(sample_dir_of(tmp_path), "grid.png")) as grid:
    assert grid.size == (4 * 34 + 2, 4 * 34 + 2)  # 4x4 digits enlarged to 32 px, 2 px gaps


TINY_UNET_FLAGS = ["--config.model.name=unet", "--config.model.ch=32",
                   "--config.model.ch_mult=(1, 2)", "--config.model.num_res_blocks=2",
                   "--config.model.attn_resolutions=(4,)", "--config.model.dropout=0.0"]


def test_main_convert_then_sample_a_diffusers_folder(tmp_path):
  from diffusers_models import diffusers_unet  # torch only where conversion is tested
  folder = tmp_path / "ddpm-tiny"
  arch = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "UpBlock2D"), sample_size=8, in_channels=1,
              out_channels=1)
  diffusers_unet(arch).save_pretrained(folder)
  workdir = tmp_path / "run"
  common = ["--config=configs/gmm_pndm.py", f"--workdir={workdir}", *TINY_UNET_FLAGS]
  result = run_main(*common, "--mode=convert", f"--config.sampler.checkpoint={folder}")
  assert result.returncode == 0, result.stderr
  assert (workdir / "converted" / "model.json").exists()
  result = run_main(*common, "--mode=sample", "--config.sampler.num_samples=4",
                    "--config.sampler.num_steps=5", "--config.sampler.method=ddim")
  assert result.returncode == 0, result.stderr
  images, _ = read_all(sample_dir_of(workdir))
  assert images.shape == (4, 8, 8, 1)

  (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
  before = sorted(os.listdir(workdir / "converted"))
  result = run_main(*common, "--mode=convert",
                    f"--config.sampler.checkpoint={tmp_path / 'broken.ckpt'}")
  assert result.returncode == 2 and "broken.ckpt" in result.stderr
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(workdir / "converted")) == before


@pytest.mark.parametrize("args, message", [
    (["--config.sampler.method=dpm-solver"], "valid choices: ddpm, ddim, s-pndm, f-pndm"),
    (["--mode=render"], "one of <train|sample|convert|stats|eval>"),
    (["--config.sampler.num_steps=2"], "at least 4 steps"),
])
def test_main_rejects_bad_input_before_any_compute(tmp_path, args, message):
  result = run_main("--config=configs/gmm_pndm.py", f"--workdir={tmp_path}", *args)
  assert result.returncode != 0 and message in result.stderr
  assert not (tmp_path / "samples").exists()


def test_every_image_setting_gets_its_own_default_directory():
  base = gmm_config(method="ddim")
  dirs = {generation.default_sample_dir(spec_of(base), "w")}
  for change in [dict(eta=0.5), dict(eta=1.0), dict(num_steps=20), dict(seed=1),
                 dict(convention="consistent"), dict(method="DDIM", num_steps=5)]:
    config = gmm_config(method="ddim")
    config.sampler.update(change)
    dirs.add(generation.default_sample_dir(spec_of(config), "w"))
  assert len(dirs) == 7  # "DDIM" at 5 steps is "ddim" at 5 steps: a new directory for the steps
  assert spec_of(gmm_config(method="ddim", eta=0.5)).image_settings()["eta"] == 0.5
  assert (generation.default_sample_dir(spec_of(gmm_config(method="DDIM")), "w")
          == generation.default_sample_dir(spec_of(gmm_config(method="ddim")), "w"))


def test_sample_directories_record_the_options_a_method_runs_with():
  config = gmm_pndm.get_config()
  config.sampler.convention, config.sampler.spacing = "consistent", "logsnr"
  plain = spec_of(config).image_settings()
  assert not {"lower_order_final", "denoise_to_zero", "thresholding"} & set(plain)
  config.sampler.method = "dpm++2m"
  assert spec_of(config).image_settings()["lower_order_final"] is True
  config.sampler.lower_order_final = False
  config.sampler.thresholding, config.sampler.grid_end = True, "sigma_min"
  settings = spec_of(config).image_settings()
  assert "lower_order_final" not in settings and settings["end"] == "sigma_min"
  assert settings["thresholding"] == dict(ratio=0.995, max_value=1.0)
