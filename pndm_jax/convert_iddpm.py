"""The PyTorch <-> Flax mapping of improved-diffusion `UNetModel` state_dicts (docs/methods.md §8).

`pndm_jax.models.iddpm_unet.IDDPMUNet` names its modules after the improved-diffusion keys, so
the mapping is by name: a Flax path `input_blocks_1_0/in_layers_2/kernel` is the key
`input_blocks.1.0.in_layers.2.weight` (every `_<digits>` becomes `.<digits>`; kernel/scale ->
weight). Layouts: convs [O, I, kh, kw] <-> [kh, kw, I, O]; the attention's 1x1 conv1d qkv and
proj_out [O, I, 1] <-> Dense [I, O]; Linear [O, I] <-> [I, O]; norms [C] as is.

Strict like `pndm_jax.convert`: any unknown, missing or mis-shaped key is a `CheckpointError`
listing all of them, raised before anything is returned. A DataParallel `module.` prefix (on
every key) is accepted. torch is never imported here: state_dicts are mappings of numpy arrays.

Public API:
  state_dict_shapes(model) -> {key: PyTorch shape}
  from_state_dict(state_dict, model) -> Flax params; to_state_dict(params, model) (its inverse)
  architecture(model) -> the JSON-able fields a checkpoint determines
  infer_architecture(state_dict, image_size, num_heads=4, num_head_channels=-1) -> those fields
"""

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import numpy as np

from pndm_jax.convert import CheckpointError, abstract_params, check_keys
from pndm_jax.models.iddpm_unet import IDDPMUNet

# The IDDPMUNet fields a checkpoint determines (or, for the heads, that rebuild it exactly);
# dropout and dtype are not among them.
ARCH_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resamp_with_conv",
               "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
               "resblock_updown", "learn_sigma", "in_channels", "image_size")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_CONV1D = frozenset({"qkv", "proj_out"})  # Dense in Flax, 1x1 Conv1d in improved-diffusion


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One parameter: its Flax path, its improved-diffusion key, and its layout."""
  flax_path: tuple[str, ...]
  key: str
  kind: str  # "conv" (OIHW <-> HWIO), "conv1d" (OI1 <-> IO), "dense" (OI <-> IO), "vector"
  flax_shape: tuple[int, ...]


def _torch_name(flax_name: str) -> str:
  return re.sub(r"_(\d+)", r".\1", flax_name)


@functools.lru_cache(maxsize=16)
def _entries(model: IDDPMUNet) -> tuple[_Entry, ...]:
  entries = []
  for path, leaf in flax.traverse_util.flatten_dict(abstract_params(model)).items():
    *modules, name = path
    shape = tuple(leaf.shape)
    if len(shape) == 4:
      kind = "conv"
    elif len(shape) == 2:
      kind = "conv1d" if modules[-1] in _CONV1D else "dense"
    else:
      kind = "vector"
    key = ".".join([_torch_name(m) for m in modules] + [_LEAVES[name]])
    entries.append(_Entry(tuple(path), key, kind, shape))
  return tuple(entries)


def _torch_shape(entry: _Entry) -> tuple[int, ...]:
  s = entry.flax_shape
  if entry.kind == "conv":
    return (s[3], s[2], s[0], s[1])
  if entry.kind == "conv1d":
    return (s[1], s[0], 1)
  return (s[1], s[0]) if entry.kind == "dense" else s


def _to_flax(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return w.transpose(2, 3, 1, 0)
  if kind == "conv1d":
    return w[:, :, 0].T
  return w.T if kind == "dense" else w


def _to_torch(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return w.transpose(3, 2, 0, 1)
  if kind == "conv1d":
    return w.T[:, :, None]
  return w.T if kind == "dense" else w


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state_dict without DataParallel's `module.` prefix, if every key has it."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return state_dict


def state_dict_shapes(model: IDDPMUNet) -> dict[str, tuple[int, ...]]:
  """Every key of an improved-diffusion state_dict for `model`, with its PyTorch shape."""
  return {e.key: _torch_shape(e) for e in _entries(model)}


def architecture(model: IDDPMUNet) -> dict[str, Any]:
  """The JSON-able fields (`ARCH_FIELDS`) that, with dropout and dtype, rebuild `model`
  (`IDDPMUNet(**architecture(model))`; the sequences may come back from JSON as lists)."""
  return {f: getattr(model, f) for f in ARCH_FIELDS}


def from_state_dict(state_dict: Mapping[str, Any], model: IDDPMUNet) -> Any:
  """The Flax "params" tree (float32) of `model` from an improved-diffusion state_dict.

  Values are numpy-convertible arrays. Raises CheckpointError listing every missing, unknown
  and mis-shaped key (nothing is converted then).
  """
  state_dict = _strip_module_prefix(state_dict)
  entries = _entries(model)
  check_keys(state_dict, {e.key: _torch_shape(e) for e in entries},
             f"the improved-diffusion state_dict does not match the network {architecture(model)}")
  flat = {e.flax_path: _to_flax(np.asarray(state_dict[e.key], np.float32), e.kind)
          for e in entries}
  return flax.traverse_util.unflatten_dict(flat)


def to_state_dict(params: Any, model: IDDPMUNet) -> dict[str, np.ndarray]:
  """The improved-diffusion state_dict (numpy float32, PyTorch shapes) of Flax params;
  the exact inverse of `from_state_dict`."""
  flat = flax.traverse_util.flatten_dict(params)
  return {e.key: _to_torch(np.asarray(flat[e.flax_path], np.float32), e.kind)
          for e in _entries(model)}


def _blocks(sd: Mapping[str, Any], prefix: str) -> dict[int, set[int]]:
  """{block index: its sub-module indices} of the `prefix.{k}.{s}.` keys."""
  out: dict[int, set[int]] = {}
  for key in sd:
    m = re.match(rf"{prefix}\.(\d+)\.(\d+)\.", key)
    if m:
      out.setdefault(int(m[1]), set()).add(int(m[2]))
  return out


def infer_architecture(state_dict: Mapping[str, Any], image_size: int, num_heads: int = 4,
                       num_head_channels: int = -1) -> dict[str, Any]:
  """The `architecture` fields of the network an improved-diffusion state_dict is for.

  Read off the keys and shapes: ch, ch_mult, num_res_blocks, attention levels (placed with
  `image_size`, which the state_dict does not record), use_scale_shift_norm (emb_layers width),
  learn_sigma (2C outputs), resblock_updown and resamp_with_conv. The heads cannot be read from
  shapes and are taken as given (num_heads_upsample -1). Where resampling has no parameters
  (resamp_with_conv False, or a 1-level network) resamp_with_conv is reported as such / True.
  `from_state_dict` then checks every key and shape against the rebuilt network.
  """
  sd = _strip_module_prefix(state_dict)

  def get(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise CheckpointError(f"cannot infer the architecture: no {key!r} in the state_dict "
                            f"(is this an improved-diffusion UNetModel? its first keys: "
                            f"{sorted(sd)[:8]})")
    return tuple(np.shape(sd[key]))

  ch = get("time_embed.0.weight")[1]
  in_ch = get("input_blocks.0.0.weight")[1]
  out_ch = get("out.2.weight")[0]
  if out_ch not in (in_ch, 2 * in_ch):
    raise CheckpointError(f"out.2.weight has {out_ch} output channels for {in_ch} input "
                          f"channels: neither {in_ch} (eps) nor {2 * in_ch} (learned sigma)")
  inputs, outputs = _blocks(sd, "input_blocks"), _blocks(sd, "output_blocks")
  if not outputs:
    raise CheckpointError("cannot infer the architecture: no output_blocks.* keys")
  n_out = max(outputs) + 1

  def is_res(prefix: str) -> bool:
    return f"{prefix}.in_layers.0.weight" in sd

  # The first output block holding an upsampler (a sub-module that is neither its ResBlock nor
  # its attention) ends the lowest level: its index is num_res_blocks.
  updown, with_conv, nrb = False, True, None
  for k in sorted(outputs):
    for s in sorted(outputs[k] - {0}):
      prefix = f"output_blocks.{k}.{s}"
      if is_res(prefix) or f"{prefix}.conv.weight" in sd:
        updown, nrb = is_res(prefix), k
        break
    if nrb is not None:
      break
  if nrb is None:  # no parametrised upsampler: 1 level, or resampling without convs
    gaps = sorted(set(range(1, max(inputs) + 1)) - set(inputs))
    nrb = gaps[0] - 1 if gaps else n_out - 1
    with_conv = not gaps
  if n_out % (nrb + 1):
    raise CheckpointError(f"{n_out} output blocks do not make levels of {nrb + 1} blocks")
  levels = n_out // (nrb + 1)
  if image_size <= 0 or image_size % 2 ** (levels - 1):
    raise CheckpointError(f"image_size {image_size} is not a positive multiple of "
                          f"2**{levels - 1} for a {levels}-level network")
  ch_mult, attn = [], []
  for level in range(levels):
    k = 1 + level * (nrb + 1)
    width = get(f"input_blocks.{k}.0.out_layers.3.weight")[0]
    if width % ch:
      raise CheckpointError(f"input_blocks.{k} has {width} channels, not a multiple of ch={ch}")
    ch_mult.append(width // ch)
    if f"input_blocks.{k}.1.qkv.weight" in sd:
      attn.append(image_size // 2 ** level)
  emb_width = get("input_blocks.1.0.emb_layers.1.weight")[0]
  return dict(ch=int(ch), ch_mult=tuple(ch_mult), num_res_blocks=int(nrb),
              attn_resolutions=tuple(attn),
              resamp_with_conv=bool(with_conv), num_heads=int(num_heads),
              num_head_channels=int(num_head_channels), num_heads_upsample=-1,
              use_scale_shift_norm=bool(emb_width == 2 * ch * ch_mult[0]),
              resblock_updown=bool(updown), learn_sigma=bool(out_ch == 2 * in_ch),
              in_channels=int(in_ch), image_size=int(image_size))
