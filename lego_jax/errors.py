"""The one error type for user mistakes and bad input.

The CLI prints a `LegoError` as a single line and exits with status 2; any
other exception is a bug in lego-jax and keeps its traceback.
"""


class LegoError(Exception):
  """Bad input, an unknown name, or a workdir/checkpoint that does not match."""


def unknown(kind: str, name: str, valid) -> LegoError:
  """An error for an unknown name that lists the valid ones."""
  valid = sorted(valid)
  return LegoError(f"unknown {kind} {name!r}; valid: {', '.join(map(str, valid)) or '(none)'}")
