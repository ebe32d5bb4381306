"""Schedules, alpha-bar conventions and discretizations against independent numpy code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from pndm_jax import diffusers_scheduler, schedules

LINEAR = schedules.Schedule("linear", 1000)


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
    (lambda: schedules.Schedule("sigmoid"),
     "linear, scaled_linear, cosine, trained, quad, squaredcos_cap_v2"),
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
  plan = d.plan((0.0, 0.5))
  assert np.array_equal(plan.eval_t, np.stack([d.t, (d.t + d.t_next) / 2], 1))
  assert np.array_equal(plan.to_t[:, 1], d.t_next) and not plan.to_t.flags.writeable


# --- diffusers' schedules, grids and convention (docs/methods.md §1-§3) ---


def test_diffusers_schedule_names_and_endpoints():
  assert schedules.Schedule("quad") == schedules.Schedule("scaled_linear")
  assert schedules.Schedule("quad").name == "scaled_linear"
  assert schedules.Schedule("squaredcos_cap_v2", 50) == schedules.Schedule("cosine", 50)
  sd = schedules.Schedule("scaled_linear", 1000, 0.00085, 0.012).betas
  assert np.allclose(sd, np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, rtol=1e-14)
  lin = schedules.Schedule("linear", 10, 0.001, 0.01).betas
  assert lin[0] == 0.001 and lin[-1] == pytest.approx(0.01, rel=1e-15)


def test_trained_betas_from_values_and_from_config_files(tmp_path):
  betas = np.linspace(1e-4, 0.02, 100) ** 1.1
  trained = schedules.Schedule.from_betas(betas)
  assert trained.name == "trained" and np.array_equal(trained.betas, betas)
  assert trained == schedules.Schedule.from_betas(betas.copy()) and hash(trained)
  np.save(tmp_path / "betas.npy", betas)
  np.savetxt(tmp_path / "betas.txt", betas)
  config = default.get_config().diffusion
  config.update(schedule="trained", num_timesteps=100)
  for name in ("betas.npy", "betas.txt"):
    config.trained_betas = str(tmp_path / name)
    assert np.allclose(schedules.from_config(config).betas, betas, rtol=1e-15)
  assert trained.settings()["betas_sha256"] != schedules.Schedule.from_betas(
      betas * 1.0001).settings()["betas_sha256"]
  config.num_timesteps = 1000
  with pytest.raises(ValueError, match="holds 100 betas but config.diffusion.num_timesteps"):
    schedules.from_config(config)


def test_leading_and_trailing_grids_have_exactly_s_steps():
  n, s = 1000, 30
  d = schedules.Discretization(LINEAR, s, "leading", "consistent", steps_offset=1)
  assert list(d.t) == list(np.arange(s)[::-1] * (n // s) + 1) and d.t_next[-1] == -1
  assert len(schedules.Discretization(LINEAR, s, "uniform", "consistent").t) == s + 1
  d = schedules.Discretization(LINEAR, s, "trailing", "consistent")
  expected = [round(n - i * n / s) - 1 for i in range(s)]
  assert list(d.t) == expected and d.t[0] == n - 1


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_diffusers_convention_reads_a_t_and_steps_one_skip(set_alpha_to_one):
  d = schedules.Discretization(LINEAR, 30, "leading", "diffusers", steps_offset=1,
                               set_alpha_to_one=set_alpha_to_one)
  a = LINEAR.alphas_cumprod
  assert np.array_equal(d.t_next, d.t - 33)
  got = d.alpha_bar(np.array([-32.0, -1.0, 0.0, 5.0, 999.0]))
  final = 1.0 if set_alpha_to_one else a[0]
  assert np.array_equal(got, [final, final, a[0], a[5], a[999]])
  settings = d.settings()
  assert settings["set_alpha_to_one"] == set_alpha_to_one and settings["steps_offset"] == 1


def test_diffusers_stage_times_for_an_odd_skip():
  """PRK with skip 33: stages move to t - 16 but the model is called at t' + 16 (t' = next t)."""
  d = schedules.Discretization(LINEAR, 30, "leading", "diffusers")
  t0, t1 = d.t[0], d.t[1]
  rk4 = d.plan((0.0, 0.5, 0.5, 1.0))
  assert list(rk4.eval_t[0]) == [t0, t1 + 16, t1 + 16, t1]
  assert list(rk4.to_t[0]) == [t0 - 16, t1 + 16, t1, t1] and set(rk4.from_t[0]) == {t0}
  heun = d.plan((0.0, 1.0), restart=True)  # the PLMS start: its end restarts at t' + skip
  assert list(heun.eval_t[0]) == [t0, t1] and list(heun.from_t[0]) == [t0, t1 + 33]
  one = d.plan((0.0,))
  assert np.array_equal(one.to_t[:, 0], d.t_next) and rk4.to_t[-1, -1] == d.t_next[-1]
  plain = schedules.Discretization(LINEAR, 30, "leading", "consistent")
  assert np.array_equal(plain.plan((0.0, 1.0), restart=True).from_t,
                        plain.plan((0.0, 1.0)).from_t)  # a no-op outside 'diffusers'


@pytest.mark.parametrize("call, match", [
    (lambda: schedules.Schedule("cosine", beta_start=0.001), "not 'cosine'"),
    (lambda: schedules.Schedule("linear", beta_start=0.03), "beta_start <= beta_end"),
    (lambda: schedules.Schedule("trained", 10), "need the schedule name 'trained'"),
    (lambda: schedules.Schedule.from_betas([0.1, 1.5]), "values in \\(0, 1\\)"),
    (lambda: schedules.Discretization(LINEAR, 10, "uniform", steps_offset=1), "'leading' only"),
    (lambda: schedules.Discretization(LINEAR, 10, set_alpha_to_one=True), "'diffusers' only"),
    (lambda: schedules.Discretization(LINEAR, 10, convention="diffusers"), "'leading', 'trail"),
    (lambda: schedules.Discretization(LINEAR, 1000, "leading", "diffusers", steps_offset=1),
     "A\\[1000\\], past the table"),
])
def test_bad_diffusers_settings_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_scheduler_config_translation():
  config = default.get_config()
  diffusers_scheduler.apply_scheduler_config(config, dict(
      _class_name="PNDMScheduler", beta_schedule="squaredcos_cap_v2", beta_start=0.00085,
      skip_prk_steps=True, timestep_spacing="trailing", steps_offset=1,
      prediction_type="v_prediction"))
  assert (config.diffusion.schedule, config.diffusion.beta_start) == ("squaredcos_cap_v2", 1e-4)
  assert (config.sampler.method, config.sampler.steps_offset) == ("plms", 0)
  assert config.model.prediction_type == "v_prediction"
  for bad, match in [(dict(_class_name="DDIMScheduler"), "not a PNDMScheduler"),
                     (dict(clip_sample=True), "unknown PNDMScheduler settings: clip_sample"),
                     (dict(trained_betas=[0.1] * 1000), "save them as a .npy")]:
    with pytest.raises(ValueError, match=match):
      diffusers_scheduler.apply_scheduler_config(default.get_config(), bad)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_every_grid_decreases_strictly_between_its_ends_for_every_s(schedule_name, spacing):
  schedule = schedules.Schedule(schedule_name, 1000)
  top = 800 if spacing == "quadratic" else 999
  for s in range(1, 1001):
    d = schedules.Discretization(schedule, s, spacing, "consistent")
    walk = np.append(d.t, d.t_next[-1])
    assert np.all(np.diff(walk) < 0), (s, walk)  # no repeated timestep anywhere
    assert np.array_equal(d.t_next[:-1], d.t[1:]) and d.t_next[-1] == -1
    assert d.t[-1] == (round(1000 / s) - 1 if spacing == "trailing" else 0) or s == 1
    if spacing in schedules.CONTINUOUS_SPACINGS or spacing in ("linspace", "trailing"):
      assert len(d.t) == s and (d.t[0] == top or s == 1 and spacing == "linspace"), (s, d.t[:2])


def test_log_snr_and_karras_grids_are_uniform_in_their_variables():
  d = schedules.Discretization(LINEAR, 20, "logsnr", "consistent")
  a = d.alpha_bar(d.t)
  assert np.allclose(np.diff(np.log(a / (1 - a))), np.log(a / (1 - a))[1] - np.log(a / (1 - a))[0],
                     rtol=1e-9)
  d = schedules.Discretization(schedules.Schedule("cosine"), 20, "karras", "consistent")
  a = d.alpha_bar(d.t)
  root = ((1 - a) / a) ** (1 / (2 * schedules.KARRAS_RHO))  # sigma^(1/rho)
  assert np.allclose(np.diff(root), root[1] - root[0], rtol=1e-9)
  quadratic = schedules.Discretization(LINEAR, 10, "quadratic", "consistent").t
  assert np.allclose(quadratic[::-1], np.linspace(0, np.sqrt(800), 10) ** 2, rtol=1e-12)
  with pytest.raises(ValueError, match="fractional timesteps"):
    schedules.Discretization(LINEAR, 10, "logsnr", "paper")


@pytest.mark.parametrize("spacing", schedules.CONTINUOUS_SPACINGS)
def test_grids_ending_at_sigma_min_have_s_steps_down_to_t_0(spacing):
  top = 800 if spacing == "quadratic" else 999
  for s in range(1, 1001):
    d = schedules.Discretization(LINEAR, s, spacing, "consistent", end="sigma_min")
    walk = np.append(d.t, d.t_next[-1])
    assert len(d.t) == s and d.t[0] == top and d.t_next[-1] == 0, (s, d.t[:2], d.t_next[-1])
    assert np.all(np.diff(walk) < 0) and np.array_equal(d.t_next[:-1], d.t[1:]), s
  assert d.settings()["end"] == "sigma_min"
  assert "end" not in schedules.Discretization(LINEAR, 10, spacing, "consistent").settings()
  for convention, grid in (("paper", "uniform"), ("consistent", "uniform"),
                           ("diffusers", "leading")):
    with pytest.raises(ValueError, match="end 'sigma_min' needs convention 'consistent'"):
      schedules.Discretization(LINEAR, 10, grid, convention, end="sigma_min")
  with pytest.raises(ValueError, match="valid choices: zero, sigma_min"):
    schedules.Discretization(LINEAR, 10, spacing, "consistent", end="zero_snr")


@pytest.mark.parametrize("nodes", ["sigma", "log_snr"])
def test_stages_placed_in_sigma_or_log_snr_sit_at_fractions_of_the_step(nodes):
  d = schedules.Discretization(schedules.Schedule("cosine"), 12, "logsnr", "consistent",
                               end="sigma_min")
  plan = d.plan((0.0, 0.25, 0.5, 1.0), nodes=nodes)
  a = d.alpha_bar(plan.eval_t)
  value = np.sqrt((1 - a) / a) if nodes == "sigma" else np.log(a / (1 - a))
  assert np.allclose(value[:, 1:3], value[:, :1] + np.array([0.25, 0.5]) * (value[:, 3:] -
                                                                            value[:, :1]),
                     rtol=1e-10)
  assert np.array_equal(plan.eval_t[:, 0], d.t) and np.array_equal(plan.eval_t[:, 3], d.t_next)
  assert np.array_equal(plan.to_t[:, :3], plan.eval_t[:, 1:])
  assert np.array_equal(d.plan((0.0, 0.5), nodes=nodes, num_steps=5).eval_t,
                        d.plan((0.0, 0.5), nodes=nodes).eval_t[:5])
  with pytest.raises(ValueError, match="continuous alpha-bar of convention 'consistent'"):
    schedules.Discretization(LINEAR, 10).plan((0.0, 0.5), nodes=nodes)


def test_time_of_alpha_bar_inverts_the_consistent_alpha_bar():
  t = np.concatenate([[-1.0, -0.5, 0.0, 0.3], np.linspace(1, 999, 37)])
  for schedule in (LINEAR, schedules.Schedule("cosine")):
    assert np.allclose(schedule.time_of_alpha_bar(schedule.alpha_bar(t, "consistent")), t,
                       rtol=0, atol=1e-8)


def test_time_of_alpha_bar_traces_as_on_the_host(x64):
  a = LINEAR.alpha_bar(np.linspace(-1, 999, 53), "consistent")
  traced = jax.jit(LINEAR.time_of_alpha_bar)(jnp.asarray(a))
  assert traced.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(traced), LINEAR.time_of_alpha_bar(a), rtol=0, atol=1e-9)
