"""What the order experiments call each method, its family and plot color, and the order fit.

Shared by `convergence_order` (exact eps) and `network_order` (trained networks); no jax
configuration happens here, so each script keeps its own precision and compiler settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np

from pndm_jax import samplers

# the families the targets compare (by preset name)
PSEUDO = ("pndm-v", "pndm-v-ramp", "f-pndm", "s-pndm", "ipndm", "deis1", "deis2", "deis3", "plms")
DATA_PREDICTION = ("dpm++2m", "dpm++3m", "dpm++2s", "unipc2", "unipc3", "unipc2-bh1", "unipc3-bh1")


def label(name: str) -> str:
  """The preset name a method name stands for (e.g. pseudo-lms2-heun -> s-pndm), else itself."""
  method = samplers.get_method(name)
  return next((k for k, v in samplers.PRESETS.items() if v == method), name)


def family(name: str) -> str:
  """`pseudo` (the PNDM family and DEIS), `data` (DPM-Solver++, UniPC) or `other`."""
  lab = label(name)
  return "pseudo" if lab in PSEUDO else "data" if lab in DATA_PREDICTION else "other"


def transfer(name: str) -> str:
  """The transfer a deterministic method moves x with: `pseudo`, `classical` or `data`."""
  method = samplers.get_method(name)
  return next(k for k, v in samplers.TRANSFERS.items() if v == method.transfer)


def colors(labels: Sequence[str]) -> dict[str, tuple]:
  """A distinct color per label (tab20, its dark shades first), the same in every plot."""
  tab20 = matplotlib.colormaps["tab20"]
  return dict(zip(labels, [tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]))


def fitted_order(steps: Sequence[int], errors: Sequence[float], fit: Sequence[int]) -> float:
  """Slope of log median error vs log S over the fit's step counts (nan if any is missing)."""
  pts = [(s, e) for s, e in zip(steps, errors) if s in fit and e > 0]
  if len(pts) < len(fit):
    return math.nan
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(-np.polyfit(x, y, 1)[0])
