"""Why classical methods fail off the data manifold: exact eps beside a trained network's.

The data is a ring of 8 narrow Gaussians in a plane of R^D: D = 2, and D = 32 (the ring turned
into a random 2-D plane, 0.003 thin across it), from `toy_network`. For each, a small eps-MLP
is trained by the project's training step; then every method pair that differs only in the
transfer (DDIM / classical Euler, F-PNDM / FON, pseudo / classical RK4: equal NFE within a pair)
samples with the exact eps and with the network's. Reported, per D, step count and eps:

- the final samples: the fraction on data (inside the 99.99% ellipsoid of a component), the
  median distance to the ring (the manifold the components sit on), and the sliced Wasserstein
  distance to fresh data (beside its floor, data against data);
- where each method queries eps: trajectories, and the mean -log density of the query points
  under the noised data at their timestep (how far a method strays from where eps was learned).

The paper's argument (docs/experiments.md): a network's eps is only learned near the noised data,
so a method whose intermediate points leave it is punished with a network, and not with exact eps.

  python -m experiments.manifold            # ~6 minutes on 2 CPU cores (two networks trained)
  python -m experiments.manifold --quick    # seconds; what the tests run (D = 2 only)
"""

from __future__ import annotations

import functools
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import report, toy_network  # noqa: E402
from pndm_jax import models, samplers, schedules  # noqa: E402

flags.DEFINE_bool("quick", False, "D = 2 only, a briefly trained network, few samples (tests).")
flags.DEFINE_string("out", "experiments/results/manifold", "Output directory.")
flags.DEFINE_list("dims", ["2", "32"], "Dimensions of the space the ring lies in.")
flags.DEFINE_list("num_steps", ["5", "10", "20"], "Step counts every method runs.")
flags.DEFINE_integer("num_samples", 2048, "Samples per run.", lower_bound=2)
flags.DEFINE_integer("train_steps", 10000, "Training steps of each network.", lower_bound=1)
FLAGS = flags.FLAGS

# (pseudo, classical): the same gradient part with the pseudo or the classical transfer
PAIRS = (("ddim", "classical-euler"), ("f-pndm", "fon"), ("pseudo-rk4", "classical-rk4"))
PAIRS_PSEUDO = tuple(p for p, _ in PAIRS)
METHODS = tuple(m for pair in PAIRS for m in pair)
CONVENTION = "consistent"
NUM_TRAJECTORIES = 12
NUM_PROBED = 256  # samples whose every eps query is recorded
QUICK = dict(dims=(2,), num_steps=(10,), num_samples=1024, train_steps=1500)


def run_method(eps_fn, x_T, method, discretization) -> np.ndarray:
  return np.asarray(jax.jit(samplers.sample_deterministic, static_argnums=(0, 2, 3))(
      eps_fn, x_T, method, discretization))


def run_recording(eps_fn, x_T, method, discretization
                  ) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
  """run_method, and every (x, t) at which `method` queries eps, in order (an ordered host
  callback inside the compiled loop)."""
  seen = []

  def recording(x, t):
    jax.debug.callback(lambda x, t: seen.append((np.asarray(x), float(t[0]))), x, t,
                       ordered=True)
    return eps_fn(x, t)

  x0 = run_method(recording, x_T, method, discretization)
  jax.effects_barrier()
  return x0, seen


@functools.cache
def log_density(data: toy_network.Ring):
  """data.log_density_y(y, sigma), compiled once per data set."""
  return jax.jit(data.log_density_y)


def query_nll(data, discretization, points) -> list[tuple[float, float]]:
  """(t, mean -log p_t(y)) of the query points, by t descending: their density under the noised
  data, in the ODE's variable y = x / sqrt(a)."""
  by_t = {}
  for x, t in points:
    a = float(discretization.alpha_bar(np.array([t]))[0])
    nll = -np.asarray(log_density(data)(jnp.asarray(x) / np.sqrt(a), np.sqrt((1 - a) / a)))
    by_t.setdefault(t, []).append(float(np.mean(nll)))
  return sorted(((t, float(np.mean(v))) for t, v in by_t.items()), reverse=True)


def noised_data_nll(data, discretization, ts, num) -> list[float]:
  """The same statistic for true noised data y = x0 + sigma z: what 'on the manifold' means."""
  x0 = data.sample(jax.random.key(1), num, jnp.float64)
  z = jax.random.normal(jax.random.key(2), x0.shape, jnp.float64)
  out = []
  for t in ts:
    a = float(discretization.alpha_bar(np.array([t]))[0])
    sigma = np.sqrt((1 - a) / a)
    out.append(float(-np.mean(log_density(data)(x0 + sigma * z, sigma))))
  return out


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_directions: int = 256) -> float:
  """Sliced 2-Wasserstein distance between two equal-size sample sets (fixed directions)."""
  dirs = np.random.default_rng(0).normal(size=(a.shape[1], num_directions))
  dirs /= np.linalg.norm(dirs, axis=0)
  pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
  return float(np.sqrt(np.mean((pa - pb) ** 2)))


SCORES = ("on_data", "ring_distance", "sliced_w2")


def scores(data, x0: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  return dict(on_data=float(np.mean(data.on_data(x0))),
              ring_distance=float(np.median(data.ring_distance(x0))),
              sliced_w2=sliced_wasserstein(x0, reference))


def plane(data, x: np.ndarray) -> np.ndarray:
  """The data plane's coordinates of x (the ring's own, for D = 2)."""
  return np.asarray(data.to_axes(jnp.asarray(x)))[..., :2]


def draw_samples(ax, data, x0, trajectory, title):
  """Density of the final samples in the data plane, a few query trajectories, the ring."""
  xy = plane(data, x0)
  ax.hist2d(xy[:, 0], xy[:, 1], bins=90, range=[[-1.2, 1.2], [-1.2, 1.2]], cmap="Blues",
            norm=matplotlib.colors.PowerNorm(0.4))
  path = np.stack([plane(data, x) for x, _ in trajectory])  # [queries, NUM_TRAJECTORIES, 2]
  ax.plot(path[:, :, 0], path[:, :, 1], "-", color="tab:orange", lw=0.6, alpha=0.8)
  ax.plot(path[:, :, 0], path[:, :, 1], ".", color="tab:red", ms=1.5)
  angles = np.linspace(0, 2 * np.pi, 200)
  ax.plot(toy_network.RING_RADIUS * np.cos(angles), toy_network.RING_RADIUS * np.sin(angles),
          "k:", lw=0.6)
  ax.set_aspect("equal")
  ax.set_xlim(-1.2, 1.2)
  ax.set_ylim(-1.2, 1.2)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=8)


def run_dim(dim: int, steps: tuple[int, ...], num_samples: int, train_steps: int,
            out_dir: str, curve_axes) -> tuple[list[dict], dict]:
  """Trains the network for the ring in R^dim, runs every method; returns rows and training."""
  data = toy_network.ring(dim)
  schedule = schedules.Schedule("linear")
  start = time.time()
  model, params, loss = toy_network.train_eps_mlp(data, schedule, train_steps)
  training = dict(dim=dim, steps=train_steps, loss=loss, seconds=time.time() - start)
  print(f"D={dim}: trained {train_steps} steps in {training['seconds']:.0f} s, loss {loss:.4f}",
        flush=True)
  x_T = jax.random.normal(jax.random.key(0), (num_samples, dim), jnp.float64)
  reference = np.asarray(data.sample(jax.random.key(3), num_samples, jnp.float64))
  fresh = np.asarray(data.sample(jax.random.key(4), num_samples, jnp.float64))
  floors = dict(sliced_w2_floor=sliced_wasserstein(fresh, reference),
                ring_distance_data=float(np.median(data.ring_distance(fresh))))
  network = models.eps_fn(model, params)
  fig, axes = plt.subplots(2, len(METHODS), figsize=(2.4 * len(METHODS), 5.2), squeeze=False)
  rows = []
  for s in steps:
    d = schedules.Discretization(schedule, s, convention=CONVENTION)
    sources = dict(exact=data.eps_fn(d.alpha_bar), network=network)
    for row, (source, eps_fn) in enumerate(sources.items()):
      for col, name in enumerate(METHODS):
        method = samplers.get_method(name)
        if s == steps[0]:  # the step count the figures show: every query recorded
          x0, probed = run_recording(eps_fn, x_T, method, d)
        else:
          x0, probed = run_method(eps_fn, x_T, method, d), None
        rows.append(dict(dim=dim, eps=source, steps=s, method=name, nfe=method.num_evals(d),
                         **scores(data, x0, reference), **floors))
        if probed is None:
          continue
        probed = [(x[:NUM_PROBED], t) for x, t in probed]
        draw_samples(axes[row, col], data, x0,
                     [(x[:NUM_TRAJECTORIES], t) for x, t in probed],
                     f"{name}, {source} eps\n{100 * rows[-1]['on_data']:.0f}% on data, "
                     f"SW {rows[-1]['sliced_w2']:.3f}")
        curve = query_nll(data, d, probed)
        curve_axes[row].plot([t for t, _ in curve], [v for _, v in curve],
                             "-" if name in PAIRS_PSEUDO else "--", color=f"C{col}",
                             marker="o" if dim == 2 else "s", ms=2.5, lw=1 if dim == 2 else 2,
                             label=f"D={dim} {name}")
    if s == steps[0]:
      ts = sorted(set(d.t), reverse=True)
      for ax in curve_axes:
        ax.plot(ts, noised_data_nll(data, d, ts, 2048), "k", lw=2 if dim == 2 else 1,
                label=f"D={dim} true noised data")
  fig.suptitle(f"ring in R^{dim}, {steps[0]} steps: final samples (density in the data plane) "
               f"and {NUM_TRAJECTORIES} trajectories of eps queries", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, f"manifold_{dim}d.png"), dpi=110)
  plt.close(fig)
  return rows, training


def comparisons(rows: list[dict]) -> list[dict]:
  """Per D, step count and eps: each pseudo method against its classical counterpart."""
  by = {(r["dim"], r["eps"], r["steps"], r["method"]): r for r in rows}
  out = []
  for (dim, eps, s, name), r in by.items():
    for pseudo, classical in PAIRS:
      if name == pseudo:
        c = by[(dim, eps, s, classical)]
        out.append(dict(dim=dim, eps=eps, steps=s, pseudo=pseudo, classical=classical,
                        nfe=r["nfe"], **{f"{side}_{k}": row[k] for k in SCORES
                                         for side, row in (("pseudo", r), ("classical", c))}))
  return out


def ahead(pair: dict, score: str) -> bool:
  """Whether the pseudo method of a `comparisons` row beats the classical one on `score`."""
  sign = 1 if score == "on_data" else -1  # more on data; less distance
  return sign * (pair[f"pseudo_{score}"] - pair[f"classical_{score}"]) > 0


def write_report(out_dir: str, rows, pairs, trainings, num_samples) -> None:
  body = (f"Ring of 8 Gaussians (std {toy_network.RING_STD} in its plane, "
          f"{toy_network.OFF_PLANE_STD} across it) in R^D; {num_samples} samples per run; "
          f"`consistent` convention, `uniform` grid; 'on data': inside the "
          f"{100 * toy_network.ON_DATA_PROBABILITY:g}% ellipsoid of a component; 'ring dist': "
          f"median distance to the circle; SW: sliced 2-Wasserstein distance to as many fresh "
          f"data samples (floor: data against data).\n\nNetworks: "
          + "; ".join(f"D={t['dim']}: {t['steps']} steps, final loss {t['loss']:.4f}, "
                      f"{t['seconds']:.0f} s" for t in trainings) + ".\n")
  for dim in sorted({r["dim"] for r in rows}):
    mine = [r for r in rows if r["dim"] == dim]
    body += (f"\nD = {dim} (true samples: ring dist {mine[0]['ring_distance_data']:.4f}, "
             f"SW floor {mine[0]['sliced_w2_floor']:.4f}):\n\n"
             + report.markdown_table(
                 ["steps", "method", "NFE", "exact: on data", "ring dist", "SW",
                  "network: on data", "ring dist", "SW"],
                 [[s, m, ex["nfe"], f"{100 * ex['on_data']:.1f}%", f"{ex['ring_distance']:.4f}",
                   f"{ex['sliced_w2']:.4f}", f"{100 * nw['on_data']:.1f}%",
                   f"{nw['ring_distance']:.4f}", f"{nw['sliced_w2']:.4f}"]
                  for s in sorted({r["steps"] for r in mine}) for m in METHODS
                  for ex, nw in [[next(r for r in mine if (r["steps"], r["method"], r["eps"])
                                       == (s, m, e)) for e in ("exact", "network")]]]) + "\n")
  body += ("\nHow often the pseudo method of a pair is ahead of its classical counterpart at "
           "equal NFE, over the dimensions and step counts above:\n\n" + report.markdown_table(
               ["eps", "more on data", "closer to the ring", "smaller SW"],
               [[eps] + [f"{sum(ahead(p, k) for p in mine)} of {len(mine)}" for k in SCORES]
                for eps in ("exact", "network")
                for mine in [[p for p in pairs if p["eps"] == eps]]]) + "\n")
  report.write_markdown(os.path.join(out_dir, "manifold.md"),
                        "Sampling a ring with exact and with learned eps", body)


def positive_ints(name: str, values: list[str], least: int) -> tuple[int, ...]:
  """The list flag `name` as integers >= `least`, else a usage error naming it."""
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    out = ()
  if not out or min(out) < least:
    raise app.UsageError(f"--{name}={','.join(values)}: give integers >= {least}, "
                         f"comma-separated")
  return out


def main(argv):
  del argv
  quick = dict(QUICK) if FLAGS.quick else dict(
      dims=positive_ints("dims", FLAGS.dims, 2),
      num_steps=positive_ints("num_steps", FLAGS.num_steps, 1),
      num_samples=FLAGS.num_samples, train_steps=FLAGS.train_steps)
  os.makedirs(FLAGS.out, exist_ok=True)
  fig, curve_axes = plt.subplots(1, 2, figsize=(13, 4.5))
  rows, trainings = [], []
  for dim in quick["dims"]:
    r, t = run_dim(dim, quick["num_steps"], quick["num_samples"], quick["train_steps"],
                   FLAGS.out, curve_axes)
    rows += r
    trainings.append(t)
  for ax, source in zip(curve_axes, ("exact", "network")):
    ax.set_title(f"{source} eps: mean -log p_t(y) of the points each method queries "
                 f"({quick['num_steps'][0]} steps; solid: pseudo)", fontsize=9)
    ax.set_xlabel("timestep t of the query")
    ax.set_yscale("symlog")
    ax.invert_xaxis()
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.out, "queries.png"), dpi=110)
  plt.close(fig)
  pairs = comparisons(rows)
  report.write_csv(os.path.join(FLAGS.out, "samples.csv"), rows)
  report.write_csv(os.path.join(FLAGS.out, "pairs.csv"), pairs)
  write_report(FLAGS.out, rows, pairs, trainings, quick["num_samples"])
  for p in pairs:
    print(f"D={p['dim']} {p['eps']} S={p['steps']} {p['pseudo']} vs {p['classical']} "
          f"(NFE {p['nfe']}): on data {p['pseudo_on_data']:.3f} vs {p['classical_on_data']:.3f}, "
          f"SW {p['pseudo_sliced_w2']:.4f} vs {p['classical_sliced_w2']:.4f}")


if __name__ == "__main__":
  app.run(main)
