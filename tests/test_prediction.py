"""Networks predicting x0 (`sample`) or v (`v_prediction`): converted to eps at the model boundary.

The conversion recovers eps exactly, the sampling path (eps_models.load -> network_model) applies
it, bad names fail before any compute, training refuses anything but epsilon, and one DDIM step
matches diffusers' DDIMScheduler for the same network output.
"""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_train
from pndm_jax import eps_models, generation, models, samplers, schedules, train
from pndm_jax.convert import abstract_params
from pndm_jax.models import PREDICTION_TYPES, eps_from_output, to_eps
from pndm_jax.sampler_spec import from_config as spec_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
LINEAR = schedules.Schedule("linear")
# integer and fractional timesteps, the ends of the table included
T = np.array([0.0, 1.0, 1.5, 250.0, 499.25, 998.75, 999.0])


def output_of(prediction_type, x0, eps, a):
  """What a network of `prediction_type` outputs for (x0, eps) at alpha-bar a (the definitions)."""
  return {"epsilon": eps, "sample": x0,
          "v_prediction": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction_type]


def test_alpha_bar_is_the_training_table_at_integers_and_between_it_elsewhere():
  a = LINEAR.alpha_bar(T, "consistent")
  integer = T == np.round(T)
  # exp(log A[t]): the table to an ulp or so, not bit for bit
  np.testing.assert_allclose(a[integer], LINEAR.alphas_cumprod[T[integer].astype(int)],
                             rtol=2e-15)
  lo, hi = LINEAR.alphas_cumprod[np.floor(T[~integer]).astype(int)], LINEAR.alphas_cumprod[
      np.ceil(T[~integer]).astype(int)]
  assert np.all((a[~integer] < lo) & (a[~integer] > hi))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_to_eps_recovers_eps_in_float64(x64, prediction_type):
  rng = np.random.default_rng(0)
  x0, eps = rng.standard_normal((2, len(T), 4, 4, 3))
  a = LINEAR.alpha_bar(T, "consistent")[:, None, None, None]
  x = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
  out = output_of(prediction_type, x0, eps, a)
  got = to_eps(jnp.asarray(out), jnp.asarray(x), jnp.asarray(a), prediction_type)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, eps, rtol=0, atol=1e-12)
  # the wrapper looks the alpha-bar up from t itself (traced), one t per image
  eps_fn = eps_from_output(lambda x, t: jnp.asarray(out), LINEAR, prediction_type)
  got = jax.jit(eps_fn)(jnp.asarray(x), jnp.asarray(T))
  np.testing.assert_allclose(got, eps, rtol=0, atol=1e-12)


def test_conversion_runs_in_float32_and_returns_x_dtype():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1), jnp.bfloat16)
  out = jax.random.normal(jax.random.key(1), (2, 4, 4, 1), jnp.bfloat16)
  a = jnp.asarray([0.9999, 0.3], jnp.float32)[:, None, None, None]
  for prediction_type in ("sample", "v_prediction"):
    got = to_eps(out, x, a, prediction_type)
    want = to_eps(out.astype(jnp.float32), x.astype(jnp.float32), a, prediction_type)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))  # one rounding, at the end
  assert to_eps(out, x, a, "epsilon") is out


def test_bad_names_and_a_missing_schedule_are_errors():
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match="unknown prediction type 'x0'; valid choices: epsilon, "
                                       "sample, v_prediction"):
    to_eps(x, x, 0.5, "x0")
  with pytest.raises(ValueError, match="'v_prediction' needs the schedule"):
    eps_from_output(lambda x, t: x, None, "v_prediction")
  with pytest.raises(ValueError, match="'sample' needs the schedule"):
    generation.network_model(models.UNet(), prediction_type="sample")
  with pytest.raises(ValueError, match="unknown prediction type 'eps'"):
    generation.network_model(models.UNet(), prediction_type="eps", schedule=LINEAR)


# ----------------------------------------------------------------------------- the sampling path

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
            in_channels=1, out_channels=1, image_size=8)  # digits_train's network


class Reexpressed(models.UNet):
  """The U-Net with its eps re-expressed as the x0 or v of the same prediction.

  Same parameters as the plain U-Net; the alpha-bar is the training one at t.
  """
  prediction_type: str = "epsilon"

  def __call__(self, x, t, train=False):
    eps = super().__call__(x, t, train)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    a = LINEAR.alpha_bar(t, "consistent")[:, None, None, None]
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return output_of(self.prediction_type, x0, eps, a)


@pytest.fixture(scope="module")
def tiny_params():
  """Random params of the tiny U-Net from numpy (no compile of `init`)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
                                 ).astype(np.float32), abstract_params(models.UNet(**TINY)))


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_loaded_model_of_each_prediction_type_gives_the_same_eps(monkeypatch, tiny_params,
                                                                  prediction_type):
  config = digits_train.get_config()
  config.model.prediction_type = prediction_type
  config.sampler.update(checkpoint="a network re-expressed", method="ddim", num_steps=10)
  network = Reexpressed(**TINY, prediction_type=prediction_type)
  monkeypatch.setattr(eps_models, "load_network",
                      lambda config, path: (network, tiny_params, path))
  spec = spec_of(config)
  model = eps_models.load(config, spec, "")  # the wiring `--mode=sample` uses
  reference = generation.network_model(models.UNet(**TINY), tiny_params)  # an eps network
  unconverted = generation.network_model(network, tiny_params)  # its output read as eps

  x = jax.random.normal(jax.random.key(0), (len(T), 8, 8, 1))
  t = jnp.asarray(T, jnp.float32)
  run = lambda m: jax.jit(m.apply)(tiny_params, x, t)
  want = run(reference)
  assert np.abs(run(unconverted) - want).max() > 0.1  # the conversion is needed
  # (x - sqrt(a) x0) / sqrt(1 - a) magnifies x0's float32 rounding near t = 0 (x100 at t = 0)
  a = LINEAR.alpha_bar(T, "consistent")[:, None, None, None]
  scale = np.sqrt(a / (1 - a)) if prediction_type == "sample" else np.ones_like(a)
  error = np.abs(run(model) - want)
  np.testing.assert_array_less(error, np.broadcast_to(1e-5 * np.maximum(scale, 1.0), error.shape))

  x_T = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  sample = lambda m: samplers.run_sampler(lambda x, t: m.apply(tiny_params, x, t), x_T,
                                          spec.method, spec.discretization)[0]
  np.testing.assert_allclose(sample(model), sample(reference), rtol=0, atol=1e-4)


def run_main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=ENV)


def test_cli_names_a_bad_prediction_type_before_any_compute(tmp_path):
  workdir = tmp_path / "run"
  result = run_main("--config=configs/digits_pndm.py", "--config.model.name=unet",
                    "--config.model.prediction_type=bogus", "--mode=sample",
                    f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
  assert "'bogus'" in errors[0] and "epsilon, sample, v_prediction" in errors[0], errors[0]
  assert "prediction_type" in errors[0]
  assert not workdir.exists()


def test_training_refuses_other_prediction_types(tmp_path):
  config = digits_train.get_config()
  train.check_config(config, 1)
  config.model.prediction_type = "v_prediction"
  with pytest.raises(ValueError, match="'v_prediction': training supports epsilon only"):
    train.check_config(config, 1)

  workdir = tmp_path / "run"
  result = run_main("--config=configs/digits_train.py", "--mode=train",
                    "--config.model.prediction_type=sample", f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
  assert "'sample'" in errors[0] and "training supports epsilon only" in errors[0], errors[0]
  assert not workdir.exists()


# ----------------------------------------------------------------------------- diffusers parity


def ddim_scheduler(prediction_type, num_steps):
  """diffusers' DDIM (eta 0, no clipping) on the linear schedule, its table in float64."""
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import DDIMScheduler  # pylint: disable=import-outside-toplevel
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                            beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                            prediction_type=prediction_type)
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  scheduler.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
  np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), LINEAR.alphas_cumprod,
                             rtol=1e-14)
  scheduler.set_timesteps(num_steps)
  return scheduler


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("t, t_prev", [(600, 500), (100, 0), (0, -1)])
def test_one_ddim_step_matches_diffusers(x64, prediction_type, t, t_prev):
  import torch  # pylint: disable=import-outside-toplevel
  scheduler = ddim_scheduler(prediction_type, num_steps=1000 // (t - t_prev))
  assert t in scheduler.timesteps
  rng = np.random.default_rng(1)
  x, out = rng.standard_normal((2, 2, 3, 4, 4))
  want = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.0).prev_sample

  eps_fn = eps_from_output(lambda x, t: jnp.asarray(out), LINEAR, prediction_type)
  e = np.asarray(eps_fn(jnp.asarray(x), jnp.full((2,), t, jnp.float64)))
  a, a_prev = (LINEAR.alpha_bar(np.float64(s), "consistent") for s in (t, t_prev))
  # DDIM's transfer phi(x, e; a -> a')
  got = np.sqrt(a_prev / a) * x - (np.sqrt(a_prev * (1 - a) / a) - np.sqrt(1 - a_prev)) * e
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_project_ddim_matches_diffusers_ddim(x64, prediction_type):
  """The project's sampler (grid 500 -> 0 -> -1) vs diffusers' loop for one fake network."""
  import torch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  x_T, pattern = rng.standard_normal((2, 2, 4, 4, 3))
  network = lambda x, t, xp: xp.tanh(x) * (1 + t / 1000) + xp.asarray(pattern) * xp.sin(t / 300)

  scheduler = ddim_scheduler(prediction_type, num_steps=2)
  assert list(scheduler.timesteps) == [500, 0]
  x = torch.from_numpy(x_T)
  for t in scheduler.timesteps:
    out = network(x, torch.tensor(float(t), dtype=torch.float64), torch)
    x = scheduler.step(out, int(t), x, eta=0.0).prev_sample

  t_of = lambda t: t[:, None, None, None]
  eps_fn = eps_from_output(lambda x, t: network(x, t_of(t), jnp), LINEAR, prediction_type)
  grid = schedules.Discretization(LINEAR, 2, convention="consistent")
  x0, nfe = samplers.run_sampler(eps_fn, jnp.asarray(x_T), samplers.get_method("ddim"), grid)
  assert nfe == 2 and x0.dtype == jnp.float64
  np.testing.assert_allclose(x0, x.numpy(), rtol=0, atol=1e-9)
