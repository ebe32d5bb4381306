"""Sample quality vs NFE for a trained model (default: the shipped digits model), with confidence.

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
1000-step DDPM is DDPM as trained; pf adapts its own steps).

Every setting makes `--sets` x `--num_samples` images in one run, scored as `--sets` disjoint
image sets (set k: images k n .. (k + 1) n - 1), so each score comes with a 95% Student-t
confidence interval over sets. Image i's noise depends only on (seed, i), so the sets are
independent, every method starts set k from the same x_T, and differences between settings are
paired by set (docs/experiments.md §4). One run per setting compiles its sampler once. Paired
t-tests say which differences are significant at 5%, Holm-corrected within each family: the
paper's claim (50-step F-PNDM vs 1000-step DDIM, alone); the best method at one budget vs each
other one there (a family per budget); F-PNDM vs its classical counterpart FON; and every
method's change between neighbouring budgets (one family). Reruns reuse the images
(`generation.generate_samples` resumes) and the scores saved in each sample directory.

Writes quality.csv (one row per setting and set), summary.csv (mean, std, confidence interval
per setting), comparisons.csv, skipped.csv, quality.md and quality_vs_nfe.png.

  python -m experiments.quality_vs_steps                 # 5 sets x 1000 images: meant for a GPU
  python -m experiments.quality_vs_steps --methods=ddim,f-pndm,fon --budgets=10,20 \\
      --sets=3 --num_samples=300 --noreferences          # a subset, for a CPU
  python -m experiments.quality_vs_steps --quick         # seconds; what the tests run (the
                                                         # paper's 4 methods, 10 steps, the
                                                         # config's grid)
  python -m experiments.quality_vs_steps --config=configs/cifar10_pndm.py \\
      --config.sampler.checkpoint=CKPT --inception_weights=PTH --stats=STATS.npz
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy import stats as scipy_stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import report  # noqa: E402
from experiments.method_families import family  # noqa: E402
from pndm_jax import (  # noqa: E402
  eps_models,
  files,
  generation,
  input_pipeline,
  sample_store,
  sampler_spec,
)
from pndm_jax.evaluation import digits_classifier, fid  # noqa: E402

BUDGETS = (5, 6, 8, 10, 15, 20, 50)

config_flags.DEFINE_config_file("config", "configs/digits_pndm.py", "Model/sampler config.")
flags.DEFINE_string("workdir", "runs/quality_vs_steps", "Where samples and scores go.")
flags.DEFINE_string("out", "experiments/results/quality_vs_steps", "Output directory.")
flags.DEFINE_integer("num_samples", 1000, "Images per set.")
flags.DEFINE_integer("sets", 5, "Disjoint image sets per setting (images k n .. (k + 1) n - 1): "
                     "the confidence intervals are over them.",
                     lower_bound=2)
flags.DEFINE_list("budgets", [str(b) for b in BUDGETS], "NFE budgets.")
flags.DEFINE_string("inception_weights", "", "pytorch-fid Inception weights: report FID.")
flags.DEFINE_string("stats", "", "Reference statistics .npz (default for digits: made here).")
flags.DEFINE_string("spacing", "logsnr", "The grid every method runs on (convention "
                    "`consistent`).")
flags.DEFINE_list("methods", None, "Methods to run at the NFE budgets (default: METHODS).")
flags.DEFINE_bool("references", True, "Also run the references (50-step F-PNDM, pf, 1000-step "
                  "DDIM and DDPM; the claim needs them).")
flags.DEFINE_bool("quick", False, "The paper's methods at one step count, few images (tests).")
FLAGS = flags.FLAGS

FIXED_STEP_METHODS = ("ddim", "s-pndm", "f-pndm", "fon")
METHODS = FIXED_STEP_METHODS + ("plms", "pndm-v", "pndm-v-ramp", "ipndm", "deis3", "dpm++2m",
                                "dpm++3m", "unipc3", "edm-heun")
QUICK_STEPS, QUICK_SETS, QUICK_SAMPLES = 10, 3, 100
# (method, steps): the references, on REFERENCE_SPACING (the claim's 50-step F-PNDM too)
REFERENCES = (("f-pndm", 50), ("pf", 0), ("ddim", 1000), ("ddpm", 1000))
REFERENCE_SPACING = "uniform"
CONVENTION = "consistent"
# (method, steps) on REFERENCE_SPACING: the paper says the first matches or beats the second
CLAIM = (("f-pndm", 50), ("ddim", 1000))
PSEUDO_VS_CLASSICAL = ("f-pndm", "fon")
# Chunks and batches of a fixed size, so a directory can grow to more images; pf adapts its step
# size over a batch, so its images depend on the batch size: fixed too.
CHUNK = 500
LEVEL = 0.05  # of the confidence intervals (95%) and the tests


def run_config(config, method: str, steps: int, spacing: str, convention: str,
               num_samples: int):
  """`config` with the sampler settings of one run."""
  run = config.copy_and_resolve_references()
  run.unlock()
  run.sampler.update(method=method, num_steps=max(steps, 1), spacing=spacing,
                     convention=convention, num_samples=num_samples, chunk_size=CHUNK,
                     batch_size=CHUNK)
  return run


def steps_for_budget(config, method: str, budget: int, spacing: str) -> tuple[int, int] | str:
  """(S, NFE) with the largest S whose NFE is at most `budget`, else why there is none."""
  return report.steps_for_budget(
      lambda s: sampler_spec.from_config(run_config(config, method, s, spacing, CONVENTION,
                                                    1)).nfe, budget)


def setting_name(method: str, steps: int | str, spacing: str) -> str:
  """A setting's name in the outputs, e.g. `f-pndm S=50 uniform` (pf: `S=adaptive`)."""
  return f"{method} S={steps or 'adaptive'} {spacing}"


def plan(config, quick: bool, spacing: str, methods: Sequence[str], budgets: Sequence[int],
         references: bool) -> tuple[list[dict], list[dict]]:
  """The runs ({setting, method, steps, spacing, index, role, budgets}) and the skipped
  (method, budget)s.

  role: `budget` (the step count picked for the budgets listed), `reference`, or `steps` (quick:
  a fixed step count).
  """
  def make(method, steps, spacing, index, role):
    return dict(setting=setting_name(method, steps, spacing), method=method, steps=steps,
                spacing=spacing, index=index, role=role, budgets=[])

  if quick:
    return [make(m, QUICK_STEPS, config.sampler.spacing, config.sampler.convention, "steps")
            for m in FIXED_STEP_METHODS], []
  runs, skipped = {}, []
  for method in methods:
    for budget in budgets:
      pick = steps_for_budget(config, method, budget, spacing)
      if isinstance(pick, str):
        skipped.append(dict(method=method, budget=budget, reason=pick))
        continue
      runs.setdefault((method, pick[0]), make(method, pick[0], spacing, CONVENTION,
                                              "budget"))["budgets"].append(budget)
  for method, steps in REFERENCES if references else ():
    runs[(method, steps, "reference")] = make(method, steps, REFERENCE_SPACING, CONVENTION,
                                              "reference")
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


def score_sets(sample_dir: str, num_sets: int, set_size: int, stats: str,
               feature_fn: fid.ShardedFeatureExtractor, metric: str, hashes: dict[str, str],
               settings: dict[str, Any]) -> dict[str, Any]:
  """`metric` of each image set k (images k n .. (k + 1) n - 1, n = `set_size`) of `sample_dir`
  against `stats`: the record saved there if it scored those sets with these sampler `settings`,
  statistics and weights (`hashes`), else a new one, saved for the next run. What it scored is
  read from the data: each set's first image and image count."""
  path = os.path.join(sample_dir, f"{metric}_{num_sets}x{set_size}.json")
  fixed = lambda s: {k: v for k, v in s.items() if k not in sample_store.GROWABLE}
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    if (fixed(record["sampler_settings"]) == fixed(settings)
        and all(record[k] == v for k, v in hashes.items())):
      return record
  held = sample_store.contents(sample_dir, num_sets * set_size)
  features = np.concatenate(list(feature_fn.map_batches(held.images())))
  ref_mu, ref_sigma = fid.load_stats(stats)
  values, firsts, counts = [], [], []
  for first in range(0, num_sets * set_size, set_size):
    running = fid.RunningStats()
    running.update(features[first:first + set_size])
    values.append(fid.frechet_distance(*running.finalize(), ref_mu, ref_sigma))
    firsts.append(first)
    counts.append(running.count)
  record = dict(metric=metric, values=values, first_image=firsts, num_images=counts,
                sample_dir=os.path.abspath(sample_dir), sampler_settings=held.settings,
                stats_file=os.path.abspath(stats), **hashes)
  files.write_json_atomically(path, record)
  return record


def nfe_per_image(summary: dict[str, Any], first: int, count: int) -> float:
  """NFE per image of images first .. first + count - 1 as the chunks record it (pf's differs
  between batches, one per chunk: then the mean over those images)."""
  if summary["nfe_per_image"] is not None:
    return summary["nfe_per_image"]
  held = sample_store.contents(summary["sample_dir"], first + count)
  chunks = [sample_store.read_chunk(path, load_images=False) for path in held.paths]
  used = [int(np.sum((c.indices >= first) & (c.indices < first + count))) for c in chunks]
  return float(np.dot(used, [c.nfe for c in chunks]) / sum(used))


def t_interval(values: Sequence[float]) -> tuple[float, float]:
  """Mean and the half-width of its 95% Student-t confidence interval."""
  v = np.asarray(values, np.float64)
  half = scipy_stats.t.ppf(1 - LEVEL / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
  return float(v.mean()), float(half)


def described(run: dict) -> dict:
  """A run as the CSVs show it: pf's steps `adaptive`, the budgets `;`-separated."""
  return dict(run, steps=run["steps"] or "adaptive", budgets=";".join(map(str, run["budgets"])))


def summarize(runs: list[dict], rows: list[dict], metric: str) -> list[dict]:
  """Per setting: the sets and the images per set scored, the mean NFE, and the mean, std and
  95% t interval of `metric` over sets."""
  summary = []
  for run in runs:
    mine = [r for r in rows if r["setting"] == run["setting"]]
    values = [r[metric] for r in mine]
    mean, half = t_interval(values)
    summary.append(dict(
        described(run), num_sets=len(mine), sets=";".join(str(r["set"]) for r in mine),
        images_per_set=";".join(sorted({str(r["num_images"]) for r in mine})),
        nfe=float(np.mean([r["nfe"] for r in mine])), metric=metric, mean=mean,
        std=float(np.std(values, ddof=1)), ci95_low=mean - half, ci95_high=mean + half))
  return summary


def paired(scores: dict[str, dict[int, float]], a: str, b: str, family: str,
           column: str = "") -> dict[str, Any]:
  """a - b over the sets both ran (the same x_T): mean, 95% t interval, paired t-test p."""
  sets = sorted(scores[a].keys() & scores[b].keys())
  x, y = (np.array([scores[s][k] for k in sets]) for s in (a, b))
  mean, half = t_interval(x - y)
  return dict(family=family, column=column, a=a, b=b, sets=len(sets), diff_mean=mean,
              diff_ci95_low=mean - half, diff_ci95_high=mean + half,
              p=float(scipy_stats.ttest_rel(x, y).pvalue))


def holm(comparisons: list[dict]) -> list[dict]:
  """`comparisons` (one family) with Holm's step-down adjusted p-values and the verdict at LEVEL:
  the family-wise error rate stays at most LEVEL."""
  order = sorted(range(len(comparisons)), key=lambda i: comparisons[i]["p"])
  adjusted, running = [0.0] * len(order), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(order) - rank) * comparisons[i]["p"]))
    adjusted[i] = running
  return [dict(c, family_size=len(order), p_holm=p, significant=bool(p < LEVEL))
          for c, p in zip(comparisons, adjusted)]


def compare(scores: dict[str, dict[int, float]], means: dict[str, float],
            cells: dict[tuple[str, str], str], columns: Sequence[str], methods: Sequence[str]
            ) -> dict[str, list[dict]]:
  """The paired comparisons by kind, each list Holm-corrected as one family (the best at each
  column is a family of its own): `claim`, `vs best` (every other method at a column minus the
  best there, sorted by mean), `pseudo vs classical` (f-pndm - fon) and `neighbouring budgets`
  (a method's run at one column minus the one at the column before, where they differ)."""
  kinds = dict(claim=[], vs_best=[], pseudo_vs_classical=[], neighbouring_budgets=[])
  claim = [setting_name(method, steps, REFERENCE_SPACING) for method, steps in CLAIM]
  if all(s in scores for s in claim):
    kinds["claim"] = holm([paired(scores, *claim, "claim")])
  for column in columns:
    ranked = sorted((cells[m, column] for m in methods if (m, column) in cells), key=means.get)
    kinds["vs_best"] += holm([paired(scores, s, ranked[0], f"vs best at {column}", column)
                              for s in ranked[1:]])
  kinds["pseudo_vs_classical"] = holm(
      [paired(scores, cells[PSEUDO_VS_CLASSICAL[0], c], cells[PSEUDO_VS_CLASSICAL[1], c],
              "pseudo vs classical", c)
       for c in columns if all((m, c) in cells for m in PSEUDO_VS_CLASSICAL)])
  kinds["neighbouring_budgets"] = holm(
      [paired(scores, cells[m, c1], cells[m, c0], "neighbouring budgets", f"{c0} -> {c1}")
       for m in methods for c0, c1 in zip(columns, columns[1:])
       if (m, c0) in cells and (m, c1) in cells and cells[m, c0] != cells[m, c1]])
  return kinds


def write_plot(path: str, summary: list[dict], metric: str, methods: Sequence[str]) -> None:
  """Mean score vs NFE per method with 95% intervals; the references as black markers."""
  fig, ax = plt.subplots(figsize=(8, 5))
  colors = [plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
  style = dict(pseudo="-", data="--", other=":")
  errorbar = lambda rows, **kw: ax.errorbar(
      [r["nfe"] for r in rows], [r["mean"] for r in rows],
      yerr=[[r["mean"] - r["ci95_low"] for r in rows], [r["ci95_high"] - r["mean"] for r in rows]],
      capsize=2, **kw)
  for color, method in zip(colors, methods):
    mine = sorted((r for r in summary if r["method"] == method and r["role"] != "reference"),
                  key=lambda r: r["nfe"])
    if mine:
      errorbar(mine, fmt=style[family(method)], marker="o", ms=3, color=color, label=method)
  refs = [r for r in summary if r["role"] == "reference"]
  for r, marker in zip(refs, "*Ddsv^<>"):
    errorbar([r], fmt=marker, ms=8, color="black", zorder=3, label=r["setting"])
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("NFE per image")
  ax.set_ylabel("FD-digits (not FID)" if metric == "fd_digits" else "FID")
  ax.set_title("mean and 95% interval over image sets; solid: pseudo (PNDM family, DEIS); dashed: "
               "data prediction; dotted: other", fontsize=8)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def decimals(half: float) -> int:
  """Decimal places that show a half-width to its second significant digit."""
  return max(0, 1 - math.floor(math.log10(half))) if half > 0 else 3


def with_ci(mean: float, half: float) -> str:
  """`mean ± half`, both to the half-width's second significant digit."""
  d = decimals(half)
  return f"{mean:.{d}f} ± {half:.{d}f}"


def difference(c: dict) -> str:
  """A comparison's mean difference and its 95% interval."""
  d = decimals((c["diff_ci95_high"] - c["diff_ci95_low"]) / 2)
  return f"{c['diff_mean']:+.{d}f} [{c['diff_ci95_low']:+.{d}f}, {c['diff_ci95_high']:+.{d}f}]"


def comparison_table(comparisons: list[dict], nfe: dict[str, float]) -> str:
  return report.markdown_table(
      ["family", "a", "b", "NFE a / b", "a - b [95% CI]", "p", "Holm p (family size)",
       "significant"],
      [[c["family"], c["a"], c["b"], f"{nfe[c['a']]:g} / {nfe[c['b']]:g}", difference(c),
        f"{c['p']:.2g}", f"{c['p_holm']:.2g} ({c['family_size']})",
        "yes" if c["significant"] else "no"] for c in comparisons])


def claim_line(claim: dict, images: str) -> str:
  """Whether 50-step F-PNDM and 1000-step DDIM differ significantly, and which way."""
  if not claim["significant"]:
    verdict = "not contradicted: the two do not differ significantly"
  elif claim["diff_mean"] < 0:
    verdict = "holds: 50-step F-PNDM is significantly better"
  else:
    verdict = "does not hold: 50-step F-PNDM is significantly worse"
  return (f"Claim '50-step F-PNDM matches or beats 1000-step DDIM': {verdict} here (F-PNDM - "
          f"DDIM = {difference(claim)}, paired t-test p = {claim['p']:.2g}, {claim['sets']} "
          f"sets of {images} images).")


def write_markdown(summary: list[dict], kinds: dict[str, list[dict]],
                   cells: dict[tuple[str, str], str], columns: Sequence[str],
                   methods: Sequence[str], metric: str) -> str:
  """The budget table (mean ± half-width, best and ties marked), the references, the claim,
  the chosen comparisons and the changes between neighbouring budgets."""
  by_setting = {r["setting"]: r for r in summary}
  nfe = {s: r["nfe"] for s, r in by_setting.items()}
  tied = {(c["column"], c["a"]) for c in kinds["vs_best"] if not c["significant"]}
  best = {c["column"]: c["b"] for c in kinds["vs_best"]}
  sets = " / ".join(sorted({str(r["num_sets"]) for r in summary}))
  images = ";".join(sorted({r["images_per_set"] for r in summary}))

  def cell(method, column):
    setting = cells.get((method, column))
    if setting is None:
      return "-"
    r = by_setting[setting]
    text = with_ci(r["mean"], r["ci95_high"] - r["mean"])
    text += f" ({r['nfe']:g})" if f"{r['nfe']:g} NFE" != column else ""
    if setting == best.get(column, setting):
      return f"**{text}**"
    return f"*{text}*" if (column, setting) in tied else text

  grids = sorted({(r["spacing"], r["index"]) for r in summary if r["role"] != "reference"})
  body = [
      f"{metric}: mean ± half-width of the 95% Student-t confidence interval over "
      f"{sets} disjoint image sets ({images} images each; every setting draws the same x_T "
      f"for a set, so differences are paired by set). Runs on the "
      + ", ".join(f"`{s}` grid under the `{c}` convention" for s, c in grids)
      + ". In a column `N NFE` a method runs the largest step count with at most N "
      "evaluations (`-`: it needs more); the NFE used is in parentheses where it differs. "
      "**bold**: the lowest mean in the column; *italic*: not significantly worse than it "
      f"(paired t-test over sets, Holm-corrected within the column, p >= {LEVEL}); plain: "
      "significantly worse.",
      report.markdown_table(["method"] + list(columns),
                            [[m] + [cell(m, c) for c in columns] for m in methods])]
  refs = [r for r in summary if r["role"] == "reference"]
  if refs:
    body += ["References (pf adapts its own steps; its NFE is the mean over batches):",
             report.markdown_table(
                 ["setting", "grid", "NFE", f"{metric} (95% CI)", "std over sets"],
                 [[r["setting"], f"{r['spacing']}, {r['index']}", f"{r['nfe']:g}",
                   with_ci(r["mean"], r["ci95_high"] - r["mean"]), r["std"]] for r in refs])]
  if kinds["claim"]:
    body.append(claim_line(kinds["claim"][0], images))
  runner_up = {}  # vs_best lists each column's others by mean: the first is the runner-up
  for c in kinds["vs_best"]:
    runner_up.setdefault(c["column"], c)
  chosen = kinds["claim"] + kinds["pseudo_vs_classical"] + list(runner_up.values())
  if chosen:
    body += ["Paired differences (a - b over the same sets; negative: a is better), with the "
             "95% t interval of the mean difference, the paired t-test p and Holm's adjusted p "
             "within its family: the claim, F-PNDM vs its classical counterpart FON, and the "
             "best vs the runner-up at each column (the best vs every other method: "
             "comparisons.csv, and the *italic* cells above):", comparison_table(chosen, nfe)]
  steps = kinds["neighbouring_budgets"]
  if steps:
    moves = [f"{a} -> {b}" for a, b in zip(columns, columns[1:])]
    change = {(by_setting[c["a"]]["method"], c["column"]): c for c in steps}
    text = lambda c: f"{c['diff_mean']:+.3g}" + ("†" if c["significant"] else "")
    body += [f"Change in the mean between neighbouring budgets (the later minus the earlier; "
             f"negative: better with more evaluations); †: significant (Holm over all "
             f"{len(steps)} changes); blank: the same run or none:",
             report.markdown_table(["method"] + moves,
                                   [[m] + [text(change[m, mv]) if (m, mv) in change else ""
                                           for mv in moves] for m in methods])]
  return "\n\n".join(body)


def main(argv):
  del argv
  config = FLAGS.config
  num_samples = QUICK_SAMPLES if FLAGS.quick else FLAGS.num_samples
  num_sets = QUICK_SETS if FLAGS.quick else FLAGS.sets
  budgets = sorted(int(b) for b in FLAGS.budgets)
  methods = FIXED_STEP_METHODS if FLAGS.quick else tuple(FLAGS.methods or METHODS)
  metric = "fid" if FLAGS.inception_weights else "fd_digits"
  weights = FLAGS.inception_weights or config.eval.digits_classifier
  if metric == "fd_digits":
    digits_classifier.load_or_train_digits_classifier(weights)  # trained once, then shipped
  stats = reference_stats(metric, weights, FLAGS.workdir)
  hashes = dict(stats_sha256=fid.file_sha256(stats), weights_sha256=fid.file_sha256(weights))
  model = eps_models.load(config, sampler_spec.from_config(config), FLAGS.workdir)
  runs, skipped = plan(config, FLAGS.quick, FLAGS.spacing, methods, budgets, FLAGS.references)
  for s in skipped:
    print(f"skipped {s['method']} at {s['budget']} NFE: {s['reason']}")

  feature_fn = fid.feature_fn_for(metric, weights, batch_size=CHUNK)
  rows = []
  for run in runs:
    spec = sampler_spec.from_config(run_config(config, run["method"], run["steps"],
                                               run["spacing"], run["index"],
                                               num_sets * num_samples))
    sample_dir = os.path.join(FLAGS.workdir, f"{run['method']}_{run['steps']}_{run['spacing']}_"
                                             f"{run['index']}_seed{spec.seed}")
    summary = generation.generate_samples(model, spec, sample_dir)
    record = score_sets(sample_dir, num_sets, num_samples, stats, feature_fn, metric, hashes,
                        summary["settings"])
    for k, (value, first, count) in enumerate(zip(record["values"], record["first_image"],
                                                  record["num_images"])):
      rows.append(dict(described(run), set=k, images=f"{first}..{first + count - 1}",
                       nfe=nfe_per_image(summary, first, count), **{metric: value},
                       num_images=count))
    print(run["setting"], [f"{v:.3f}" for v in record["values"]], flush=True)

  summary = summarize(runs, rows, metric)
  scores = {}
  for r in rows:
    scores.setdefault(r["setting"], {})[r["set"]] = r[metric]
  if FLAGS.quick:
    columns = [f"{QUICK_STEPS} steps"]
    cells = {(run["method"], columns[0]): run["setting"] for run in runs}
  else:
    columns = [f"{b} NFE" for b in budgets]
    cells = {(run["method"], f"{b} NFE"): run["setting"] for run in runs for b in run["budgets"]}
  kinds = compare(scores, {r["setting"]: r["mean"] for r in summary}, cells, columns, methods)

  os.makedirs(FLAGS.out, exist_ok=True)
  report.write_csv(os.path.join(FLAGS.out, "quality.csv"), rows)
  report.write_csv(os.path.join(FLAGS.out, "summary.csv"), summary)
  comparisons = [c for kind in kinds.values() for c in kind]
  if comparisons:
    report.write_csv(os.path.join(FLAGS.out, "comparisons.csv"), comparisons)
  if skipped:
    report.write_csv(os.path.join(FLAGS.out, "skipped.csv"), skipped)
  write_plot(os.path.join(FLAGS.out, "quality_vs_nfe.png"), summary, metric, methods)
  name = "FD-digits (lower is better; not FID)" if metric == "fd_digits" else "FID"
  report.write_markdown(os.path.join(FLAGS.out, "quality.md"), f"{name} vs NFE",
                        write_markdown(summary, kinds, cells, columns, methods, metric))


if __name__ == "__main__":
  app.run(main)
