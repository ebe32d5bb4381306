"""The PyTorch <-> Flax mapping of the DDPM/DDIM U-Net's weights (docs/methods.md §8).

Reads (a) DDIM-repository state_dicts (`.ckpt`: plain or EMA, optional `module.` prefix; of a list
checkpoint `[state_dict, optimizer, epoch, step(, ema_state_dict)]` one entry, by default the EMA
entry the DDIM repository saves last) and (b) diffusers `UNet2DModel` folders (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`). Both are mapped onto `pndm_jax.models.UNet`
through one key table (`_MODULES`/`_LAYERS`), used in both directions. Any unknown, missing or
mis-shaped key is a `CheckpointError` listing them: nothing is dropped. Where weights are found
and how they are stored is `checkpoints`' business.

safetensors are read with `safetensors.numpy`; torch is imported only for `.ckpt`/`.bin` pickles.

Public API:
  read_pytorch(src, expected=None, image_size=None, list_entry=-1, report=None) -> (UNet, params)
  from_state_dict(state_dict, model, layout) -> params; to_state_dict(params, model, layout)
  state_dict_shapes(model, layout) -> {key: shape}; abstract_params(model) -> ShapeDtypeStruct tree
  architecture(model) -> the fields a checkpoint determines; reconcile(...) checks them
`params` is always the Flax "params" collection (what `model.apply({"params": params}, ...)` takes).
Each read logs (absl, INFO) one line saying what it read, e.g. "read entry 4 of 5 (EMA) of
celeba.ckpt"; `report`, if given, gets that line too.
"""

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors.numpy import load_file as load_safetensors

from pndm_jax import choices
from pndm_jax.models.unet import UNet

LAYOUTS = ("ddim", "diffusers")

# The key table. Modules: (flax module, DDIM module, diffusers module); {i} is the resolution level
# and {j} the block. diffusers numbers its up blocks in the order they run (lowest resolution
# first), so there {u} = levels - 1 - i.
_MODULES = (
    ("temb_dense0", "temb.dense.0", "time_embedding.linear_1"),
    ("temb_dense1", "temb.dense.1", "time_embedding.linear_2"),
    ("conv_in", "conv_in", "conv_in"),
    ("down_{i}_block_{j}", "down.{i}.block.{j}", "down_blocks.{i}.resnets.{j}"),
    ("down_{i}_attn_{j}", "down.{i}.attn.{j}", "down_blocks.{i}.attentions.{j}"),
    ("down_{i}_downsample", "down.{i}.downsample", "down_blocks.{i}.downsamplers.0"),
    ("mid_block_1", "mid.block_1", "mid_block.resnets.0"),
    ("mid_attn_1", "mid.attn_1", "mid_block.attentions.0"),
    ("mid_block_2", "mid.block_2", "mid_block.resnets.1"),
    ("up_{i}_block_{j}", "up.{i}.block.{j}", "up_blocks.{u}.resnets.{j}"),
    ("up_{i}_attn_{j}", "up.{i}.attn.{j}", "up_blocks.{u}.attentions.{j}"),
    ("up_{i}_upsample", "up.{i}.upsample", "up_blocks.{u}.upsamplers.0"),
    ("norm_out", "norm_out", "conv_norm_out"),
    ("conv_out", "conv_out", "conv_out"),
)
# Layers inside those modules: (flax, DDIM, diffusers).
_LAYERS = (
    ("norm1", "norm1", "norm1"), ("conv1", "conv1", "conv1"),
    ("temb_proj", "temb_proj", "time_emb_proj"),
    ("norm2", "norm2", "norm2"), ("conv2", "conv2", "conv2"),
    ("nin_shortcut", "nin_shortcut", "conv_shortcut"),
    ("norm", "norm", "group_norm"), ("q", "q", "to_q"), ("k", "k", "to_k"), ("v", "v", "to_v"),
    ("proj_out", "proj_out", "to_out.0"),
    ("conv", "conv", "conv"),
)
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Attention projections are Dense in Flax and diffusers but 1x1 convs in the DDIM repository.
_DDIM_CONV1X1 = frozenset({"q", "k", "v", "proj_out"})
# Older diffusers weights (e.g. the hub's ddpm-* models) name the attention layers like this.
_DIFFUSERS_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# diffusers UNet2DModel settings that the DDIM network fixes: key -> (required, diffusers default).
_DIFFUSERS_FIXED = {
    "act_fn": ("silu", "silu"),
    "add_attention": (True, True),
    "attention_head_dim": (None, 8),
    "attn_norm_num_groups": (None, None),
    "center_input_sample": (False, False),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
    "downsample_padding": (0, 1),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "flip_sin_to_cos": (False, True),
    "freq_shift": (1, 0),
    "mid_block_scale_factor": (1, 1),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "norm_eps": (1e-6, 1e-5),
    "norm_num_groups": (32, 32),
    "resnet_time_scale_shift": ("default", "default"),
    "time_embedding_dim": (None, None),
    "time_embedding_type": ("positional", "positional"),
}
# The UNet fields a checkpoint determines (dropout and dtype it does not).
ARCH_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resamp_with_conv",
                "in_channels", "out_channels", "image_size")
_MAX_LISTED = 40


class CheckpointError(ValueError):
  """Weights that cannot be found, read or used: the one error type of `checkpoints`."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One parameter: its Flax path, its key in a PyTorch layout, and how the tensor is laid out."""
  flax_path: tuple[str, ...]
  key: str
  kind: str  # "conv" (OIHW <-> HWIO), "dense" (OI <-> IO), "conv1x1" (OI11 <-> IO), "vector"
  flax_shape: tuple[int, ...]


def _template_regex(template: str) -> re.Pattern[str]:
  return re.compile(template.format(i=r"(?P<i>\d+)", j=r"(?P<j>\d+)"))


_MODULE_RES = tuple((_template_regex(f), d, h) for f, d, h in _MODULES)
_LAYER_NAMES = {f: (d, h) for f, d, h in _LAYERS}


def _torch_module(flax_module: str, layout: str, levels: int) -> str:
  for regex, ddim, diffusers in _MODULE_RES:
    m = regex.fullmatch(flax_module)
    if m:
      idx = {k: int(v) for k, v in m.groupdict().items()}
      if "i" in idx:
        idx["u"] = levels - 1 - idx["i"]
      return (ddim if layout == "ddim" else diffusers).format(**idx)
  raise KeyError(f"no key-table entry for Flax module {flax_module!r}")


@functools.lru_cache(maxsize=16)
def _traced_params(model: nn.Module) -> Any:
  x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), x, t)["params"]


def abstract_params(model: nn.Module) -> Any:
  """The "params" tree of any of `models.NETWORKS`' modules as ShapeDtypeStructs (no allocation;
  the trace is cached)."""
  return jax.tree.map(lambda s: s, _traced_params(model))  # fresh containers


def _entries(model: UNet, layout: str) -> list[_Entry]:
  """The key table expanded over every parameter of `model`, for one PyTorch layout."""
  choices.check("layout", layout, LAYOUTS)
  col = LAYOUTS.index(layout)
  levels = len(model.ch_mult)
  entries = []
  for path, leaf in flax.traverse_util.flatten_dict(abstract_params(model)).items():
    *modules, name = path
    parts = [_torch_module(modules[0], layout, levels)]
    parts += [_LAYER_NAMES[m][col] for m in modules[1:]]
    shape = tuple(leaf.shape)
    if len(shape) == 4:
      kind = "conv"
    elif len(shape) == 2:
      kind = "conv1x1" if layout == "ddim" and modules[-1] in _DDIM_CONV1X1 else "dense"
    else:
      kind = "vector"
    entries.append(_Entry(path, ".".join(parts + [_LEAVES[name]]), kind, shape))
  return entries


def _torch_shape(entry: _Entry) -> tuple[int, ...]:
  s = entry.flax_shape
  return {"conv": lambda: (s[3], s[2], s[0], s[1]), "dense": lambda: (s[1], s[0]),
          "conv1x1": lambda: (s[1], s[0], 1, 1), "vector": lambda: s}[entry.kind]()


def _to_flax(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return w.transpose(2, 3, 1, 0)
  if kind == "conv1x1":
    return w[:, :, 0, 0].T
  return w.T if kind == "dense" else w


def _to_torch(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return w.transpose(3, 2, 0, 1)
  if kind == "conv1x1":
    return w.T[:, :, None, None]
  return w.T if kind == "dense" else w


def state_dict_shapes(model: UNet, layout: str) -> dict[str, tuple[int, ...]]:
  """The exact keys and PyTorch shapes a `layout` state_dict for `model` holds."""
  return {e.key: _torch_shape(e) for e in _entries(model, layout)}


def listing(title: str, items: list[str]) -> str:
  shown = "\n    ".join(items[:_MAX_LISTED])
  more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"  {title} ({len(items)}):\n    {shown}{more}"


def check_keys(state_dict: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
               what: str) -> None:
  """Raises a CheckpointError headed `what` that lists every key of `shapes` (key -> PyTorch
  shape) that `state_dict` lacks, every key it has beyond them, and every mis-shaped one."""
  missing = sorted(shapes.keys() - state_dict.keys())
  unexpected = sorted(state_dict.keys() - shapes.keys())
  misshaped = sorted(
      f"{k}: {tuple(np.shape(state_dict[k]))}, expected {tuple(shape)}"
      for k, shape in shapes.items()
      if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(shape))
  if missing or unexpected or misshaped:
    parts = [listing(title, items) for title, items in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped)) if items]
    raise CheckpointError(f"{what}:\n" + "\n".join(parts))


def _rename_old_attention(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Maps the deprecated diffusers attention names onto the current ones."""
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    new = f"{m[1]}.{_DIFFUSERS_OLD_ATTN[m[2]]}.{m[3]}" if m else key
    if new in out:
      raise CheckpointError(f"both {key} and an equivalent of it ({new}) are in the checkpoint")
    out[new] = value
  return out


def from_state_dict(state_dict: Mapping[str, Any], model: UNet, layout: str) -> Any:
  """Flax params of `model` from a `layout` state_dict of numpy-convertible arrays.

  Raises CheckpointError listing every missing, unexpected and mis-shaped key.
  """
  entries = _entries(model, layout)
  if layout == "diffusers":
    state_dict = _rename_old_attention(state_dict)
  check_keys(state_dict, {e.key: _torch_shape(e) for e in entries},
             f"the {layout} state_dict does not match the network {architecture(model)}")
  flat = {e.flax_path: _to_flax(np.asarray(state_dict[e.key], np.float32), e.kind)
          for e in entries}
  return flax.traverse_util.unflatten_dict(flat)


def to_state_dict(params: Any, model: UNet, layout: str) -> dict[str, np.ndarray]:
  """The `layout` state_dict (numpy, PyTorch shapes) of Flax params; inverse of from_state_dict."""
  flat = flax.traverse_util.flatten_dict(params)
  return {e.key: _to_torch(np.asarray(flat[e.flax_path], np.float32), e.kind)
          for e in _entries(model, layout)}


def architecture(model: UNet) -> dict[str, Any]:
  return {f: getattr(model, f) for f in ARCH_FIELDS}


def _attn_levels(model: UNet) -> tuple[int, ...]:
  """The levels with attention (what `attn_resolutions` effectively selects)."""
  return tuple(i for i in range(len(model.ch_mult))
               if model.image_size // 2 ** i in model.attn_resolutions)


def _check_image_size(image_size: int, levels: int) -> None:
  if image_size <= 0 or image_size % 2 ** (levels - 1):
    raise CheckpointError(f"image_size {image_size} is not a positive multiple of "
                          f"2**{levels - 1} for a {levels}-level network")


def _infer_ddim(sd: Mapping[str, np.ndarray], image_size: int | None) -> dict[str, Any]:
  """UNet fields read off a DDIM-layout state_dict (image_size decides the attention levels)."""
  if image_size is None:
    raise CheckpointError("a DDIM .ckpt does not record the image size: pass image_size "
                          "(or an expected network)")

  def get(key: str) -> np.ndarray:
    if key not in sd:
      raise CheckpointError(f"cannot infer the architecture: no {key!r} in the state_dict "
                            f"(is this a DDIM-layout checkpoint? its first keys: {sorted(sd)[:8]})")
    return sd[key]

  ch, in_ch = get("conv_in.weight").shape[:2]
  levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"down\.(\d+)\.", k))), default=-1)
  if levels == 0:
    raise CheckpointError("cannot infer the architecture: no down.{i}.* keys in the state_dict "
                          "(a diffusers model is read from its folder, with config.json)")
  _check_image_size(image_size, levels)
  num_res_blocks = len({m[1] for k in sd if (m := re.match(r"down\.0\.block\.(\d+)\.", k))})
  ch_mult = []
  for i in range(levels):
    out = get(f"down.{i}.block.0.conv1.weight").shape[0]
    if out % ch:
      raise CheckpointError(f"down.{i} has {out} channels, not a multiple of ch={ch}")
    ch_mult.append(out // ch)
  attn = tuple(image_size // 2 ** i for i in range(levels) if f"down.{i}.attn.0.q.weight" in sd)
  with_conv = levels == 1 or "down.0.downsample.conv.weight" in sd
  return dict(ch=int(ch), ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
              attn_resolutions=attn, resamp_with_conv=with_conv, in_channels=int(in_ch),
              out_channels=int(get("conv_out.weight").shape[0]), image_size=int(image_size))


def _diffusers_fields(config: Mapping[str, Any]) -> dict[str, Any]:
  """UNet fields of a diffusers UNet2DModel config; an error lists what the DDIM net lacks."""
  problems = [f"{k}={config.get(k, default)!r} (needs {req!r})"
              for k, (req, default) in _DIFFUSERS_FIXED.items() if config.get(k, default) != req]
  if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
    problems.append(f"_class_name={config['_class_name']!r} (needs 'UNet2DModel')")
  try:
    boc = [int(c) for c in config["block_out_channels"]]
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    size, nrb = config["sample_size"], int(config["layers_per_block"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"diffusers config lacks a usable {e}") from e
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      problems.append(f"sample_size={size} (needs a square image)")
    size = size[0]
  if any(c % boc[0] for c in boc):
    problems.append(f"block_out_channels={boc} (needs multiples of the first)")
  if len(down) != len(boc) or len(up) != len(boc):
    problems.append("down_block_types/up_block_types/block_out_channels differ in length")
  bad_types = [b for b in down if b not in ("DownBlock2D", "AttnDownBlock2D")]
  bad_types += [b for b in up if b not in ("UpBlock2D", "AttnUpBlock2D")]
  if bad_types:
    problems.append(f"block types {bad_types} (needs (Attn)DownBlock2D/(Attn)UpBlock2D)")
  attn_down = [b.startswith("Attn") for b in down]
  if attn_down != [b.startswith("Attn") for b in reversed(up)]:
    problems.append(f"attention in down blocks {down} and up blocks {up} does not mirror")
  if problems:
    raise CheckpointError("the diffusers UNet2DModel is not a DDPM/DDIM U-Net:\n  "
                          + "\n  ".join(problems))
  _check_image_size(int(size), len(boc))
  return dict(ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=nrb,
              attn_resolutions=tuple(int(size) // 2 ** i for i, a in enumerate(attn_down) if a),
              resamp_with_conv=True, in_channels=int(config.get("in_channels", 3)),
              out_channels=int(config.get("out_channels", 3)), image_size=int(size))


def diffusers_config(model: UNet) -> dict[str, Any]:
  """The diffusers `UNet2DModel` arguments of the same network (what `_diffusers_fields` reads
  back), e.g. to load `to_state_dict(params, model, "diffusers")` into for parity runs."""
  if not model.resamp_with_conv:
    raise CheckpointError("diffusers' UNet2DModel resamples with convolutions: "
                          "resamp_with_conv=False has no diffusers equivalent")
  attn = [i in _attn_levels(model) for i in range(len(model.ch_mult))]
  return dict({k: required for k, (required, _) in _DIFFUSERS_FIXED.items()},
              sample_size=model.image_size, in_channels=model.in_channels,
              out_channels=model.out_channels,
              block_out_channels=tuple(model.ch * k for k in model.ch_mult),
              layers_per_block=model.num_res_blocks, dropout=model.dropout,
              down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
              up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D"
                                   for a in reversed(attn)))


def reconcile(fields: dict[str, Any], dropout: float | None, expected: UNet | None,
               image_size: int | None, src: str) -> UNet:
  """The network of a checkpoint, checked against the expected one (which gives dropout/dtype)."""
  found = UNet(**fields, **({} if dropout is None else {"dropout": dropout}))
  if image_size is not None and image_size != found.image_size:
    raise CheckpointError(f"{src} is for {found.image_size}x{found.image_size} images, "
                          f"not {image_size}")
  if expected is None:
    return found
  got, want = architecture(found), architecture(expected)
  got["attn_resolutions"], want["attn_resolutions"] = (
      tuple(m.image_size // 2 ** i for i in _attn_levels(m)) for m in (found, expected))
  diff = [f"{k}: checkpoint {got[k]!r}, expected {want[k]!r}" for k in got if got[k] != want[k]]
  if diff:
    raise CheckpointError(f"{src} holds a different architecture than expected:\n  "
                          + "\n  ".join(diff))
  return expected


def _import_torch() -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError("reading PyTorch pickles (.ckpt/.bin) needs torch: "
                          "pip install torch==2.13.0 (safetensors need no torch)") from e
  return torch


def torch_state_dict(obj: Any, src: str) -> dict[str, np.ndarray]:
  """float32 numpy arrays of a state_dict of tensors; any other value is an error."""
  torch = _import_torch()
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{src} holds a {type(obj).__name__}, not a state_dict")
  bad = sorted(k for k, v in obj.items()
               if not (isinstance(v, torch.Tensor) and v.is_floating_point()))
  if bad:
    raise CheckpointError(f"{src}: entries that are not floating-point tensors:\n"
                          + listing("keys", bad))
  return {k: v.detach().cpu().to(torch.float32).numpy() for k, v in obj.items()}


def torch_load(path: str) -> Any:
  """What a PyTorch checkpoint file holds (tensors and plain containers only: weights_only)."""
  torch = _import_torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # corrupt, truncated or foreign files fail in many ways
    raise CheckpointError(f"cannot read the PyTorch checkpoint {path}: {e}") from e


def _is_state_dict(obj: Any) -> bool:
  torch = _import_torch()
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(v, torch.Tensor) for v in obj.values())


def _describe_entry(obj: Any) -> str:
  """What one entry of a list checkpoint is, for messages."""
  if _is_state_dict(obj):
    return f"state_dict ({len(obj)} keys)"
  if isinstance(obj, Mapping):
    return "optimizer state" if "param_groups" in obj else f"dict ({len(obj)} keys)"
  return type(obj).__name__


def _read_ddim(path: str, list_entry: int) -> tuple[dict[str, np.ndarray], str]:
  """The state_dict of a DDIM `.ckpt`, and a line saying what was read.

  Of a list checkpoint, `list_entry` -1 is the EMA entry (the last, which must be a state_dict)
  and any other index picks that entry; a plain state_dict ignores `list_entry`.
  """
  obj = torch_load(path)
  if isinstance(obj, (list, tuple)):
    n, entries = len(obj), ", ".join(_describe_entry(e) for e in obj)
    if not -n <= list_entry < n:
      raise CheckpointError(f"{path} is a list of {n} entries ({entries}); no entry {list_entry}")
    if list_entry == -1 and not _is_state_dict(obj[-1]):
      raise CheckpointError(
          f"{path} is a list checkpoint with no EMA entry (the DDIM repository appends the EMA "
          f"state_dict last when EMA is on); entries: {entries}. For the raw training weights "
          "(entry 0) pass --config.sampler.checkpoint_list_entry=0 (list_entry=0)")
    index = list_entry % n
    read = f"read entry {index} of {n}{' (EMA)' if list_entry == -1 else ''} of {path}"
    obj, src = obj[index], f"{path} (entry {index})"
  else:
    read, src = f"read the state_dict {path} (not a list: list_entry ignored)", path
  sd = torch_state_dict(obj, src)
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd, read


def _read_diffusers(folder: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(
      os.path.join(folder, "unet")):
    folder = os.path.join(folder, "unet")  # a pipeline folder
  try:
    with open(os.path.join(folder, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{folder} is not a diffusers model folder: {e}") from e
  st = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  if os.path.exists(st):
    try:
      sd = load_safetensors(st)
    except Exception as e:  # safetensors raises its own error type or OSError
      raise CheckpointError(f"cannot read {st}: {e}") from e
    return config, {k: np.asarray(v, np.float32) for k, v in sd.items()}
  pt = os.path.join(folder, "diffusion_pytorch_model.bin")
  if os.path.exists(pt):
    return config, torch_state_dict(torch_load(pt), pt)
  raise CheckpointError(f"{folder} has neither diffusion_pytorch_model.safetensors nor .bin "
                        f"(found {sorted(os.listdir(folder))})")


def note(line: str, report: Callable[[str], None] | None) -> None:
  logging.info("%s", line)
  if report is not None:
    report(line)


def read_pytorch(src: str, expected: UNet | None = None, image_size: int | None = None,
                 list_entry: int = -1,
                 report: Callable[[str], None] | None = None) -> tuple[UNet, Any]:
  """(network, Flax params) of a DDIM `.ckpt` file or a diffusers UNet2DModel folder.

  The architecture is read off the checkpoint. If `expected` is given (e.g. `unet_from_config`
  of the run config) it must match, and its dropout and dtype are used; otherwise dtype is
  float32 and dropout comes from the diffusers config (a DDIM .ckpt: the UNet default).
  `image_size` is needed for a DDIM .ckpt without `expected` (it places the attention);
  for diffusers it is checked against `sample_size`. `list_entry` picks the entry of a list
  checkpoint: -1 (default) the EMA entry the DDIM training code saves last, an error if the list
  has none; 0 the raw training weights. What was read is logged and passed to `report`.
  """
  if os.path.isdir(src):
    config, sd = _read_diffusers(src)
    fields, layout = _diffusers_fields(config), "diffusers"
    dropout = float(config.get("dropout", 0.0))
    read = f"read the diffusers UNet2DModel {src}"
  elif src.endswith(".safetensors"):
    raise CheckpointError(f"{src}: pass the diffusers model folder (with config.json), not the "
                          "weights file")
  elif os.path.isfile(src):
    sd, read = _read_ddim(src, list_entry)
    size = image_size if image_size is not None or expected is None else expected.image_size
    fields, layout, dropout = _infer_ddim(sd, size), "ddim", None
  else:
    raise CheckpointError(f"no checkpoint at {src}")
  model = reconcile(fields, dropout, expected, image_size, src)
  params = from_state_dict(sd, model, layout)
  note(read, report)
  return model, params
