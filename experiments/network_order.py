"""Convergence order of the deterministic methods on trained networks, against their own ODE.

`convergence_order` measures orders where eps is exact; here eps is a trained network's: the
2-D ring's eps-MLP (`experiments.toy_network`, trained at the start of the run) and the shipped
digits U-Net (`configs/digits_pndm.py`). Every method solves the same ODE, dy/dsigma =
eps(x, t) under the `consistent` convention (docs/methods.md §4), so its error is measured
against a high-accuracy solution of the network's ODE (`reference_ode`: many RK4 steps in log
sigma), from the same fixed x_T, at step counts S; the order is the slope of log median error
vs log S, fitted separately over the coarse steps (S <= --fit_split) and the fine ones
(S >= --fit_split), since a network need not be smooth on the scale of the coarse steps.

Grids: fractional spacings (`logsnr`, `time_uniform`) with `end="sigma_min"`: the S steps run
from t = N-1 to t = 0 (alpha-bar A[0]), the same ends for every S, so one reference serves all
S and both spacings, and every step shrinks as S grows. (With `end="zero"` every grid ends with
the same step 0 -> -1 into sigma = 0 whatever S is, whose error does not shrink with S.)

Precision: the sampler state and the reference are float64 (jax_enable_x64); the networks
compute in float32, as trained, so float32 rounding of eps sets an error floor. The reference
is also solved with half the steps; the difference (the half-step solution's error, an upper
bound on the reference's own) estimates both its truncation error and that floor, and a point
within FLOOR_MARGIN of it is left out of the fits (`at_floor` in errors.csv).

Writes errors.csv (every run), orders.md (fitted orders and errors per network and spacing,
the reference's error estimate, the networks' details) and error_vs_nfe.png.

  python -m experiments.network_order            # both networks, ~9 min on 2 CPU cores
  python -m experiments.network_order --quick    # seconds: the ring, 3 methods; what tests run
  python -m experiments.network_order --networks=ring --steps=10,20,40,80,160,320,640
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs import digits_pndm  # noqa: E402
from experiments import report, toy_network  # noqa: E402
from experiments.method_families import colors, fitted_order, label, transfer  # noqa: E402
from pndm_jax import (  # noqa: E402
  analytic,
  eps_models,
  models,
  reference_ode,
  sampler_spec,
  samplers,
  schedules,
)

NETWORKS = ("ring", "digits")
# the paper's methods and its ablation's RK4 pair, then the fast samplers they are compared with
METHODS = ("ddim", "classical-euler", "s-pndm", "f-pndm", "fon", "pseudo-rk4", "classical-rk4",
           "pndm-v", "ipndm", "plms", "dpm++2m", "unipc3")
CONVENTION = "consistent"
END = "sigma_min"
FLOOR_SIGMA = 1e-6  # reference_ode.solve's floor; these grids end above it (at sigma(A[0]))
FLOOR_MARGIN = 10.0  # errors within this factor of the reference's estimate are left unfitted
TRANSFER_STYLE = dict(pseudo="-", classical="--", data=":")

# spacings and steps per network: an evaluation of the U-Net costs ~100x one of the MLP
FULL = dict(networks=NETWORKS, spacings=dict(ring=("logsnr", "time_uniform"), digits=("logsnr",)),
            steps=dict(ring=(10, 20, 40, 80, 160, 320, 640), digits=(10, 20, 40, 80, 160, 320)),
            fit_split=80, methods=METHODS, mlp_train_steps=4000, mlp_batch=512,
            reference_steps=2000, num_samples=32)
# a small batch: the run is compile-bound, and 3000 steps let the EMA (decay 0.999) forget the init
QUICK = dict(networks=("ring",), spacings={n: ("logsnr",) for n in NETWORKS},
             steps={n: (10, 20, 40) for n in NETWORKS}, fit_split=20,
             methods=("ddim", "pseudo-rk4", "classical-rk4"), mlp_train_steps=3000, mlp_batch=32,
             reference_steps=2000, num_samples=16)

flags.DEFINE_bool("quick", False, "The ring only, briefly trained, 3 methods (seconds; tests).")
flags.DEFINE_string("out", "experiments/results/network_order", "Output directory.")
flags.DEFINE_list("networks", list(FULL["networks"]), f"Networks, of {', '.join(NETWORKS)}.")
flags.DEFINE_list("spacings", None,
                  "Fractional grid spacings (convention `consistent`, end `sigma_min`) for every "
                  "network; default: logsnr and time_uniform for the ring, logsnr for the digits.")
flags.DEFINE_list("methods", list(METHODS), "Deterministic method names.")
flags.DEFINE_list("steps", None, "Step counts S for every network; default: 10, 20, ..., 640 "
                  "for the ring, 10, ..., 320 for the digits.")
flags.DEFINE_integer("fit_split", FULL["fit_split"],
                     "Orders are fitted over S <= this (coarse) and S >= this (fine).")
flags.DEFINE_integer("num_samples", FULL["num_samples"], "Fixed x_T per network.",
                     lower_bound=1)
flags.DEFINE_integer("mlp_train_steps", FULL["mlp_train_steps"], "Training steps of the MLP.",
                     lower_bound=1)
flags.DEFINE_integer("reference_steps", FULL["reference_steps"],
                     "RK4 steps of the reference solution (its error estimate uses half).",
                     lower_bound=2)
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """A trained network as the samplers call it, the x_T its runs start from, and its story."""

  name: str
  eps_fn: Callable[[jax.Array, jax.Array], jax.Array]
  schedule: schedules.Schedule
  x_T: jax.Array  # float64
  details: str


def in_float32(eps_fn: Callable) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """eps_fn computing in float32, as the network was trained, whatever the state's dtype."""
  return lambda x, t: eps_fn(x.astype(jnp.float32), t).astype(x.dtype)


def initial_noise(num_samples: int, shape: tuple[int, ...]) -> jax.Array:
  """The fixed x_T (float64) every run on a network starts from."""
  return jax.random.normal(jax.random.key(0), (num_samples, *shape), jnp.float64)


def ring_network(num_samples: int, train_steps: int, batch_size: int) -> Network:
  """The 2-D ring's eps-MLP, trained here by the project's training step."""
  schedule = schedules.Schedule("linear")
  start = time.time()
  model, params, loss = toy_network.train_eps_mlp(toy_network.ring(dim=2), schedule,
                                                  train_steps, batch_size=batch_size)
  details = (f"`models.mlp.EpsMLP` ({model.features} features, {model.num_blocks} blocks) "
             f"trained here for {train_steps} steps (batch {batch_size}, EMA weights) on the "
             f"2-D ring of `experiments.toy_network`, `{schedule.name}` schedule, "
             f"{time.time() - start:.0f} s; final training loss {loss:.4f} (mean over the last "
             f"training call, up to 500 steps)")
  eps_fn = in_float32(models.eps_fn(model, params))
  return Network("ring", eps_fn, schedule, initial_noise(num_samples, (2,)), details)


def digits_network(num_samples: int) -> Network:
  """The shipped digits U-Net, loaded as `quality_vs_steps` loads it."""
  config = digits_pndm.get_config()
  spec = sampler_spec.from_config(config)
  model = eps_models.load(config, spec, workdir="")
  schedule = spec.discretization.schedule
  details = (f"the shipped U-Net of `configs/digits_pndm.py` (weights "
             f"`{os.path.relpath(model.source)}`, 8x8x1 images), `{schedule.name}` schedule")
  eps_fn = in_float32(lambda x, t: model.apply(model.params, x, t))
  return Network("digits", eps_fn, schedule, initial_noise(num_samples, model.image_shape),
                 details)


def distance(a: jax.Array, b: jax.Array) -> np.ndarray:
  """|a - b| per sample, over the flattened sample."""
  diff = np.asarray(a - b).reshape(a.shape[0], -1)
  return np.linalg.norm(diff, axis=-1)


class Runner:
  """Runs methods on one network; caches its reference solutions by the grid's ends."""

  def __init__(self, network: Network, reference_steps: int):
    self.network = network
    self.reference_steps = reference_steps
    self._reference: dict[tuple[float, float], tuple[jax.Array, float]] = {}

  def reference(self, d: schedules.Discretization) -> tuple[jax.Array, float]:
    """(x at the grid's end on the network's ODE, the median error estimate of it: the distance
    to the solution with half the steps)."""
    ends = analytic.ode_endpoints(d)
    if ends not in self._reference:
      net = self.network
      eps_y = reference_ode.timestep_eps_y(net.eps_fn, net.schedule)
      solve = jax.jit(reference_ode.solve, static_argnums=(0, 2, 3, 4, 5))
      fine, coarse = (solve(eps_y, net.x_T, *ends, FLOOR_SIGMA, n)
                      for n in (self.reference_steps, self.reference_steps // 2))
      self._reference[ends] = fine, float(np.median(distance(fine, coarse)))
    return self._reference[ends]

  def errors(self, method: samplers.Deterministic, d: schedules.Discretization
             ) -> tuple[int, float, float]:
    """(NFE, median, mean error of x0 over the samples); a ValueError if the method refuses."""
    nfe = method.num_evals(d)
    x0 = jax.jit(samplers.sample_deterministic, static_argnums=(0, 2, 3))(
        self.network.eps_fn, self.network.x_T, method, d)
    err = distance(x0, self.reference(d)[0])
    return nfe, float(np.median(err)), float(np.mean(err))


def fit_windows(steps, split: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The coarse and the fine step counts the orders are fitted over."""
  return tuple(s for s in steps if s <= split), tuple(s for s in steps if s >= split)


def window_names(split: int) -> tuple[str, str]:
  return f"S <= {split}", f"S >= {split}"


def window_order(results: dict[int, tuple], window: tuple[int, ...], floor: float) -> float:
  """fitted_order over the window's points above the floor (nan: fewer than two)."""
  kept = tuple(s for s in window if s in results and results[s][1] >= FLOOR_MARGIN * floor)
  if len(kept) < 2:
    return math.nan
  return fitted_order(list(results), [r[1] for r in results.values()], kept)


def run_network(runner: Runner, grid: dict, rows: list[dict], refused: list[str]) -> None:
  """Every method at every spacing and S on one network; appends to rows and refused."""
  net = runner.network
  steps = grid["steps"][net.name]
  windows = fit_windows(steps, grid["fit_split"])
  start = time.time()
  for spacing in grid["spacings"][net.name]:
    grids = {s: schedules.Discretization(net.schedule, s, spacing, CONVENTION, end=END)
             for s in steps}
    _, floor = runner.reference(grids[steps[0]])
    for name in grid["methods"]:
      method = samplers.get_method(name)
      results = {}
      for s, d in grids.items():
        try:
          results[s] = runner.errors(method, d)
        except ValueError as e:
          refused.append(f"{net.name} {spacing} {name} S={s}: {e}")
      orders = [window_order(results, w, floor) for w in windows]
      for s, (nfe, med, mean) in results.items():
        rows.append(dict(network=net.name, spacing=spacing, method=name, label=label(name),
                         transfer=transfer(name), steps=s, nfe=nfe, median_error=med,
                         mean_error=mean, reference_error=floor,
                         at_floor=med < FLOOR_MARGIN * floor, order_coarse=orders[0],
                         order_fine=orders[1]))
    print(f"{net.name} {spacing}: {len(grid['methods'])} methods, {time.time() - start:.0f} s",
          flush=True)


def fmt_order(order: float) -> str:
  return "-" if math.isnan(order) else f"{order:.2f}"


def write_orders(path: str, grid: dict, networks: list[Network], rows: list[dict],
                 refused: list[str]) -> None:
  """orders.md: per network, its details, the reference check and per spacing a table of
  fitted orders and median errors."""
  windows = window_names(grid["fit_split"])
  reference_steps = grid["reference_steps"]
  body = (f"Per trained network and grid (spacing under the `{CONVENTION}` convention, `end="
          f"{END}`: the S steps run from t = N-1 to t = 0, the same ends for every S): the "
          f"median over {grid['num_samples']} fixed x_T of |x0 - x0*| (over the flattened "
          f"sample), x0* the network's own ODE solved with {reference_steps} RK4 steps in log "
          f"sigma (`reference_ode`), and its slope against log S fitted over {windows[0]} and "
          f"{windows[1]}. Sampler state and reference in float64, networks in float32: float32 "
          f"rounding of eps sets an error floor. The reference's error estimate is its distance "
          f"to the solution with {reference_steps // 2} steps (which bounds its own error and "
          f"shows the floor); points within {FLOOR_MARGIN:g}x of it (marked `*`) are left out of "
          f"the fits, and an order `-` means fewer than two points were left.\n")
  for net in networks:
    mine = [r for r in rows if r["network"] == net.name]
    floor = mine[0]["reference_error"]
    best = min(mine, key=lambda r: r["median_error"])
    body += (f"\n**{net.name}**: {net.details}.\n\nReference error estimate "
             f"{floor:.1e}; the smallest method error is {best['median_error']:.1e} "
             f"({best['label']}, {best['spacing']}, S={best['steps']}), "
             f"{best['median_error'] / floor:.0f}x above it.\n")
    steps = grid["steps"][net.name]
    for spacing in grid["spacings"][net.name]:
      cells = {(r["method"], r["steps"]): r for r in mine if r["spacing"] == spacing}
      header = ["method", "transfer", *(f"order {w}" for w in windows),
                *(f"S={s}" for s in steps)]
      table = []
      for name in grid["methods"]:
        first = next((r for (m, _), r in cells.items() if m == name), None)
        if first is None:
          continue
        errors = [cells.get((name, s)) for s in steps]
        table.append([label(name), first["transfer"], fmt_order(first["order_coarse"]),
                      fmt_order(first["order_fine"]),
                      *("-" if r is None else f"{r['median_error']:.1e}"
                        + ("*" if r["at_floor"] else "") for r in errors)])
      body += (f"\n{net.name}, `{spacing}` (fitted order; median error at each S):\n\n"
               + report.markdown_table(header, table) + "\n")
  if refused:
    body += "\nRefused (not run):\n\n" + "\n".join(f"- {line}" for line in refused) + "\n"
  report.write_markdown(path, "Convergence order on trained networks (vs the network's own ODE)",
                        body)


def plot(path: str, grid: dict, networks: list[Network], rows: list[dict]) -> None:
  """Median error vs NFE per network and spacing, one line per method (style: its transfer),
  with the reference's error estimate."""
  panels = [(n.name, s) for n in networks for s in grid["spacings"][n.name]]
  labels = list(dict.fromkeys(label(m) for m in grid["methods"]))
  color = colors(labels)
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
  handles = {}
  for ax, (net, spacing) in zip(axes.flat, panels):
    mine = [r for r in rows if (r["network"], r["spacing"]) == (net, spacing)]
    for name in grid["methods"]:
      pts = sorted((r["nfe"], r["median_error"]) for r in mine if r["method"] == name)
      if pts:
        lab = label(name)
        (line,) = ax.loglog(*zip(*pts), TRANSFER_STYLE[transfer(name)], marker="o", ms=2.5,
                            lw=1.2, color=color[lab], label=lab)
        handles.setdefault(lab, line)
    if mine:
      line = ax.axhline(mine[0]["reference_error"], color="gray", lw=0.8, ls="-.")
      handles.setdefault("reference error estimate", line)
    ax.set_title(f"{net}, {spacing} ({CONVENTION}, end {END})", fontsize=10)
    ax.set_xlabel("NFE")
    ax.set_ylabel("median |x0 - x0*|")
  fig.legend(list(handles.values()), list(handles), loc="upper center",
             ncol=min(len(handles), 7), fontsize=8,
             title="solid: pseudo transfer; dashed: classical; dotted: data prediction",
             title_fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 0.82))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(grid: dict, out_dir: str) -> list[dict]:
  """Builds the networks, runs the grid, writes errors.csv, orders.md and error_vs_nfe.png."""
  builders = dict(
      ring=lambda: ring_network(grid["num_samples"], grid["mlp_train_steps"], grid["mlp_batch"]),
      digits=lambda: digits_network(grid["num_samples"]))
  rows, refused, networks = [], [], []
  for name in grid["networks"]:
    networks.append(builders[name]())
    run_network(Runner(networks[-1], grid["reference_steps"]), grid, rows, refused)
  os.makedirs(out_dir, exist_ok=True)
  report.write_csv(os.path.join(out_dir, "errors.csv"), rows)
  write_orders(os.path.join(out_dir, "orders.md"), grid, networks, rows, refused)
  plot(os.path.join(out_dir, "error_vs_nfe.png"), grid, networks, rows)
  return rows


def main(argv):
  del argv
  grid = dict(QUICK if FLAGS.quick else FULL)
  for name in ("networks", "methods", "fit_split", "num_samples", "mlp_train_steps",
               "reference_steps"):
    if not FLAGS.quick or FLAGS[name].present:
      grid[name] = getattr(FLAGS, name)
  if FLAGS.spacings:
    grid["spacings"] = {n: tuple(FLAGS.spacings) for n in NETWORKS}
    for spacing in FLAGS.spacings:
      if spacing not in schedules.CONTINUOUS_SPACINGS:
        raise app.UsageError(f"--spacings: {spacing!r} is not one of the fractional spacings "
                             f"{', '.join(schedules.CONTINUOUS_SPACINGS)} (end {END!r} needs one)")
  if FLAGS.steps:
    if not all(s.isdigit() and int(s) > 0 for s in FLAGS.steps):
      raise app.UsageError(f"--steps={','.join(FLAGS.steps)}: give positive integers, "
                           f"comma-separated")
    grid["steps"] = {n: tuple(sorted({int(s) for s in FLAGS.steps})) for n in NETWORKS}
  for name in grid["networks"]:
    if name not in NETWORKS:
      raise app.UsageError(f"--networks: {name!r} is not one of {', '.join(NETWORKS)}")
  for name in grid["methods"]:
    try:
      deterministic = isinstance(samplers.get_method(name), samplers.Deterministic)
    except ValueError as e:
      raise app.UsageError(f"--methods: {e}") from None
    if not deterministic:
      raise app.UsageError(f"--methods: {name!r} is not a deterministic method")
  start = time.time()
  rows = run(grid, FLAGS.out)
  for r in rows:
    if r["steps"] == grid["steps"][r["network"]][-1]:
      print(r["network"], r["spacing"], r["method"], f"order {fmt_order(r['order_coarse'])} / "
            f"{fmt_order(r['order_fine'])}, error at S={r['steps']}: {r['median_error']:.1e}")
  print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
