"""safetensors files, read lazily and written as a stream.

The format is simple enough to handle directly, which lets us validate every header
field with a message naming the file, memory-map one tensor at a time, keep bfloat16
bit-exact (ml_dtypes), and write a file whose tensors are produced one by one:

    [8 bytes: little-endian u64 n] [n bytes: JSON header] [tensor bytes ...]
    header = {name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]},
              "__metadata__": {...}}     offsets are relative to the end of the header
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from llama_jax.checkpoint.jsonio import loads
from llama_jax.checkpoint.mapped import MappedTensor, copy_into
from llama_jax.errors import LlamaError, brief

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the format's own limit


class SafeTensor(MappedTensor):
    """One tensor of a safetensors file: metadata now, bytes on `read()`."""

    def __init__(self, path: str, start: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.start, self.dtype, self.shape = path, start, dtype, shape

    def read_into(self, out: np.ndarray) -> None:
        """Copy the tensor into `out` (same number of elements, any strides and dtype)."""
        self._check_size(out)
        copy_into(self.path, self.start, self.dtype, out)


def read_safetensors(path: str | os.PathLike) -> dict[str, SafeTensor]:
    """Parse and validate a safetensors header by the format's own rules.

    The header is at most 100 MB of JSON (nesting bounded); each entry has a known
    dtype, a shape of non-negative integers and data_offsets [begin, end] whose length
    is exactly the shape's bytes; sorted by offset the tensors tile the data section
    with no gap, overlap or byte left over, as the `safetensors` library requires.

    Args:
      path: the `.safetensors` file.
    Returns:
      {name: SafeTensor} for every tensor in the file.
    Raises:
      LlamaError: the file is missing or short, its header breaks a rule above (the
        message names the tensor), or a tensor's bytes lie outside the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LlamaError(f"{path}: no such file.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LlamaError(f"{path}: too short to be a safetensors file ({size} bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise LlamaError(
                f"{path}: corrupt safetensors header (declares {n} header bytes in a file of "
                f"{size}; the format allows at most {_MAX_HEADER}); the file is truncated or "
                "not safetensors."
            )
        text = f.read(n)
    header = loads(text, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise LlamaError(f"{path}: corrupt safetensors header (not a JSON object).")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise LlamaError(f"{path}: corrupt safetensors header (__metadata__ is not an object).")
    base = 8 + n
    out = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, info)
        spans.append((begin, end, name))
        out[name] = SafeTensor(path, base + begin, dtype, shape)
    # The format's rule: sorted by offset, the tensors cover the data section exactly.
    expected = 0
    for begin, end, name in sorted(spans):
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
            raise LlamaError(
                f"{path}: tensor {brief(name)} starts at byte {begin} of the data, which "
                f"{what} (expected {expected}); the file is corrupt or crafted."
            )
        expected = end
    if base + expected != size:
        raise LlamaError(
            f"{path}: the tensors end at byte {base + expected} but the file has {size}; the "
            "file is truncated or corrupt."
        )
    return out


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _entry(path: str, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked."""

    def bad(why: str) -> LlamaError:
        return LlamaError(
            f"{path}: corrupt safetensors header entry for tensor {brief(name)}: {why}; the "
            "file is corrupt or not safetensors."
        )

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise bad("expected an object with dtype, shape and data_offsets")
    if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
        raise bad(f"dtype {str(info['dtype'])[:40]!r} is not one of {sorted(DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or len(shape) > 16 or not all(map(_int, shape)):
        raise bad("shape must be a list of at most 16 non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_int, offsets)):
        raise bad("data_offsets must be two non-negative integers")
    dtype = DTYPES[info["dtype"]]
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != nbytes:
        raise bad(
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes but {info['dtype']} "
            f"{shape} needs {nbytes}"
        )
    return dtype, tuple(shape), begin, end


def plan_header(
    specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict | None = None
) -> bytes:
    """Header bytes (length prefix included) for tensors written in the given order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes one safetensors file whose tensors arrive one at a time, in planned order."""

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, np.dtype, tuple[int, ...]]]):
        self.path = os.fspath(path)
        self._pending = list(specs)
        self._f = open(self.path, "wb")
        self._f.write(plan_header(specs))

    def write(self, name: str, arr: np.ndarray) -> None:
        """Append tensor `name`, which must be the next one planned, with its planned shape."""
        want_name, dtype, shape = self._pending.pop(0)
        if name != want_name or arr.dtype != dtype or tuple(arr.shape) != tuple(shape):
            raise LlamaError(
                f"{self.path}: expected {want_name} {dtype} {shape}, got {name} {arr.dtype} "
                f"{arr.shape}."
            )
        self._f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))

    def close(self) -> None:
        """Finish the file; every planned tensor must have been written."""
        self._f.close()
        if self._pending:
            raise LlamaError(f"{self.path}: {len(self._pending)} tensors were never written.")
