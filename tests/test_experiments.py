"""The experiments' --quick modes run and write well-formed outputs."""

import csv
import json
import math
import os
import platform
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
  """A briefly trained 2-D network: every method pair runs with exact and network eps, and
  pseudo RK4 puts more samples on the data than classical RK4 at equal NFE (40) with the
  network (seen with 4 training seeds: 37-54% against 26-45%)."""
  stdout = run_experiment("manifold", tmp_path)
  rows = list(csv.DictReader(open(tmp_path / "samples.csv")))
  assert {(r["eps"], r["method"], r["steps"]) for r in rows} == {
      (e, m, s) for e in ("exact", "network") for m in ("ddim", "classical-euler", "f-pndm", "fon",
                                                         "pseudo-rk4", "classical-rk4")
      for s in ("10",)}
  assert all(0.0 <= float(r["on_data"]) <= 1.0 and float(r["sliced_w2"]) > 0 for r in rows)
  assert {int(r["nfe"]) for r in rows} == {10, 19, 40}
  pairs = {(p["eps"], p["steps"], p["pseudo"]): p for p in csv.DictReader(
      open(tmp_path / "pairs.csv"))}
  rk4 = pairs[("network", "10", "pseudo-rk4")]
  assert rk4["classical"] == "classical-rk4" and rk4["nfe"] == "40"
  assert float(rk4["pseudo_on_data"]) > float(rk4["classical_on_data"]), rk4
  assert "pseudo-rk4 vs classical-rk4 (NFE 40)" in stdout
  for name in ("manifold_2d.png", "queries.png"):
    check_png(tmp_path / name)
  table = open(tmp_path / "manifold.md").read()
  assert "| 10 | pseudo-rk4 | 40 |" in table and "Produced by" in table


def test_quality_vs_steps_quick(tmp_path):
  stdout = run_experiment("quality_vs_steps", tmp_path / "out", f"--workdir={tmp_path / 'run'}")
  out = tmp_path / "out"
  nfe = {"ddim": 10, "s-pndm": 11, "f-pndm": 19, "fon": 19}
  rows = list(csv.DictReader(open(out / "quality.csv")))
  assert sorted((r["method"], r["set"], r["images"]) for r in rows) == sorted(
      (m, str(k), f"{100 * k}..{100 * k + 99}") for m in nfe for k in range(3))
  assert all(float(r["nfe"]) == nfe[r["method"]] for r in rows)
  assert all(float(r["fd_digits"]) > 0 and int(r["num_images"]) == 100 for r in rows)

  summary = {r["setting"]: r for r in csv.DictReader(open(out / "summary.csv"))}
  assert sorted(r["method"] for r in summary.values()) == sorted(nfe)
  mean = {s: float(r["mean"]) for s, r in summary.items()}
  for setting, r in summary.items():
    values = [float(q["fd_digits"]) for q in rows if q["setting"] == setting]
    assert r["sets"] == "0;1;2" and r["num_sets"] == "3" and r["images_per_set"] == "100"
    assert mean[setting] == pytest.approx(sum(values) / len(values))
    assert float(r["ci95_low"]) < mean[setting] < float(r["ci95_high"])

  comparisons = list(csv.DictReader(open(out / "comparisons.csv")))
  assert {c["family"] for c in comparisons} == {"vs best at 10 steps", "pseudo vs classical"}
  vs_best = [c for c in comparisons if c["family"] == "vs best at 10 steps"]
  best = min(mean, key=mean.get)
  assert sorted(c["a"] for c in vs_best) == sorted(set(summary) - {best})
  assert all(c["b"] == best and int(c["family_size"]) == 3 for c in vs_best)
  for c in comparisons:
    assert 0 <= float(c["p"]) <= float(c["p_holm"]) <= 1
    assert c["significant"] == str(float(c["p_holm"]) < 0.05)
    assert float(c["diff_mean"]) == pytest.approx(mean[c["a"]] - mean[c["b"]])  # paired
    assert float(c["diff_ci95_low"]) < float(c["diff_mean"]) < float(c["diff_ci95_high"])

  check_png(out / "quality_vs_nfe.png")
  table = open(out / "quality.md").read()
  assert "FD-digits" in table and "95% Student-t confidence interval" in table
  cells = {line.split(" | ")[0][2:]: line for line in table.splitlines()
           if line.startswith("| ") and " ± " in line}
  assert set(cells) == set(nfe) and "**" in cells[summary[best]["method"]]  # the best in bold
  assert "f-pndm S=10" in stdout
  # a rerun scores nothing again: it reads the records the first run saved with the images
  records = sorted((tmp_path / "run").glob("*/fd_digits_3x100.json"))
  assert len(records) == 4 and all(json.load(open(r))["num_images"] == [100] * 3 for r in records)


def test_benchmark_train_only(tmp_path):
  run_experiment("benchmark", tmp_path, "--train_only")
  result = json.load(open(tmp_path / "benchmark.json"))
  assert result["settings"]["train_only"] and set(result) == {"settings", "train", "environment"}
  train = result["train"]
  assert {"ours", "torch", "ours_xla_defaults"} <= set(train)
  assert train["speed_ratio_ours_over_torch"] == pytest.approx(train["torch"]["s"]
                                                              / train["ours"]["s"])
  table = open(tmp_path / "benchmark.md").read()
  assert "training step compiled with XLA's default options" in table and "forward" not in table


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
  train = result["train"]  # the same step compiled with XLA's defaults, timed in the same turns
  assert positive(train["ours_xla_defaults"]["s"]) and len(train["ours_xla_defaults"][
      "repeats_s"]) == settings["repeats"]
  assert train["speed_ratio_programs_over_xla_defaults"] == pytest.approx(
      train["ours_xla_defaults"]["s"] / train["ours"]["s"])

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
  assert env["malloc_keeps_freed_memory"] == (platform.libc_ver()[0] == "glibc")  # Linux here
  assert set(env["versions"]) >= {"jax", "jaxlib", "torch", "diffusers"}
  table = open(tmp_path / "benchmark.md").read()
  assert "speed ratio ours / theirs" in table and "Produced by" in table
