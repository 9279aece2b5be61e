"""Copy a tensor's bytes from a file into any numpy view, a slice at a time, via mmap.

A converter wants each tensor in its final layout and dtype without intermediate full
copies. `copy_into` maps one slice of the file at a time (about 16 MiB), copies it into
the matching slice of `out` (which may be a strided view: a transpose, a slice of a
larger array, HF's rotary rows permuted), casting on the way, and unmaps it, so the file
pages never pile up in the resident set.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from llama_jax.errors import LlamaError

CHUNK_BYTES = 16 * 2**20


def copy_into(path: str, start: int, dtype: np.dtype, out: np.ndarray) -> None:
    """Fill `out` with the C-ordered elements stored in `path` from byte `start`.

    Args:
      path: the file.
      start: byte offset of the first element.
      dtype: the stored dtype (cast to out.dtype while copying).
      out: the destination, any strides; its shape is the stored tensor's, reshaped.
    """
    dtype = np.dtype(dtype)
    if out.size == 0:
        return
    rows = out.shape[0] if out.ndim else 1
    row_items = out.size // rows
    row_bytes = row_items * dtype.itemsize
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    gran = mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            begin = start + r0 * row_bytes
            aligned = begin - begin % gran
            mm = mmap.mmap(
                f.fileno(),
                (r1 - r0) * row_bytes + begin - aligned,
                access=mmap.ACCESS_READ,
                offset=aligned,
            )
            try:
                src = np.frombuffer(mm, dtype, count=(r1 - r0) * row_items, offset=begin - aligned)
                if out.ndim:
                    np.copyto(out[r0:r1], src.reshape((r1 - r0, *out.shape[1:])), casting="unsafe")
                else:
                    np.copyto(out, src.reshape(()), casting="unsafe")
                del src
            finally:
                mm.close()


class MappedTensor:
    """A tensor stored in a file: shape and dtype now, bytes on `read()`.

    Subclasses (safetensors entries, `.pth` storages) set `path`, `shape` and `dtype` and
    implement `read_into`.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensor."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The tensor as a new C-contiguous numpy array."""
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out

    def read_into(self, out: np.ndarray) -> None:
        """Copy the tensor into `out` (same number of elements, any strides and dtype)."""
        raise NotImplementedError

    def _check_size(self, out: np.ndarray) -> None:
        if out.size != int(np.prod(self.shape, dtype=np.int64)):
            raise LlamaError(f"{self.path}: cannot read shape {self.shape} into {out.shape}.")


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise; Linux only).

    Orbax's writer threads allocate and free large buffers; without this, the resident
    set of a long conversion creeps up by tens of MB per block through fragmentation.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
