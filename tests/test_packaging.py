"""The package installs (`pip install -e .` / a wheel) with its dependencies and type marker."""

import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_holds_the_package_its_pins_and_py_typed(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "requirements.txt"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(os.path.join(REPO, "pndm_jax"), src / "pndm_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
  (wheel,) = os.listdir(tmp_path / "dist")
  with zipfile.ZipFile(tmp_path / "dist" / wheel) as z:
    names = z.namelist()
    metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
  assert "pndm_jax/py.typed" in names and "pndm_jax/samplers/methods.py" in names
  assert not [n for n in names if n.startswith(("tests/", "configs/", "experiments/"))]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    pins = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  for pin in pins:
    assert f"Requires-Dist: {pin}" in metadata, pin
