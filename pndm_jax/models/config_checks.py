"""The config checks every network family shares, with one wording for each bad field.

Each family's `check_*_config` calls `check_shared` for the fields all U-Net-shaped networks read
alike (the data size, dtype, ch_mult, num_res_blocks, attn_resolutions, dropout), then checks its
own (docs/methods.md §8). Every error names the field, its value, why, and the valid choices.
"""

import numbers
from collections.abc import Callable
from typing import Any, NoReturn

import jax.numpy as jnp

# Computation dtypes `config.model.dtype` may name (float64 needs jax_enable_x64).
DTYPES = ("float32", "bfloat16", "float16", "float64")


def is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def fail(prefix: str, field: str, value: Any, why: str, valid: str) -> NoReturn:
  raise ValueError(f"{prefix}{field}={value!r} is not valid: {why}; valid: {valid}")


def check_bools(get: Callable[[str], Any], fields: tuple[str, ...], prefix: str) -> None:
  for field in fields:
    if not isinstance(get(field), bool):
      fail(prefix, field, get(field), "not a bool", "True, False")


def check_shared(get: Callable[[str], Any], image_size: int, num_channels: int,
                 prefix: str) -> tuple[int, ...]:
  """Checks the fields every family reads alike (`get(field)` gives a field's value) and
  returns the network's resolutions, one per level."""
  for name, value in (("image_size", image_size), ("num_channels", num_channels)):
    if not is_int(value) or value < 1:
      raise ValueError(f"{name}={value!r} is not valid: not a positive integer; valid: 1, 2, ...")
  dtype = get("dtype")
  try:
    dtype_name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  except TypeError:
    dtype_name = None
  if dtype_name not in DTYPES:
    fail(prefix, "dtype", dtype, "not a computation dtype the networks support", ", ".join(DTYPES))
  ch_mult = get("ch_mult")
  if (not isinstance(ch_mult, (tuple, list)) or not ch_mult
      or not all(is_int(m) and m >= 1 for m in ch_mult)):
    fail(prefix, "ch_mult", ch_mult, "not a non-empty sequence of positive integers (one per "
         "resolution level)", "e.g. (1, 2, 2, 2)")
  levels = len(ch_mult)
  if image_size % 2 ** (levels - 1):
    fail(prefix, "ch_mult", ch_mult, f"its {levels} levels halve the image {levels - 1} times, "
         f"so image_size {image_size} would have to be a multiple of {2 ** (levels - 1)}",
         f"at most {(image_size & -image_size).bit_length()} levels for image_size {image_size}")
  num_res_blocks = get("num_res_blocks")
  if not is_int(num_res_blocks) or num_res_blocks < 1:
    fail(prefix, "num_res_blocks", num_res_blocks, "not a positive integer", "1, 2, ...")
  resolutions = tuple(image_size // 2 ** i for i in range(levels))
  attn = get("attn_resolutions")
  if not isinstance(attn, (tuple, list)) or not all(is_int(r) and r in resolutions for r in attn):
    fail(prefix, "attn_resolutions", attn, f"not a sequence of the network's resolutions "
         f"{resolutions} (resolutions, not downsample rates; a resolution it never runs at "
         "would silently get no attention)", f"any subset of {resolutions}, e.g. ()")
  dropout = get("dropout")
  if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout < 1:
    fail(prefix, "dropout", dropout, "not a probability in [0, 1)", "0.0 <= dropout < 1.0")
  return resolutions


def shared_fields(get: Callable[[str], Any]) -> dict[str, Any]:
  """The fields every family reads alike, as its module takes them (checked by `check_shared`):
  channels, their multipliers, blocks per level, attention resolutions, dropout and dtype."""
  return dict(ch=int(get("ch")), ch_mult=tuple(int(m) for m in get("ch_mult")),
              num_res_blocks=int(get("num_res_blocks")),
              attn_resolutions=tuple(int(r) for r in get("attn_resolutions")),
              dropout=float(get("dropout")), dtype=jnp.dtype(get("dtype")))
