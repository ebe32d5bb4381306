"""Test setup: 8 fake CPU devices (set before jax is imported) and an `x64` fixture."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs the test with float64 enabled (numerics tests against float64 numpy)."""
  with jax.enable_x64(True):
    yield
