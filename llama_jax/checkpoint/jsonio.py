"""JSON from files we did not write, with bounded size and nesting.

Python's parser recurses once per nesting level, so a header or config of a few
kilobytes of `[[[[...` ends in RecursionError; and a file can be any size. Every JSON
this package reads from a checkpoint (params.json, config.json, safetensors headers,
index files, llama_jax.json) goes through `loads` or `read_json`, which measure the
nesting before parsing and turn every failure into one LlamaError naming the file.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from llama_jax.errors import LlamaError

MAX_DEPTH = 64  # real configs and headers nest 3 deep
MAX_CONFIG_BYTES = 64 * 2**20  # an index of a 405B model is ~100 KB
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside strings."""
    outside = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    opens = np.isin(outside, (ord("["), ord("{")))
    closes = np.isin(outside, (ord("]"), ord("}")))
    steps = opens.astype(np.int8) - closes.astype(np.int8)
    steps = steps[opens | closes].astype(np.int64)  # only the brackets: small
    return int(np.cumsum(steps).max(initial=0))


def loads(raw: bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON bytes whose nesting is at most `max_depth`.

    Args:
      raw: UTF-8 JSON.
      where: the file (and part) for the message, e.g. "model.safetensors header".
      max_depth: the deepest nesting accepted.
    Returns:
      The parsed value.
    Raises:
      LlamaError: nested too deeply, not UTF-8, or not JSON.
    """
    import json

    depth = _depth(raw)
    if depth > max_depth:
        raise LlamaError(
            f"{where}: JSON nested {depth} levels deep (at most {max_depth} accepted); the file "
            "is corrupt or crafted."
        )
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LlamaError(f"{where}: not valid JSON ({str(e)[:200]}).") from None


def read_json(path: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Read and parse a JSON file of at most `max_bytes`.

    Args:
      path: the file.
      max_bytes: larger files are refused before they are read.
    Returns:
      The parsed value (any JSON type: callers check what they expect).
    Raises:
      LlamaError: unreadable, too large, nested too deeply or not JSON.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise LlamaError(
                    f"{path}: {size} bytes, more than the {max_bytes} a config or index file "
                    "may have; this is not the file it should be."
                )
            raw = f.read(size + 1)  # read(n) allocates n bytes up front
    except OSError as e:
        raise LlamaError(f"{path}: cannot read it ({e.strerror or e}).") from None
    return loads(raw, path)
