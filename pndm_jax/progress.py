"""A live progress line (count, rate, ETA) on a terminal; silent when output is not a terminal.

    with progress.Progress(total=5000, desc="sample", unit="img") as bar:
      for batch in batches:
        ...
        bar.update(len(batch))

Used by sample, stats, eval and train. It writes only to a TTY (stderr by
default), so logs, pipes and CI output stay clean; the runs log their own
summary lines either way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TextIO


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return (f"{hours}:" if hours else "") + f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
  """Counts work done towards `total` and redraws one line with rate and ETA."""

  def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
               stream: TextIO | None = None, enabled: bool | None = None,
               min_interval: float = 0.2):
    self.total, self.desc, self.unit = total, desc, unit
    self.count = self._start_count = initial
    self._stream = stream if stream is not None else sys.stderr
    isatty = getattr(self._stream, "isatty", lambda: False)
    self.enabled = isatty() if enabled is None else enabled
    self._start = self._last_draw = time.perf_counter()
    self._min_interval = min_interval

  def __enter__(self) -> Progress:
    self._draw(force=True)
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def rate(self) -> float:
    """Units per second since the bar started (work done before `initial` excluded)."""
    elapsed = time.perf_counter() - self._start
    return (self.count - self._start_count) / elapsed if elapsed > 0 else 0.0

  def line(self) -> str:
    """`desc: count/total units (pct%), rate units/s, ETA mm:ss`."""
    rate = self.rate()
    parts = [f"{self.desc}: {self.count}"]
    if self.total:
      parts[0] += f"/{self.total} {self.unit} ({100 * self.count / self.total:.0f}%)"
    else:
      parts[0] += f" {self.unit}"
    if rate > 0:
      parts.append(f"{rate:.3g} {self.unit}/s")
      if self.total:
        parts.append(f"ETA {_duration(max(self.total - self.count, 0) / rate)}")
    return ", ".join(parts)

  def update(self, n: int = 1) -> None:
    self.count += n
    self._draw()

  def _draw(self, force: bool = False) -> None:
    now = time.perf_counter()
    if not self.enabled or (not force and now - self._last_draw < self._min_interval):
      return
    self._last_draw = now
    self._stream.write("\r\033[K" + self.line())
    self._stream.flush()

  def close(self) -> None:
    if self.enabled:
      self._draw(force=True)
      self._stream.write("\n")
      self._stream.flush()
      self.enabled = False


def track(batches: Iterable[Sized], bar: Progress) -> Iterator[Sized]:
  """Yields `batches` unchanged, advancing `bar` by each batch's length."""
  for batch in batches:
    yield batch
    bar.update(len(batch))
