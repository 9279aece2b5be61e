"""The one exception type for mistakes a user can make, and the checks that raise it."""

from __future__ import annotations

import math
import reprlib
from typing import Any


class LlamaError(ValueError):
    """A problem with the user's input: a config, a path, a checkpoint, a mesh or a flag.

    The message names what is wrong (the file, tensor, field or flag) and what to do.
    The command-line tool prints it without a traceback and exits non-zero.
    """


def check_int(where: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """`value` if it is an integer in [low, high] (bools refused), else a LlamaError.

    Args:
      where: the field's name for the message, e.g. "LlamaConfig.dim".
      value: the value to check.
      low, high: the inclusive range.
    Returns:
      The value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise LlamaError(f"{where} must be an integer, got {brief(value)}.")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise LlamaError(f"{where} must be {bound}, got {value}.")
    return value


def check_real(where: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    """`value` as a float if it is a finite real number with low < value < high.

    Args:
      where: the field's name for the message.
      value: an int or float (bools, strings, NaN and infinities are refused).
      low, high: the exclusive range.
    Returns:
      float(value).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LlamaError(f"{where} must be a number, got {brief(value)}.")
    value = float(value)
    if not math.isfinite(value):
        raise LlamaError(f"{where} must be finite, got {value}.")
    if not low < value < high:
        raise LlamaError(f"{where} must be greater than {low} and less than {high}, got {value}.")
    return value


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def brief(value: Any) -> str:
    """A bounded repr for messages (a hostile file may hold megabytes in one field)."""
    return _REPR.repr(value) + f" ({type(value).__name__})"
