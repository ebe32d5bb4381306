"""Importing a part pulls in only what it needs: samplers no training or data stack, the
sampling path (generation, eps_models, checkpoints) not the training module, and main.py's
modes (pndm_jax.cli) neither the training and evaluation stacks nor the ODE solver library
until a mode asks for them."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_STACK = ("pndm_jax.train", "clu", "grain", "optax", "orbax", "tensorflow_datasets")


def imported(module: str, watched: tuple[str, ...]) -> list[str]:
  """The modules of `watched` (or under them) that importing `module` loads, in a fresh process."""
  code = (f"import json, sys; import {module}; "
          f"print(json.dumps(sorted(m for m in sys.modules if m in {watched!r} "
          f"or m.split('.')[0] in {watched!r})))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_samplers_import_without_the_training_stack():
  assert imported("pndm_jax.samplers", TRAINING_STACK) == []


def test_the_sampling_path_does_not_import_training():
  for module in ("pndm_jax.generation", "pndm_jax.eps_models", "pndm_jax.checkpoints"):
    assert imported(module, ("pndm_jax.train",)) == [], module


def test_the_command_line_loads_each_stack_when_a_mode_needs_it():
  assert imported("pndm_jax.cli", ("pndm_jax.train", "pndm_jax.evaluation", "diffrax")) == []
