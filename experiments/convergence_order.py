"""Convergence order of every deterministic method on models with exact eps.

For each analytic model (an 8-d Gaussian, whose ODE solution is closed-form, and
an 8-d Gaussian mixture, against a fine RK4 reference), schedule and index
convention, runs pseudo/classical transfer x Euler/Heun/RK4/LMS2-4 at several
step counts in float64, measures the error of x0 against the reference (median
and mean over samples: a mixture can flip a few samples between modes, which
the median ignores), and fits the order as the slope of log error vs log S.

  python -m experiments.convergence_order            # full grid, a few minutes on CPU
  python -m experiments.convergence_order --quick    # seconds; what the tests run
"""

from __future__ import annotations

import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import report  # noqa: E402
from pndm_jax import analytic, samplers, schedules  # noqa: E402

flags.DEFINE_bool("quick", False, "A small grid that runs in seconds (for tests).")
flags.DEFINE_string("out", "experiments/results/convergence_order", "Output directory.")
flags.DEFINE_integer("num_samples", 64, "Samples per setting (errors are over these).")
FLAGS = flags.FLAGS

FULL = dict(models=("gaussian", "mixture"), schedules=("linear", "cosine"),
            indices=("consistent", "paper"), steps=(5, 10, 20, 50, 100, 200),
            fit=(20, 50, 100, 200),
            methods=tuple(f"{tr}-{g}" for tr in samplers.TRANSFERS
                          for g in ("euler", "heun", "rk4", "lms2-heun", "lms3-rk4",
                                    "lms4-rk4", "lms4-ramp"))
            + ("pseudo-vlms3-rk4", "pseudo-vlms4-rk4"))
QUICK = dict(models=("gaussian",), schedules=("linear",), indices=("consistent",),
             steps=(10, 20, 40), fit=(10, 20, 40),
             methods=("pseudo-euler", "pseudo-lms2-heun", "pseudo-lms4-rk4", "classical-lms4-rk4"))
NAMES = {"pseudo-euler": "ddim", "pseudo-lms2-heun": "s-pndm", "pseudo-lms4-rk4": "f-pndm",
         "classical-lms4-rk4": "fon"}


def make_model(name: str) -> analytic.GaussianMixture:
  return analytic.gaussian(dim=8) if name == "gaussian" else analytic.gaussian_mixture(dim=8)


def errors_for(model, model_name, sched, convention, method, steps, x_T):
  """(NFE, median, mean error norm of x0 over the batch), one triple per step count."""
  sampler = samplers.get_method(method)
  out = []
  for s in steps:
    d = schedules.Discretization(sched, s, spacing="uniform", convention=convention)
    eps_fn = model.eps_fn(d.alpha_bar)
    a_start, a_end = analytic.ode_endpoints(d)
    if model_name == "gaussian":
      truth = model.exact_solution(x_T, a_start, a_end)
    else:
      truth = model.reference_solution(x_T, a_start, a_end)
    x0 = jax.jit(samplers.sample_deterministic, static_argnums=(0, 2, 3))(eps_fn, x_T, sampler, d)
    err = np.asarray(jnp.linalg.norm(x0 - truth, axis=-1))
    out.append((sampler.num_evals(d), float(np.median(err)), float(np.mean(err))))
  return out


def fitted_order(steps, errors, fit):
  keep = [i for i, s in enumerate(steps) if s in fit]
  x = np.log([steps[i] for i in keep])
  y = np.log([errors[i] for i in keep])
  return float(-np.polyfit(x, y, 1)[0])


def run(grid: dict, num_samples: int, out_dir: str) -> dict[tuple, float]:
  """Runs the grid; writes CSV, plot and table; returns {(model, sched, index, method): order}."""
  rows, orders = [], {}
  settings = [(m, s, i) for m in grid["models"] for s in grid["schedules"]
              for i in grid["indices"]]
  fig, axes = plt.subplots(len(settings) // 2 or 1, min(2, len(settings)),
                           figsize=(12, 4 * max(1, len(settings) // 2)), squeeze=False)
  for ax, (model_name, sched_name, index) in zip(axes.flat, settings):
    model = make_model(model_name)
    sched = schedules.Schedule(sched_name)
    x_T = jax.random.normal(jax.random.key(0), (num_samples, 8), jnp.float64)
    for method in grid["methods"]:
      errs = errors_for(model, model_name, sched, index, method, grid["steps"], x_T)
      nfes, med = [e[0] for e in errs], [e[1] for e in errs]
      order = fitted_order(grid["steps"], med, grid["fit"])
      orders[(model_name, sched_name, index, method)] = order
      for s, (n, e_med, e_mean) in zip(grid["steps"], errs):
        rows.append(dict(model=model_name, schedule=sched_name, index=index, method=method,
                         steps=s, nfe=n, median_error=e_med, mean_error=e_mean,
                         fitted_order=order))
      style = "-" if method.startswith("pseudo") else "--"
      ax.loglog(nfes, med, style, marker="o", ms=3,
                label=f"{NAMES.get(method, method)} ({order:.2f})")
    ax.set_title(f"{model_name}, {sched_name}, {index}")
    ax.set_xlabel("NFE")
    ax.set_ylabel("median |x0 - x0*|")
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)
  fig.savefig(os.path.join(out_dir, "error_vs_nfe.png"), dpi=110)
  plt.close(fig)
  report.write_csv(os.path.join(out_dir, "errors.csv"), rows)

  header = ["method"] + [f"{m[:5]}/{s}/{i[:4]}" for m, s, i in settings]
  table = [[NAMES.get(meth, meth)] + [orders[(m, s, i, meth)] for m, s, i in settings]
           for meth in grid["methods"]]
  fit = ", ".join(str(s) for s in grid["fit"])
  report.write_markdown(
      os.path.join(out_dir, "orders.md"), "Fitted convergence order (median error)",
      f"Slope of log median error vs log S over S in {{{fit}}}; columns are "
      f"model/schedule/index convention; float64, exact eps, {num_samples} samples.\n\n"
      + report.markdown_table(header, table))
  return orders


def main(argv):
  del argv
  grid = QUICK if FLAGS.quick else FULL
  num_samples = 16 if FLAGS.quick else FLAGS.num_samples
  orders = run(grid, num_samples, FLAGS.out)
  for key, order in orders.items():
    print(*key, f"order {order:.2f}")


if __name__ == "__main__":
  app.run(main)
