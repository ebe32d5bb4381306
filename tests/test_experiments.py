"""The experiments' --quick modes run and write well-formed outputs."""

import csv
import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_experiment(name, out, *args):
  result = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--quick", f"--out={out}",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def check_png(path):
  with Image.open(path) as image:
    assert image.size[0] > 100 and image.size[1] > 100


def test_convergence_order_quick(tmp_path):
  run_experiment("convergence_order", tmp_path)
  rows = list(csv.DictReader(open(tmp_path / "errors.csv")))
  assert {r["method"] for r in rows} >= {"pseudo-euler", "pseudo-lms2-heun"}
  order = {r["method"]: float(r["fitted_order"]) for r in rows}
  assert order["pseudo-euler"] < order["pseudo-lms2-heun"]
  assert all(float(r["median_error"]) > 0 and int(r["nfe"]) >= int(r["steps"]) for r in rows)
  check_png(tmp_path / "error_vs_nfe.png")
  table = open(tmp_path / "orders.md").read()
  assert "| ddim |" in table and "| s-pndm |" in table and "Produced by" in table


def test_manifold_quick(tmp_path):
  stdout = run_experiment("manifold", tmp_path)
  assert "ddim on data" in stdout and "fon on data" in stdout
  rows = list(csv.DictReader(open(tmp_path / "evaluations.csv")))
  assert {r["method"] for r in rows} == {"ddim", "fon"}
  assert all(0.0 <= float(r["on_data_fraction"]) <= 1.0 for r in rows)
  check_png(tmp_path / "manifold.png")
  assert "| ddim |" in open(tmp_path / "manifold.md").read()


def test_quality_vs_steps_quick(tmp_path):
  stdout = run_experiment("quality_vs_steps", tmp_path / "out", f"--workdir={tmp_path / 'run'}")
  rows = list(csv.DictReader(open(tmp_path / "out" / "quality.csv")))
  assert [r["method"] for r in rows] == ["ddim", "s-pndm", "f-pndm", "fon"]
  assert [int(r["nfe"]) for r in rows] == [10, 11, 19, 19]
  assert all(float(r["fd_digits"]) > 0 and int(r["num_images"]) == 200 for r in rows)
  check_png(tmp_path / "out" / "quality_vs_nfe.png")
  assert "FD-digits" in open(tmp_path / "out" / "quality.md").read()
  assert "fd_digits" in stdout
