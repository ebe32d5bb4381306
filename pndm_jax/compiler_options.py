"""XLA options the project compiles its sampling programs with (docs/performance.md)."""

# XLA:CPU's YNNPACK fusions run the U-Net's forward ~15% slower than XLA's own CPU kernels on
# the machine experiments/benchmark.py ran on (a training step is as fast either way); other
# backends ignore CPU options.
SAMPLING = {"xla_cpu_experimental_ynn_fusion_type": ""}
