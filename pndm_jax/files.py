"""Writing files so that nothing half-written is ever read, and checking a destination first."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def temporary_name(path: str) -> str:
  """A hidden, per-process name beside `path` to write to before renaming onto `path`."""
  folder, name = os.path.split(path)
  return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def write_json_atomically(path: str, obj: Any) -> None:
  """Writes JSON under a temporary name, then renames it into place."""
  tmp = temporary_name(path)
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def ensure_writable_dir(folder: str) -> None:
  """Creates `folder` if needed and proves a file can be written in it (raises OSError if not).

  A real write, not `os.access`, which answers yes to root on a read-only filesystem.
  """
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryFile(dir=folder):
    pass
