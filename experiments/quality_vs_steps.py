"""Sample quality vs steps and vs NFE for a trained model (default: the shipped digits model).

For ddim, s-pndm, f-pndm, fon at several step counts, plus pf and 1000-step
ddpm / ddim, generates images with `main.py`'s sampling code and scores them:
FD-digits (Frechet distance of the project's digits-classifier features to the
digits data; *not* FID) for the digits model, or FID when `--inception_weights`
and `--stats` are given. Tests the paper's claim that 50-step F-PNDM matches or
beats 1000-step DDIM. 1000-step runs use the `consistent` convention, since
`paper` reads past the alpha-bar table at S = N.

  python -m experiments.quality_vs_steps                 # digits model, ~15 min on 2 CPU cores
  python -m experiments.quality_vs_steps --quick         # seconds; what the tests run
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
flags.DEFINE_bool("quick", False, "One step count, few images (for tests).")
FLAGS = flags.FLAGS

STEPS = (5, 10, 20, 50, 100)
QUICK_STEPS = (10,)
FIXED_STEP_METHODS = ("ddim", "s-pndm", "f-pndm", "fon")
REFERENCES = (("ddim", 1000, "consistent"), ("ddpm", 1000, "consistent"))


def settings(quick: bool, convention: str) -> list[tuple[str, int, str]]:
  steps = QUICK_STEPS if quick else STEPS
  runs = [(m, s, convention) for m in FIXED_STEP_METHODS for s in steps]
  return runs if quick else runs + [("pf", 0, convention)] + list(REFERENCES)


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


def main(argv):
  del argv
  config = FLAGS.config
  num_samples = 200 if FLAGS.quick else FLAGS.num_samples
  metric = "fid" if FLAGS.inception_weights else "fd_digits"
  weights = FLAGS.inception_weights or config.eval.digits_classifier
  if metric == "fd_digits":
    digits_classifier.load_or_train_digits_classifier(weights)  # trained once, then shipped
  stats = reference_stats(metric, weights, FLAGS.workdir)
  model = eps_models.load(config, sampler_spec.from_config(config), FLAGS.workdir)

  rows = []
  for method, steps, convention in settings(FLAGS.quick, config.sampler.convention):
    run_config = config.copy_and_resolve_references()
    run_config.unlock()
    run_config.sampler.update(method=method, num_steps=max(steps, 1), convention=convention,
                              num_samples=num_samples, chunk_size=num_samples,
                              batch_size=min(num_samples, 500))
    sample_dir = os.path.join(FLAGS.workdir, f"{method}_{steps}_{convention}")
    summary = generation.generate_samples(model, sampler_spec.from_config(run_config), sample_dir)
    record = fid.evaluate_sample_dir(sample_dir, stats, weights,
                                     os.path.join(sample_dir, f"{metric}.json"),
                                     metric=metric)
    rows.append(dict(method=method, steps=steps or "adaptive", index=convention,
                     nfe=summary["nfe_per_image"], **{metric: record[metric]},
                     num_images=record["num_images"]))
    print(rows[-1])

  os.makedirs(FLAGS.out, exist_ok=True)
  report.write_csv(os.path.join(FLAGS.out, "quality.csv"), rows)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for method in FIXED_STEP_METHODS:
    mine = [r for r in rows if r["method"] == method]
    ax.plot([r["nfe"] for r in mine], [r[metric] for r in mine], marker="o", label=method)
  for r in rows:
    if r["method"] == "pf" or r["steps"] == 1000:
      ax.scatter([r["nfe"]], [r[metric]], marker="*", s=120,
                 label=f"{r['method']} {r['steps']}")
  ax.set_xscale("log")
  ax.set_xlabel("NFE per image")
  ax.set_ylabel("FD-digits (not FID)" if metric == "fd_digits" else "FID")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.out, "quality_vs_nfe.png"), dpi=110)
  plt.close(fig)

  score = {(r["method"], r["steps"]): r[metric] for r in rows}
  claim = ""
  if ("f-pndm", 50) in score and ("ddim", 1000) in score:
    verdict = "holds" if score[("f-pndm", 50)] <= score[("ddim", 1000)] else "does not hold"
    claim = (f"\n\nClaim '50-step F-PNDM matches or beats 1000-step DDIM': {verdict} here "
             f"({score[('f-pndm', 50)]:.3g} vs {score[('ddim', 1000)]:.3g}).")
  name = "FD-digits (lower is better; not FID)" if metric == "fd_digits" else "FID"
  report.write_markdown(
      os.path.join(FLAGS.out, "quality.md"), f"{name} vs steps",
      f"{num_samples} images per setting.\n\n"
      + report.markdown_table(["method", "steps", "index", "NFE", metric],
                              [[r["method"], r["steps"], r["index"], r["nfe"], r[metric]]
                               for r in rows]) + claim)


if __name__ == "__main__":
  app.run(main)
