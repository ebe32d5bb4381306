"""Sample quality vs NFE for a trained model (default: the shipped digits model).

For the paper's methods (ddim, s-pndm, f-pndm, fon) and the fast samplers they
are compared with (pndm-v, pndm-v-ramp, ipndm, plms, deis3, dpm++2m, dpm++3m,
unipc3, edm-heun) at NFE budgets {5, 6, 8, 10, 15, 20, 50}, plus pf, 50-step
F-PNDM and 1000-step ddpm / ddim, generates images with `main.py`'s sampling
code and scores them: FD-digits (Frechet distance of the project's
digits-classifier features to the digits data; *not* FID) for the digits model,
or FID when `--inception_weights` and `--stats` are given. At each budget a
method runs the largest step count whose NFE is at most the budget (the NFE
used is recorded; a method whose fewest evaluations exceed the budget is
skipped there), on one grid for all: `--spacing` (default `logsnr`) under the
`consistent` convention, which every method accepts. The references run on the
training grid (`uniform`, `consistent`: at S = 1000 every training timestep, so
1000-step DDPM is DDPM as trained; pf adapts its own steps). Tests the paper's
claim that 50-step F-PNDM matches or beats 1000-step DDIM (both on that grid).

  python -m experiments.quality_vs_steps                 # digits model, ~15 min on 2 CPU cores
  python -m experiments.quality_vs_steps --quick         # seconds; what the tests run (the
                                                         # paper's 4 methods, 10 steps, the
                                                         # config's grid)
  python -m experiments.quality_vs_steps --config=configs/cifar10_pndm.py \\
      --config.sampler.checkpoint=CKPT --inception_weights=PTH --stats=STATS.npz
"""

from __future__ import annotations

import os

import matplotlib
from absl import app, flags
from ml_collections import config_flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import report  # noqa: E402
from pndm_jax import eps_models, generation, input_pipeline, sampler_spec  # noqa: E402
from pndm_jax.evaluation import digits_classifier, fid  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/digits_pndm.py", "Model/sampler config.")
flags.DEFINE_string("workdir", "runs/quality_vs_steps", "Where samples and scores go.")
flags.DEFINE_string("out", "experiments/results/quality_vs_steps", "Output directory.")
flags.DEFINE_integer("num_samples", 500, "Images per setting.")
flags.DEFINE_string("inception_weights", "", "pytorch-fid Inception weights: report FID.")
flags.DEFINE_string("stats", "", "Reference statistics .npz (default for digits: made here).")
flags.DEFINE_string("spacing", "logsnr", "The grid every method runs on (convention "
                    "`consistent`).")
flags.DEFINE_list("methods", None, "Methods to run at the NFE budgets (default: METHODS).")
flags.DEFINE_bool("quick", False, "The paper's methods at one step count, few images (tests).")
FLAGS = flags.FLAGS

BUDGETS = (5, 6, 8, 10, 15, 20, 50)
FIXED_STEP_METHODS = ("ddim", "s-pndm", "f-pndm", "fon")
METHODS = FIXED_STEP_METHODS + ("plms", "pndm-v", "pndm-v-ramp", "ipndm", "deis3", "dpm++2m",
                                "dpm++3m", "unipc3", "edm-heun")
PSEUDO = ("pndm-v", "pndm-v-ramp", "f-pndm", "s-pndm", "ipndm", "deis1", "deis2", "deis3", "plms")
DATA_PREDICTION = ("dpm++2m", "dpm++3m", "dpm++2s", "unipc2", "unipc3", "unipc2-bh1", "unipc3-bh1")
QUICK_STEPS = 10
# (method, steps): the references, on REFERENCE_SPACING (the claim's 50-step F-PNDM too)
REFERENCES = (("f-pndm", 50), ("pf", 0), ("ddim", 1000), ("ddpm", 1000))
REFERENCE_SPACING = "uniform"
CONVENTION = "consistent"


def run_config(config, method: str, steps: int, spacing: str, convention: str,
               num_samples: int):
  """`config` with the sampler settings of one run."""
  run = config.copy_and_resolve_references()
  run.unlock()
  run.sampler.update(method=method, num_steps=max(steps, 1), spacing=spacing,
                     convention=convention, num_samples=num_samples, chunk_size=num_samples,
                     batch_size=min(num_samples, 500))
  return run


def steps_for_budget(config, method: str, budget: int, spacing: str) -> tuple[int, int] | str:
  """(S, NFE) with the largest S whose NFE is at most `budget`, else why there is none."""
  return report.steps_for_budget(
      lambda s: sampler_spec.from_config(run_config(config, method, s, spacing, CONVENTION,
                                                    1)).nfe, budget)


def plan(config, quick: bool, spacing: str, methods) -> tuple[list[dict], list[dict]]:
  """The runs ({method, steps, spacing, index, role, budgets}) and the skipped (method, budget)s.

  role: `budget` (the step count picked for the budgets listed), `reference`, or `steps` (quick:
  a fixed step count).
  """
  if quick:
    convention = config.sampler.convention
    return [dict(method=m, steps=QUICK_STEPS, spacing=config.sampler.spacing, index=convention,
                 role="steps", budgets="") for m in FIXED_STEP_METHODS], []
  runs, skipped = {}, []
  for method in methods:
    for budget in BUDGETS:
      pick = steps_for_budget(config, method, budget, spacing)
      if isinstance(pick, str):
        skipped.append(dict(method=method, budget=budget, reason=pick))
        continue
      run = runs.setdefault((method, pick[0]), dict(method=method, steps=pick[0], spacing=spacing,
                                                    index=CONVENTION, role="budget", budgets=[]))
      run["budgets"].append(budget)
  for run in runs.values():
    run["budgets"] = ";".join(map(str, run["budgets"]))
  for method, steps in REFERENCES:
    runs[(method, steps, "reference")] = dict(method=method, steps=steps,
                                              spacing=REFERENCE_SPACING, index=CONVENTION,
                                              role="reference", budgets="")
  return list(runs.values()), skipped


def reference_stats(metric: str, weights: str, workdir: str) -> str:
  """The statistics file to compare with: --stats, or the digits data's FD-digits stats."""
  if FLAGS.stats:
    return FLAGS.stats
  if metric != "fd_digits":
    raise ValueError("--inception_weights needs --stats (the dataset's FID statistics .npz, "
                     "e.g. from main.py --mode=stats)")
  path = os.path.join(workdir, "digits_fd_stats.npz")
  if not os.path.exists(path):
    images, _ = input_pipeline.digits_with_labels()
    feature_fn = fid.feature_fn_for(metric, weights, batch_size=512)
    fid.save_stats(path, *fid.compute_stats_from_images(images, feature_fn))
  return path


def family(method: str) -> str:
  return "pseudo" if method in PSEUDO else "data" if method in DATA_PREDICTION else "other"


def write_plot(path: str, rows: list[dict], metric: str, methods) -> None:
  fig, ax = plt.subplots(figsize=(8, 5))
  colors = [plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
  style = dict(pseudo="-", data="--", other=":")
  for color, method in zip(colors, methods):
    mine = sorted((r["nfe"], r[metric]) for r in rows
                  if r["method"] == method and r["role"] != "reference")
    if mine:
      ax.plot(*zip(*mine), style[family(method)], marker="o", ms=3, color=color, label=method)
  refs = [r for r in rows if r["role"] == "reference"]
  for r, marker in zip(refs, "*Ddsv^<>"):
    ax.scatter([r["nfe"]], [r[metric]], marker=marker, s=70, color="black", zorder=3,
               label=f"{r['method']} {r['steps'] or 'adaptive'} ({r['spacing']})")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("NFE per image")
  ax.set_ylabel("FD-digits (not FID)" if metric == "fd_digits" else "FID")
  ax.set_title("solid: pseudo (PNDM family, DEIS); dashed: data prediction; dotted: other",
               fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_table(rows, skipped, metric, methods, num_samples, spacing, quick) -> str:
  if quick:
    return report.markdown_table(["method", "steps", "index", "NFE", metric],
                                 [[r["method"], r["steps"], r["index"], r["nfe"], r[metric]]
                                  for r in rows])
  cell = {}
  for r in rows:
    for b in filter(None, str(r["budgets"]).split(";")):
      cell[(r["method"], int(b))] = r
  best = {b: min((cell[(m, b)][metric] for m in methods if (m, b) in cell), default=None)
          for b in BUDGETS}

  def fmt(method, budget):
    r = cell.get((method, budget))
    if r is None:
      return "-"
    text = f"{r[metric]:.3g}" + (f" ({r['nfe']})" if r["nfe"] != budget else "")
    return f"**{text}**" if r[metric] == best[budget] else text

  budgets = report.markdown_table(
      ["method"] + [f"{b} NFE" for b in BUDGETS],
      [[m] + [fmt(m, b) for b in BUDGETS] for m in methods])
  refs = report.markdown_table(
      ["method", "steps", "grid", "NFE", metric],
      [[r["method"], r["steps"] or "adaptive", f"{r['spacing']}, {r['index']}", r["nfe"],
        r[metric]] for r in rows if r["role"] == "reference"])
  return (f"{num_samples} images per setting; every run on the `{spacing}` grid under the "
          f"`{CONVENTION}` convention. At each budget a method runs the largest step count with "
          f"at most that many evaluations (the NFE used in parentheses where it is lower; `-`: "
          f"it needs more); **bold**: the best at that budget.\n\n{budgets}\n\n"
          f"References (pf adapts its own steps):\n\n{refs}")


def main(argv):
  del argv
  config = FLAGS.config
  num_samples = 200 if FLAGS.quick else FLAGS.num_samples
  methods = tuple(FLAGS.methods or METHODS)
  metric = "fid" if FLAGS.inception_weights else "fd_digits"
  weights = FLAGS.inception_weights or config.eval.digits_classifier
  if metric == "fd_digits":
    digits_classifier.load_or_train_digits_classifier(weights)  # trained once, then shipped
  stats = reference_stats(metric, weights, FLAGS.workdir)
  model = eps_models.load(config, sampler_spec.from_config(config), FLAGS.workdir)
  runs, skipped = plan(config, FLAGS.quick, FLAGS.spacing, methods)
  for s in skipped:
    print(f"skipped {s['method']} at {s['budget']} NFE: {s['reason']}")

  rows = []
  for run in runs:
    run_cfg = run_config(config, run["method"], run["steps"], run["spacing"], run["index"],
                         num_samples)
    sample_dir = os.path.join(FLAGS.workdir, f"{run['method']}_{run['steps']}_{run['spacing']}_"
                                             f"{run['index']}")
    summary = generation.generate_samples(model, sampler_spec.from_config(run_cfg), sample_dir)
    record = fid.evaluate_sample_dir(sample_dir, stats, weights,
                                     os.path.join(sample_dir, f"{metric}.json"),
                                     metric=metric)
    rows.append(dict(method=run["method"], steps=run["steps"] or "adaptive",
                     index=run["index"], spacing=run["spacing"], role=run["role"],
                     budgets=run["budgets"],
                     nfe=summary["nfe_per_image"], **{metric: record[metric]},
                     num_images=record["num_images"]))
    print(rows[-1], flush=True)

  os.makedirs(FLAGS.out, exist_ok=True)
  report.write_csv(os.path.join(FLAGS.out, "quality.csv"), rows)
  if skipped:
    report.write_csv(os.path.join(FLAGS.out, "skipped.csv"), skipped)
  write_plot(os.path.join(FLAGS.out, "quality_vs_nfe.png"),
             [dict(r, steps=0 if r["steps"] == "adaptive" else r["steps"]) for r in rows],
             metric, FIXED_STEP_METHODS if FLAGS.quick else methods)

  score = {(r["method"], r["steps"]): r[metric] for r in rows
           if r["role"] == ("steps" if FLAGS.quick else "reference")}
  claim = ""
  if ("f-pndm", 50) in score and ("ddim", 1000) in score:
    verdict = "holds" if score[("f-pndm", 50)] <= score[("ddim", 1000)] else "does not hold"
    claim = (f"\n\nClaim '50-step F-PNDM matches or beats 1000-step DDIM': {verdict} here "
             f"({score[('f-pndm', 50)]:.3g} vs {score[('ddim', 1000)]:.3g}).")
  name = "FD-digits (lower is better; not FID)" if metric == "fd_digits" else "FID"
  report.write_markdown(
      os.path.join(FLAGS.out, "quality.md"), f"{name} vs NFE",
      write_table(rows, skipped, metric, methods, num_samples, FLAGS.spacing, FLAGS.quick)
      + claim)


if __name__ == "__main__":
  app.run(main)
