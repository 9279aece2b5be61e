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
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from llama_jax.checkpoint.mapped import MappedTensor, copy_into
from llama_jax.errors import LlamaError

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
_MAX_HEADER = 100 * 2**20


class SafeTensor(MappedTensor):
    """One tensor of a safetensors file: metadata now, bytes on `read()`."""

    def __init__(self, path: str, start: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.start, self.dtype, self.shape = path, start, dtype, shape

    def read_into(self, out: np.ndarray) -> None:
        """Copy the tensor into `out` (same number of elements, any strides and dtype)."""
        self._check_size(out)
        copy_into(self.path, self.start, self.dtype, out)


def read_safetensors(path: str | os.PathLike) -> dict[str, SafeTensor]:
    """Parse and validate a safetensors header.

    Args:
      path: the `.safetensors` file.
    Returns:
      {name: SafeTensor} for every tensor in the file.
    Raises:
      LlamaError: the file is missing, its header is corrupt, or a tensor's bytes lie
        outside the file or disagree with its shape and dtype.
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
                f"{size}); the file is truncated or not safetensors."
            )
        text = f.read(n)
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise LlamaError(f"{path}: corrupt safetensors header ({e}).") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LlamaError(
                f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}."
            ) from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise LlamaError(
                f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has data_offsets "
                f"[{begin}, {end}] that do not fit its size or the file ({size} bytes); "
                "the file is truncated or corrupt."
            )
        out[name] = SafeTensor(path, base + begin, dtype, shape)
    return out


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
