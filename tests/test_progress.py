"""The progress line: count, rate and ETA on a terminal; nothing at all elsewhere."""

import io

import jax
import numpy as np

from configs import gmm_pndm
from pndm_jax import eps_models, generation, progress, sharding
from pndm_jax.sampler_spec import from_config as spec_of


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_line_has_count_rate_and_eta(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
  bar = progress.Progress(100, "sample", "img", initial=20, stream=Terminal())
  now[0] += 2.0
  bar.update(5)  # 5 images in 2 s since the start; 75 to go
  assert bar.line() == "sample: 25/100 img (25%), 2.5 img/s, ETA 00:30"


def test_silent_when_not_a_terminal():
  stream = io.StringIO()
  with progress.Progress(10, "stats", "img", stream=stream) as bar:
    for _ in progress.track([np.zeros(5), np.zeros(5)], bar):
      pass
  assert bar.count == 10 and stream.getvalue() == ""


def test_sampling_advances_the_bar_per_batch():
  config = gmm_pndm.get_config()
  config.sampler.update(num_steps=5)
  model = eps_models.load(config, spec_of(config), "")
  mesh = sharding.batch_mesh(jax.devices()[:1])
  terminal = Terminal()
  with progress.Progress(10, "sample", "img", stream=terminal, min_interval=0) as bar:
    images, _ = generation.sample_images(generation.make_generate_fn(model, spec_of(config), mesh),
                                       model.params, np.arange(10), mesh, 4, bar)
  assert images.shape == (10, 8, 8, 1)
  drawn = [line.split(",")[0] for line in terminal.getvalue().split("\r\033[K") if line]
  assert drawn == ["sample: 0/10 img (0%)", "sample: 4/10 img (40%)", "sample: 8/10 img (80%)",
                   "sample: 10/10 img (100%)", "sample: 10/10 img (100%)"]
  assert terminal.getvalue().endswith("\n")  # closed: the next output starts a new line
