"""clu's metric writers and periodic actions, with TensorBoard files and no TensorFlow needed."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

# clu 0.0.12 imports TensorFlow from `clu.metric_writers.summary_writer` when any
# of `clu.metric_writers` (and so `clu.periodic_actions`) is imported
# (google/CommonLoopUtils#358). Without TensorFlow, that module is served here
# with a factory for the tensorboardX-backed writer below, so clu's writers,
# `create_default_writer` and periodic actions work and still write TensorBoard files.
_SUMMARY_WRITER_MODULE = "clu.metric_writers.summary_writer"
if (importlib.util.find_spec("tensorflow") is None
    and _SUMMARY_WRITER_MODULE not in sys.modules):
  _summary_writer = types.ModuleType(_SUMMARY_WRITER_MODULE)
  _summary_writer.SummaryWriter = lambda logdir: TensorboardXWriter(logdir)
  sys.modules[_SUMMARY_WRITER_MODULE] = _summary_writer

from clu import metric_writers, periodic_actions  # noqa: E402  (after the stand-in above)

__all__ = ["metric_writers", "periodic_actions", "TensorboardXWriter"]


class TensorboardXWriter(metric_writers.MetricWriter):
  """clu's MetricWriter interface over tensorboardX: TensorBoard event files without TensorFlow."""

  def __init__(self, logdir: str):
    import tensorboardX  # pylint: disable=g-import-not-at-top

    self._writer = tensorboardX.SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 3:
        value = value[None]
      self._writer.add_images(key, value, global_step=step, dataformats="NHWC")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    for key, value in arrays.items():
      bins = (num_buckets or {}).get(key, "tensorflow")
      self._writer.add_histogram(key, np.asarray(value), global_step=step, bins=bins)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items())))

  def write_summaries(self, step, values, metadata=None):
    raise NotImplementedError("raw TensorFlow summaries need TensorFlow")

  def write_videos(self, step, videos):
    raise NotImplementedError("TensorboardXWriter does not write videos")

  def write_audios(self, step, audios, *, sample_rate):
    raise NotImplementedError("TensorboardXWriter does not write audio")

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()
