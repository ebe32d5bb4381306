"""The network factory: every family by config, eps at the boundary, their PyTorch checkpoints
sampled through main.py (docs/methods.md §8)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import run_main, snapshot
from test_generation import read_all, sample_dir_of

from configs import cifar10_ddpmpp_deep_pf, cifar10_iddpm_cosine_pndm, cifar10_pndm
from pndm_jax import convert_iddpm, convert_ncsnpp, image_grid, models
from pndm_jax.models import ncsnpp

TINY = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,),
        "dropout": 0.0}
PAPER_CONFIGS = {"unet": cifar10_pndm, "iddpm": cifar10_iddpm_cosine_pndm,
                 "ncsnpp": cifar10_ddpmpp_deep_pf}


def tiny_config(name: str, image_size: int = 8):
  config = PAPER_CONFIGS[name].get_config()
  config.model.update(TINY)
  config.data.image_size = image_size
  return config


def random_params(model, seed):
  """Random weights of `model` (nothing zero, unlike its initialisation in places)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                               jnp.zeros((1,)))["params"])
  leaves, tree = jax.tree.flatten(abstract)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(0, 0.05, s.shape).astype(np.float32)
                                   for s in leaves])


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_factory_builds_each_family_from_its_config(name):
  config = tiny_config(name)
  model = models.from_config(config.model, 8, 3)
  assert models.name_of(model) == name
  params = random_params(model, 0)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  eps = jax.jit(models.eps_fn(model, params, num_timesteps=1000))(x, jnp.array([3.0, 700.5]))
  assert eps.shape == x.shape and bool(jnp.isfinite(eps).all())


def test_bad_family_and_field_are_named():
  config = tiny_config("iddpm")
  config.model.name = "ncsn"
  with pytest.raises(ValueError, match="'ncsn'.*unet, iddpm, ncsnpp"):
    models.check_config(config.model, 8, 3)
  config = tiny_config("ncsnpp")
  config.model.progressive_input = "sideways"
  with pytest.raises(ValueError, match="progressive_input"):
    models.check_config(config.model, 8, 3)


def test_eps_is_the_first_half_of_a_learned_variance_output():
  model = models.from_config(tiny_config("iddpm").model, 8, 3)
  params = random_params(model, 0)
  x, t = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), jnp.array([5.0, 900.0])
  out, eps = jax.jit(lambda p: (model.apply({"params": p}, x, t),
                                models.apply_eps(model, p, x, t)))(params)
  assert out.shape == (2, 8, 8, 6)
  np.testing.assert_array_equal(eps, out[..., :3])


def test_continuous_network_gets_score_sde_labels():
  model = models.from_config(tiny_config("ncsnpp").model, 8, 3)
  params = random_params(model, 0)
  x, t = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), jnp.array([5.0, 900.0])
  labels = ncsnpp.labels_from_timestep(t, 1000, "positional")
  eps, out = jax.jit(lambda p: (models.apply_eps(model, p, x, t, num_timesteps=1000),
                                model.apply({"params": p}, x, labels)))(params)
  np.testing.assert_array_equal(eps, out)
  with pytest.raises(ValueError, match="num_timesteps"):
    models.apply_eps(model, params, x, t)


def _tiny_flags(name):
  config = tiny_config(name)
  return [f"--config=configs/{PAPER_CONFIGS[name].__name__.split('.')[-1]}.py",
          "--config.data.image_size=8", "--config.model.ch=32", "--config.model.ch_mult=(1, 2)",
          "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=(4,)",
          "--config.model.dropout=0.0", "--config.sampler.num_samples=4",
          "--config.sampler.batch_size=4", "--config.sampler.num_steps=5",
          "--config.sampler.method=ddim"], config


def _in_process_images(config, model, params):
  """The images the config's sampler makes from (model, params), without main.py."""
  from pndm_jax import generation, sampler_spec, sharding
  spec = sampler_spec.from_config(config)
  eps_model = generation.network_model(model, params, "test", schedule=spec.discretization.schedule)
  fn = generation.make_generate_fn(eps_model, spec, sharding.batch_mesh(jax.devices()[:1]))
  return np.asarray(fn(params, np.arange(4))[0])


@pytest.mark.parametrize("name", ["iddpm", "ncsnpp"])
def test_main_samples_a_pytorch_checkpoint_of_each_family(tmp_path, name):
  import torch  # a test dependency: the checkpoints are PyTorch files
  flags, config = _tiny_flags(name)
  config.sampler.update(num_samples=4, batch_size=4, num_steps=5, method="ddim")
  model = models.from_config(config.model, 8, 3)
  params = random_params(model, 0)
  family = convert_iddpm if name == "iddpm" else convert_ncsnpp
  tensors = lambda p: {k: torch.from_numpy(np.array(v)) for k, v in
                       family.to_state_dict(p, model).items()}
  path = tmp_path / ("cifar10_uncond.pt" if name == "iddpm" else "checkpoint_8.pth")
  if name == "iddpm":
    torch.save(tensors(params), path)
  else:  # score_sde's layout: the EMA is what must be read, not `model`
    raw = random_params(model, 1)
    torch.save({"model": {f"module.{k}": v for k, v in tensors(raw).items()},
                "ema": {"decay": 0.9999, "num_updates": 1,
                        "shadow_params": list(tensors(params).values())},
                "step": 1}, path)
  workdir = tmp_path / "run"
  if name == "iddpm":  # converted once into the workdir, then sampled from there
    result = run_main(*flags, "--mode=convert", f"--workdir={workdir}",
                      f"--config.sampler.checkpoint={path}")
    assert result.returncode == 0, result.stderr
    assert json.load(open(workdir / "converted" / "model.json"))["network"] == "iddpm"
    before = snapshot(workdir)
    broken = {k: v for k, v in torch.load(path).items() if k != "out.2.bias"}
    torch.save(broken | {"label_emb.weight": torch.zeros(10, 128)}, tmp_path / "broken.pt")
    result = run_main(*flags, "--mode=convert", f"--workdir={workdir}",
                      f"--config.sampler.checkpoint={tmp_path / 'broken.pt'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and "out.2.bias" in result.stderr
    assert "label_emb.weight" in result.stderr
    assert snapshot(workdir) == before  # the converted model is untouched
    result = run_main(*flags, "--mode=sample", f"--workdir={workdir}")
  else:  # read on the run
    result = run_main(*flags, "--mode=sample", f"--workdir={workdir}",
                      f"--config.sampler.checkpoint={path}")
  assert result.returncode == 0, result.stderr
  images, indices = read_all(sample_dir_of(workdir))
  assert images.shape == (4, 8, 8, 3) and sorted(indices) == [0, 1, 2, 3]
  want = image_grid.to_uint8(_in_process_images(config, model, params)).astype(int)
  assert np.abs(images.astype(int)[np.argsort(indices)] - want).max() <= 1
