"""The XLA options sampling and training programs compile with (docs/performance.md)."""

# XLA:CPU's YNNPACK fusions make the U-Net slower than XLA's own CPU kernels: the forward ~15%
# on an AVX-512 EPYC, a training step ~1.3x on an AVX2 EPYC and ~1.57x on an Intel Xeon with
# AVX-512 and AMX. Not on every CPU: on an AVX-512 EPYC with bfloat16 instructions they made a
# training step ~1.08x faster (experiments/benchmark.py, and docs/performance.md for the
# measurements); other backends ignore CPU options.
PROGRAMS = {"xla_cpu_experimental_ynn_fusion_type": ""}
