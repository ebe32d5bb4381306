"""Why classical methods fail: where each method queries the model, on a 2-D data manifold.

The data is a ring of narrow Gaussians in 2-D, with exact eps. Every sampler is
run eagerly and every point where it evaluates the model is recorded. The
plot shows (left) final samples over the data ring and (right) how far the
evaluation points stray from the high-density region of the noised data at
their timestep: the mean negative log density of the evaluated y = x/sqrt(a)
under p(y; sigma), against that of true noised samples. Pseudo methods stay
on the typical set; classical RK / linear-multistep steps leave it, most in
the last, small-noise steps, which is the paper's argument.

  python -m experiments.manifold            # ~1 minute on CPU
  python -m experiments.manifold --quick    # seconds; what the tests run
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

flags.DEFINE_bool("quick", False, "Fewer samples and methods (for tests).")
flags.DEFINE_string("out", "experiments/results/manifold", "Output directory.")
flags.DEFINE_integer("num_steps", 10, "Sampling steps for every method.")
FLAGS = flags.FLAGS

METHODS = ("ddim", "f-pndm", "pseudo-rk4", "classical-euler", "fon", "classical-rk4")
PSEUDO = ("ddim", "f-pndm", "pseudo-rk4")
CONVENTION = "consistent"


def ring(num_components: int = 8, radius: float = 0.7, std: float = 0.03):
  angles = 2 * np.pi * np.arange(num_components) / num_components
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return analytic.GaussianMixture(np.full(num_components, 1 / num_components), means,
                                  np.full_like(means, std))


def evaluations(model, discretization, method, x_T):
  """Runs `method` eagerly; returns its final x0 and every (x, t) it fed the model."""
  eps_fn = model.eps_fn(discretization.alpha_bar)
  seen = []

  def recording_eps(x, t):
    seen.append((np.asarray(x), float(t[0])))
    return eps_fn(x, t)

  with jax.disable_jit():
    x0 = samplers.sample_deterministic(recording_eps, x_T, method, discretization)
  return np.asarray(x0), seen


def off_manifold(model, discretization, points):
  """Mean -log p(y; sigma_t) of evaluated points, per timestep, sorted by t (descending)."""
  out = {}
  for x, t in points:
    a = float(discretization.alpha_bar(np.array([t]))[0])
    y = jnp.asarray(x) / np.sqrt(a)
    nll = -np.asarray(model.log_density_y(y, np.sqrt((1 - a) / a)))
    out.setdefault(t, []).append(float(np.mean(nll)))
  return sorted(((t, float(np.mean(v))) for t, v in out.items()), reverse=True)


def typical_nll(model, discretization, ts, num):
  """The same statistic for true noised data y = x0 + sigma z (what 'on manifold' means)."""
  x0 = model.sample(jax.random.key(1), num, jnp.float64)
  z = jax.random.normal(jax.random.key(2), x0.shape, jnp.float64)
  out = []
  for t in ts:
    a = float(discretization.alpha_bar(np.array([t]))[0])
    sigma = np.sqrt((1 - a) / a)
    out.append(float(-np.mean(model.log_density_y(x0 + sigma * z, sigma))))
  return out


def within_data(model, x0, k: float = 4.0) -> float:
  """Fraction of samples within k standard deviations of some component mean."""
  d = np.linalg.norm(x0[:, None, :] - np.asarray(model.means)[None], axis=-1)
  return float(np.mean(np.min(d, axis=1) < k * float(np.max(model.stds))))


def run(methods, num_samples: int, num_steps: int, out_dir: str) -> dict[str, float]:
  model = ring()
  discretization = schedules.Discretization(schedules.Schedule("linear"), num_steps,
                                            convention=CONVENTION)
  x_T = jax.random.normal(jax.random.key(0), (num_samples, 2), jnp.float64)
  fig = plt.figure(figsize=(4 * len(methods), 8))
  ax_n = fig.add_subplot(2, 1, 2)
  angles = np.linspace(0, 2 * np.pi, 200)
  rows, fractions, nfes = [], {}, {}
  for col, method in enumerate(methods):
    value = samplers.get_method(method)
    nfes[method] = value.num_evals(discretization)
    x0, seen = evaluations(model, discretization, value, x_T)
    fractions[method] = within_data(model, x0)
    ax = fig.add_subplot(2, len(methods), col + 1)
    ax.plot(0.7 * np.cos(angles), 0.7 * np.sin(angles), "k:", lw=0.8)
    ax.scatter(x0[:, 0], x0[:, 1], s=3, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_title(f"{method} (NFE {nfes[method]}): "
                 f"{100 * fractions[method]:.0f}% on data", fontsize=9)
    curve = off_manifold(model, discretization, seen)
    style = "-" if method in PSEUDO else "--"
    ax_n.plot([t for t, _ in curve], [v for _, v in curve], style, marker="o", ms=3,
              label=method)
    rows += [dict(method=method, t=t, mean_nll=v, on_data_fraction=fractions[method])
             for t, v in curve]
  ts = sorted({r["t"] for r in rows}, reverse=True)
  ax_n.plot(ts, typical_nll(model, discretization, ts, 2048), "k", lw=2, label="true noised data")
  ax_n.set_xlabel("timestep t of the model evaluation")
  ax_n.set_ylabel("mean -log p_t(y) of evaluated points")
  ax_n.set_yscale("symlog")
  ax_n.invert_xaxis()
  ax_n.set_title(f"how far each method's model evaluations stray from the noised data "
                 f"(solid: pseudo, dashed: classical), {num_steps} steps")
  ax_n.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)
  fig.savefig(os.path.join(out_dir, "manifold.png"), dpi=110)
  plt.close(fig)
  report.write_csv(os.path.join(out_dir, "evaluations.csv"), rows)
  report.write_markdown(
      os.path.join(out_dir, "manifold.md"), "Samples that land on the data ring",
      f"2-D ring of 8 Gaussians (std 0.03), exact eps, {num_steps} steps, "
      f"{num_samples} samples; 'on data' = within 4 std of a component mean.\n\n"
      + report.markdown_table(["method", "NFE", "on data"],
                              [[m, nfes[m], f"{100 * f:.1f}%"]
                               for m, f in fractions.items()]))
  return fractions


def main(argv):
  del argv
  methods = ("ddim", "fon") if FLAGS.quick else METHODS
  fractions = run(methods, 64 if FLAGS.quick else 1024, FLAGS.num_steps, FLAGS.out)
  for method, fraction in fractions.items():
    print(method, f"on data: {fraction:.3f}")


if __name__ == "__main__":
  app.run(main)
