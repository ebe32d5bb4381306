"""The experiments' --quick modes run and write well-formed outputs."""

import csv
import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest
from PIL import Image

from pndm_jax import samplers, schedules

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


def test_benchmark_quick(tmp_path):
  run_experiment("benchmark", tmp_path)
  result = json.load(open(tmp_path / "benchmark.json"))
  settings, env = result["settings"], result["environment"]
  batch = settings["batch"]
  schedule = schedules.from_config(ml_collections.ConfigDict(settings["diffusion"]))
  positive = lambda v: isinstance(v, float) and math.isfinite(v) and v > 0

  assert result["parity"]["forward_max_abs_diff"] <= result["parity"]["tolerance"] <= 1e-3
  for pair in (result["forward"], result["train"]):
    assert positive(pair["ours"]["s"]) and positive(pair["torch"]["s"])
    assert pair["speed_ratio_ours_over_torch"] == pytest.approx(pair["torch"]["s"]
                                                                / pair["ours"]["s"])

  def check_sampler(side, forward_s):
    assert positive(side["wall_s"]) and side["images_per_s"] == pytest.approx(batch
                                                                             / side["wall_s"])
    assert side["overhead_wall_over_nfe_x_forward"] == pytest.approx(
        side["wall_s"] / (side["nfe"] * forward_s))

  def check_nfe(side):
    grid = schedules.Discretization(schedule, side["steps"], side["spacing"], side["convention"])
    assert side["nfe"] == samplers.get_method(side["method"]).num_evals(grid)

  check_sampler(result["sampler"], result["forward"]["ours"]["s"])
  check_nfe(result["sampler"])
  assert result["sampler"]["method"] == settings["method"]
  for mode, extra in (("prk", 9), ("plms", 1)):  # PNDMScheduler's unet calls
    r = result["diffusers"][mode]
    theirs = r["diffusers"]
    assert theirs["nfe"] == settings["steps"] + extra
    check_sampler(theirs, result["forward"]["torch"]["s"])
    for name in ("equal_steps", "equal_nfe"):
      ours = r[name]
      if "skipped" in ours:  # --method needs more evaluations than diffusers makes
        assert name == "equal_nfe" and "needs more" in ours["skipped"]
        continue
      check_sampler(ours, result["forward"]["ours"]["s"])
      check_nfe(ours)
      assert ours["convention"] == "diffusers"
      assert (ours["nfe"] == theirs["nfe"]) if name == "equal_steps" else (
          ours["nfe"] <= theirs["nfe"])
      assert ours["images_per_s_ratio_ours_over_diffusers"] == pytest.approx(
          ours["images_per_s"] / theirs["images_per_s"])
  assert result["diffusers"]["prk"]["equal_steps"]["method"] == "f-pndm"
  assert result["diffusers"]["plms"]["equal_steps"]["method"] == "plms"

  compiled, memory = result["compile"], result["memory"]
  assert positive(compiled["forward"]["total_s"])
  for name, steps in (("sampler_s10", 10), ("sampler_s1000", 1000),
                      ("generate", result["settings"]["steps"])):
    c, m = compiled[name], memory[name]
    assert c["steps"] == steps and positive(c["total_s"])
    check_nfe(c)
    assert c["compile_ratio_sampler_over_forward"] == pytest.approx(
        c["total_s"] / compiled["forward"]["total_s"])
    assert m["total_bytes"] == m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"] > 0
  assert memory["memory_ratio_s1000_over_s10"] == pytest.approx(
      memory["sampler_s1000"]["total_bytes"] / memory["sampler_s10"]["total_bytes"])
  assert "peak_bytes_in_use_after_sampling" in memory  # None on CPU

  assert env["xla_cpu_threads"] == env["torch_num_threads"] >= 1
  assert len(env["loadavg_before"]) == len(env["loadavg_after"]) == 3
  assert env["cpu_model"] and env["date"] and "--quick" in env["argv"]
  assert set(env["versions"]) >= {"jax", "jaxlib", "torch", "diffusers"}
  table = open(tmp_path / "benchmark.md").read()
  assert "speed ratio ours / theirs" in table and "Produced by" in table
