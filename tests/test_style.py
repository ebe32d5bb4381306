"""One style everywhere: the linter configured in pyproject.toml passes on the whole tree."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_passes():
  ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
  result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr


def layout_paths(readme: str) -> set[str]:
  """The paths the README's layout block names: each entry line's first word (a comma-separated
  run of bare names continues the folder of the first one)."""
  layout = readme.split("## Layout", 1)[1].split("```")[1]
  paths = set()
  for line in layout.splitlines():
    words = line.split()
    if not words or line[0].isspace():  # blank, or a description's continuation
      continue
    folder = os.path.dirname(words[0])
    for word in words:
      name = word.rstrip(",")
      paths.add(name if "/" in name or not folder else f"{folder}/{name}")
      if not word.endswith(","):
        break
  return paths


def test_readme_layout_matches_the_tree():
  with open(os.path.join(REPO, "README.md")) as f:
    named = layout_paths(f.read())
  for path in named:
    assert os.path.exists(os.path.join(REPO, path)), f"the layout names {path}, not in the tree"
  package = os.path.join(REPO, "pndm_jax")
  for entry in sorted(os.listdir(package)):
    if entry.endswith(".py") and entry != "__init__.py":
      assert f"pndm_jax/{entry}" in named, f"the layout omits pndm_jax/{entry}"
    elif os.path.isdir(os.path.join(package, entry)) and entry != "__pycache__":
      assert f"pndm_jax/{entry}/" in named, f"the layout omits pndm_jax/{entry}/"
