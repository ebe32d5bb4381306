"""The networks a config can name, behind one factory, each giving the samplers eps.

`config.model.name` picks the family (docs/methods.md §8):
  * `unet`: the DDPM/DDIM U-Net (`unet.py`);
  * `iddpm`: improved DDPM's `UNetModel` (`iddpm_unet.py`); with learned variances its output has
    2C channels, and the first C are eps;
  * `ncsnpp`: score_sde's NCSN++ / DDPM++ (`ncsnpp.py`), a continuous-time network: it takes
    score_sde's time labels, made from the timestep here (`ncsnpp.labels_from_timestep`).
Every module is called as `module(x, t_in, train=...)` on NHWC x. The samplers and the training
loss see only `apply_eps`: the project's timestep t (an index in [0, N-1], possibly fractional)
in, eps out, so the time conversion and the eps half live at this one boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pndm_jax import choices
from pndm_jax.models import iddpm_unet, ncsnpp, unet

NETWORKS = ("unet", "iddpm", "ncsnpp")

_CHECKS = {"unet": unet.check_model_config, "iddpm": iddpm_unet.check_iddpm_config,
           "ncsnpp": ncsnpp.check_ncsnpp_config}
_BUILDERS = {"unet": unet.unet_from_config, "iddpm": iddpm_unet.iddpm_from_config,
             "ncsnpp": ncsnpp.ncsnpp_from_config}
_TYPES = {unet.UNet: "unet", iddpm_unet.IDDPMUNet: "iddpm", ncsnpp.NCSNpp: "ncsnpp"}


def check_name(name: str, field: str = "config.model.name") -> str:
  """Returns `name` if it names a network family, else a ValueError listing them."""
  return choices.check(field, name, NETWORKS)


def check_config(model_cfg: Mapping[str, Any], image_size: int, num_channels: int,
                 prefix: str = "config.model.") -> None:
  """Raises a ValueError naming the first field of `model_cfg` that cannot build its network."""
  _CHECKS[check_name(model_cfg["name"], f"{prefix}name")](model_cfg, image_size, num_channels,
                                                          prefix=prefix)


def from_config(model_cfg: Mapping[str, Any], image_size: int, num_channels: int) -> nn.Module:
  """The network `model_cfg["name"]` names, built from the config's fields for the data."""
  return _BUILDERS[check_name(model_cfg["name"])](model_cfg, image_size, num_channels)


def name_of(model: nn.Module) -> str:
  """The family name of a network module."""
  return _TYPES[type(model)]


def _field_names(module_type: type[nn.Module]) -> list[str]:
  return [f.name for f in dataclasses.fields(module_type)
          if f.name not in ("parent", "name", "dtype")]


def architecture(model: nn.Module) -> dict[str, Any]:
  """Every field of `model` but its computation dtype: what rebuilds it (`from_architecture`)."""
  return {name: getattr(model, name) for name in _field_names(type(model))}


def from_architecture(network: str, fields: Mapping[str, Any], dtype: Any) -> nn.Module:
  """The `network` family's module with `architecture`'s `fields` (sequences, e.g. read back
  from JSON as lists, become tuples) computing in `dtype`. A ValueError names missing, unknown
  or invalid fields."""
  module_type = {name: t for t, name in _TYPES.items()}[check_name(network, "network")]
  want = _field_names(module_type)
  missing, unknown = sorted(set(want) - fields.keys()), sorted(fields.keys() - set(want))
  if missing or unknown:
    raise ValueError(f"missing fields {missing}, unknown fields {unknown} for a {network} network")
  check_config({"name": network, **fields, "dtype": dtype}, fields["image_size"],
               fields["in_channels"], prefix="")
  return module_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()},
                     dtype=jnp.dtype(dtype))


def apply_eps(model: nn.Module, params: Any, x: jax.Array, t: jax.Array, *,
              num_timesteps: int | None = None, train: bool = False,
              rngs: dict[str, jax.Array] | None = None) -> jax.Array:
  """eps of `model` at x [B, H, W, C] and the timestep t ([B] or a scalar, an index in
  [0, N-1]); continuous-time networks need the schedule's `num_timesteps` N."""
  t_in = t
  if isinstance(model, ncsnpp.NCSNpp):
    if num_timesteps is None:
      raise ValueError("an ncsnpp network needs num_timesteps to turn timesteps into its labels")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    t_in = ncsnpp.labels_from_timestep(t, num_timesteps, model.embedding_type)
  out = model.apply({"params": params}, x, t_in, train=train, rngs=rngs)
  if isinstance(model, iddpm_unet.IDDPMUNet) and model.learn_sigma:
    out = out[..., :x.shape[-1]]  # the learned-variance half is not eps
  return out


def eps_fn(model: nn.Module, params: Any, data_format: str = "NHWC",
           num_timesteps: int | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The sampler's `eps_fn(x, t)` for a network and its "params" collection (inference mode).

  The output is cast to x.dtype. `data_format="NCHW"` transposes at the boundary for callers
  holding PyTorch-layout arrays; the networks themselves always run NHWC.
  """
  if data_format not in ("NHWC", "NCHW"):
    raise ValueError(f"data_format must be 'NHWC' or 'NCHW', got {data_format!r}")
  nchw = data_format == "NCHW"

  def fn(x: jax.Array, t: jax.Array) -> jax.Array:
    h = jnp.transpose(x, (0, 2, 3, 1)) if nchw else x
    out = apply_eps(model, params, h, t, num_timesteps=num_timesteps).astype(x.dtype)
    return jnp.transpose(out, (0, 3, 1, 2)) if nchw else out

  return fn
