"""Training: objective pieces, EMA, sharding invariance, exact resume, checkpoints, end to end.

Every model here is the same tiny U-Net on 8x8x3 images with a global batch of
16, so the train step compiles once per mesh; a per-module persistent
compilation cache lets the repeated `train_and_evaluate` runs reuse it.
"""

import functools
import glob
import io
import logging
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets

from configs import default, digits_train, gmm_pndm
from pndm_jax import checkpoints, eps_models, progress, schedules, sharding, train
from pndm_jax.models import unet, unet_from_config
from pndm_jax.models.mlp import EpsMLP
from pndm_jax.sampler_spec import from_config as spec_of


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A fresh persistent compilation cache (jax keeps using it for the rest of the session)."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))


def write_digits_npz(path):
  """The digits as an 8x8 RGB uint8 .npz (an offline source with the tfds mocks' shapes)."""
  grey = np.round(datasets.load_digits().images * (255 / 16)).astype(np.uint8)
  np.savez(path, images=np.repeat(grey[..., None], 3, axis=-1))
  return path


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
  return write_digits_npz(str(tmp_path_factory.mktemp("data") / "digits.npz"))


def tiny_config(dataset="npz", path=""):
  config = default.get_config()
  config.data.update(dataset=dataset, path=path, image_size=8, num_channels=3, random_flip=True)
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.1)
  config.training.update(batch_size=16, num_train_steps=2, lr=1e-3, warmup_steps=3,
                         ema_decay=0.9, log_every=1, checkpoint_every=1, sample_every=0,
                         num_grid_samples=8)
  # Adam's first steps move each weight by ~lr * sign(g); a larger eps keeps that
  # smooth in near-zero gradients, whose float rounding differs between meshes.
  config.training.adam_eps = 1e-3
  config.sampler.update(method="ddim", num_steps=5)
  return config


def build(config, mesh, with_state=True, loop=None):
  """(initial state or None, train_fn) as train_and_evaluate builds them (`loop`: its override)."""
  model = unet_from_config(config.model, config.data.image_size, config.data.num_channels)
  tx = train.make_optimizer(config.training)
  schedule = schedules.Schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  size, channels = config.data.image_size, config.data.num_channels
  state = (train.create_train_state(model, tx, init_key, (size, size, channels), mesh)
           if with_state else None)
  return state, train.make_train_fn(model, tx, schedule, train.step_settings(config), mesh,
                                    train_key, loop=loop)


@pytest.fixture(scope="module")
def fixed_batch(digits_npz):
  with np.load(digits_npz) as f:
    return f["images"][:16][None].astype(np.float32) / 127.5 - 1.0  # [1, 16, 8, 8, 3]


def test_antithetic_timesteps_and_flips():
  t = np.asarray(train.antithetic_timesteps(jax.random.key(0), 10, 1000))
  assert t.shape == (10,) and t.min() >= 0 and t.max() <= 999
  np.testing.assert_array_equal(t[6:], 999 - t[:4])  # first 6 drawn, then N-1-t
  x = jax.random.normal(jax.random.key(1), (64, 4, 4, 1))
  y = np.asarray(train.random_flip(jax.random.key(2), x))
  same = (y == np.asarray(x)).all(axis=(1, 2, 3))
  mirrored = (y == np.asarray(x)[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (same | mirrored).all() and 10 < mirrored.sum() < 54


def test_digits_config_builds():
  config = digits_train.get_config()
  train.check_config(config, 1)
  model = unet_from_config(config.model, config.data.image_size, config.data.num_channels)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1))
  assert sum(x.size for x in jax.tree.leaves(shapes)) < 1_000_000  # a ~2.6 MB EMA checkpoint


def test_learning_rate_warms_up_linearly():
  training = tiny_config().training
  lr = train.learning_rate_schedule(training.lr, training.warmup_steps)
  np.testing.assert_allclose([lr(n) for n in range(5)], [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3],
                             rtol=1e-6)


def float64_equations(jaxpr):
  """Every equation of `jaxpr` and its sub-jaxprs (scan, jit, cond bodies) with a float64 output."""
  for eqn in jaxpr.eqns:
    if any(getattr(v.aval, "dtype", None) == jnp.float64 for v in eqn.outvars):
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          yield from float64_equations(sub)


def in_adam_bias_correction(eqn):
  """optax's scale_by_adam computes the scalar 1 - b**count from Python-float b (float64 under x64).

  Passing float32 betas would make it float32, but would also round 1 - b in float32 in the
  moment updates (1 - float32(0.999) = 0.00099998713), changing float32 training.
  """
  frames = eqn.source_info.traceback.frames if eqn.source_info.traceback else []
  return (all(v.aval.shape == () for v in eqn.outvars)
          and any(f.function_name.startswith("scale_by_adam.") for f in frames))


def test_train_step_computes_in_float32_under_x64(x64):
  config = tiny_config()
  model = unet_from_config(config.model, config.data.image_size, config.data.num_channels)
  tx = train.make_optimizer(config.training)
  state = jax.eval_shape(functools.partial(train.create_train_state, model, tx,
                                           example_shape=(8, 8, 3), mesh=sharding.batch_mesh()),
                         jax.random.key(0))
  step = functools.partial(train.train_step, model=model, tx=tx,
                           alphas_cumprod=jnp.linspace(1.0, 0.0, 1000, dtype=jnp.float32),
                           settings=train.step_settings(config), key=jax.random.key(0))
  jaxpr = jax.make_jaxpr(step)(state, jax.ShapeDtypeStruct((16, 8, 8, 3), jnp.float32))
  float64 = list(float64_equations(jaxpr.jaxpr))
  assert float64, "the bias correction is float64 under x64: is the walk still finding it?"
  assert [f"{e.primitive} -> {[str(v.aval) for v in e.outvars]}"
          for e in float64 if not in_adam_bias_correction(e)] == []
  lr = train.learning_rate_schedule(1e-3, 3)
  assert jax.eval_shape(lr, jnp.int64(0)).dtype == jnp.float32  # any integer count


def test_the_objective_of_vectors_is_the_per_example_sum(x64):
  """The toy networks' data: x0 [B, D], the same eps objective (numpy from the same draws)."""
  model = EpsMLP(features=16, num_blocks=1, embed_dim=8)
  x0 = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(1), x0, jnp.zeros((6,)))["params"]
  ac = np.linspace(0.999, 0.01, 50)
  key = jax.random.key(2)
  loss = train.diffusion_loss(params, model, x0, key, jnp.asarray(ac, jnp.float32), "l2", False)
  _, k_t, k_noise, _ = jax.random.split(key, 4)
  t = np.asarray(train.antithetic_timesteps(k_t, 6, 50))
  noise = np.asarray(jax.random.normal(k_noise, x0.shape, jnp.float32), np.float64)
  a = ac[t][:, None]
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  eps = np.asarray(model.apply({"params": params}, jnp.asarray(x_t, jnp.float32),
                               jnp.asarray(t, jnp.float32)), np.float64)
  assert eps.shape == x0.shape
  np.testing.assert_allclose(float(loss), np.mean(np.sum((eps - noise) ** 2, axis=1)), rtol=1e-5)
  other_t = model.apply({"params": params}, jnp.asarray(x_t, jnp.float32), 7.0)  # scalar t
  assert not np.allclose(np.asarray(other_t), eps, atol=1e-3)


def test_loss_goes_down_and_ema_matches_numpy(fixed_batch):
  config = tiny_config()
  state, train_fn = build(config, sharding.batch_mesh(jax.devices()[:1]))  # 8: the next test
  decay = config.training.ema_decay
  ema = jax.device_get(state.params)
  losses = []
  for _ in range(40):
    state, metrics = train_fn(state, fixed_batch)
    params = jax.device_get(state.params)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    losses.append(float(metrics["loss"][0]))
  assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8]), losses  # ~0.55 seen
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(state.ema_params), ema)


def test_sharded_step_matches_one_device(fixed_batch):
  config = tiny_config()
  mesh1, mesh8 = sharding.batch_mesh(jax.devices()[:1]), sharding.batch_mesh()
  assert mesh8.size == 8
  state8, fn8 = build(config, mesh8)
  _, fn1 = build(config, mesh1, with_state=False)
  state1 = jax.device_put(jax.device_get(state8), jax.sharding.NamedSharding(
      mesh1, jax.sharding.PartitionSpec()))
  for _ in range(3):
    state1, m1 = fn1(state1, fixed_batch)
    state8, m8 = fn8(state8, fixed_batch)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert len(state8.params["conv_in"]["kernel"].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               jax.device_get(state8.params), jax.device_get(state1.params))


@pytest.mark.parametrize("loop, rtol, atol", [
    ("scan", 1e-5, 1e-6),  # a scan body compiles apart from the single step: rounding differs
    ("host", 1e-6, 1e-7),  # the single step's own function, called twice
])
def test_two_steps_in_one_call_match_single_steps(fixed_batch, loop, rtol, atol):
  config = tiny_config()
  config.model.ch_mult = (1,)  # one level: the loops, not the network, are compared
  state, train_fn = build(config, sharding.batch_mesh(), loop=loop)
  both, m2 = train_fn(jax.tree.map(jnp.copy, state), np.concatenate([fixed_batch] * 2))
  assert {k: v.shape for k, v in m2.items()} == {"loss": (2,), "grad_norm": (2,), "lr": (2,)}
  for i in range(2):
    state, m1 = train_fn(state, fixed_batch)
    for name in m2:
      np.testing.assert_allclose(m2[name][i], m1[name][0], rtol=rtol)
  assert int(both.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               jax.device_get(both), jax.device_get(state))


def test_cpu_runs_steps_in_a_host_loop(caplog):
  config = tiny_config()
  with caplog.at_level(logging.INFO):
    build(config, sharding.batch_mesh(), with_state=False)
  assert "as a host loop: XLA:CPU is slow at convolution gradients" in caplog.text
  with pytest.raises(ValueError, match="unknown loop 'while'"):
    build(config, sharding.batch_mesh(), with_state=False, loop="while")


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_optimizer_state_and_updates_are_optax_clip_then_adam(grad_clip):
  training = tiny_config().training
  training.grad_clip = grad_clip
  adam = optax.adam(train.learning_rate_schedule(training.lr, training.warmup_steps),
                    b1=training.beta1, b2=training.beta2, eps=training.adam_eps)
  # make_optimizer before it took the norm from the train step; checkpoints hold its state
  before = optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam
  tx = train.make_optimizer(training)
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  ours, theirs = tx.init(params), before.init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  grads = {"w": jnp.linspace(-0.3, 0.2, 12).reshape(3, 4), "b": jnp.array([0.1, -0.2, 0.3, 0.0])}
  for scale in (0.5, 10.0):  # global norm ~0.34 and ~6.8: under and over grad_clip = 1
    g = jax.tree.map(lambda x, s=scale: s * x, grads)
    assert (optax.tree.norm(g) < 1.0) == (scale < 1)
    u1, ours = tx.update(g, ours, params, grad_norm=optax.tree.norm(g))
    u2, theirs = before.update(g, theirs, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


@pytest.mark.parametrize("scale", [0.5, 10.0])
def test_clip_by_global_norm_is_optaxs(scale):
  grads = {"w": scale * jnp.linspace(-0.3, 0.2, 12).reshape(3, 4), "b": jnp.array([0.1, 0.3])}
  norm = optax.tree.norm(grads)
  assert (norm < 1.0) == (scale < 1)
  ours, state = train.clip_by_global_norm(1.0).update(grads, optax.EmptyState(), grad_norm=norm)
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert state == optax.EmptyState()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)
  if scale > 1:
    np.testing.assert_allclose(optax.tree.norm(ours), 1.0, rtol=1e-6)


def test_dropout_is_flaxs_with_a_float32_draw():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  rngs = {"dropout": jax.random.key(1)}
  ours = unet.Dropout(0.3).apply({}, x, False, rngs=rngs)
  np.testing.assert_array_equal(ours, nn.Dropout(0.3).apply({}, x, False, rngs=rngs))
  assert 0.6 < np.mean(np.asarray(ours) != 0) < 0.8
  np.testing.assert_array_equal(unet.Dropout(0.3).apply({}, x, True), x)


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_resume_is_exact(tmp_path, digits_npz, monkeypatch):
  config = tiny_config(path=digits_npz)
  config.training.update(num_train_steps=4, checkpoint_every=2)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  config.training.num_train_steps = 2
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  config.training.num_train_steps = 4
  terminal = Terminal()
  monkeypatch.setattr(progress, "Progress", functools.partial(progress.Progress, stream=terminal))
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == int(straight.step) == 4
  drawn = terminal.getvalue()  # the progress line counts on from the restored step
  assert drawn.startswith("\r\033[Ktrain: 2/4 step (50%)") and "train: 4/4 step (100%)" in drawn
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
  ema = checkpoints.load_ema_params(str(tmp_path / "resumed"))
  jax.tree.map(np.testing.assert_array_equal, ema, jax.device_get(straight.ema_params))


@pytest.mark.parametrize("dataset", ["cifar10", "celeb_a"])
def test_mock_tfds_training_end_to_end(tmp_path, dataset):
  config = tiny_config(dataset=dataset)
  config.training.update(num_train_steps=1, sample_every=1 if dataset == "cifar10" else 0)
  with tfds.testing.mock_data(num_examples=32):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  tags = event_tags(str(tmp_path))
  for tag in ("loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec"):
    assert tags.get(tag) == 1, tags
  if dataset == "cifar10":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(tmp_path / "train_grids" / "00000001.png") as grid:
      assert grid.size == (3 * 10 + 2, 3 * 10 + 2)  # 8 images, 3 per row, 2px gaps
    assert tags.get("samples") == 1


def event_tags(workdir):
  """{tag: number of events} over the TensorBoard event files in `workdir`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # records: u64 length, u32 crc, payload, u32 crc
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += length + 16
      for value in event.summary.value:
        tags[value.tag] = tags.get(value.tag, 0) + 1
  return tags


def small_state(value):
  """A model-free TrainState for checkpoint tests."""
  params = {"w": jnp.full((3,), value, jnp.float32)}
  return train.TrainState(step=jnp.asarray(int(value), jnp.int32), params=params,
                          ema_params={"w": params["w"] * 10},
                          opt_state=(jnp.zeros(()), {"m": params["w"] + 1}))


def saved_run(directory, steps=(1, 2)):
  with checkpoints.checkpoint_manager(directory) as manager:
    for step in steps:
      checkpoints.save_training(manager, small_state(step), step)
    manager.wait_until_finished()


def corrupt(directory, step):
  """Overwrites every file of checkpoint `step` with garbage: unreadable, not another config."""
  for path in glob.glob(os.path.join(directory, str(step), "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")


def test_unreadable_latest_checkpoint_errors_or_falls_back(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory)
  corrupt(directory, 2)
  os.mkdir(os.path.join(directory, "2.corrupt"))  # an earlier casualty: never overwritten
  with checkpoints.checkpoint_manager(directory) as manager:
    with pytest.raises(checkpoints.CheckpointError,
                       match="(?s)" + re.escape(os.path.join(directory, "2"))
                       + ".*restore_fallback=True to resume from .* step 1"):
      checkpoints.restore_training(manager, small_state(0))
  assert sorted(os.listdir(directory)) == ["1", "2", "2.corrupt"]
  with checkpoints.checkpoint_manager(directory) as manager:
    restored = checkpoints.restore_training(manager, small_state(0), fallback=True)
    assert manager.latest_step() == 1
  assert int(restored.step) == 1
  np.testing.assert_array_equal(restored.ema_params["w"], [10.0] * 3)
  assert sorted(os.listdir(directory)) == ["1", "2.corrupt", "2.corrupt-1"]
  assert os.listdir(os.path.join(directory, "2.corrupt")) == []


def test_unreadable_arrays_under_readable_metadata_fall_back(tmp_path, monkeypatch):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory)
  with checkpoints.checkpoint_manager(directory) as manager:
    real_restore = manager.restore

    def restore(step, *args, **kwargs):
      if step == 2:
        raise OSError("truncated chunk")
      return real_restore(step, *args, **kwargs)

    monkeypatch.setattr(manager, "restore", restore)
    with pytest.raises(checkpoints.CheckpointError, match="truncated chunk.*restore_fallback"):
      checkpoints.restore_training(manager, small_state(0))
    assert int(checkpoints.restore_training(manager, small_state(0), fallback=True).step) == 1
  assert sorted(os.listdir(directory)) == ["1", "2.corrupt"]


def test_fallback_goes_one_step_back_and_moves_nothing_it_cannot_replace(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory, steps=(1, 2, 3))
  corrupt(directory, 3)
  corrupt(directory, 2)
  with checkpoints.checkpoint_manager(directory) as manager:
    with pytest.raises(checkpoints.CheckpointError,
                       match="(?s)both unreadable; nothing was moved: .*"
                       + re.escape(os.path.join(directory, "3")) + ".*"
                       + re.escape(os.path.join(directory, "2"))):
      checkpoints.restore_training(manager, small_state(0), fallback=True)
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  only = str(tmp_path / "only")
  saved_run(only, steps=(1,))
  corrupt(only, 1)
  with checkpoints.checkpoint_manager(only) as manager:
    with pytest.raises(checkpoints.CheckpointError, match="no earlier checkpoint exists") as info:
      checkpoints.restore_training(manager, small_state(0), fallback=True)
  assert "restore_fallback" not in str(info.value) and os.listdir(only) == ["1"]


def test_another_config_is_a_mismatch_not_corruption(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory)
  state = small_state(0)
  target = state.replace(  # one shape, one dtype, one leaf fewer, 24 more: 27 differences
      params={"w": jnp.zeros((4,)), **{f"x{i:02d}": jnp.zeros(()) for i in range(24)}},
      ema_params={"w": jnp.zeros((3,), jnp.bfloat16)}, opt_state=(state.opt_state[0], {}))
  for fallback in (False, True):
    with checkpoints.checkpoint_manager(directory) as manager:
      with pytest.raises(checkpoints.CheckpointMismatchError) as info:
        checkpoints.restore_training(manager, target, fallback=fallback)
    message = str(info.value)
    assert os.path.join(directory, "2") in message and "27 leaves differ" in message
    for line in ["ema_params/w: saved (3,) float32, expected (3,) bfloat16",
                 "train/opt_state/1/m: saved (3,) float32, not in the config's state",
                 "train/params/w: saved (3,) float32, expected (4,) float32",
                 "train/params/x00: missing from the checkpoint, expected () float32",
                 "... and 7 more", "config differs from the one that wrote the checkpoints"]:
      assert line in message, message
    assert "x16" in message and "x17" not in message and "fallback" not in message
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_resume_refuses_another_model_or_fewer_steps(tmp_path, digits_npz, monkeypatch):
  config = tiny_config(path=digits_npz)
  state = jax.device_get(build(config, sharding.batch_mesh())[0]).replace(step=np.int32(3))
  narrow = {**state.params, "conv_in": {"kernel": np.zeros((3, 3, 3, 16), np.float32),
                                        "bias": np.zeros(16, np.float32)}}
  for workdir, saved in [("run", state), ("other_model", state.replace(params=narrow,
                                                                       ema_params=narrow))]:
    with checkpoints.checkpoint_manager(str(tmp_path / workdir / "checkpoints")) as manager:
      checkpoints.save_training(manager, saved, 3)
  config.training.num_train_steps = 3  # already there: nothing to do
  assert int(train.train_and_evaluate(config, str(tmp_path / "run")).step) == 3
  monkeypatch.setattr(train, "make_train_fn", pytest.fail)  # errors come before compiling
  config.training.num_train_steps = 2
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "run" / "checkpoints"))
                     + ".* at step 3, past config.training.num_train_steps=2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.training.num_train_steps = 4
  with pytest.raises(checkpoints.CheckpointMismatchError, match=(
      r"(?s)4 leaves differ.*ema_params/conv_in/kernel: saved \(3, 3, 3, 16\) float32, "
      r"expected \(3, 3, 3, 32\) float32.*config differs")):
    train.train_and_evaluate(config, str(tmp_path / "other_model"))
  assert os.listdir(tmp_path / "other_model" / "checkpoints") == ["3"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory)
  partial = os.path.join(directory, "3.orbax-checkpoint-tmp", "train")
  os.makedirs(partial)
  with open(os.path.join(partial, "_METADATA"), "w") as f:
    f.write("{trunc")
  with checkpoints.checkpoint_manager(directory) as manager:
    restored = checkpoints.restore_training(manager, small_state(0))
  assert int(restored.step) == 2


def test_load_ema_params_reads_a_shipped_ema_only_checkpoint(tmp_path):
  saved_run(str(tmp_path / "run" / "checkpoints"))
  np.testing.assert_array_equal(checkpoints.load_ema_params(str(tmp_path / "run"))["w"], [20.0] * 3)
  np.testing.assert_array_equal(checkpoints.load_ema_params(str(tmp_path / "run"), step=1)["w"],
                                [10.0] * 3)
  shipped = tmp_path / "shipped" / "checkpoints" / "2"
  shutil.copytree(tmp_path / "run" / "checkpoints" / "2" / "ema_params", shipped / "ema_params")
  shutil.copy(tmp_path / "run" / "checkpoints" / "2" / "_CHECKPOINT_METADATA", shipped)
  ema = checkpoints.load_ema_params(str(tmp_path / "shipped"))
  assert isinstance(ema["w"], np.ndarray)
  np.testing.assert_array_equal(ema["w"], [20.0] * 3)
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint directory"):
    checkpoints.load_ema_params(str(tmp_path / "nothing"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_checkpoint_when_sampling_is_named(tmp_path, damage):
  directory = str(tmp_path / "run" / "checkpoints")
  saved_run(directory)
  if damage == "garbage":
    corrupt(directory, 2)
  else:
    for path in glob.glob(os.path.join(directory, "2", "ema_params", "**", "*"), recursive=True):
      if os.path.isfile(path):
        os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(os.path.join(directory, "2"))):
    checkpoints.load_ema_params(str(tmp_path / "run"))
  np.testing.assert_array_equal(checkpoints.load_ema_params(str(tmp_path / "run"), step=1)["w"],
                                [10.0] * 3)


def test_sampling_from_a_chosen_training_step(tmp_path, monkeypatch):
  config = tiny_config()
  model = unet_from_config(config.model, config.data.image_size, config.data.num_channels)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros(1))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        shapes["params"])
  monkeypatch.chdir(tmp_path)
  with checkpoints.checkpoint_manager("run/checkpoints") as manager:
    for step in (1, 2):
      checkpoints.save_training(manager, train.TrainState(
          step=np.int32(step), params=params,
          ema_params=jax.tree.map(lambda p, s=step: p * s, params),
          opt_state=np.zeros(())), step)
  shutil.copytree("run/checkpoints", "elsewhere")  # any orbax checkpoints directory
  checkpoints.save_params("converted", model, params)

  def load(checkpoint, step=-1):
    config.sampler.update(checkpoint=checkpoint, checkpoint_step=step)
    return eps_models.load(config, spec_of(config), "run")

  sources = set()
  for checkpoint, step, directory, expected in [
      ("", -1, "run/checkpoints", 2), ("run", 1, "run/checkpoints", 1),
      ("run/checkpoints/1", -1, "run/checkpoints", 1), ("elsewhere/2/", -1, "elsewhere", 2)]:
    loaded = load(checkpoint, step)
    assert loaded.source == f"{tmp_path / directory} step {expected} (EMA)"
    np.testing.assert_array_equal(loaded.params["conv_in"]["kernel"],
                                  params["conv_in"]["kernel"] * expected)
    sources.add(loaded.source)
  assert len(sources) == 3  # two steps of one run are told apart
  assert load("converted").source == str(tmp_path / "converted")
  for checkpoint, step in [("run", 7), ("run/checkpoints/7", -1)]:
    with pytest.raises(checkpoints.CheckpointError,
                       match="no checkpoint of step 7 .*available steps: 1, 2"):
      load(checkpoint, step)
  with pytest.raises(ValueError, match="step 1, but step 2 was asked for"):
    load("run/checkpoints/1", 2)
  with pytest.raises(ValueError, match="checkpoint_step=1 .* not one"):
    load("converted", 1)
  gmm = gmm_pndm.get_config()
  source = eps_models.load(gmm, spec_of(gmm), "").source
  assert source == f"analytic digits_gmm(std={gmm.model.gmm_std})"


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=12), "not divisible by the device count 8"),
    (dict(loss="huber"), "unknown loss 'huber'"),
    (dict(num_train_steps=5, steps_per_call=2), "multiple of steps_per_call"),
])
def test_bad_training_config_fails_before_compute(tmp_path, monkeypatch, digits_npz,
                                                  overrides, message):
  monkeypatch.setattr(train, "create_train_state", pytest.fail)
  config = tiny_config(path=digits_npz)
  config.training.update(overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("data, message", [
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
    (dict(dataset="image_folder", path="EMPTY"), "contains no images"),
])
def test_bad_data_fails_before_compute(tmp_path, monkeypatch, data, message):
  monkeypatch.setattr(train, "create_train_state", pytest.fail)
  (tmp_path / "empty").mkdir()
  config = tiny_config()
  config.data.update(data)
  if config.data.path == "EMPTY":
    config.data.path = str(tmp_path / "empty")
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
