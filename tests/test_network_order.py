"""The trained-network order experiment's --quick mode runs and writes well-formed outputs."""

import csv
import math
import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_network_order_quick(tmp_path):
  result = subprocess.run([sys.executable, "-m", "experiments.network_order", "--quick",
                           f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(open(tmp_path / "errors.csv")))
  runs = {(r["method"], int(r["steps"])): r for r in rows}
  steps = sorted({s for _, s in runs})
  assert {m for m, _ in runs} == {"ddim", "pseudo-rk4", "classical-rk4"} and len(steps) >= 2
  assert len(runs) == len(rows) == 3 * len(steps)  # every method at every S, once
  assert {r["network"] for r in rows} == {"ring"}
  assert {r["transfer"] for r in rows} == {"pseudo", "classical"}
  for (method, s), r in runs.items():
    assert int(r["nfe"]) == s * (4 if method.endswith("rk4") else 1)
    assert 0 < float(r["median_error"]) < 1 and float(r["mean_error"]) > 0

  median = lambda m: [float(runs[(m, s)]["median_error"]) for s in steps]
  for method in ("ddim", "pseudo-rk4"):  # convergence: errors fall as S grows
    assert all(a > b for a, b in zip(median(method), median(method)[1:])), median(method)
  # RK4 in the pseudo transfer is more accurate than DDIM at every S, and than its classical twin
  assert all(p < d for p, d in zip(median("pseudo-rk4"), median("ddim")))
  assert all(p < c for p, c in zip(median("pseudo-rk4"), median("classical-rk4")))
  assert all(not math.isnan(float(r["order_coarse"])) for r in rows)
  # the reference is far more accurate than any method, so no point sits at its floor
  reference = float(rows[0]["reference_error"])
  assert 0 < reference < min(median("pseudo-rk4")) / 100
  assert all(r["at_floor"] == "False" for r in rows)

  table = open(tmp_path / "orders.md").read()
  assert "| ddim | pseudo |" in table and "| classical-rk4 | classical |" in table
  assert "Reference error estimate" in table and "Produced by" in table
  with Image.open(tmp_path / "error_vs_nfe.png") as image:
    assert image.size[0] > 100 and image.size[1] > 100
