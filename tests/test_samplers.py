"""Samplers: parity with the reference loops, convergence, NFE, stochastic methods, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pndm_jax import analytic, reference_ode, samplers, schedules
from pndm_jax.samplers import multistep_weights

LINEAR = schedules.Schedule("linear")

# --- an independent float64 numpy re-implementation of the reference loops ('paper') ---


def toy_eps(xp, x, t):
  """A smooth, nonlinear stand-in for a network (t may be fractional)."""
  t = t[:, None]
  return xp.tanh(0.8 * x + 0.3 * xp.sin(t / 97.0)) * (1.0 + t / 2000.0) - 0.1 * x


def ref_transfer(x, t, t_next, e, a_table):
  at, an = a_table[int(t) + 1], a_table[int(t_next) + 1]  # int() truncates toward zero
  return x + (an - at) * (x / (math.sqrt(at) * (math.sqrt(at) + math.sqrt(an)))
                          - e / (math.sqrt(at) * (math.sqrt((1 - an) * at)
                                                  + math.sqrt((1 - at) * an))))


def ref_sample(method, x, a_table, num_steps):
  n = len(a_table)
  seq = list(range(0, n, n // num_steps))
  seq_next = [-1] + seq[:-1]
  eps = lambda x, t: toy_eps(np, x, np.full(x.shape[0], float(t)))
  plms = lambda h: (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4]) / 24
  lower_plms = {2: lambda h: (3 * h[-1] - h[-2]) / 2,
                3: lambda h: (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12, 4: plms}
  rk4_mean = lambda k1, k2, k3, k4: (k1 + 2 * k2 + 2 * k3 + k4) / 6
  history = []
  for t, t_next in zip(reversed(seq), reversed(seq_next)):
    if method == "ddim":
      x = ref_transfer(x, t, t_next, eps(x, t), a_table)
    elif method == "s-pndm":
      if history:
        history.append(eps(x, t))
        e = 0.5 * (3 * history[-1] - history[-2])
      else:
        e1 = eps(x, t)
        history.append(e1)
        e2 = eps(ref_transfer(x, t, t_next, e1, a_table), t_next)
        e = 0.5 * (e1 + e2)
      x = ref_transfer(x, t, t_next, e, a_table)
    elif method == "plms":  # diffusers' PLMS start: Heun, second evaluation dropped, then ramp
      if history:
        history.append(eps(x, t))
        e = lower_plms[min(len(history), 4)](history)
      else:
        e1 = eps(x, t)
        history.append(e1)
        e = 0.5 * (e1 + eps(ref_transfer(x, t, t_next, e1, a_table), t_next))
      x = ref_transfer(x, t, t_next, e, a_table)
    elif method == "f-pndm":
      if len(history) > 2:
        history.append(eps(x, t))
        e = plms(history)
      else:
        m = (t + t_next) / 2
        e1 = eps(x, t)
        history.append(e1)
        e2 = eps(ref_transfer(x, t, m, e1, a_table), m)
        e3 = eps(ref_transfer(x, t, m, e2, a_table), m)
        e4 = eps(ref_transfer(x, t, t_next, e3, a_table), t_next)
        e = rk4_mean(e1, e2, e3, e4)
      x = ref_transfer(x, t, t_next, e, a_table)
    elif method == "fon":
      h = t - t_next
      delta = lambda x_eval, s, x=x, t=t: ref_transfer(x, t, t - 1, eps(x_eval, s), a_table) - x
      if len(history) > 2:
        history.append(delta(x, t))
        d = plms(history)
      else:
        m = (t + t_next) / 2
        d1 = delta(x, t)
        history.append(d1)
        d2 = delta(x + d1 * h / 2, m)
        d3 = delta(x + d2 * h / 2, m)
        d4 = delta(x + d3 * h, t_next)
        d = rk4_mean(d1, d2, d3, d4)
      x = x + d * h
  return x


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("method", ["ddim", "s-pndm", "f-pndm", "fon", "plms"])
@pytest.mark.parametrize("num_steps", [7, 30, 50, 100])
def test_parity_with_reference_loops(x64, schedule_name, method, num_steps):
  sched = schedules.Schedule(schedule_name)
  x_T = np.random.default_rng(num_steps).standard_normal((3, 5))
  expected = ref_sample(method, x_T, sched.alphas_cumprod, num_steps)
  d = schedules.Discretization(sched, num_steps, convention="paper")
  got = samplers.sample_deterministic(lambda x, t: toy_eps(jnp, x, t), jnp.asarray(x_T),
                                      samplers.get_method(method), d)
  assert got.dtype == jnp.float64
  assert np.max(np.abs(np.asarray(got) - expected)) <= 1e-10 * np.max(np.abs(expected))


def test_parity_grid_has_fractional_midpoints():
  d = schedules.Discretization(LINEAR, 30, spacing="uniform", convention="paper")
  assert np.any((d.t + d.t_next) % 2 == 1)  # skip 33 is odd: RK midpoints are x.5
  assert np.array_equal(d.plan(samplers.RK4.c).eval_t[:, 1], (d.t + d.t_next) / 2)


# --- convergence against the closed-form Gaussian solution ('consistent') ---


def gaussian_errors(method, steps_list, schedule_name="linear", spacing="uniform", end="zero",
                    **options):
  gauss = analytic.gaussian(dim=8)
  sched = schedules.Schedule(schedule_name)
  x_T = jax.random.normal(jax.random.key(0), (64, 8), jnp.float64)
  errors = []
  for s in steps_list:
    d = schedules.Discretization(sched, s, spacing=spacing, convention="consistent", end=end)
    eps_fn = gauss.eps_fn(d.alpha_bar)
    a_start, a_end = analytic.ode_endpoints(d)
    x0 = samplers.sample_deterministic(eps_fn, x_T, samplers.get_method(method, **options), d)
    exact = gauss.exact_solution(x_T, a_start, a_end)
    errors.append(float(jnp.median(jnp.linalg.norm(x0 - exact, axis=-1))))
  return np.array(errors)


def fitted_order(steps_list, errors):
  return -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]


STEPS = [20, 50, 100, 200]


@pytest.mark.parametrize("method, min_order", [("ddim", 0.8), ("s-pndm", 1.5)])
def test_convergence_order_on_gaussian(x64, method, min_order):
  errors = gaussian_errors(method, STEPS)
  assert np.all(np.diff(errors) < 0), errors
  assert fitted_order(STEPS, errors) >= min_order


@pytest.mark.parametrize("method", ["f-pndm", "pseudo-rk4", "pseudo-heun", "pseudo-lms3-rk4",
                                    "pseudo-lms4-ramp", "plms", "pseudo-vlms4-heunramp"])
def test_every_pseudo_method_converges(x64, method):
  errors = gaussian_errors(method, [10, 40, 160], "cosine")
  assert np.all(np.diff(errors) < 0), errors


@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
def test_variable_step_plms_in_sigma_keeps_high_order(x64, spacing):
  errors = gaussian_errors("pseudo-vlms4-rk4", STEPS, spacing=spacing)
  assert np.all(np.diff(errors) < 0) and fitted_order(STEPS, errors) >= 2.5
  fixed = gaussian_errors("f-pndm", STEPS, spacing=spacing)
  assert fitted_order(STEPS, fixed) < 2.0  # what it fixes


def test_variable_step_weights_integrate_the_interpolant_exactly():
  rng = np.random.default_rng(0)
  for k in (1, 2, 3, 4):
    nodes = np.sort(rng.uniform(1.0, 5.0, k))  # newest first: sigma grows into the past
    start, end = nodes[0], nodes[0] - rng.uniform(0.1, 1.0)
    poly = np.polynomial.Polynomial(rng.standard_normal(k))  # degree k - 1: interpolated exactly
    exact = (poly.integ()(end) - poly.integ()(start)) / (end - start)
    weights = multistep_weights.sigma_weights(nodes, start, end)
    assert np.isclose(weights @ poly(nodes), exact, rtol=1e-10)
    equal = multistep_weights.sigma_weights(start + 0.3 * np.arange(k), start, start - 0.3)
    assert np.allclose(equal, multistep_weights.ADAMS_BASHFORTH[k], rtol=1e-12)


def test_fpndm_50_steps_beats_ddim_500_steps(x64):
  assert gaussian_errors("f-pndm", [50])[0] < gaussian_errors("ddim", [500])[0]


def test_reference_solution_matches_closed_form(x64):
  gauss = analytic.gaussian(dim=8)
  x_T = jax.random.normal(jax.random.key(3), (16, 8), jnp.float64)
  for a_start, a_end in [(4e-5, 1.0), (0.02, 0.9999)]:
    exact = gauss.exact_solution(x_T, a_start, a_end)
    ref = gauss.reference_solution(x_T, a_start, a_end)
    assert np.max(np.abs(ref - exact)) < 1e-8


def test_a_timestep_networks_reference_solution_is_its_odes(x64):
  """reference_ode.solve on eps_fn(x, t) (what a trained network gives) reaches the closed-form
  solution of the ODE the samplers solve under `consistent`: images [B, H, W, C] included."""
  gauss = analytic.gaussian(dim=12)
  schedule = schedules.Schedule("linear")
  eps_fn = gauss.eps_fn(lambda t: schedule.alpha_bar(t, "consistent"))
  x_T = jax.random.normal(jax.random.key(4), (5, 2, 2, 3), jnp.float64)
  d = schedules.Discretization(schedule, 10, "logsnr", "consistent")
  a_start, a_end = analytic.ode_endpoints(d)
  ref = reference_ode.solve(reference_ode.timestep_eps_y(eps_fn, schedule), x_T, a_start, a_end,
                            floor=1e-8)
  assert ref.shape == x_T.shape
  exact = gauss.exact_solution(x_T.reshape(5, -1), a_start, a_end).reshape(x_T.shape)
  assert np.max(np.abs(ref - exact)) < 1e-7


# --- NFE ---


# ("ddim", 6, 7): S = 6 has skip 166, so 7 grid steps
NFE_CASES = [("ddim", 10, 10), ("s-pndm", 10, 11), ("f-pndm", 10, 19), ("fon", 10, 19),
             ("f-pndm", 30, 40), ("ddpm", 10, 10), ("classical-heun", 5, 10),
             ("pseudo-rk4", 5, 20), ("pseudo-lms3-heun", 8, 10), ("pseudo-lms4-ramp", 8, 8),
             ("pseudo-lms2-euler", 8, 8), ("pseudo-vlms4-rk4", 10, 19), ("ddim", 6, 7),
             ("plms", 10, 11), ("pndm", 10, 19), ("classical-lms3-heunramp", 2, 3)]


@pytest.mark.parametrize("method, num_steps, expected", NFE_CASES)
def test_nfe_counts_actual_calls(method, num_steps, expected):
  calls = []

  def counting_eps(x, t):
    calls.append(t)
    return 0.1 * x

  method, d = samplers.get_method(method), schedules.Discretization(LINEAR, num_steps)
  assert method.num_evals(d) == expected
  with jax.disable_jit():  # an eager run: scan executes its body once per step
    _, nfe = samplers.run_sampler(counting_eps, jnp.ones((2, 3)), method, d,
                                  rng=jax.random.key(0))
  assert nfe == len(calls) == expected


def test_nfe_matches_paper_presets():
  d = schedules.Discretization(LINEAR, 50)
  assert samplers.get_method("f-pndm").num_evals(d) == 59
  assert samplers.get_method("s-pndm").num_evals(d) == 51
  assert samplers.get_method("ddim").num_evals(d) == 50
  assert samplers.get_method("pf").num_evals(d) is None


def count_executions(method, x_T, discretization):
  """Runs the jitted sampler with a host callback in eps_fn; returns (nfe, calls made)."""
  calls = []

  def eps_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * x

  run = jax.jit(lambda x: samplers.run_sampler(eps_fn, x, method, discretization)[1])
  nfe = jax.block_until_ready(run(x_T))
  return int(nfe), len(calls)


@pytest.mark.parametrize("method", ["f-pndm", "pf"])
def test_jitted_nfe_counts_executions(method):
  reported, made = count_executions(samplers.get_method(method), jnp.ones((2, 4)),
                                    schedules.Discretization(LINEAR, 20))
  assert reported == made > 0


# --- compiled behaviour ---


def test_jit_with_static_arguments_and_dtypes():
  sched = schedules.Schedule("cosine")
  run = jax.jit(samplers.run_sampler, static_argnames=("eps_fn", "method", "discretization"))
  method, d = samplers.get_method("f-pndm"), schedules.Discretization(sched, 20)
  eps_fn = analytic.gaussian(4).eps_fn(d.alpha_bar)
  for dtype in (jnp.float32, jnp.bfloat16):
    x_T = jax.random.normal(jax.random.key(0), (4, 4), dtype)
    x0, nfe = run(eps_fn, x_T, method, d)
    eager, _ = samplers.run_sampler(eps_fn, x_T, method, d)
    assert x0.dtype == jnp.promote_types(dtype, jnp.float32) and nfe == 29  # state >= float32
    assert np.allclose(np.asarray(x0, np.float32), np.asarray(eager, np.float32), atol=1e-2)


def test_compiled_program_does_not_grow_with_steps():
  eps_fn = lambda x, t: jnp.tanh(x) * t[:, None] / 1000

  def model_calls_in_program(num_steps):
    d = schedules.Discretization(LINEAR, num_steps)
    fn = lambda x: samplers.sample_deterministic(eps_fn, x, samplers.get_method("f-pndm"), d)
    return jax.jit(fn).lower(jnp.ones((2, 3))).as_text().count("tanh")

  assert model_calls_in_program(200) == model_calls_in_program(20) == 1  # one scan body


def _model_traces(method: samplers.Method, d: schedules.Discretization) -> int:
  """How often tracing `method` over `d` calls the model: its copies in the compiled program."""
  calls = []
  eps_fn = lambda x, t: calls.append(1) or jnp.tanh(x) * t[:, None] / 1000
  run = lambda x, key: samplers.run_sampler(eps_fn, x, method, d, rng=key)[0]
  jax.jit(run).lower(jnp.ones((2, 3)), jax.random.key(0))
  return len(calls)


@pytest.mark.parametrize("name", [m for m in samplers.PRESETS if m != "pf"]
                         + ["classical-rk4", "fon", "pseudo-lms3-heun", "data-unipc3-rk4"])
def test_every_method_holds_the_network_once(name):
  """One model call per scan body (F-PNDM's RK4 warm-up, EDM's final Euler step, UniPC's
  corrector and the denoising step included), so compile time is one network's."""
  d = schedules.Discretization(LINEAR, 20, convention="consistent", spacing="logsnr",
                                end="sigma_min")
  assert _model_traces(samplers.get_method(name), d) == 1
  if isinstance(samplers.get_method(name), samplers.Deterministic):
    options = dict(lower_order_final=True, denoise_to_zero=True)
    assert _model_traces(samplers.get_method(name, **options), d) == 1


def test_bfloat16_state_stays_float32(x64):
  """A bfloat16 x_T and network: the state, coefficients and history stay float32, so the error
  against the float64 run is within 2x of float32 state with the same bfloat16 network (a
  bfloat16 state is ~5x worse in median at 50 F-PNDM steps: 3.1e-3 vs 5.9e-4 here; the max,
  ~1.3 either way, is a trajectory the network's rounding sends to another component)."""
  mixture = analytic.gaussian_mixture(dim=8)
  d = schedules.Discretization(LINEAR, 50)
  method = samplers.get_method("f-pndm")
  exact = mixture.eps_fn(d.alpha_bar)
  network = lambda x, t: exact(x.astype(jnp.bfloat16).astype(jnp.float32),
                               t.astype(jnp.float32)).astype(jnp.bfloat16)
  x_T = jax.random.normal(jax.random.key(0), (512, 8), jnp.bfloat16)
  reference = samplers.sample_deterministic(exact, x_T.astype(jnp.float64), method, d)
  error = lambda x0: np.abs(np.asarray(x0, np.float64) - np.asarray(reference))
  bf16 = samplers.sample_deterministic(network, x_T, method, d)
  f32_state = samplers.sample_deterministic(network, x_T.astype(jnp.float32), method, d)
  assert bf16.dtype == jnp.float32
  for stat in (np.median, np.max):
    assert stat(error(bf16)) <= 2 * stat(error(f32_state))
  assert np.median(error(bf16)) < 1.5e-3


def test_eps_fn_sees_batch_timesteps_with_fractional_midpoints():
  seen = []
  with jax.disable_jit():
    samplers.sample_deterministic(lambda x, t: seen.append(np.asarray(t)) or 0 * x,
                                  jnp.ones((3, 2)), samplers.get_method("f-pndm"),
                                  schedules.Discretization(LINEAR, 30))
  assert all(t.shape == (3,) for t in seen)
  assert [float(t[0]) for t in seen[:4]] == [990.0, 973.5, 973.5, 957.0]


# --- stochastic methods ---


def test_stochastic_methods_are_reproducible_from_the_key():
  eps_fn = analytic.gaussian(4).eps_fn(lambda t: LINEAR.alpha_bar(t, "paper"))
  x_T = jnp.ones((3, 4))
  d = schedules.Discretization(LINEAR, 20)
  for method in [samplers.get_method("ddpm"), samplers.get_method("ddim", eta=0.5)]:
    a, b, c = (samplers.sample_ancestral(eps_fn, x_T, method, d, jax.random.key(seed))
               for seed in (7, 7, 8))
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_per_image_keys_make_noise_independent_of_the_batch():
  eps_fn = analytic.gaussian(4).eps_fn(lambda t: LINEAR.alpha_bar(t, "paper"))
  keys = jax.random.split(jax.random.key(0), 6)
  x_T = jax.random.normal(jax.random.key(1), (6, 4))
  d = schedules.Discretization(LINEAR, 10)
  run = lambda x, k: samplers.sample_ancestral(eps_fn, x, samplers.get_method("ddpm"), d, k)
  full = run(x_T, keys)
  assert np.allclose(run(x_T[2:5], keys[2:5]), full[2:5], atol=1e-6)


def test_ddpm_1000_steps_matches_data_moments(x64):
  gauss = analytic.gaussian(dim=8)
  n = 4000
  x_T = jax.random.normal(jax.random.key(0), (n, 8), jnp.float64)
  d = schedules.Discretization(LINEAR, 1000, convention="consistent")
  x0, nfe = samplers.run_sampler(gauss.eps_fn(d.alpha_bar), x_T, samplers.get_method("ddpm"), d,
                                 rng=jax.random.key(1))
  assert nfe == 1000
  mean_z = (np.mean(x0, 0) - gauss.means[0]) / (gauss.stds[0] / math.sqrt(n))
  var = gauss.stds[0] ** 2
  var_z = (np.var(x0, 0) - var) / (var * math.sqrt(2 / n))
  assert np.max(np.abs(mean_z)) < 4.5 and np.max(np.abs(var_z)) < 4.5


def test_ddim_eta_zero_equals_deterministic_ddim(x64):
  eps_fn = analytic.gaussian(4).eps_fn(lambda t: LINEAR.alpha_bar(t, "consistent"))
  x_T = jax.random.normal(jax.random.key(0), (5, 4), jnp.float64)
  d = schedules.Discretization(LINEAR, 25, convention="consistent")
  det = samplers.sample_deterministic(eps_fn, x_T, samplers.get_method("ddim"), d)
  sto = samplers.sample_ancestral(eps_fn, x_T, samplers.Ancestral(samplers.FixedSmall(eta=0.0)),
                                  d, jax.random.key(0))
  assert np.allclose(det, sto, rtol=1e-10, atol=1e-12)


# --- bad input ---


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="dpm-solver"), "valid choices: ddpm, ddim, s-pndm, f-pndm, fon, plms, pndm-v"),
    (dict(method="pseudo-rk5"), "euler, heun, rk4, srk4, lmid, lms2, lms3, lms4"),
    (dict(method="pseudo-lms3"), "needs a warmup"),
    (dict(method="classical-vlms4-rk4"), "written for the 'pseudo' transfer, got 'classical'"),
    (dict(method="pseudo-dpm2-ramp"), "written for the 'data' transfer, got 'pseudo'"),
    (dict(method="data-lmid", convention="consistent"), "take the last step with a first-order"),
    (dict(method="deis3"), "'t' \\(DEIS's tAB\\) integrates over the continuous alpha-bar"),
    (dict(method="pndm-v"), "stages placed in sigma need the continuous alpha-bar"),
    (dict(method="f-pndm", convention="shifted"), "paper, consistent"),
    (dict(method="f-pndm", spacing="log"), "uniform, linspace"),
    (dict(method="ddim", num_steps=0), "num_steps must be in"),
    (dict(method="ddim", num_steps=1001), "num_steps must be in"),
    (dict(method="ddim", num_steps=1000), "A\\[1000\\]"),
    (dict(method="f-pndm", num_steps=3, convention="consistent"), "at least 4 steps"),
    (dict(method="fon", num_steps=2), "at least 4 steps"),
    (dict(method="ddpm", num_steps=10), "stochastic"),
    (dict(method="f-pndm", eta=0.5), "applies to method 'ddim' only"),
    (dict(method="ddim", convention="consistent", options=dict(denoise_to_zero=True)),
     "already ends at alpha-bar 1"),
    (dict(method="ddpm", options=dict(lower_order_final=True)), "apply to deterministic methods"),
    (dict(method="dpm++2s", convention="consistent", options=dict(lower_order_final=False)),
     "first-order rule"),
])
def test_bad_input_raises_clear_errors(kwargs, match):
  kwargs = {"num_steps": 10, **kwargs}
  name, eta = kwargs.pop("method"), kwargs.pop("eta", 0.0)
  options = kwargs.pop("options", {})
  with pytest.raises(ValueError, match=match):
    method = samplers.get_method(name, eta, **options)
    samplers.run_sampler(lambda x, t: x, jnp.ones((1, 2)), method,
                         schedules.Discretization(LINEAR, **kwargs))


def test_num_evals_rejects_what_sampling_rejects():
  with pytest.raises(ValueError, match="at least 4 steps"):
    samplers.get_method("f-pndm").num_evals(
        schedules.Discretization(LINEAR, 3, convention="consistent"))
  with pytest.raises(ValueError, match="valid choices"):
    samplers.get_method("pndm-4")


def test_pf_needs_the_linear_schedule():
  with pytest.raises(ValueError, match="'linear' schedule"):
    samplers.sample_probability_flow(lambda x, t: x, jnp.ones((1, 2)), samplers.get_method("pf"),
                                     schedules.Schedule("cosine"))


# --- method values ---


def test_names_parse_to_hashable_values():
  assert samplers.get_method("PSEUDO-LMS4-RK4") == samplers.get_method("f-pndm")
  assert samplers.get_method("f-pndm") == samplers.Deterministic(
      samplers.PSEUDO, samplers.LinearMultistep(4), samplers.RK4)
  assert samplers.get_method("ddim", eta=0.5) == samplers.Ancestral(samplers.FixedSmall(0.5))
  assert samplers.RK4.c == (0, 1 / 2, 1 / 2, 1) and samplers.HEUN.c == (0, 1)
  assert samplers.get_method("pseudo-vlms3-ramp").gradient.rule == "sigma"
  assert samplers.get_method("PNDM") == samplers.get_method("f-pndm")
  assert samplers.get_method("PLMS") == samplers.Deterministic(
      samplers.PSEUDO, samplers.LinearMultistep(4), samplers.HEUN_RAMP)
  assert samplers.canonical_name("PNDM") == "f-pndm"
  for name in [*samplers.PRESETS, "classical-rk4", "pseudo-vlms4-ramp"]:
    hash(samplers.get_method(name))
  assert hash(schedules.Discretization(LINEAR, 50)) == hash(schedules.Discretization(LINEAR, 50))


def test_method_values_reject_names():
  with pytest.raises(TypeError, match="get_method parses names"):
    samplers.Deterministic("pseudo", "lms4", warmup="ramp")


# --- the fast samplers: DPM-Solver++, UniPC, DEIS, iPNDM, EDM Heun, pndm-v (docs/methods.md §6) ---

FIRST_ORDER_MEMBERS = ["deis1", "pseudo-tab1-ramp", "pseudo-logrho1-ramp", "pseudo-vlms1-ramp",
                       "data-dpm1-ramp", "data-llms1-ramp", "data-euler"]


@pytest.mark.parametrize("name", FIRST_ORDER_MEMBERS)
@pytest.mark.parametrize("spacing, end", [("logsnr", "zero"), ("time_uniform", "sigma_min"),
                                          ("uniform", "zero")])
def test_first_order_members_are_ddim(x64, name, spacing, end):
  d = schedules.Discretization(LINEAR, 20, spacing, "consistent", end=end)
  x_T = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
  eps_fn = lambda x, t: toy_eps(jnp, x, t)
  ddim = samplers.sample_deterministic(eps_fn, x_T, samplers.get_method("ddim"), d)
  ours = samplers.sample_deterministic(eps_fn, x_T, samplers.get_method(name), d)
  assert np.max(np.abs(ours - ddim)) <= 1e-10


@pytest.mark.parametrize("name", ["ipndm", "deis3", "pseudo-logrho3-ramp", "dpm++2m", "dpm++3m",
                                  "dpm++2s", "unipc3", "unipc2-bh1", "edm-heun", "pndm-v-ramp"])
def test_every_fast_sampler_starts_with_a_ddim_step(x64, name):
  """One step: multistep methods have no history yet, and lower_order_final makes the
  single-step ones Euler."""
  d = schedules.Discretization(LINEAR, 1, "time_uniform", "consistent", end="sigma_min")
  x_T = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
  eps_fn = lambda x, t: toy_eps(jnp, x, t)
  ddim = samplers.sample_deterministic(eps_fn, x_T, samplers.get_method("ddim"), d)
  ours = samplers.sample_deterministic(eps_fn, x_T, samplers.get_method(name), d)
  assert np.max(np.abs(ours - ddim)) <= 1e-10


ORDER_STEPS = [50, 100, 200, 400]
# (method, nominal order, the least order the test accepts). The grid is uniform in log-SNR and
# ends at A[0] (end='sigma_min'), the final orders are not lowered: every step is the method's
# own. dpm++3m is the reference code's 3M, whose third-order term is half the exact one, so it
# is second order (the exact log-SNR integral, data-llms3-ramp, is third); fixed-weight PLMS
# (f-pndm, ipndm, plms) is excluded: it needs steps equal in sigma (docs/methods.md §5).
NOMINAL_ORDERS = [("ddim", 1, 0.7), ("s-pndm", 2, 1.7), ("edm-heun", 2, 1.7), ("deis2", 2, 1.7),
                  ("deis3", 3, 2.7), ("pseudo-logrho3-ramp", 3, 2.7), ("dpm++2m", 2, 1.7),
                  ("dpm++2s", 2, 1.7), ("dpm++3m", 3, 1.7), ("data-llms3-ramp", 3, 2.7),
                  ("unipc2", 3, 2.7), ("unipc2-bh1", 3, 2.7), ("unipc3", 4, 3.7),
                  ("unipc3-bh1", 4, 3.7), ("pndm-v", 4, 3.7), ("pndm-v-ramp", 4, 3.7)]


@pytest.mark.parametrize("method, nominal, least", NOMINAL_ORDERS)
def test_fast_samplers_reach_their_order_on_the_gaussian(x64, method, nominal, least):
  errors = gaussian_errors(method, ORDER_STEPS, spacing="logsnr", end="sigma_min",
                           lower_order_final=False)
  assert np.all(np.diff(errors) < 0), errors
  assert fitted_order(ORDER_STEPS, errors) >= least
  if method == "dpm++3m":  # what keeps it at second order: the exact integral is third
    assert fitted_order(ORDER_STEPS, errors) < 2.5


def test_data_prediction_methods_stall_on_the_step_into_sigma_zero(x64):
  """Their log-SNR step into sigma = 0 is infinite, so it is first order whatever the method;
  the pseudo methods integrate in sigma and keep their order (docs/methods.md §6)."""
  stalled = gaussian_errors("unipc3", [50, 200], spacing="logsnr")
  assert stalled[1] > 0.5 * stalled[0]
  kept = gaussian_errors("pndm-v-ramp", [50, 200], spacing="logsnr")
  assert kept[1] < 0.05 * kept[0] and kept[1] < 0.1 * stalled[1]


FAST_NFE_CASES = [("dpm++2m", 10, 10), ("unipc3", 10, 10), ("deis3", 10, 10), ("ipndm", 10, 10),
                  ("dpm++2s", 10, 19), ("edm-heun", 10, 19), ("pndm-v", 10, 19),
                  ("pndm-v-ramp", 10, 10), ("ddim", 10, 11)]


@pytest.mark.parametrize("method, num_steps, expected", FAST_NFE_CASES)
def test_fast_samplers_nfe_counts_actual_calls(method, num_steps, expected):
  calls = []
  end = "sigma_min" if method == "ddim" else "zero"  # ddim: with denoise_to_zero

  def counting_eps(x, t):
    calls.append(np.asarray(t)[0])
    return 0.1 * x

  method = samplers.get_method(method, denoise_to_zero=end == "sigma_min")
  d = schedules.Discretization(LINEAR, num_steps, "logsnr", "consistent", end=end)
  assert method.num_evals(d) == expected
  with jax.disable_jit():
    _, nfe = samplers.run_sampler(counting_eps, jnp.ones((2, 3)), method, d)
  assert nfe == len(calls) == expected
  assert min(calls) >= 0  # nothing asks the network about t = -1 (sigma = 0)


@pytest.mark.parametrize("method", ["unipc3", "dpm++2s", "pndm-v", "edm-heun"])
def test_fast_samplers_jitted_nfe_and_flat_programs(method):
  method = samplers.get_method(method)
  d = schedules.Discretization(LINEAR, 20, "logsnr", "consistent")
  reported, made = count_executions(method, jnp.ones((2, 4)), d)
  assert reported == made == method.num_evals(d)
  eps_fn = lambda x, t: jnp.tanh(x) * t[:, None] / 1000

  def model_calls_in_program(num_steps):
    d = schedules.Discretization(LINEAR, num_steps, "logsnr", "consistent")
    fn = lambda x: samplers.sample_deterministic(eps_fn, x, method, d)
    return jax.jit(fn).lower(jnp.ones((2, 3))).as_text().count("tanh")

  assert model_calls_in_program(200) == model_calls_in_program(20)


def test_denoise_to_zero_is_one_more_data_prediction_at_t_0(x64):
  d = schedules.Discretization(LINEAR, 10)  # paper: ends at A[0]
  x_T = jax.random.normal(jax.random.key(2), (4, 3), jnp.float64)
  eps_fn = lambda x, t: toy_eps(jnp, x, t)
  x = samplers.sample_deterministic(eps_fn, x_T, samplers.get_method("f-pndm"), d)
  a = LINEAR.alphas_cumprod[0]
  expected = (x - np.sqrt(1 - a) * toy_eps(jnp, x, jnp.zeros(4))) / np.sqrt(a)
  denoised = samplers.sample_deterministic(
      eps_fn, x_T, samplers.get_method("f-pndm", denoise_to_zero=True), d)
  assert np.max(np.abs(denoised - expected)) <= 1e-12


def test_thresholding_clips_each_image_at_its_quantile():
  x0 = jax.random.normal(jax.random.key(3), (3, 2, 50)) * jnp.array([0.3, 1.5, 4.0])[:, None, None]
  for max_value in (1.0, 2.5):
    out = np.asarray(samplers.Thresholding(0.9, max_value)(x0))
    for image, source in zip(out, np.asarray(x0), strict=True):
      s = np.clip(np.quantile(np.abs(source), 0.9), 1.0, max_value)
      assert np.allclose(image, np.clip(source, -s, s) / s, atol=1e-6)
  with pytest.raises(ValueError, match="0 < ratio <= 1"):
    samplers.Thresholding(ratio=1.5)


def test_options_and_their_records():
  assert samplers.get_method("dpm++2m").lower_order_final
  assert not samplers.get_method("dpm++2m", lower_order_final=False).lower_order_final
  assert samplers.method_options(samplers.get_method("f-pndm")) == {}
  thresholded = samplers.get_method("unipc3", thresholding=samplers.Thresholding())
  assert samplers.method_options(thresholded) == dict(
      lower_order_final=True, thresholding=dict(ratio=0.995, max_value=1.0))
  assert samplers.get_method("ipndm") == samplers.Deterministic(
      samplers.PSEUDO, samplers.LinearMultistep(4), samplers.RAMP)
  for name in samplers.PRESETS:
    hash(samplers.get_method(name))
