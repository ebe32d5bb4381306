"""Importing the samplers pulls in nothing of the training and data stack."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_STACK = ("pndm_jax.train", "clu", "grain", "optax", "orbax", "tensorflow_datasets")


def test_samplers_import_without_the_training_stack():
  code = ("import json, sys; import pndm_jax.samplers; "
          f"print(json.dumps(sorted(m for m in sys.modules if m in {TRAINING_STACK!r} "
          f"or m.split('.')[0] in {TRAINING_STACK!r})))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []
