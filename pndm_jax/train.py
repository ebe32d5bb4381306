"""Training the epsilon-prediction U-Net (METHODS §7): objective, sharded step, checkpoints, logs.

The objective is the reference's: random horizontal flips, timesteps drawn
antithetically (t and N-1-t in the two halves of a batch), x_t = sqrt(A[t]) x0 +
sqrt(1 - A[t]) eps, and an l1 (or l2) error on eps summed over pixels and
averaged over the batch; Adam with linear warm-up, global-norm clipping, and an
EMA of the parameters after every step.

One jitted function runs `steps_per_call` steps (under `lax.scan` when more
than one), data-parallel over a 1-D device mesh: the batch is sharded along the
mesh axis and the train state is replicated by its sharding, so gradients are
reduced by the compiler.
Every random draw is keyed by (seed, step), and batch `i` of the input pipeline
belongs to step `i`, so a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pndm_jax import image_grid, input_pipeline, progress, sampling, schedules, sharding
from pndm_jax.metric_logging import metric_writers, periodic_actions
from pndm_jax.models import UNet, unet_from_config

CHECKPOINT_DIR = "checkpoints"
SAMPLE_DIR = "samples"
LOSSES = ("l1", "l2")


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree of arrays."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


# ----------------------------------------------------------------------------- objective


def learning_rate_schedule(training: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * min((n + 1) / warmup_steps, 1) at update n (0-based): linear warm-up, then constant."""
  lr, warmup = training.lr, max(int(training.warmup_steps), 1)
  return lambda count: lr * jnp.minimum((count + 1) / warmup, 1.0)


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with linear warm-up, after global-norm clipping (grad_clip <= 0 disables it)."""
  adam = optax.adam(learning_rate_schedule(training), b1=training.beta1, b2=training.beta2,
                    eps=training.adam_eps)
  if training.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(training.grad_clip), adam)
  return adam


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def antithetic_timesteps(key: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
  """int32 [batch]: t ~ U{0..N-1} in the first half, N-1-t in the second (the reference's draw)."""
  t = jax.random.randint(key, (batch // 2 + 1,), 0, num_timesteps)
  return jnp.concatenate([t, num_timesteps - 1 - t])[:batch]


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
  """Flips each NHWC image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1, :], x)


def diffusion_loss(params: Any, model: UNet, x0: jax.Array, key: jax.Array,
                   alphas_cumprod: jax.Array, loss: str, flip: bool) -> jax.Array:
  """The eps-prediction loss of one batch: per-image error summed over pixels, batch mean."""
  k_flip, k_t, k_noise, k_dropout = jax.random.split(key, 4)
  x0 = x0.astype(jnp.float32)
  if flip:
    x0 = random_flip(k_flip, x0)
  t = antithetic_timesteps(k_t, x0.shape[0], alphas_cumprod.shape[0])
  a = alphas_cumprod[t][:, None, None, None]
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
  eps = model.apply({"params": params}, x_t, t.astype(jnp.float32), train=True,
                    rngs={"dropout": k_dropout}).astype(jnp.float32)
  err = jnp.abs(eps - noise) if loss == "l1" else jnp.square(eps - noise)
  return jnp.mean(jnp.sum(err, axis=(1, 2, 3)))


def train_step(state: TrainState, x0: jax.Array, *, model: UNet,
               tx: optax.GradientTransformation, alphas_cumprod: jax.Array,
               config: ml_collections.ConfigDict, key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch x0 [B, H, W, C]; metrics are scalars."""
  training = config.training
  step_key = jax.random.fold_in(key, state.step)
  loss, grads = jax.value_and_grad(diffusion_loss)(
      state.params, model, x0, step_key, alphas_cumprod, training.loss, config.data.random_flip)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_update(state.ema_params, params, training.ema_decay))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": learning_rate_schedule(training)(state.step)}
  return new_state, metrics


# ----------------------------------------------------------------------------- sharding


def steps_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of the [steps_per_call, global_batch, H, W, C] arrays the train function takes."""
  return NamedSharding(mesh, P(None, sharding.BATCH_AXIS))


def create_train_state(model: UNet, tx: optax.GradientTransformation, key: jax.Array,
                       image_size: int, num_channels: int, mesh: Mesh) -> TrainState:
  """Freshly initialised state (step 0, EMA = params), replicated over the mesh."""

  def init(key):
    x = jnp.zeros((1, image_size, image_size, num_channels), jnp.float32)
    params = model.init({"params": key}, x, jnp.zeros((1,), jnp.float32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params),  # own buffers: state is donated
                      opt_state=tx.init(params))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))(key)


def make_train_fn(model: UNet, tx: optax.GradientTransformation, schedule: schedules.Schedule,
                  config: ml_collections.ConfigDict, mesh: Mesh, key: jax.Array
                  ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """One jitted call of k = batches.shape[0] train steps; returns per-step metrics [k].

  k > 1 runs under `lax.scan` (fewer dispatches on accelerators). k = 1 runs
  the step directly: on XLA:CPU a convolution's weight gradient inside a loop
  body is many times slower than outside one (jax-ml/jax#12868; measured ~8x
  on this U-Net). The input state is donated; the returned one is replicated.
  """
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

  def step(state, x0):
    return train_step(state, x0, model=model, tx=tx, alphas_cumprod=alphas_cumprod,
                      config=config, key=key)

  def train_fn(state, batches):
    if batches.shape[0] > 1:
      return jax.lax.scan(step, state, batches)
    state, metrics = step(state, batches[0])
    return state, jax.tree.map(lambda m: m[None], metrics)

  replicated = sharding.replicated(mesh)
  return jax.jit(train_fn, in_shardings=(replicated, steps_batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
  """A checkpoint exists but its files cannot be read (corrupt or truncated)."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree, shapes or dtypes differ from the state the config builds.

  A config error, not corruption: an earlier checkpoint of the same run would
  not fit either, so nothing is moved aside and no fallback is offered.
  """


_ITEMS = ("train", "ema_params")
MAX_LISTED_LEAVES = 20
_ORBAX_STEP_FILE = "_CHECKPOINT_METADATA"  # orbax writes it into every step directory


def checkpoint_manager(directory: str, keep: int = 3) -> ocp.CheckpointManager:
  """An orbax manager keeping the last `keep` checkpoints of `directory`.

  Orbax writes each checkpoint to a temporary directory and renames it only
  when complete, so a crash mid-save leaves the previous one as the latest.
  The item handlers are named up front so that metadata is readable before
  anything is restored.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
  handlers = {name: ocp.StandardCheckpointHandler() for name in _ITEMS}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def _items(state: TrainState) -> dict[str, Any]:
  """A state as the checkpoint's items (EMA parameters on their own, so samplers can
  restore or ship them alone); works on concrete and abstract states alike."""
  return {"train": {"step": state.step, "params": state.params, "opt_state": state.opt_state},
          "ema_params": state.ema_params}


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int) -> None:
  """Saves `state` as checkpoint `step` (asynchronously; the manager waits before the next)."""
  args = {name: ocp.args.StandardSave(item) for name, item in _items(state).items()}
  manager.save(step, args=ocp.args.Composite(**args), force=True)


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _saved_trees(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """{item: tree of array metadata} of checkpoint `step`; raises if any item is unreadable."""
  metadata = manager.item_metadata(step)
  missing = [name for name in _ITEMS if metadata.get(name) is None]
  if missing:
    raise FileNotFoundError(f"no readable metadata for item(s) {', '.join(missing)}")
  return {name: metadata[name].tree for name in _ITEMS}


def _mismatched_leaves(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
  """One line per leaf whose tree path, shape or dtype differs between the two trees."""
  saved, expected = ocp.tree.to_flat_dict(saved), ocp.tree.to_flat_dict(expected)
  describe = lambda x: f"{tuple(x.shape)} {np.dtype(x.dtype).name}"
  lines = []
  for key in sorted(saved.keys() | expected.keys()):
    name = "/".join(key)
    if key not in expected:
      lines.append(f"{name}: saved {describe(saved[key])}, not in the config's state")
    elif key not in saved:
      lines.append(f"{name}: missing from the checkpoint, expected {describe(expected[key])}")
    elif describe(saved[key]) != describe(expected[key]):
      lines.append(f"{name}: saved {describe(saved[key])}, expected {describe(expected[key])}")
  return lines


def _restore_step(manager: ocp.CheckpointManager, step: int, items: dict[str, Any]
                  ) -> dict[str, Any]:
  """Checkpoint `step` restored as the abstract `items`.

  The saved tree is compared with `items` first, from the metadata: a
  difference raises CheckpointMismatchError; unreadable files (metadata, or
  the arrays themselves) raise CheckpointError.
  """
  path = _step_path(manager, step)
  try:
    saved = _saved_trees(manager, step)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"checkpoint {path} is unreadable (its metadata: "
                          f"{type(e).__name__}: {e})") from e
  mismatched = _mismatched_leaves(saved, items)
  if mismatched:
    listed = mismatched[:MAX_LISTED_LEAVES]
    if len(mismatched) > MAX_LISTED_LEAVES:
      listed.append(f"... and {len(mismatched) - MAX_LISTED_LEAVES} more")
    raise CheckpointMismatchError(
        f"checkpoint {path} does not fit the state this config builds; {len(mismatched)} "
        f"leaves differ:\n  " + "\n  ".join(listed) + "\nThe model/optimizer config differs "
        f"from the one that wrote the checkpoints in {manager.directory}: resume with that "
        f"config, or train this one in a new workdir.")
  args = {name: ocp.args.StandardRestore(item) for name, item in items.items()}
  try:
    return manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from e


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Renames checkpoint `step` to `<step>.corrupt` (`.corrupt-1`, ... if taken; never
  overwriting) on process 0, then makes every process's manager forget it."""
  path = _step_path(manager, step)
  if jax.process_index() == 0:
    dst, n = path + ".corrupt", 0
    while os.path.lexists(dst):
      n += 1
      dst = f"{path}.corrupt-{n}"
    logging.warning("checkpoint %s is unreadable; moved it to %s", path, dst)
    os.rename(path, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
  manager.reload()


def restore_checkpoint(manager: ocp.CheckpointManager, target: TrainState,
                       fallback: bool = False) -> Optional[TrainState]:
  """The latest checkpoint restored with `target`'s structure and shardings, or None if none.

  A checkpoint whose tree, shapes or dtypes differ from `target` raises
  CheckpointMismatchError. An unreadable latest checkpoint raises a
  CheckpointError; with `fallback`, the previous checkpoint is restored
  instead, and only once that has worked is the unreadable one moved aside to
  `<step>.corrupt`. At most one step back: if the previous one is unreadable
  too, the error names both and nothing is moved.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  items = _items(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
  try:
    restored = _restore_step(manager, steps[0], items)
  except CheckpointError as latest:
    if len(steps) == 1:
      raise CheckpointError(f"{latest}; no earlier checkpoint exists") from latest
    if not fallback:
      raise CheckpointError(
          f"{latest}; set config.training.restore_fallback=True to resume from the previous "
          f"checkpoint, step {steps[1]} (this one is then moved aside)") from latest
    try:
      restored = _restore_step(manager, steps[1], items)
    except CheckpointError as previous:
      raise CheckpointError(f"the last two checkpoints are both unreadable; nothing was "
                            f"moved: {latest}; {previous}") from previous
    _move_aside(manager, steps[0])
  train = restored["train"]
  return TrainState(step=train["step"], params=train["params"],
                    ema_params=restored["ema_params"], opt_state=train["opt_state"])


def find_training_checkpoints(path: str) -> Optional[tuple[str, Optional[int]]]:
  """(absolute checkpoints directory, step the path names or None), or None.

  `path` is a training workdir, its `checkpoints` directory, or one step
  directory in it (an integer name inside `checkpoints`, existing or not, or
  an orbax step directory inside any other); None for anything else.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return os.path.join(path, CHECKPOINT_DIR), None
  if os.path.basename(path) == CHECKPOINT_DIR:
    return path, None
  parent, name = os.path.split(path)
  if name.isdigit() and (os.path.basename(parent) == CHECKPOINT_DIR
                         or os.path.isfile(os.path.join(path, _ORBAX_STEP_FILE))):
    return parent, int(name)
  return None


def resolve_checkpoint(path: str, step: Optional[int] = None) -> tuple[str, int]:
  """(absolute checkpoints directory, step) that `path` and `step` (None: latest) name.

  Raises FileNotFoundError if there is no such checkpoint (naming the steps
  there are) and ValueError if a step directory and `step` disagree.
  """
  found = find_training_checkpoints(path)
  if found is None or not os.path.isdir(found[0]):
    raise FileNotFoundError(f"no checkpoint directory at {path!r}")
  directory, named = found
  if named is not None and step is not None and step != named:
    raise ValueError(f"{path} is the checkpoint of step {named}, but step {step} was asked for")
  step = named if named is not None else step
  steps = sorted(ocp.utils.checkpoint_steps(directory))
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {directory!r}")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; available steps: "
                            f"{', '.join(map(str, steps))}")
  return directory, step


def load_ema_params(path: str, step: Optional[int] = None) -> Any:
  """EMA parameters (a pytree of numpy arrays) from a training run, for sampling.

  `path` and `step` as in `resolve_checkpoint`. Only the `ema_params` item is
  read, so a checkpoint directory holding just that item (a shipped model)
  works too. Unreadable files raise a CheckpointError naming the checkpoint.
  """
  directory, step = resolve_checkpoint(path, step)
  manager = ocp.CheckpointManager(
      directory, item_handlers={"ema_params": ocp.PyTreeCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  with manager:
    try:
      # Restored as host numpy arrays: valid whatever devices the run was saved from.
      tree = manager.item_metadata(step)["ema_params"].tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      restored = manager.restore(step, args=ocp.args.Composite(
          ema_params=ocp.args.PyTreeRestore(restore_args=restore_args)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"EMA parameters of checkpoint {os.path.join(directory, str(step))} "
                            f"cannot be restored: {type(e).__name__}: {e}") from e
  logging.info("loaded the EMA parameters of %s, step %d", directory, step)
  return restored["ema_params"]


# ----------------------------------------------------------------------------- the loop


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises a ValueError for settings that would fail later (called before any compute)."""
  training = config.training
  if training.loss not in LOSSES:
    raise ValueError(f"unknown loss {training.loss!r}; valid choices: {', '.join(LOSSES)}")
  if training.steps_per_call < 1 or training.num_train_steps % training.steps_per_call:
    raise ValueError(f"num_train_steps ({training.num_train_steps}) must be a multiple of "
                     f"steps_per_call ({training.steps_per_call})")
  input_pipeline.check_global_batch(training.batch_size, num_devices, jax.process_count())
  schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def _crossed(step: int, k: int, every: int) -> bool:
  """Whether the last k steps, ending at `step`, passed a multiple of `every` (0: never)."""
  return every > 0 and step // every != (step - k) // every


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_start: Optional[Callable[[], None]] = None) -> TrainState:
  """Trains per `config`, resuming from the latest checkpoint in `workdir`; returns the state.

  Writes to `workdir`: `checkpoints/` (orbax), TensorBoard events and
  `samples/<step>.png` grids from the EMA parameters; on a terminal, a progress
  line with rate and ETA. Throughput (steps/s, images/s) is measured over
  training only, not checkpointing or sampling. A checkpoint past
  `num_train_steps` is a ValueError (raised before the train step compiles).
  `on_start` is called once the checkpoint (if any) has restored and training begins.
  """
  training, data = config.training, config.data
  mesh = sharding.batch_mesh()
  check_config(config, mesh.size)
  dataset = input_pipeline.create_dataset(data, training.batch_size, config.seed, mesh.size)
  schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  model = unet_from_config(config.model, data.image_size, data.num_channels)
  tx = make_optimizer(training)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(model, tx, init_key, data.image_size, data.num_channels, mesh)

  is_chief = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    manager = stack.enter_context(checkpoint_manager(os.path.join(workdir, CHECKPOINT_DIR),
                                                     training.keep_checkpoints))
    state = restore_checkpoint(manager, state, training.restore_fallback) or state
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
    train_fn = make_train_fn(model, tx, schedule, config, mesh, train_key)
    generate = sampling.make_generate_fn(sampling.network_model(model), config, mesh)
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
          save_checkpoint(manager, state, step)
        last = (step, time.perf_counter())
      if _crossed(step, k, training.sample_every) or (done and training.sample_every > 0):
        with report.timed("sample"):
          images, _ = sampling.sample_images(generate, state.ema_params, grid_indices, mesh)
          if is_chief:
            nrow = math.ceil(math.sqrt(len(images)))
            image_grid.save_image_grid(images, os.path.join(workdir, SAMPLE_DIR,
                                                            f"{step:08d}.png"), nrow)
            writer.write_images(step, {"samples": image_grid.make_image_grid(images, nrow)})
        last = (step, time.perf_counter())
  return state
