"""PyTorch `.pth` / `.bin` files without torch and without running the file's code.

`torch.save` writes a zip archive (stored, not compressed):

    <prefix>/data.pkl      a pickle of the state dict; each tensor is a call to
                           torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                           whose storage is a "persistent id" ('storage', torch.BFloat16Storage,
                           key, location, numel) naming the file <prefix>/data/<key>
    <prefix>/data/<key>    raw little-endian bytes of one storage
    <prefix>/version, <prefix>/byteorder

A plain `pickle.load` of data.pkl would call whatever the pickle names (os.system
included). `read_pth` unpickles with an allow-list of the four kinds of global a state
dict needs, each mapped to a harmless stand-in, and returns `LazyTensor`s: shape, dtype
and where the bytes lie. `LazyTensor.read()` memory-maps just that tensor's bytes and
copies them out, so a converter holds one tensor at a time, never the whole file.

Nothing in the pickle is trusted. Every tensor's storage offset, sizes and strides must
be non-negative integers, its elements must lie inside its storage, and its shape may
hold no more elements than the storage does (zero strides included), so reading a
tensor never touches bytes outside its storage or allocates more than the file holds.
data.pkl may inflate to at most `MAX_PICKLE_BYTES`. Objects the unpickler builds cannot
be altered afterwards by the pickle (BUILD), so what was checked is what is read.

`write_pth` is the inverse: it streams tensors into the same zip layout and writes the
pickle by hand (opcodes, no pickler), so `torch.load(..., weights_only=True)` and Meta's
code read it while this package never imports torch.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from llama_jax.checkpoint.mapped import MappedTensor, copy_into
from llama_jax.errors import LlamaError, brief

# torch storage class names -> numpy dtypes (bfloat16 through ml_dtypes, bit-exact).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES = {v: k for k, v in STORAGE_DTYPES.items()}
# A state dict's pickle is about 150 bytes per tensor (405B's largest shard: ~200 KB).
# Unpickled objects take up to ~20x the bytes that name them, so this bounds memory too.
MAX_PICKLE_BYTES = 16 * 2**20
_MAX_DIMS = 32


class _Sealed:
    """Refuses the pickle's BUILD opcode, which would overwrite checked attributes."""

    def __setstate__(self, state):
        raise LlamaError(
            "the pickle tries to modify a tensor or storage after creating it (BUILD), "
            "which torch.save never writes"
        )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


@dataclass(frozen=True)
class _StorageType(_Sealed):
    """Stand-in for a torch.*Storage class named in the pickle."""

    name: str


@dataclass(frozen=True)
class _StorageRef(_Sealed):
    """A storage: the zip member `data/<key>` holding `numel` elements of `dtype`."""

    key: str
    dtype: np.dtype
    numel: int


class LazyTensor(_Sealed, MappedTensor):
    """A tensor inside a `.pth` archive: metadata now, bytes on `read()`."""

    def __init__(
        self,
        path: str,
        member: zipfile.ZipInfo,
        data_offset: int,
        storage: _StorageRef,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
    ):
        self.path = path
        self._member = member
        self._data_offset = data_offset  # byte offset of the storage inside the file
        self.storage = storage
        self.offset = offset  # in elements, into the storage
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)
        self.dtype = storage.dtype

    def read_into(self, out: np.ndarray) -> None:
        """Copy the tensor into `out` (same number of elements, any strides and dtype).

        The bytes are memory-mapped a slice at a time, so the file's pages never all
        sit in memory; the dtype is cast while copying.
        """
        self._check_size(out)
        contiguous = tuple(self.stride) == tuple(
            int(np.prod(self.shape[i + 1 :], dtype=np.int64)) for i in range(len(self.shape))
        )
        start = self._data_offset + self.offset * self.dtype.itemsize
        if contiguous or out.size <= 1:
            copy_into(self.path, start, self.dtype, out)
            return
        # A strided view of a storage (rare in checkpoints): map its whole span once.
        item = self.dtype.itemsize
        span = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride, strict=True))
        flat = np.empty(span, self.dtype)
        copy_into(self.path, start, self.dtype, flat)
        view = np.lib.stride_tricks.as_strided(
            flat, self.shape, tuple(st * item for st in self.stride), writeable=False
        )
        np.copyto(out, view.reshape(out.shape), casting="unsafe")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; any global outside the allow-list is refused."""

    def __init__(self, data: bytes, path: str, make_tensor):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._make_tensor = make_tensor
        self._dtypes: dict[str, np.dtype] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise LlamaError(
            f"{self._path}: the pickle asks for {module}.{name}, which a tensor state dict never "
            "needs; refusing to load it (a .pth file can run arbitrary code when unpickled). "
            "Only torch tensors in dicts are accepted: re-save the weights with "
            "torch.save(model.state_dict(), ...) from a trusted environment."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise LlamaError(f"{self._path}: unexpected persistent id {brief(pid)} in data.pkl.")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise LlamaError(f"{self._path}: storage type {brief(storage_type)} is not supported.")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_count(numel):
            raise LlamaError(
                f"{self._path}: malformed storage record {brief(pid)} in data.pkl (expected a "
                "key, a location and a non-negative element count)."
            )
        dtype = STORAGE_DTYPES[storage_type.name]
        if self._dtypes.setdefault(key, dtype) != dtype:
            raise LlamaError(f"{self._path}: storage {key!r} is named with two dtypes.")
        return _StorageRef(key, dtype, numel)

    def _rebuild_tensor_v2(self, storage, offset, size, stride, *rest):
        if not isinstance(storage, _StorageRef):
            raise LlamaError(f"{self._path}: a tensor without a storage in data.pkl.")
        shape_ok = isinstance(size, tuple) and len(size) <= _MAX_DIMS and all(map(_is_count, size))
        stride_ok = isinstance(stride, tuple) and len(stride) == len(size) if shape_ok else False
        if not (_is_count(offset) and shape_ok and stride_ok and all(map(_is_count, stride))):
            raise LlamaError(
                f"{self._path}: a tensor on storage {storage.key!r} has offset {brief(offset)}, "
                f"size {brief(size)}, stride {brief(stride)}; each must be non-negative "
                "integers (as torch.save writes), with one stride per dimension."
            )
        return self._make_tensor(storage, offset, size, stride)


def _local_data_offset(f, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored zip member's data (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise LlamaError(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_pth(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Read the tensor index of a `torch.save` zip file without executing its pickle.

    Args:
      path: a `.pth` or `pytorch_model*.bin` file.
    Returns:
      {name: LazyTensor} in the file's order; call `.read()` for the data.
    Raises:
      LlamaError: the file is missing, truncated, not a torch zip archive, asks for a
        callable outside the allow-list, or has a tensor whose offset, sizes or strides
        do not fit its storage (the message names the storage).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LlamaError(f"{path}: no such file.")
    try:
        return _read_pth(path)
    except LlamaError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        OverflowError,
        struct.error,
        NotImplementedError,
        RuntimeError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        RecursionError,
        MemoryError,
    ) as e:
        # A malformed archive or pickle: name the file, not zipfile's or pickle's internals.
        raise LlamaError(
            f"{path}: corrupt torch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "download it again or re-save it with torch.save."
        ) from None


def _read_pth(path: str) -> dict[str, LazyTensor]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise LlamaError(
            f"{path}: not a zip-format torch checkpoint (torch >= 1.6 writes zip files; this "
            "may be the legacy format or a different file). Re-save it with a current torch."
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise LlamaError(
            f"{path}: truncated or corrupt zip archive ({e}); download it again."
        ) from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise LlamaError(f"{path}: expected one data.pkl in the archive, found {brief(pkl)}.")
        prefix = pkl[0][: -len("data.pkl")]
        if zf.getinfo(pkl[0]).file_size > MAX_PICKLE_BYTES:
            raise _too_big(path)
        try:
            with zf.open(pkl[0]) as member:
                data = member.read(MAX_PICKLE_BYTES + 1)  # the declared size may lie
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise LlamaError(f"{path}: cannot read data.pkl ({e}); the file is corrupt.") from None
        if len(data) > MAX_PICKLE_BYTES:
            raise _too_big(path)
        infos = {i.filename: i for i in zf.infolist()}
        size = os.path.getsize(path)
        offsets: dict[str, tuple[zipfile.ZipInfo, int]] = {}

        with open(path, "rb") as f:

            def make_tensor(storage: _StorageRef, offset, shape, stride) -> LazyTensor:
                member = f"{prefix}data/{storage.key}"
                if member not in offsets:
                    info = infos.get(member)
                    if info is None:
                        raise LlamaError(f"{path}: storage {member} is missing from the archive.")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise LlamaError(f"{path}: storage {member} is compressed; re-save it.")
                    try:
                        start = _local_data_offset(f, info)
                    except LlamaError as e:
                        raise LlamaError(f"{path}: {e}; the file is corrupt.") from None
                    need = storage.numel * storage.dtype.itemsize
                    if info.file_size < need or start + need > size:
                        raise LlamaError(
                            f"{path}: storage {member} holds {info.file_size} bytes but its "
                            f"tensors need {need}; the file is truncated or corrupt."
                        )
                    offsets[member] = (info, start)
                info, start = offsets[member]
                numel = math.prod(shape)
                # Checked in Python integers: nothing here can overflow or wrap around.
                span = 1 + sum((s - 1) * st for s, st in zip(shape, stride, strict=True))
                if numel and (numel > storage.numel or offset + span > storage.numel):
                    raise LlamaError(
                        f"{path}: a tensor of shape {brief(shape)}, stride {brief(stride)} at "
                        f"offset {offset} reaches past the {storage.numel} elements of storage "
                        f"{member}; the file is corrupt or crafted."
                    )
                return LazyTensor(path, info, start, storage, offset, shape, stride)

            obj = _RestrictedUnpickler(data, path, make_tensor).load()
    if isinstance(obj, dict) and set(obj) >= {"model"} and isinstance(obj["model"], dict):
        obj = obj["model"]  # some trainers wrap the state dict
    if not isinstance(obj, dict):
        raise LlamaError(f"{path}: expected a state dict, found {type(obj).__name__}.")
    out = {}
    for name, value in obj.items():
        if isinstance(value, LazyTensor):
            if not isinstance(name, str):
                raise LlamaError(f"{path}: a tensor is named {brief(name)}, not a string.")
            out[name] = value
    return out


def _too_big(path: str) -> LlamaError:
    return LlamaError(
        f"{path}: data.pkl inflates to more than {MAX_PICKLE_BYTES} bytes, far more than a "
        "state dict's index needs; the file is corrupt or crafted."
    )


# Writing ---------------------------------------------------------------------------


def _int(v: int) -> bytes:
    if 0 <= v < 2**31:
        return b"J" + struct.pack("<i", v)  # BININT
    raw = int(v).to_bytes((int(v).bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(items: Iterable[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _state_dict_pickle(entries: list[tuple[str, str, np.dtype, tuple[int, ...]]]) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors, each on its own storage."""
    ordered_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    out = [b"\x80\x02", ordered_dict, b"("]
    for name, key, dtype, shape in entries:
        numel = int(np.prod(shape, dtype=np.int64))
        stride = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
        storage = (
            _tuple(
                [
                    _str("storage"),
                    _global("torch", _DTYPE_STORAGES[np.dtype(dtype)]),
                    _str(key),
                    _str("cpu"),
                    _int(numel),
                ]
            )
            + b"Q"  # BINPERSID
        )
        args = _tuple(
            [
                storage,
                _int(0),
                _tuple(map(_int, shape)),
                _tuple(map(_int, stride)),
                b"\x89",
                ordered_dict,
            ]
        )
        out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    out += [b"u", b"."]  # SETITEMS, STOP
    return b"".join(out)


def write_pth(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """Stream (name, array) pairs into a `torch.save`-compatible zip file.

    Each array is written as soon as it arrives, so callers can produce them one at a
    time. bfloat16 arrays (ml_dtypes) are written bit-exact as torch.bfloat16.

    Args:
      path: the file to create.
      tensors: (name, numpy array) pairs, in the order the state dict should list them.
    Returns:
      The number of tensor bytes written.
    """
    prefix = os.path.splitext(os.path.basename(os.fspath(path)))[0] or "archive"
    entries = []
    total = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, (name, arr) in enumerate(tensors):
            arr = np.ascontiguousarray(arr)
            if arr.dtype not in _DTYPE_STORAGES:
                raise LlamaError(f"Tensor {name!r} has dtype {arr.dtype}, not storable in .pth.")
            with zf.open(f"{prefix}/data/{i}", "w", force_zip64=arr.nbytes > 2**31 - 2**20) as w:
                w.write(memoryview(arr.reshape(-1).view(np.uint8)))
            entries.append((name, str(i), arr.dtype, tuple(arr.shape)))
            total += arr.nbytes
        zf.writestr(f"{prefix}/data.pkl", _state_dict_pickle(entries))
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/version", "3\n")
    return total
