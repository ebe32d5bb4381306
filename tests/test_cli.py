"""main.py as a user meets it: bad input, help, logs, kill -9 and resume, concurrent runs, eval."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from fid_weights import random_jax_fid_pickle
from test_generation import read_all, sample_dir_of

from pndm_jax import checkpoints, models, sample_store
from pndm_jax.evaluation import fid, inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
GMM = ["--config=configs/gmm_pndm.py", "--config.sampler.num_steps=10"]


def start_main(*args):
  return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=ENV)


def snapshot(root):
  """{path: (size, mtime)} of every file below `root`: what "nothing changed" compares."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
  """A workdir holding a finished 21-image GMM run (F-PNDM, 10 steps, chunks of 8)."""
  workdir = tmp_path_factory.mktemp("good")
  result = run_main(*GMM, f"--workdir={workdir}", "--config.sampler.num_samples=21",
                    "--config.sampler.chunk_size=8")
  assert result.returncode == 0, result.stderr
  return workdir


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  """Files the bad-input table points at: a plain file and a truncated params directory."""
  root = tmp_path_factory.mktemp("inputs")
  (root / "a_file").write_text("not a directory")
  unet = models.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                     dropout=0.0, in_channels=1, out_channels=1, image_size=8)
  params = unet.init(jax.random.key(0), np.zeros((1, 8, 8, 1)), np.zeros((1,)))["params"]
  path = root / "damaged_params"
  checkpoints.save_params(str(path), unet, jax.device_get(params))
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs),
                key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  return root


TINY_UNET = ["--config.model.name=unet", "--config.model.ch=32", "--config.model.ch_mult=(1, 2)",
             "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=()",
             "--config.data.num_channels=1"]

# (arguments, what the error line must name); {inputs} is the folder of bad_inputs.
BAD_INPUTS = [
    (["--config=configs/no_such.py"], ["configs/no_such.py", "configs/gmm_pndm.py"]),
    ([], ["--config=FILE is required", "configs/digits_pndm.py"]),
    (GMM + ["--config.sampler.metod=ddim"], ["metod", "did you mean config.sampler.method"]),
    (GMM + ["--config.sampler.num_steps=ten"], ["num_steps", "ten"]),
    (GMM + ["--mode=render"], ["--mode=render", "train|sample|convert|stats|eval"]),
    (GMM + ["--config.sampler.method=dpm-solver"], ["'dpm-solver'", "ddim, s-pndm, f-pndm"]),
    (GMM + ["--config.sampler.num_steps=2"], ["at least 4 steps"]),
    (GMM + ["--config.sampler.convention=diffusers"], ["'uniform'", "'leading', 'trailing'"]),
    (GMM + ["--config.sampler.steps_offset=1"], ["steps_offset (1)", "'leading' only"]),
    (GMM + ["--config.sampler.grid_end=sigma"], ["'sigma'", "zero, sigma_min"]),
    (GMM + ["--config.sampler.grid_end=sigma_min"], ["end 'sigma_min'", "'consistent'"]),
    (GMM + ["--config.sampler.method=dpm++2m", "--config.sampler.denoise_to_zero=True",
            "--config.sampler.convention=consistent"], ["denoise_to_zero", "sigma = 0"]),
    (GMM + ["--config.sampler.thresholding=True", "--config.sampler.threshold_ratio=2"],
     ["ratio=2.0", "0 < ratio <= 1"]),
    (GMM + ["--config.sampler.method=ddpm", "--config.sampler.lower_order_final=True"],
     ["lower_order_final", "deterministic methods"]),
    (GMM + ["--config.model.prediction_type=v_prediction"], ["digits_gmm is analytic",
                                                              "'v_prediction'"]),
    (GMM + ["--config.diffusion.schedule=trained",
            "--config.diffusion.trained_betas={inputs}/missing.npy"], ["missing.npy"]),
    (["--config=configs/digits_pndm.py", "--config.model.dtype=bfloat"],
     ["config.model.dtype='bfloat'", "float32, bfloat16"]),
    (GMM + ["--mode=train", "--config.data.dataset=mnist"], ["'mnist'", "cifar10, celeb_a"]),
    (GMM + ["--workdir={inputs}/a_file"], ["a_file", "is a file"]),
    (GMM + ["--workdir={inputs}/a_file/run"], ["a_file/run", "cannot be written"]),
    (GMM + ["--config.sampler.num_samples=21", "--config.sampler.chunk_size=4"],
     ["chunk_size", "directory 8, now 4"]),
    (GMM + TINY_UNET + ["--config.sampler.checkpoint={inputs}/damaged_params"],
     ["damaged_params", "truncated or corrupt"]),
    (GMM + ["--mode=convert"], ["config.sampler.checkpoint", "empty"]),
    (GMM + ["--mode=eval"], ["config.eval.stats_file", "empty"]),
    (GMM + ["--mode=stats", "--config.eval.metric=inception", "--config.eval.stats_file=x.npz"],
     ["'inception'", "fid, fd_digits"]),
]


@pytest.mark.parametrize("args, names", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_is_one_error_line_and_changes_nothing(good_run, bad_inputs, args, names):
  args = [a.format(inputs=bad_inputs) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={good_run}")
  before = snapshot(good_run)
  result = run_main(*args)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr
  assert "Traceback" not in result.stderr
  for name in names:
    assert name in result.stderr, result.stderr
  assert snapshot(good_run) == before


def test_help_names_modes_configs_and_fields():
  result = run_main("--help")
  assert result.returncode == 0, result.stderr
  for text in ("sample", "train", "convert", "stats", "eval", "configs/celeba_pndm.py",
               "--show_config", "--workdir"):
    assert text in result.stdout
  result = run_main("--config=configs/gmm_pndm.py", "--show_config")
  assert result.returncode == 0 and "num_steps: 50" in result.stdout


def test_first_run_is_quiet_and_the_reference_names_are_aliases(tmp_path):
  digits = ["--config=configs/digits_pndm.py", "--config.sampler.num_steps=10",
            "--config.sampler.num_samples=8", f"--workdir={tmp_path}"]
  result = run_main(*digits, "--config.sampler.method=F-PNDM")
  assert result.returncode == 0, result.stderr
  assert "orbax" not in result.stderr and len(result.stderr.splitlines()) <= 4, result.stderr
  assert os.path.basename(sample_dir_of(tmp_path)).startswith("f-pndm-10-seed0-")
  result = run_main(*digits, "--config.sampler.method=f-pndm", "--verbose")
  assert "0 made by this run" in result.stdout  # the same images, the same directory
  assert "orbax" in result.stderr  # --verbose brings third-party INFO back


def test_runs_of_other_settings_share_a_workdir(tmp_path):
  for steps in ("10", "20"):
    result = run_main(*GMM, f"--workdir={tmp_path}", f"--config.sampler.num_steps={steps}",
                      "--config.sampler.num_samples=4")
    assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(tmp_path / "samples"))[0].startswith("f-pndm-10-")
  assert len(os.listdir(tmp_path / "samples")) == 2


def test_kill_9_during_sampling_then_resume(tmp_path):
  common = ["--config=configs/digits_pndm.py", "--config.sampler.num_samples=32",
            "--config.sampler.chunk_size=4", "--config.sampler.batch_size=4"]
  straight = run_main(*common, f"--workdir={tmp_path / 'straight'}")
  assert straight.returncode == 0, straight.stderr
  proc = start_main(*common, f"--workdir={tmp_path / 'killed'}")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:  # kill once the first chunk is out
    samples = tmp_path / "killed" / "samples"
    if samples.exists() and any(n.endswith(".npz") for d in os.listdir(samples)
                                for n in os.listdir(samples / d)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  sample_dir = sample_dir_of(tmp_path / "killed")
  kept = sum(sample_store.check_chunk(sample_dir, k, 4, 32) is None for k in range(8))
  resumed = run_main(*common, f"--workdir={tmp_path / 'killed'}")
  assert resumed.returncode == 0, resumed.stderr
  assert f"({32 - 4 * kept} made by this run" in resumed.stdout  # exactly the missing chunks
  want, got = read_all(sample_dir_of(tmp_path / "straight")), read_all(sample_dir)
  np.testing.assert_array_equal(got[1], np.arange(32))  # no image missing or twice
  assert np.max(np.abs(got[0].astype(int) - want[0])) <= 1
  assert not [f for f in os.listdir(sample_dir) if f.endswith(".claim") or ".tmp" in f]


def test_two_concurrent_samplers_make_each_chunk_once(tmp_path):
  common = [*GMM, f"--workdir={tmp_path}", "--config.sampler.num_samples=64",
            "--config.sampler.chunk_size=4", "--config.sampler.batch_size=4"]
  procs = [start_main(*common) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
  made = [int(re.search(r"\((\d+) made by this run", out)[1]) for out, _ in outs]
  assert sum(made) == 64, made
  images, indices = read_all(sample_dir_of(tmp_path))
  np.testing.assert_array_equal(indices, np.arange(64))


def eval_setup(tmp_path):
  """Random Inception weights and reference statistics (FID runs through the real pipeline)."""
  rng = np.random.default_rng(0)
  weights, stats = tmp_path / "inception.pickle", tmp_path / "stats.npz"
  random_jax_fid_pickle(str(weights))
  a = rng.standard_normal((inception.FEATURE_DIM, 8))
  fid.save_stats(str(stats), rng.standard_normal(inception.FEATURE_DIM), a @ a.T)
  return ["--config.eval.metric=fid", f"--config.eval.inception_weights={weights}",
          f"--config.eval.stats_file={stats}", "--config.eval.batch_size=8"]


def test_eval_records_what_the_samples_were_made_with(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  evaluation = eval_setup(tmp_path)
  common = [*GMM, f"--workdir={workdir}", "--config.sampler.chunk_size=4",
            "--config.sampler.num_steps=20", "--config.sampler.method=s-pndm"]
  result = run_main(*common, "--config.sampler.num_samples=8")
  assert result.returncode == 0, result.stderr
  sample_dir = sample_dir_of(workdir)
  result = run_main(*common, "--mode=eval", "--config.sampler.num_samples=12", *evaluation)
  assert result.returncode == 2 and "images 0..7 of the 12 requested" in result.stderr

  result = run_main(*common, "--mode=eval", "--config.sampler.num_samples=12",
                    "--config.eval.subset=True", *evaluation)
  assert result.returncode == 0, result.stderr
  record = json.load(open(workdir / "fid.json"))
  assert record["num_images"] == 8 and record["num_requested"] == 12 and record["subset"]
  assert record["sampler_settings"]["method"] == "s-pndm"
  assert record["sampler_settings"]["num_steps"] == 20 and record["nfe_per_image"] == 21
  assert record["sampler_settings"]["weights"].startswith("analytic digits_gmm")

  # The command line may not contradict the directory's settings.
  result = run_main(*GMM, f"--workdir={workdir}", "--mode=eval", *evaluation,
                    f"--config.sampler.sample_dir={sample_dir}", "--config.sampler.num_samples=8")
  assert result.returncode == 2 and "num_steps: directory 20, now 10" in result.stderr

  with open(os.path.join(sample_dir, "samples_00001.npz"), "r+b") as f:
    f.truncate(64)
  result = run_main(*common, "--mode=eval", "--config.sampler.num_samples=8", *evaluation)
  assert result.returncode == 2 and "samples_00001.npz" in result.stderr
  assert "Traceback" not in result.stderr


def test_stats_never_overwrites_without_being_asked(tmp_path):
  stats = tmp_path / "digits_stats.npz"
  common = [*GMM, f"--workdir={tmp_path / 'run'}", "--config.eval.metric=fd_digits",
            f"--config.eval.stats_file={stats}", "--config.eval.num_images=300"]
  result = run_main(*common, "--mode=stats")
  assert result.returncode == 0, result.stderr
  before = snapshot(tmp_path)
  result = run_main(*common, "--mode=stats")
  assert result.returncode == 2 and "--config.eval.overwrite=True" in result.stderr
  assert snapshot(tmp_path) == before
  result = run_main(*common, "--mode=stats", "--config.eval.overwrite=True",
                    "--config.eval.num_images=200")
  assert result.returncode == 0, result.stderr
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left
  unwritable = run_main(*common, "--mode=stats",
                        f"--config.eval.stats_file={tmp_path / 'digits_stats.npz' / 'x.npz'}")
  assert unwritable.returncode == 2 and "cannot write statistics" in unwritable.stderr


def test_training_resume_errors_lose_nothing_and_any_step_samples(tmp_path):
  train = ["--config=configs/digits_train.py", f"--workdir={tmp_path}", "--mode=train",
           "--config.training.num_train_steps=2", "--config.training.checkpoint_every=1",
           "--config.training.sample_every=0", "--config.training.log_every=1"]
  result = run_main(*train)
  assert result.returncode == 0, result.stderr
  before = snapshot(tmp_path)
  for args, names in [
      (["--config.model.ch=64"], ["does not fit", "conv_in", "(3, 3, 1, 32)"]),
      (["--config.training.num_train_steps=1"], ["at step 2", "num_train_steps=1"])]:
    result = run_main(*train, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line[:6] for line in result.stderr.splitlines()].count("error:") == 1
    assert "restore_fallback" not in result.stderr
    for name in names:
      assert name in result.stderr, result.stderr
    assert snapshot(tmp_path) == before  # config_train.json and the checkpoints untouched

  sample = ["--config=configs/digits_train.py", f"--workdir={tmp_path}", "--mode=sample",
            "--config.sampler.num_samples=4", "--config.sampler.num_steps=5",
            "--config.sampler.method=ddim"]
  result = run_main(*sample, f"--config.sampler.checkpoint={tmp_path / 'checkpoints' / '1'}")
  assert result.returncode == 0, result.stderr
  settings = json.load(open(os.path.join(sample_dir_of(tmp_path), "sampling.json")))
  assert settings["weights"] == f"{tmp_path / 'checkpoints'} step 1 (EMA)"
