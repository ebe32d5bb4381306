"""The one validator for named choices: "unknown X 'y'; valid choices: a, b, c"."""

from __future__ import annotations

from collections.abc import Collection


def check(kind: str, value: str, valid: Collection[str]) -> str:
  """Returns `value` if it is one of `valid`, else raises a ValueError listing them."""
  if value not in valid:
    raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")
  return value
