"""Writing experiment outputs: a CSV, a markdown table and where they came from."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any


def provenance() -> str:
  """One line naming the command, date and machine, for tables that go into the README."""
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{len(devices)} x {devices[0].platform.upper()} ({devices[0].device_kind})")
  command = " ".join(["python", "-m", "experiments." + os.path.splitext(
      os.path.basename(sys.argv[0]))[0]] + sys.argv[1:])
  return f"`{command}` on {datetime.date.today().isoformat()}, {machine}, jax {jax.__version__}"


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_markdown(path: str, title: str, body: str) -> None:
  with open(path, "w") as f:
    f.write(f"### {title}\n\n{body}\n\nProduced by {provenance()}.\n")


def steps_for_budget(nfe_of: Callable[[int], int], budget: int) -> tuple[int, int] | str:
  """(S, NFE) with the largest S whose NFE (`nfe_of(S)`, which raises ValueError for a grid the
  method refuses) is at most `budget`, else why there is none.

  NFE does not decrease with S and is at least S, so S runs down from the budget.
  """
  fewest, last_error = None, None
  for s in range(budget, 0, -1):
    try:
      nfe = nfe_of(s)
    except ValueError as e:
      last_error = last_error or str(e)
      continue
    if nfe <= budget:
      return s, nfe
    fewest = (s, nfe)
  if fewest:
    return f"needs more than {budget} evaluations (fewest here: {fewest[1]} at S={fewest[0]})"
  return last_error or f"no grid with at most {budget} evaluations"
