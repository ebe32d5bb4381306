"""Training the epsilon-prediction U-Net (docs/methods.md §9): objective, sharded step, logs.

The objective is the reference's: random horizontal flips, timesteps drawn
antithetically (t and N-1-t in the two halves of a batch), x_t = sqrt(A[t]) x0 +
sqrt(1 - A[t]) eps, and an l1 (or l2) error on eps summed over pixels and
averaged over the batch; Adam with linear warm-up, global-norm clipping, and an
EMA of the parameters after every step.

A train call runs `steps_per_call` steps (under `lax.scan`, or on CPU as that
many calls of the jitted step), data-parallel over a 1-D device mesh: the batch
is sharded along the mesh axis and the train state is replicated by its
sharding, so gradients are reduced by the compiler.
Every random draw is keyed by (seed, step), and batch `i` of the input pipeline
belongs to step `i`, so a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pndm_jax import (
  checkpoints,
  choices,
  compiler_options,
  distributed,
  generation,
  image_grid,
  input_pipeline,
  models,
  progress,
  sampler_spec,
  schedules,
  sharding,
)
from pndm_jax.metric_logging import metric_writers, periodic_actions

GRID_DIR = "train_grids"  # sample grids made during training (sample directories live in samples/)
LOSSES = ("l1", "l2")
LOOPS = ("scan", "host")  # how a train call runs its steps (make_train_fn)


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree of arrays."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The scalars a training step reads, taken from the config once, outside `jit`."""

  loss: str            # "l1" | "l2"
  random_flip: bool
  ema_decay: float
  lr: float
  warmup_steps: int


def step_settings(config: ml_collections.ConfigDict) -> StepSettings:
  training = config.training
  return StepSettings(loss=training.loss, random_flip=bool(config.data.random_flip),
                      ema_decay=float(training.ema_decay), lr=float(training.lr),
                      warmup_steps=int(training.warmup_steps))


# ----------------------------------------------------------------------------- objective


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
  """lr * min((n + 1) / warmup_steps, 1) at update n (0-based): linear warm-up, then constant."""
  warmup = max(int(warmup_steps), 1)
  # float32 whatever the count's integer type (an int64 count would promote to float64 under x64)
  return lambda count: lr * jnp.minimum((jnp.asarray(count) + 1).astype(jnp.float32) / warmup, 1.0)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` given the norm (`update(..., grad_norm=)`) instead of computing it.

  The train step already computes the gradient norm for its metrics. The state is optax's
  (`EmptyState`), so optimizer states and training checkpoints are unchanged.
  """

  def update(updates, state, params=None, *, grad_norm, **extra_args):
    del params, extra_args
    below = grad_norm < max_norm
    return jax.tree.map(
        lambda t: jax.lax.select(below, t, (t / grad_norm.astype(t.dtype)) * max_norm),
        updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """Adam with linear warm-up, after global-norm clipping (grad_clip <= 0 disables it).

  Its update takes the gradients' global norm as `grad_norm=` (used by the clipping only).
  """
  adam = optax.adam(learning_rate_schedule(training.lr, training.warmup_steps),
                    b1=training.beta1, b2=training.beta2, eps=training.adam_eps)
  if training.grad_clip > 0:
    return optax.chain(clip_by_global_norm(training.grad_clip), adam)
  return optax.with_extra_args_support(adam)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def antithetic_timesteps(key: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
  """int32 [batch]: t ~ U{0..N-1} in the first half, N-1-t in the second (the reference's draw)."""
  t = jax.random.randint(key, (batch // 2 + 1,), 0, num_timesteps)
  return jnp.concatenate([t, num_timesteps - 1 - t])[:batch]


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
  """Flips each NHWC image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, jnp.float32(0.5), (x.shape[0], 1, 1, 1))  # float32 under x64
  return jnp.where(flip, x[:, :, ::-1, :], x)


def diffusion_loss(params: Any, model: nn.Module, x0: jax.Array, key: jax.Array,
                   alphas_cumprod: jax.Array, loss: str, flip: bool) -> jax.Array:
  """The eps-prediction loss of one batch: per-example error summed over the example, batch mean.

  x0 is a batch of NHWC images or, for the toy networks of the experiments, of vectors [B, D]
  (`flip` is for images only).
  """
  k_flip, k_t, k_noise, k_dropout = jax.random.split(key, 4)
  x0 = x0.astype(jnp.float32)
  if flip:
    x0 = random_flip(k_flip, x0)
  t = antithetic_timesteps(k_t, x0.shape[0], alphas_cumprod.shape[0])
  a = alphas_cumprod[t].reshape((-1,) + (1,) * (x0.ndim - 1))
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
  eps = models.apply_eps(model, params, x_t, t.astype(jnp.float32),
                         num_timesteps=alphas_cumprod.shape[0], train=True,
                         rngs={"dropout": k_dropout}).astype(jnp.float32)
  err = jnp.abs(eps - noise) if loss == "l1" else jnp.square(eps - noise)
  return jnp.mean(jnp.sum(err, axis=tuple(range(1, x0.ndim))))


def train_step(state: TrainState, x0: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformationExtraArgs, alphas_cumprod: jax.Array,
               settings: StepSettings, key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch x0 [B, H, W, C]; metrics are scalars."""
  step_key = jax.random.fold_in(key, state.step)
  loss, grads = jax.value_and_grad(diffusion_loss)(
      state.params, model, x0, step_key, alphas_cumprod, settings.loss, settings.random_flip)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_update(state.ema_params, params, settings.ema_decay))
  lr = learning_rate_schedule(settings.lr, settings.warmup_steps)(state.step)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
  return new_state, metrics


# ----------------------------------------------------------------------------- sharding


def steps_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of the [steps_per_call, global_batch, H, W, C] arrays the train function takes."""
  return NamedSharding(mesh, P(None, sharding.BATCH_AXIS))


def initial_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """The state at step 0 from `params`: EMA = params, a fresh optimizer state (traceable)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),  # own buffers: state is donated
                    opt_state=tx.init(params))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       example_shape: Sequence[int], mesh: Mesh) -> TrainState:
  """Freshly initialised state (step 0, EMA = params), replicated over the mesh; `example_shape`
  is one example's, e.g. (H, W, C)."""

  def init(key):
    x = jnp.zeros((1, *example_shape), jnp.float32)
    return initial_state(model.init({"params": key}, x, jnp.zeros((1,), jnp.float32))["params"],
                         tx)

  return jax.jit(init, out_shardings=sharding.replicated(mesh))(key)


def make_train_fn(model: nn.Module, tx: optax.GradientTransformationExtraArgs,
                  schedule: schedules.Schedule, settings: StepSettings, mesh: Mesh,
                  key: jax.Array, loop: str | None = None, options: dict[str, Any] | None = None
                  ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """train_fn(state, batches [k, B, H, W, C]) runs k train steps; returns per-step metrics [k].

  `loop` "scan" runs the k steps in one jitted call under `lax.scan` (fewer
  dispatches); "host" makes k calls of the jitted step, since on XLA:CPU a
  convolution's weight gradient inside a loop body is many times slower than
  outside one (jax-ml/jax#12868; measured ~8x on this U-Net). None picks
  "host" on CPU, else "scan". Both run the same steps; the input state is
  donated and the returned one is replicated. `options` are the XLA options the
  step compiles with (default `compiler_options.PROGRAMS`; `{}` is XLA's defaults).
  """
  platform = mesh.devices.flat[0].platform
  if loop is not None:
    reason = "as asked"
  elif platform == "cpu":
    loop, reason = "host", "XLA:CPU is slow at convolution gradients in lax.scan (jax-ml/jax#12868)"
  else:
    loop, reason = "scan", f"one dispatch per call on {platform}"
  choices.check("loop", loop, LOOPS)
  logging.info("train calls run their steps as a %s loop: %s", loop, reason)
  options = compiler_options.PROGRAMS if options is None else options
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  replicated, batches_sharding = sharding.replicated(mesh), steps_batch_sharding(mesh)

  def step(state, x0):
    return train_step(state, x0, model=model, tx=tx, alphas_cumprod=alphas_cumprod,
                      settings=settings, key=key)

  if loop == "host":
    step_i = jax.jit(lambda state, batches, i: step(state, batches[i]),
                     in_shardings=(replicated, batches_sharding, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=0,
                     compiler_options=options)

    def host_loop(state, batches):
      batches, metrics = jax.device_put(batches, batches_sharding), []  # moved once, not per step
      for i in range(batches.shape[0]):
        state, m = step_i(state, batches, np.int32(i))
        metrics.append(m)
      return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)

    return host_loop

  def scan(state, batches):
    if batches.shape[0] > 1:
      return jax.lax.scan(step, state, batches)
    state, metrics = step(state, batches[0])  # no loop body for one step
    return state, jax.tree.map(lambda m: m[None], metrics)

  return jax.jit(scan, in_shardings=(replicated, batches_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=options)


# ----------------------------------------------------------------------------- the loop


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises a ValueError for settings that would fail later (called before any compute)."""
  training = config.training
  choices.check("loss", training.loss, LOSSES)
  prediction_type = config.model.get("prediction_type", "epsilon")
  if prediction_type != "epsilon":
    raise ValueError(f"config.model.prediction_type={prediction_type!r}: training supports "
                     "epsilon only (its objective is the eps-prediction loss); sample and "
                     "v_prediction are for sampling from networks trained elsewhere")
  if training.steps_per_call < 1 or training.num_train_steps % training.steps_per_call:
    raise ValueError(f"num_train_steps ({training.num_train_steps}) must be a multiple of "
                     f"steps_per_call ({training.steps_per_call})")
  input_pipeline.check_global_batch(training.batch_size, num_devices, jax.process_count())
  schedules.from_config(config.diffusion)  # validates


def _crossed(step: int, k: int, every: int) -> bool:
  """Whether the last k steps, ending at `step`, passed a multiple of `every` (0: never)."""
  return every > 0 and step // every != (step - k) // every


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       spec: sampler_spec.SamplerSpec | None = None,
                       on_start: Callable[[], None] | None = None) -> TrainState:
  """Trains per `config`, resuming from the latest checkpoint in `workdir`; returns the state.

  Writes to `workdir`: `checkpoints/` (orbax), TensorBoard events and
  `train_grids/<step>.png` from the EMA parameters; on a terminal, a progress
  line with rate and ETA. Throughput (steps/s, images/s) is measured over
  training only, not checkpointing or sampling. A checkpoint past
  `num_train_steps` is a ValueError (raised before the train step compiles).
  The sample grids use `spec` (default: the config's sampler). `on_start` is
  called once the checkpoint (if any) has restored and training begins.
  """
  training, data = config.training, config.data
  mesh = sharding.batch_mesh()
  check_config(config, mesh.size)
  dataset = input_pipeline.create_dataset(data, training.batch_size, config.seed, mesh.size)
  spec = spec or sampler_spec.from_config(config)
  schedule = spec.discretization.schedule
  model = models.from_config(config.model, data.image_size, data.num_channels)
  tx = make_optimizer(training)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(model, tx, init_key,
                             (data.image_size, data.image_size, data.num_channels), mesh)

  is_chief = distributed.is_chief()
  with contextlib.ExitStack() as stack:
    manager = stack.enter_context(checkpoints.checkpoint_manager(
        os.path.join(workdir, checkpoints.CHECKPOINT_DIR), training.keep_checkpoints))
    state = checkpoints.restore_training(manager, state, training.restore_fallback) or state
    step = int(state.step)
    if step > training.num_train_steps:
      raise ValueError(f"the latest checkpoint in {manager.directory} is at step {step}, past "
                       f"config.training.num_train_steps={training.num_train_steps}; set "
                       f"num_train_steps to at least {step} to train on, or use a new workdir")
    logging.info("training from step %d to %d on %d device(s), global batch %d", step,
                 training.num_train_steps, mesh.size, training.batch_size)
    if on_start is not None:
      on_start()

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    stack.callback(writer.close)
    report = periodic_actions.ReportProgress(num_train_steps=training.num_train_steps,
                                             every_steps=training.log_every, every_secs=None)
    bar = stack.enter_context(progress.Progress(training.num_train_steps, "train", "step",
                                                initial=step, enabled=None if is_chief else False))
    train_fn = make_train_fn(model, tx, schedule, step_settings(config), mesh, train_key)
    generate = generation.make_generate_fn(
        generation.network_model(model, schedule=schedule), spec, mesh)
    grid_indices = np.arange(training.num_grid_samples)
    k = training.steps_per_call
    batches = input_pipeline.device_batches(dataset, step, k, steps_batch_sharding(mesh))
    stack.callback(batches.close)
    pending, last = [], (step, time.perf_counter())  # throughput since (step, time)
    while step < training.num_train_steps:
      state, metrics = train_fn(state, next(batches))
      step += k
      pending.append(metrics)
      report(step)
      bar.update(k)
      done = step == training.num_train_steps
      if done or _crossed(step, k, training.log_every):
        values = jax.device_get(pending)
        steps_per_sec = (step - last[0]) / (time.perf_counter() - last[1])
        writer.write_scalars(step, {
            "loss": np.mean([v["loss"] for v in values]),
            "grad_norm": np.mean([v["grad_norm"] for v in values]),
            "lr": values[-1]["lr"][-1],
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * training.batch_size})
        pending, last = [], (step, time.perf_counter())
      if done or _crossed(step, k, training.checkpoint_every):
        with report.timed("checkpoint"):
          checkpoints.save_training(manager, state, step)
        last = (step, time.perf_counter())
      if _crossed(step, k, training.sample_every) or (done and training.sample_every > 0):
        with report.timed("sample"):
          images, _ = generation.sample_images(generate, state.ema_params, grid_indices, mesh)
          if is_chief:
            nrow = math.ceil(math.sqrt(len(images)))
            image_grid.save_image_grid(images, os.path.join(workdir, GRID_DIR,
                                                            f"{step:08d}.png"), nrow)
            writer.write_images(step, {"samples": image_grid.make_image_grid(images, nrow)})
        last = (step, time.perf_counter())
  return state
