"""Convergence order and error vs NFE of every deterministic method on models with exact eps.

For each analytic model (an 8-d Gaussian, whose ODE solution is closed-form, and
an 8-d Gaussian mixture, against a fine RK4 reference), schedule and grid
(spacing `uniform`, the paper's skip grid, under the `paper` convention for the
paper's ablation space and under `consistent` for every method; the fractional
spacings, e.g. `logsnr`, under `consistent`), runs each method in float64 and
measures the error of x0 against the reference (median and mean over samples:
a mixture can flip a few samples between modes, which the median ignores):

- at step counts S in {20, 50, 100, 200}, where the order is fitted as the slope
  of log median error vs log S;
- at NFE budgets {5, 6, 8, 10, 15, 20, 50}: the largest S whose `num_evals` is at
  most the budget (the NFE actually used is recorded; a method that needs more
  evaluations than the budget is skipped there), since error vs NFE is the
  honest axis for methods with different evaluations per step.

A method that refuses a setting (a ValueError) is recorded in skipped.csv with
the reason, as is every budget a method cannot meet. Writes errors.csv (every run),
error_at_budget.csv, skipped.csv, orders.md (the fitted orders), at_10_nfe.md
(errors at 10 NFE and the targets) and error_vs_nfe.png.

  python -m experiments.convergence_order            # full grid, ~11 min on 2 CPU cores
  python -m experiments.convergence_order --quick    # seconds; what the tests run
  python -m experiments.convergence_order --spacings=logsnr,karras --methods=pndm-v,dpm++3m
"""

from __future__ import annotations

import csv
import math
import os
import time

import jax

jax.config.update("jax_enable_x64", True)
# Every (method, grid) pair is its own small program (a few microseconds of work on 64 x 8
# samples), so the runs are compile-bound; XLA's optimizations cost more than they save here
# (~35% of the wall time) and change the results by float64 rounding only.
jax.config.update("jax_disable_most_optimizations", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import report  # noqa: E402
from experiments.method_families import (  # noqa: E402
  DATA_PREDICTION,
  PSEUDO,
  colors,
  family,
  fitted_order,
  label,
)
from pndm_jax import analytic, samplers, schedules  # noqa: E402

# the paper's ablation space: transfer x gradient part (x warm-up), and variable-step PLMS (the
# data transfer is covered by the DPM-Solver++ / UniPC presets)
ABLATIONS = tuple(f"{tr}-{g}" for tr in ("pseudo", "classical")
                  for g in ("euler", "heun", "rk4", "lms2-heun", "lms3-rk4", "lms4-rk4",
                            "lms4-ramp")) + ("pseudo-vlms3-rk4", "pseudo-vlms4-rk4")
_ABLATION_VALUES = [samplers.get_method(name) for name in ABLATIONS]
# every deterministic preset the ablation names do not already stand for
PRESET_METHODS = tuple(name for name, value in samplers.PRESETS.items()
                       if isinstance(value, samplers.Deterministic)
                       and value not in _ABLATION_VALUES)
DEFAULT_METHODS = ABLATIONS + PRESET_METHODS
BASELINES = DATA_PREDICTION + ("deis1", "deis2", "deis3")  # DPM-Solver++, UniPC, DEIS
BUDGETS = (5, 6, 8, 10, 15, 20, 50)
REPORT_BUDGET = 10
TARGET_ORDER = 2.5

flags.DEFINE_bool("quick", False, "A small grid that runs in seconds (for tests).")
flags.DEFINE_string("out", "experiments/results/convergence_order", "Output directory.")
flags.DEFINE_integer("num_samples", 64, "Samples per setting (errors are over these).")
flags.DEFINE_list("spacings", ["uniform", "logsnr"],
                  "Grid spacings: `uniform` (the skip grid) runs under the `paper` convention "
                  "(the paper's methods) and `consistent` (all); the fractional spacings under "
                  "`consistent`. --quick uses `uniform` unless this is given.")
flags.DEFINE_list("methods", list(DEFAULT_METHODS),
                  "Method names (presets or TRANSFER-GRADIENT[-WARMUP]); default: the paper's "
                  "ablation space and every deterministic preset. --quick uses a few unless "
                  "this is given.")
FLAGS = flags.FLAGS

FULL = dict(models=("gaussian", "mixture"), schedules=("linear", "cosine"),
            spacings=("uniform", "logsnr"), paper=True, fit=(20, 50, 100, 200), budgets=BUDGETS,
            methods=DEFAULT_METHODS)
QUICK = dict(models=("gaussian",), schedules=("linear",), spacings=("uniform",), paper=False,
             fit=(10, 20, 40), budgets=(REPORT_BUDGET, 20),
             methods=("pseudo-euler", "pseudo-lms2-heun", "pseudo-lms4-rk4", "classical-lms4-rk4",
                      "pndm-v", "dpm++2m"))


def under_paper(name: str) -> bool:
  """Whether `name` is in the paper's ablation space, which also runs under `paper`."""
  return samplers.get_method(name) in _ABLATION_VALUES


def make_model(name: str) -> analytic.GaussianMixture:
  return analytic.gaussian(dim=8) if name == "gaussian" else analytic.gaussian_mixture(dim=8)


def settings_of(grid: dict) -> list[tuple[str, str, str, str]]:
  """(model, schedule, spacing, convention) of every setting the grid runs."""
  out = []
  for model in grid["models"]:
    for sched in grid["schedules"]:
      for spacing in grid["spacings"]:
        if spacing == "uniform" and grid["paper"]:
          out.append((model, sched, spacing, "paper"))
        out.append((model, sched, spacing, "consistent"))
  return out


def column(setting) -> str:
  """A setting's grid as a table column: the spacing, and `paper` where that is the convention."""
  _, _, spacing, convention = setting
  return f"{spacing}/paper" if convention == "paper" else spacing


class Runner:
  """Runs methods on one model and caches grids and reference solutions across methods."""

  def __init__(self, model_name: str, num_samples: int):
    self.model_name = model_name
    self.model = make_model(model_name)
    self.x_T = jax.random.normal(jax.random.key(0), (num_samples, 8), jnp.float64)
    self._truth: dict[tuple[float, float], jax.Array] = {}

  def truth(self, d: schedules.Discretization) -> jax.Array:
    ends = analytic.ode_endpoints(d)
    if ends not in self._truth:
      solve = (self.model.exact_solution if self.model_name == "gaussian"
               else self.model.reference_solution)
      self._truth[ends] = solve(self.x_T, *ends)
    return self._truth[ends]

  def errors(self, method: samplers.Deterministic, d: schedules.Discretization
             ) -> tuple[int, float, float]:
    """(NFE, median, mean error norm of x0 over the batch)."""
    nfe = method.num_evals(d)  # raises a ValueError for too few steps
    x0 = jax.jit(samplers.sample_deterministic, static_argnums=(0, 2, 3))(
        self.model.eps_fn(d.alpha_bar), self.x_T, method, d)
    err = np.asarray(jnp.linalg.norm(x0 - self.truth(d), axis=-1))
    return nfe, float(np.median(err)), float(np.mean(err))


def steps_for_budget(method, sched, spacing, convention, budget) -> tuple[int, int] | str:
  """(S, NFE) with the largest S whose NFE is at most `budget`, else why there is none."""
  return report.steps_for_budget(
      lambda s: method.num_evals(schedules.Discretization(sched, s, spacing, convention)), budget)


def run_setting(runner: Runner, setting, method_names, grid, rows, budget_rows, skipped):
  """Every method on one setting; appends to the row lists; returns {method: order}."""
  model_name, sched_name, spacing, convention = setting
  sched = schedules.Schedule(sched_name)
  key = dict(model=model_name, schedule=sched_name, spacing=spacing, index=convention)
  orders = {}
  for name in method_names:
    method = samplers.get_method(name)
    meta = dict(key, method=name, label=label(name), family=family(name))
    picks = {}
    for budget in grid["budgets"]:
      pick = steps_for_budget(method, sched, spacing, convention, budget)
      if isinstance(pick, str):
        skipped.append(dict(meta, what=f"budget {budget}", reason=pick))
      else:
        picks[budget] = pick[0]
    results = {}
    for s in sorted(set(grid["fit"]) | set(picks.values())):
      try:
        d = schedules.Discretization(sched, s, spacing, convention)
        results[s] = runner.errors(method, d)
      except ValueError as e:
        skipped.append(dict(meta, what=f"S={s}", reason=str(e)))
    order = fitted_order(list(results), [r[1] for r in results.values()], grid["fit"])
    if results:
      orders[name] = order
    for s, (nfe, med, mean) in results.items():
      budgets = ";".join(str(b) for b, sb in picks.items() if sb == s)
      rows.append(dict(meta, steps=s, nfe=nfe, budgets=budgets, median_error=med,
                       mean_error=mean, fitted_order=order))
    for budget, s in picks.items():
      if s in results:
        nfe, med, mean = results[s]
        budget_rows.append(dict(meta, budget=budget, steps=s, nfe=nfe, median_error=med,
                                mean_error=mean))
    # each run is its own executable, mapped into memory until the cache lets it go: thousands
    # of them exhaust the process's memory maps (vm.max_map_count), so drop them per method
    jax.clear_caches()
  return orders


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
  """report.write_csv, but an empty list still gets its header."""
  if rows:
    report.write_csv(path, rows)
    return
  with open(path, "w", newline="") as f:
    csv.DictWriter(f, fieldnames=fields).writeheader()


def plot(path: str, settings, rows, method_names) -> None:
  """Median error vs NFE per setting (presets only; the ablation names are in errors.csv)."""
  shown = [n for n in method_names if label(n) in samplers.PRESETS]
  labels = list(dict.fromkeys(label(n) for n in shown))
  color = colors(labels)
  style = dict(pseudo="-", data="--", other=":")
  ncols = min(3, len(settings))
  nrows = math.ceil(len(settings) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows + 1), squeeze=False)
  handles = {}
  for ax, setting in zip(axes.flat, settings):
    mine = [r for r in rows if (r["model"], r["schedule"], r["spacing"], r["index"]) == setting]
    for name in shown:
      pts = sorted((r["nfe"], r["median_error"]) for r in mine if r["method"] == name)
      if pts:
        lab = label(name)
        (line,) = ax.loglog(*zip(*pts), style[family(name)], marker="o", ms=2.5, lw=1.2,
                            color=color[lab], label=lab)
        handles.setdefault(lab, line)
    ax.axvline(REPORT_BUDGET, color="gray", lw=0.6, ls=":")
    ax.set_title(f"{setting[0]}, {setting[1]}, {column(setting)}"
                 + ("" if setting[3] == "paper" else " (consistent)"), fontsize=10)
    ax.set_xlabel("NFE")
    ax.set_ylabel("median |x0 - x0*|")
  for ax in axes.flat[len(settings):]:
    ax.axis("off")
  fig.legend(list(handles.values()), list(handles), loc="upper center",
             ncol=min(len(handles), 10), fontsize=8,
             title="solid: pseudo (PNDM family, DEIS); dashed: data prediction "
                   "(DPM-Solver++, UniPC); dotted: other", title_fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / (4.2 * nrows + 1)))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def fmt_err(row: dict | None) -> str:
  if row is None:
    return "-"
  nfe = f" ({row['nfe']})" if row["nfe"] != row["budget"] else ""
  return f"{row['median_error']:.2e}{nfe}"


def best(rows: list[dict], names: tuple[str, ...]) -> dict | None:
  """The row with the smallest median error among methods whose preset name is in `names`."""
  mine = [r for r in rows if r["label"] in names]
  return min(mine, key=lambda r: r["median_error"]) if mine else None


def order_target(orders: dict, settings, methods) -> tuple[bool | None, str]:
  """A pseudo method with order >= TARGET_ORDER on the mixture under both schedules and both
  `uniform` (consistent) and `logsnr`."""
  need = [("mixture", s, sp, "consistent") for s in ("linear", "cosine")
          for sp in ("uniform", "logsnr")]
  missing = [n for n in need if n not in settings]
  name = (f"a pseudo method with order >= {TARGET_ORDER} on the mixture under both schedules "
          f"and both spacings uniform (consistent) and logsnr")
  if missing:
    lacks = ", ".join(" ".join(n[:3]) for n in missing)
    return None, f"Target '{name}': not evaluated (this run lacks {lacks})."
  worst = {}
  for m in methods:
    if family(m) == "pseudo" and all((*n, m) in orders for n in need):
      worst[label(m)] = min(orders[(*n, m)] for n in need)
  passing = sorted((v, k) for k, v in worst.items() if v >= TARGET_ORDER)[::-1]
  if passing:
    detail = ", ".join(f"{k} (lowest of the four: {v:.2f})" for v, k in passing)
    return True, f"Target '{name}': **holds**: {detail}."
  top = max(worst.items(), key=lambda kv: kv[1]) if worst else ("none", math.nan)
  return False, (f"Target '{name}': **does not hold**; the best pseudo method is {top[0]} "
                 f"(lowest of the four: {top[1]:.2f}).")


def budget_target(budget_rows, settings) -> tuple[bool | None, list[list[str]]]:
  """Per consistent setting: best pseudo vs best of DPM-Solver++/UniPC/DEIS at REPORT_BUDGET."""
  table, verdicts = [], []
  for setting in settings:
    if setting[3] != "consistent":
      continue
    mine = [r for r in budget_rows if r["budget"] == REPORT_BUDGET
            and (r["model"], r["schedule"], r["spacing"], r["index"]) == setting]
    p, b = best(mine, PSEUDO), best(mine, BASELINES)
    pndm = best(mine, tuple(n for n in PSEUDO if not n.startswith("deis")))
    data = best(mine, DATA_PREDICTION)
    holds = None if p is None or b is None else p["median_error"] <= b["median_error"]
    verdicts.append(holds)
    name = lambda r: "-" if r is None else f"{r['label']} {fmt_err(r)}"
    table.append([setting[0], setting[1], column(setting), name(p), name(b), name(pndm),
                  name(data), {True: "yes", False: "**no**", None: "n/a"}[holds]])
  known = [v for v in verdicts if v is not None]
  return (all(known) if known else None), table


def write_reports(out_dir, grid, settings, orders, budget_rows, num_samples, methods):
  """orders.md (fitted orders) and at_10_nfe.md (errors at REPORT_BUDGET NFE, targets)."""
  fit = ", ".join(str(s) for s in grid["fit"])
  labels = [label(m) for m in methods]
  body = (f"Slope of log median error vs log S over S in {{{fit}}}, per model, schedule and "
          f"grid (`uniform` = the paper's skip grid, under the `consistent` convention unless "
          f"marked `/paper`; `logsnr` under `consistent`; grids end at sigma = 0); float64, "
          f"exact eps, {num_samples} samples; blank: not run, `-`: refused (skipped.csv).\n")
  for model in grid["models"]:
    cols = [s for s in settings if s[0] == model]
    header = ["method"] + [f"{s[1]} {column(s)}" for s in cols]
    fmt = lambda s, m: ("" if s[3] == "paper" and not under_paper(m) else
                        "-" if math.isnan(orders.get((*s, m), math.nan)) else
                        f"{orders[(*s, m)]:.2f}")
    table = [[lab] + [fmt(s, m) for s in cols] for m, lab in zip(methods, labels)]
    body += f"\n{model}:\n\n" + report.markdown_table(header, table) + "\n"
  holds1, text1 = order_target(orders, settings, methods)
  report.write_markdown(os.path.join(out_dir, "orders.md"),
                        "Fitted convergence order (median error)", body + "\n" + text1)

  body = (f"Median error of x0 at a budget of {REPORT_BUDGET} NFE (the largest S with at most "
          f"{REPORT_BUDGET} evaluations; the NFE actually used in parentheses where it is "
          f"lower); `-`: needs more evaluations or refused (skipped.csv). **Bold**: the best "
          f"pseudo method ({', '.join(PSEUDO)}); *italic*: the best of DPM-Solver++/UniPC/DEIS "
          f"({', '.join(BASELINES)}); DEIS counts as both.\n")
  for model in grid["models"]:
    cols = [s for s in settings if s[0] == model]
    cell = {}
    for s in cols:
      mine = {r["method"]: r for r in budget_rows if r["budget"] == REPORT_BUDGET and
              (r["model"], r["schedule"], r["spacing"], r["index"]) == s}
      p, b = best(list(mine.values()), PSEUDO), best(list(mine.values()), BASELINES)
      for m, r in mine.items():
        text = fmt_err(r)
        if r is p and r is b:
          text = f"***{text}***"
        elif r is p:
          text = f"**{text}**"
        elif r is b:
          text = f"*{text}*"
        cell[(*s, m)] = text
    header = ["method"] + [f"{s[1]} {column(s)}" for s in cols]
    table = [[lab] + [cell.get((*s, m), "" if s[3] == "paper" and not under_paper(m) else "-")
                      for s in cols] for m, lab in zip(methods, labels)]
    body += f"\n{model}:\n\n" + report.markdown_table(header, table) + "\n"
  holds2, table2 = budget_target(budget_rows, settings)
  failed = sum(row[-1] == "**no**" for row in table2)
  verdict = {True: f"**holds** (in all {len(table2)} settings)",
             False: f"**does not hold** (fails in {failed} of {len(table2)} settings)",
             None: "not evaluated (no setting ran both families)"}[holds2]
  body += (f"\nTarget 'best pseudo error at {REPORT_BUDGET} NFE <= best of DPM-Solver++/UniPC/"
           f"DEIS at {REPORT_BUDGET} NFE' (per model/schedule/spacing, `consistent`): {verdict}.\n"
           f"\n" + report.markdown_table(
               ["model", "schedule", "grid", "best pseudo", "best DPM-Solver++/UniPC/DEIS",
                "best PNDM family (no DEIS)", "best DPM-Solver++/UniPC", "target holds"], table2)
           + f"\n\n{text1}")
  report.write_markdown(os.path.join(out_dir, "at_10_nfe.md"),
                        f"Error at {REPORT_BUDGET} NFE and the targets", body)
  return (holds1, text1), (holds2, table2)


def run(grid: dict, num_samples: int, out_dir: str) -> dict[tuple, float]:
  """Runs the grid; writes CSVs, plot and tables; returns {(model, sched, spacing, index,
  method): order}."""
  rows, budget_rows, skipped, orders = [], [], [], {}
  settings = settings_of(grid)
  runners = {m: Runner(m, num_samples) for m in grid["models"]}
  paper_methods = [m for m in grid["methods"] if under_paper(m)]
  start = time.time()
  for setting in settings:
    methods = paper_methods if setting[3] == "paper" else grid["methods"]
    for m, order in run_setting(runners[setting[0]], setting, methods, grid, rows, budget_rows,
                                skipped).items():
      orders[(*setting, m)] = order
    print(f"{' '.join(setting)}: {len(methods)} methods, {time.time() - start:.0f} s", flush=True)
  os.makedirs(out_dir, exist_ok=True)
  report.write_csv(os.path.join(out_dir, "errors.csv"), rows)
  write_csv(os.path.join(out_dir, "error_at_budget.csv"), budget_rows,
            ["model", "schedule", "spacing", "index", "method", "label", "family", "budget",
             "steps", "nfe", "median_error", "mean_error"])
  write_csv(os.path.join(out_dir, "skipped.csv"), skipped,
            ["model", "schedule", "spacing", "index", "method", "label", "family", "what",
             "reason"])
  plot(os.path.join(out_dir, "error_vs_nfe.png"), settings, rows, grid["methods"])
  (holds1, text1), (holds2, table2) = write_reports(out_dir, grid, settings, orders,
                                                    budget_rows, num_samples, grid["methods"])
  print(text1.replace("**", ""))
  print(f"Target 'best pseudo error at {REPORT_BUDGET} NFE <= best of DPM-Solver++/UniPC/DEIS':")
  for line in table2:
    print("  " + " | ".join(line).replace("**", ""))
  return orders


def main(argv):
  del argv
  grid = dict(QUICK if FLAGS.quick else FULL)
  if not FLAGS.quick or FLAGS["spacings"].present:
    grid["spacings"] = tuple(FLAGS.spacings)
  if not FLAGS.quick or FLAGS["methods"].present:
    grid["methods"] = tuple(FLAGS.methods)
  for name in grid["methods"]:
    if not isinstance(samplers.get_method(name), samplers.Deterministic):
      raise app.UsageError(f"--methods: {name!r} is not a deterministic method")
  num_samples = 16 if FLAGS.quick else FLAGS.num_samples
  orders = run(grid, num_samples, FLAGS.out)
  for key, order in orders.items():
    print(*key, f"order {order:.2f}")


if __name__ == "__main__":
  app.run(main)
