"""score_sde PyTorch checkpoints <-> `pndm_jax.models.ncsnpp.NCSNpp` params.

score_sde's NCSNpp holds its layers in one flat `all_modules` list; its state_dict keys are
`all_modules.{i}.{layer}.{leaf}` in creation order. The Flax model names the i-th layer
`all_modules_{i}` with the same inner names, so the mapping is by name: `.` <-> a path step,
`weight` <-> `kernel` (convs OIHW <-> HWIO, linears OI <-> IO) or `scale` (GroupNorm), and
identity for NIN's `W` [in, out] / `b` and the Fourier projection's `W`.

score_sde's `checkpoint_*.pth` is {'model', 'ema', 'optimizer', 'step'}; 'model' keys carry the
DataParallel `module.` prefix and 'ema' is {'decay', 'num_updates', 'shadow_params'}, the EMA of
the parameters with requires_grad, in `model.parameters()` order. NCSNpp has no buffers, so that
is the state_dict order minus the Fourier projection's fixed `W` (requires_grad=False), which is
then taken from 'model'. Any unknown, missing or mis-shaped key, or an EMA list that does not
fit, is a `CheckpointError` raised before anything is returned. torch is never imported: tensors
are read through their `.detach().cpu().float().numpy()`.
"""

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import numpy as np

from pndm_jax.convert import CheckpointError, abstract_params, check_keys
from pndm_jax.models.ncsnpp import NCSNpp

# Inner layer order of score_sde's modules (attribute registration order in their __init__).
_LAYER_ORDER = ("GroupNorm_0", "Conv_0", "Conv2d_0", "Dense_0", "GroupNorm_1", "Conv_1", "Conv_2",
                "NIN_0", "NIN_1", "NIN_2", "NIN_3", "Conv")
_LEAF_ORDER = ("kernel", "scale", "W", "bias", "b")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight"}
# Leaves of layers created with requires_grad=False (excluded from score_sde's EMA).
_FIXED = re.compile(r"all_modules\.\d+\.W")


@dataclasses.dataclass(frozen=True)
class _Entry:
  flax_path: tuple[str, ...]
  key: str
  flax_shape: tuple[int, ...]

  @property
  def torch_shape(self) -> tuple[int, ...]:
    s = self.flax_shape
    if self.flax_path[-1] == "kernel":
      return (s[3], s[2], s[0], s[1]) if len(s) == 4 else (s[1], s[0])
    return s


def _sort_key(path: tuple[str, ...]) -> tuple[Any, ...]:
  index = int(path[0].rsplit("_", 1)[1])
  inner = tuple(_LAYER_ORDER.index(p) for p in path[1:-1])
  return (index, inner, _LEAF_ORDER.index(path[-1]))


@functools.lru_cache(maxsize=32)
def _entries(model: NCSNpp) -> tuple[_Entry, ...]:
  flat = flax.traverse_util.flatten_dict(abstract_params(model))
  entries = []
  for path in sorted(flat, key=_sort_key):
    top = "all_modules." + path[0].rsplit("_", 1)[1]
    key = ".".join((top, *path[1:-1], _TORCH_LEAF.get(path[-1], path[-1])))
    entries.append(_Entry(path, key, tuple(flat[path].shape)))
  return tuple(entries)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (torch itself is not imported)
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def _to_flax(a: np.ndarray, e: _Entry) -> np.ndarray:
  if e.flax_path[-1] == "kernel":
    a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
  return np.ascontiguousarray(a, np.float32)


def _to_torch(a: np.ndarray, e: _Entry) -> np.ndarray:
  if e.flax_path[-1] == "kernel":
    a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
  return np.ascontiguousarray(a, np.float32)


def architecture(model: NCSNpp) -> dict[str, Any]:
  """The fields that decide a checkpoint's keys and meaning (all but dropout and dtype)."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in ("dropout", "dtype", "parent", "name")}


def state_dict_shapes(model: NCSNpp) -> dict[str, tuple[int, ...]]:
  """Every score_sde state_dict key for `model` with its PyTorch shape, in creation order."""
  return {e.key: e.torch_shape for e in _entries(model)}


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops DataParallel's `module.` prefix; a key present with and without it is an error."""
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    new = key[len("module."):] if key.startswith("module.") else key
    if new in out:
      raise CheckpointError(f"both {key} and {new} are in the state_dict")
    out[new] = value
  return out


def _check(state_dict: Mapping[str, Any], model: NCSNpp) -> None:
  check_keys(state_dict, state_dict_shapes(model),
             f"the score_sde state_dict does not match the network {architecture(model)}")


def from_state_dict(state_dict: Mapping[str, Any], model: NCSNpp) -> Any:
  """Flax "params" (float32 numpy) of `model` from a score_sde NCSNpp state_dict.

  Accepts the `module.` prefix. Raises CheckpointError listing every missing, unexpected and
  mis-shaped key.
  """
  state_dict = _strip_prefix(state_dict)
  _check(state_dict, model)
  flat = {e.flax_path: _to_flax(_to_numpy(state_dict[e.key]), e) for e in _entries(model)}
  return flax.traverse_util.unflatten_dict(flat)


def to_state_dict(params: Any, model: NCSNpp) -> dict[str, np.ndarray]:
  """The score_sde state_dict (numpy, PyTorch shapes, creation order); from_state_dict's inverse."""
  flat = flax.traverse_util.flatten_dict(params)
  return {e.key: _to_torch(np.asarray(flat[e.flax_path], np.float32), e) for e in _entries(model)}


def from_score_sde_checkpoint(obj: Mapping[str, Any], model: NCSNpp, use_ema: bool = True) -> Any:
  """Flax params from a loaded score_sde `checkpoint_*.pth` dict ('model', 'ema', ...).

  With use_ema, the 'ema' shadow_params replace the trainable parameters in state_dict order
  (the Fourier projection's fixed W is not among them and comes from 'model'). A count mismatch,
  or a shape mismatch at some position, is a CheckpointError.
  """
  if not isinstance(obj, Mapping) or "model" not in obj:
    keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"not a score_sde checkpoint (no 'model' entry): {keys}")
  state_dict = _strip_prefix(obj["model"])
  _check(state_dict, model)
  if use_ema:
    ema = obj.get("ema")
    if not isinstance(ema, Mapping) or "shadow_params" not in ema:
      raise CheckpointError("use_ema=True but the checkpoint has no 'ema' entry with "
                            "'shadow_params'")
    shadow = list(ema["shadow_params"])
    trainable = [e for e in _entries(model) if not _FIXED.fullmatch(e.key)]
    if len(shadow) != len(trainable):
      raise CheckpointError(f"the EMA holds {len(shadow)} tensors but the network has "
                            f"{len(trainable)} trainable parameters")
    state_dict = dict(state_dict)
    for i, (value, e) in enumerate(zip(shadow, trainable)):
      if tuple(np.shape(value)) != e.torch_shape:
        raise CheckpointError(f"EMA shadow_params[{i}] has shape {tuple(np.shape(value))}, but "
                              f"parameter {i} ({e.key}) has shape {e.torch_shape}")
      state_dict[e.key] = value
  return from_state_dict(state_dict, model)
