"""Schedules, alpha-bar conventions and discretizations against independent numpy code."""

import math

import numpy as np
import pytest

from pndm_jax import schedules


def discretized(num_steps, spacing, convention):
  """(t, t_next) of a 1000-step linear schedule's discretization."""
  d = schedules.Discretization(schedules.Schedule("linear", 1000), num_steps, spacing, convention)
  return d.t, d.t_next


def test_betas_match_formulas():
  n = 1000
  lin = schedules.Schedule("linear", n).betas
  assert lin.dtype == np.float64 and lin.shape == (n,)
  assert lin[0] == 1e-4 and lin[-1] == pytest.approx(0.02, rel=1e-15)
  quad = schedules.Schedule("quad", n).betas
  assert np.allclose(np.sqrt(quad), np.linspace(0.01, math.sqrt(0.02), n), rtol=1e-14)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  cos = schedules.Schedule("cosine", 37).betas
  expected = [min(1 - f((i + 1) / 37) / f(i / 37), 0.999) for i in range(37)]
  assert np.allclose(cos, expected, rtol=1e-13, atol=0) and cos[-1] == 0.999


def test_alphas_cumprod_is_running_product():
  s = schedules.Schedule("linear", 50)
  expected = [math.prod(1 - b for b in s.betas[: k + 1]) for k in range(50)]
  assert np.allclose(s.alphas_cumprod, expected, rtol=1e-14)


def test_paper_convention_reads_one_index_ahead_and_truncates():
  s = schedules.Schedule("linear", 100)
  a = s.alphas_cumprod
  got = s.alpha_bar(np.array([-1.0, -0.5, 0.0, 10.0, 10.5, 98.0]), "paper")
  assert np.array_equal(got, a[[0, 1, 1, 11, 11, 99]])


def test_consistent_convention_is_the_training_alpha_bar_interpolated():
  s = schedules.Schedule("cosine", 100)
  a = s.alphas_cumprod
  ints = np.arange(-1, 100, dtype=np.float64)
  assert np.allclose(s.alpha_bar(ints, "consistent"), np.concatenate([[1.0], a]), rtol=1e-14)
  mid = s.alpha_bar(np.array([-0.5, 10.25]), "consistent")
  assert mid[0] == pytest.approx(math.sqrt(a[0]), rel=1e-14)
  assert mid[1] == pytest.approx(a[10] ** 0.75 * a[11] ** 0.25, rel=1e-14)


def test_uniform_grid_is_the_reference_skip_grid():
  t, t_next = discretized(50, "uniform", "paper")
  assert len(t) == 50 and (t[0], t_next[0]) == (980, 960) and (t[-1], t_next[-1]) == (0, -1)
  t, t_next = discretized(30, "uniform", "paper")
  seq = list(range(0, 1000, 33))
  assert len(t) == 31 and list(t) == seq[::-1] and list(t_next) == ([-1] + seq[:-1])[::-1]


def test_linspace_grid():
  t, t_next = discretized(10, "linspace", "consistent")
  assert list(t) == list(np.round(np.linspace(999, 0, 10))) and t_next[-1] == -1
  assert np.array_equal(t_next[:-1], t[1:])


@pytest.mark.parametrize("call, match", [
    (lambda: schedules.Schedule("sigmoid"), "linear, quad, cosine"),
    (lambda: discretized(10, "log", "paper"), "uniform, linspace"),
    (lambda: discretized(10, "uniform", "shifted"), "paper, consistent"),
    (lambda: discretized(0, "uniform", "paper"), "num_steps must be in"),
    (lambda: discretized(1001, "uniform", "consistent"), "num_steps must be in"),
    (lambda: discretized(1000, "uniform", "paper"), "A\\[1000\\]"),
    (lambda: discretized(10, "linspace", "paper"), "consistent"),
])
def test_bad_input_raises_with_choices(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_consistent_convention_accepts_every_step():
  t, _ = discretized(1000, "uniform", "consistent")
  assert t[0] == 999 and len(t) == 1000


def test_discretization_is_a_frozen_value_with_its_convention():
  sched = schedules.Schedule("cosine", 100)
  d = schedules.Discretization(sched, 10, convention="consistent")
  assert d == schedules.Discretization(sched, 10, "uniform", "consistent")
  assert hash(d) == hash(schedules.Discretization(sched, 10, "uniform", "consistent"))
  assert d != schedules.Discretization(sched, 10, "uniform", "paper")
  assert d.t.dtype == d.t_next.dtype == np.float64 and not d.t.flags.writeable
  assert np.array_equal(d.alpha_bar(d.t - 0.5), sched.alpha_bar(d.t - 0.5, "consistent"))
  assert np.array_equal(d.times(0.0), d.t) and np.array_equal(d.times(1.0), d.t_next)
