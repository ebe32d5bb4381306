"""Every way weights are found, loaded and saved, with one error type (`CheckpointError`).

  * params directories (`model.json` + orbax `params/`): what `--mode=convert`
    writes and what the shipped model is (`save_params`, `load_params`);
  * training runs' orbax checkpoints (`train` and `ema_params` items): saved and
    restored whole by training (`save_training`, `restore_training`), their EMA
    parameters of any step read for sampling (`load_ema_params`);
  * PyTorch checkpoints (DDIM `.ckpt`, diffusers folders), read through the
    PyTorch <-> Flax mapping of `convert`;
  * `load_weights` takes any of these paths; `find_weights` finds a workdir's own.

The layouts are described in docs/methods.md §8.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from pndm_jax import convert, convert_iddpm, convert_ncsnpp, models
from pndm_jax.convert import CheckpointError
from pndm_jax.models.unet import UNet

CHECKPOINT_DIR = "checkpoints"  # a training workdir's orbax checkpoints
CONVERTED_DIR = "converted"     # where `main.py --mode=convert` writes into the workdir
_MODEL_JSON = "model.json"
_FORMAT = "pndm_jax.unet.params/1"
_REMAKE = "remake it from the original weights with main.py --mode=convert"
_FAMILY_FILES = {"iddpm": "an improved-diffusion .pt state_dict",
                 "ncsnpp": "a score_sde checkpoint_*.pth or a state_dict"}

T = TypeVar("T")


# ----------------------------------------------------------------------------- params directories


def _model_json(model: nn.Module, files: dict[str, int]) -> dict[str, Any]:
  return {"format": _FORMAT, "network": models.name_of(model), **models.architecture(model),
          "dtype": jnp.dtype(model.dtype).name, "files": files}


def _file_sizes(root: str) -> dict[str, int]:
  """Path relative to `root` -> size in bytes, of every file under `root`."""
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
  return {os.path.relpath(p, root): os.path.getsize(p) for p in paths}


def _is_params_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, _MODEL_JSON))


def save_params(path: str, model: nn.Module, params: Any) -> None:
  """Writes params + architecture as a directory (orbax `params/` + `model.json`).

  Written to a temporary sibling and renamed into place, so a failure leaves an existing
  checkpoint at `path` intact. Refuses to replace anything that is not such a checkpoint.
  model.json also records the size of every file under `params/`, so that `load_params` tells
  a truncated copy from a good one before orbax reads it.
  """
  path = os.path.abspath(path)
  if os.path.lexists(path) and not _is_params_checkpoint(path):
    raise CheckpointError(f"{path} exists and is not a pndm_jax params checkpoint; "
                          "refusing to replace it")
  flatten = flax.traverse_util.flatten_dict
  want = {p: (tuple(s.shape), np.dtype(np.float32))
          for p, s in flatten(convert.abstract_params(model)).items()}
  got = {p: (tuple(np.shape(a)), np.dtype(a.dtype)) for p, a in flatten(params).items()}
  if got != want:
    raise CheckpointError("params do not fit the network (tree, shapes or float32 dtype differ)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
      ckptr.wait_until_finished()
    files = _file_sizes(os.path.join(tmp, "params"))
    with open(os.path.join(tmp, _MODEL_JSON), "w") as f:
      json.dump(_model_json(model, files), f, indent=2)
    if os.path.lexists(path):
      old = tmp + ".old"
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except OSError:
        os.rename(old, path)
        raise
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read_model_json(path: str, dtype: Any) -> tuple[nn.Module, dict[str, int]]:
  """The network a `save_params` directory's model.json describes, and its `params/` file sizes
  (none recorded by older checkpoints, whose network is always the U-Net); anything else in
  model.json is an error."""
  file = os.path.join(path, _MODEL_JSON)
  try:
    with open(file) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is not a pndm_jax params checkpoint, or a truncated or corrupt "
                          f"one: cannot read {file} ({e}); {_REMAKE}") from e
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
    raise CheckpointError(f"{file} is not in the format {_FORMAT}")
  files = meta.get("files", {})
  fields = {k: v for k, v in meta.items() if k not in ("format", "files", "network", "dtype")}
  if not isinstance(files, dict) or not all(isinstance(n, int) for n in files.values()):
    raise CheckpointError(f"{file} is corrupt (files={files!r} is not a name -> size table); "
                          f"{_REMAKE}")
  try:
    model = models.from_architecture(meta.get("network", "unet"), fields,
                                     dtype if dtype is not None else meta.get("dtype"))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{file} is corrupt ({e}); {_REMAKE}") from e
  return model, files


def load_params(path: str, dtype: Any = None) -> tuple[nn.Module, Any]:
  """(network, params) of a `save_params` checkpoint; `dtype` overrides the computation dtype.

  A truncated or corrupt directory is a CheckpointError naming it (not an orbax traceback).
  """
  model, sizes = _read_model_json(path, dtype)
  params_dir = os.path.join(os.path.abspath(path), "params")
  found = _file_sizes(params_dir)
  damaged = [f"params/{name}: " + (f"{found[name]} bytes, written as {size}" if name in found
                                   else "missing")
             for name, size in sorted(sizes.items()) if found.get(name) != size]
  if damaged:
    listed = convert.listing("damaged files", damaged)
    raise CheckpointError(f"{path} is truncated or corrupt:\n{listed}\n  {_REMAKE}")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, convert.abstract_params(model))
  except Exception as e:  # orbax and tensorstore fail in many ways on damaged files
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    raise CheckpointError(f"{path} is a truncated or corrupt params checkpoint: its params/ "
                          f"cannot be restored ({type(e).__name__}: {first_line}); "
                          f"{_REMAKE}") from e
  return model, params


def _read_other_family(path: str, expected: nn.Module,
                       report: Callable[[str], None] | None) -> Any:
  """The params of an improved-diffusion `.pt` state_dict (for an `iddpm` network) or of a
  score_sde `checkpoint_*.pth` (for `ncsnpp`: its `ema` entry, or a plain state_dict), mapped
  onto `expected`, the network the config builds (these files hold no architecture)."""
  obj = convert.torch_load(path)
  if models.name_of(expected) == "ncsnpp" and isinstance(obj, dict) and "ema" in obj:
    params = convert_ncsnpp.from_score_sde_checkpoint(obj, expected, use_ema=True)
    convert.note(f"read the EMA weights of the score_sde checkpoint {path}", report)
    return params
  state_dict = convert.torch_state_dict(obj, path)
  family = convert_iddpm if models.name_of(expected) == "iddpm" else convert_ncsnpp
  params = family.from_state_dict(state_dict, expected)
  convert.note(f"read the state_dict {path}", report)
  return params


def _load_converted(path: str, expected: nn.Module | None, list_entry: int,
                    report: Callable[[str], None] | None) -> tuple[nn.Module, Any]:
  """(network, params) of a `save_params` directory, a DDIM `.ckpt` or a diffusers folder (the
  U-Net), or the PyTorch checkpoint of another family's `expected` network; arguments as in
  `convert.read_pytorch`."""
  if os.path.isdir(path) and _is_params_checkpoint(path):
    model, params = load_params(path)
    _check_same_network(model, expected, path)
    convert.note(f"read the params checkpoint {path}", report)
    return (expected or model), params
  if expected is not None and not isinstance(expected, UNet):
    name = models.name_of(expected)
    if os.path.isdir(path):
      raise CheckpointError(f"{path} is a directory but not a params checkpoint; a {name} "
                            f"network reads {_FAMILY_FILES[name]}, a params checkpoint or a "
                            "training run")
    return expected, _read_other_family(path, expected, report)
  return convert.read_pytorch(path, expected, None, list_entry, report)


def _check_same_network(found: nn.Module, expected: nn.Module | None, src: str) -> None:
  """Raises a CheckpointError listing how a params checkpoint's network differs from the one
  the config builds (dropout and dtype aside: the config gives those)."""
  if expected is None:
    return
  if isinstance(found, UNet) and isinstance(expected, UNet):
    convert.reconcile(convert.architecture(found), found.dropout, expected, None, src)
    return
  got, want = (models.architecture(m) | {"network": models.name_of(m)} for m in (found, expected))
  diff = [f"{k}: checkpoint {got.get(k)!r}, expected {want.get(k)!r}"
          for k in sorted(got.keys() | want.keys()) if k != "dropout" and got.get(k) != want.get(k)]
  if diff:
    raise CheckpointError(f"{src} holds a different architecture than expected:\n  "
                          + "\n  ".join(diff))


# ----------------------------------------------------------------------------- training runs


class CheckpointMismatchError(CheckpointError):
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
  anything is restored. (Sets how orbax saves every jax.Array in this process.)
  """
  # Each replicated array is written whole by its first replica. Orbax's default, splitting
  # the writing over the replicas, compiles a slice per array and device at the first save
  # (docs/performance.md).
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
  handlers = {name: ocp.StandardCheckpointHandler() for name in _ITEMS}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def _items(state: Any) -> dict[str, Any]:
  """A state as the checkpoint's items (EMA parameters on their own, so samplers can
  restore or ship them alone); works on concrete and abstract states alike."""
  return {"train": {"step": state.step, "params": state.params, "opt_state": state.opt_state},
          "ema_params": state.ema_params}


def save_training(manager: ocp.CheckpointManager, state: Any, step: int) -> None:
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


def restore_training(manager: ocp.CheckpointManager, target: T,
                     fallback: bool = False) -> T | None:
  """The latest checkpoint restored with `target`'s structure and shardings, or None if none.

  `target` is a training state (`step`, `params`, `ema_params`, `opt_state` and
  `replace`, like `train.TrainState`); the result is `target.replace(...)`.

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
  except CheckpointMismatchError:
    raise
  except CheckpointError as latest:
    if len(steps) == 1:
      raise CheckpointError(f"{latest}; no earlier checkpoint exists") from latest
    if not fallback:
      raise CheckpointError(
          f"{latest}; set config.training.restore_fallback=True to resume from the previous "
          f"checkpoint, step {steps[1]} (this one is then moved aside)") from latest
    try:
      restored = _restore_step(manager, steps[1], items)
    except CheckpointMismatchError:
      raise
    except CheckpointError as previous:
      raise CheckpointError(f"the last two checkpoints are both unreadable; nothing was "
                            f"moved: {latest}; {previous}") from previous
    _move_aside(manager, steps[0])
  train = restored["train"]
  return target.replace(step=train["step"], params=train["params"],
                        ema_params=restored["ema_params"], opt_state=train["opt_state"])


def find_training_checkpoints(path: str) -> tuple[str, int | None] | None:
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


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
  """(absolute checkpoints directory, step) that `path` and `step` (None: latest) name.

  Raises a CheckpointError if there is no such checkpoint (naming the steps
  there are) or a step directory and `step` disagree.
  """
  found = find_training_checkpoints(path)
  if found is None or not os.path.isdir(found[0]):
    raise CheckpointError(f"no checkpoint directory at {path!r}")
  directory, named = found
  if named is not None and step is not None and step != named:
    raise CheckpointError(f"{path} is the checkpoint of step {named}, but step {step} was "
                          "asked for")
  step = named if named is not None else step
  steps = sorted(ocp.utils.checkpoint_steps(directory))
  if not steps:
    raise CheckpointError(f"no checkpoints in {directory!r}")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} in {directory}; available steps: "
                          f"{', '.join(map(str, steps))}")
  return directory, step


def load_ema_params(path: str, step: int | None = None) -> Any:
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


# ----------------------------------------------------------------------------- any of them


def load_weights(path: str, expected: nn.Module | None = None, step: int | None = None,
                 list_entry: int = -1, report: Callable[[str], None] | None = None
                 ) -> tuple[nn.Module, Any, str]:
  """(network, params, source) from any checkpoint path, checked against `expected`.

  A training run (a workdir, its checkpoints or one step directory) gives the
  EMA parameters of `step` (None: the latest, or the step directory's own); its
  checkpoints hold no architecture, so there `expected` is required.
  anything else is a params directory or a PyTorch checkpoint (`list_entry`
  picks the entry of a DDIM list checkpoint; -1 is its EMA). `source` names
  the weights exactly: a run's checkpoints directory and step, or the path.
  """
  if find_training_checkpoints(path) is not None:
    if expected is None:
      raise CheckpointError(f"{path} is a training run: its network comes from the config")
    directory, step = resolve_checkpoint(path, step)
    return expected, load_ema_params(path, step), f"{directory} step {step} (EMA)"
  if step is not None:
    raise CheckpointError(f"config.sampler.checkpoint_step={step} picks a step of a training "
                          f"run, but {path} is not one")
  model, params = _load_converted(path, expected, list_entry, report)
  return model, params, os.path.abspath(path)


def find_weights(workdir: str) -> str:
  """A workdir's own weights: `--mode=convert`'s output, else its training run."""
  converted = os.path.join(workdir, CONVERTED_DIR)
  if os.path.isdir(converted):
    return converted
  if find_training_checkpoints(workdir) is not None:
    return workdir
  raise CheckpointError(
      f"no model to sample from: config.sampler.checkpoint is empty and {workdir!r} has "
      f"neither training checkpoints nor a converted model. Either train one:\n"
      f"  python main.py --config=<train config> --mode=train --workdir={workdir}\n"
      f"or convert downloaded PyTorch weights (a DDIM .ckpt or a diffusers UNet2DModel "
      f"folder) and point the sampler at them:\n"
      f"  python main.py --config=<this config> --mode=convert "
      f"--config.sampler.checkpoint=PATH --workdir={workdir}\n"
      f"  (or sample straight from PATH with --config.sampler.checkpoint=PATH)")
