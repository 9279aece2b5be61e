"""The converted-weights checkpoint: an Orbax checkpoint per tensor group, plus the config.

On disk:

    DST/
      llama_jax.json              {"format": "llama-jax", "version": 1, "config": {...}}
                                  (+ "quantization": "int8" for an int8 checkpoint)
      tokenizer.model             copied from the source when it has one
      params/tok_embeddings/      Orbax PyTree checkpoint {"tok_embeddings": [V, D]}
      params/norm/                {"norm": {"weight": [D]}}
      params/output/              {"output": [D, V]} (absent with tied embeddings)
      params/layers/00000/        one block: {"attention": {"wq": [D, N, H], ...},
      ...                          "feed_forward": {...}, "attention_norm": ..., "ffn_norm": ...}

An int8 checkpoint (`save` of a model quantized by `llama_jax.inference.int8`) holds
each projection weight as its int8 `values` and float32 `scale`, e.g.
{"attention": {"wq": {"values": [D, N, H] int8, "scale": [N, H] float32}, ...}}, and its
llama_jax.json says "quantization": "int8"; embeddings and norms stay float.

One Orbax checkpoint per block, as the model holds its blocks: the converter writes a
block at a time, so host memory stays near one block whatever the depth, and `load`
reads each block straight onto the devices of the target mesh (Orbax reads only each
device's slice), never holding a whole parameter on one device or on the host.

Every writer builds the directory as a hidden temporary sibling and renames it into
place when complete: an interrupted run leaves no partial DST, and an existing DST is
replaced only with `force=True`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from llama_jax.checkpoint.jsonio import read_json
from llama_jax.checkpoint.tokenizer_files import HF_TOKENIZER_FILES
from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError

CONFIG_FILE = "llama_jax.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = "llama-jax"
VERSION = 1
TOP = (("tok_embeddings",), ("norm", "weight"), ("output",))
QUANTIZATIONS = ("int8",)  # the values of llama_jax.json's "quantization" (absent: float)


def top_dir(path: tuple[str, ...]) -> str:
    """Directory (under params/) of a top-level parameter."""
    return os.path.join("params", path[0])


def layer_dir(layer: int) -> str:
    """Directory (under the checkpoint) of block `layer`."""
    return os.path.join("params", "layers", f"{layer:05d}")


# Atomic directories -------------------------------------------------------------------


def _primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """A barrier across processes (multi-host); nothing on one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"llama_jax.checkpoint.{name}")


def _shared_tag() -> str:
    """A random tag, the same on every process (process 0's)."""
    tag = uuid.uuid4().int % 2**31
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tag = int(multihost_utils.broadcast_one_to_all(np.int32(tag)))
    return f"{tag:08x}"


def check_destination(dst: str, force: bool = False, protect=()) -> None:
    """Refuse a destination that would overwrite or swallow the user's files.

    Args:
      dst: the directory to create (absolute).
      force: whether an existing `dst` may be replaced.
      protect: paths (the source) that `dst` must not be, lie inside, or contain;
        compared after resolving symbolic links.
    Raises:
      LlamaError: naming the path and why; nothing has been touched.
    """
    real = os.path.realpath(dst)
    for path in protect:
        src = os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))
        for d in {real, dst}:
            if d == src or d.startswith(src + os.sep) or src.startswith(d + os.sep):
                how = "is" if d == src else "is inside" if d.startswith(src) else "contains"
                raise LlamaError(
                    f"{dst}: the destination {how} the source {src}; writing there could "
                    "delete the weights being read. Choose a destination outside the source."
                )
    if os.path.lexists(dst) and not force:
        what = f"a symbolic link to {os.readlink(dst)}" if os.path.islink(dst) else "it exists"
        raise LlamaError(
            f"{dst} already exists ({what}); choose another destination or pass --force."
        )
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise LlamaError(f"{parent}: the destination's parent directory does not exist.")


def _remove(path: str) -> None:
    """Delete a file, a symbolic link (not its target) or a directory tree."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _os_error(dst: str, e: BaseException) -> LlamaError | None:
    """A LlamaError naming the path and the cause of a failed write, or None."""
    if isinstance(e, OSError):
        where = e.filename or dst
        return LlamaError(
            f"{where}: cannot write ({e.strerror or e}); nothing was written to {dst}."
        )
    text = str(e)
    causes = ("No space left on device", "Read-only file system", "Permission denied")
    for cause in causes:
        if cause in text:  # tensorstore (Orbax's writer) reports these as other types
            return LlamaError(f"{dst}: cannot write ({cause}); nothing was written there.")
    return None


class _Signals:
    """SIGTERM raises like Ctrl-C, and both wait while the directory is being swapped."""

    def __init__(self):
        self.busy = False
        self.pending: int | None = None
        self.saved: dict = {}

    def handler(self, signum, frame):
        if self.busy:
            self.pending = signum
            return
        self.raise_for(signum)

    @staticmethod
    def raise_for(signum):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self.handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.saved.items():
            signal.signal(sig, old)

    @contextlib.contextmanager
    def deferred(self):
        """Signals arriving inside are raised when it ends."""
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
            if self.pending is not None:
                signum, self.pending = self.pending, None
                self.raise_for(signum)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, force: bool = False, protect=()) -> Iterator[str]:
    """Yield a temporary sibling of `dst` to fill; rename it to `dst` on success.

    On a multi-host run every process must enter it (as with Orbax saves): process 0
    creates and renames the directory, the others wait at barriers, and all of them
    write into the same temporary directory in between.

    Args:
      dst: the directory to create.
      force: replace `dst` (a directory, a file or a symbolic link; never a link's
        target) if it exists, only after the new one is complete.
      protect: paths `dst` must not be, lie inside or contain (the source).
    Yields:
      The temporary directory's path. On any exception, SIGINT or SIGTERM it is deleted
      and `dst` is left as it was; on success no temporary or old sibling remains. A
      failed write (disk full, read-only, permissions) becomes one LlamaError naming
      the path and the cause.
    """
    dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    check_destination(dst, force, protect)
    parent = os.path.dirname(dst)
    tag = _shared_tag()
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{tag}")
    old = os.path.join(parent, f".{os.path.basename(dst)}.old-{tag}")
    with _Signals() as signals:
        try:
            if _primary():
                os.makedirs(tmp)
            _sync(f"created-{tag}")
            yield tmp
            _sync(f"written-{tag}")
            if _primary():
                with signals.deferred():
                    if os.path.lexists(dst):
                        os.rename(dst, old)
                        try:
                            os.rename(tmp, dst)
                        except BaseException:
                            os.rename(old, dst)  # put the user's DST back
                            raise
                        _remove(old)
                    else:
                        os.rename(tmp, dst)
            _sync(f"renamed-{tag}")
        except BaseException as e:
            if _primary():
                with signals.deferred():
                    _remove(tmp)
            error = _os_error(dst, e) if isinstance(e, Exception) else None
            if error is not None:
                raise error from None
            raise


# Writing ------------------------------------------------------------------------------


def _checkpointer():
    import orbax.checkpoint as ocp

    # zstd compression would save 10-30% of disk on bf16 weights but costs the writer
    # about 0.7x the largest tensor in extra host memory; streaming favours memory.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def write_group(root: str, sub: str, tree: dict) -> None:
    """Save one tensor group (a dict of numpy or jax arrays) as an Orbax checkpoint."""
    import orbax.checkpoint as ocp

    target = os.path.join(root, sub)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    _checkpointer().save(target, args=ocp.args.PyTreeSave(tree))


def write_config(root: str, cfg: LlamaConfig, tokenizer: str | None = None, **extra) -> None:
    """Record the config (and copy the tokenizer file) into a checkpoint being written."""
    if not _primary():
        return
    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), **extra}
    with open(os.path.join(root, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(root, TOKENIZER_FILE))


def layer_tree(flat: dict[tuple[str, ...], object]) -> dict:
    """{("attention", "wq"): a, ...} -> {"attention": {"wq": a}, ...}."""
    tree: dict = {}
    for (group, leaf), value in flat.items():
        tree.setdefault(group, {})[leaf] = value
    return tree


def model_quantization(model) -> str | None:
    """How a model's projection weights would be saved: None (float) or "int8".

    Args:
      model: a `Transformer`, plain or quantized by `llama_jax.inference.int8.quantize`.
    Returns:
      None when every projection (wq ... w3, an untied output) is a float nnx.Param,
      "int8" when every one is an `Int8Weight`.
    Raises:
      LlamaError: a projection that is neither (e.g. a LoRA adapter around a weight), or
        a mix of float and int8 projections; the message names one and what to do.
    """
    from llama_jax.inference import int8

    layer_of = {id(m): i for i, block in enumerate(model.layers) for m in vars(block).values()}
    kinds: dict[str, str] = {}
    for owner, attr, path in int8.projections(model):
        name = ".".join(path)
        if path[0] == "layers":
            name = f"layers.{layer_of.get(id(owner), '?')}.{path[1]}.{attr}"
        w = getattr(owner, attr)
        if isinstance(w, int8.Int8Weight):
            kinds.setdefault("int8", name)
        elif isinstance(w, nnx.Param) and not jnp.issubdtype(w.dtype, jnp.integer):
            kinds.setdefault("float", name)
        else:
            raise LlamaError(
                f"{name} is a {type(w).__name__}, neither a float weight (nnx.Param) nor an "
                "Int8Weight, so it cannot be saved as a checkpoint. Merge LoRA adapters into "
                "the weights first (llama_jax.training.lora.merge(model)) or save the adapters "
                "alone (lora.export_peft)."
            )
    if len(kinds) > 1:
        raise LlamaError(
            f"{kinds['int8']} is int8 but {kinds['float']} is float: a checkpoint holds all "
            "projection weights in one precision. Quantize the rest "
            "(llama_jax.inference.int8.quantize(model)) or save a float model."
        )
    return "int8" if "int8" in kinds else None


def save(
    model,
    path: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    force: bool = False,
):
    """Write a model's weights and config as a llama-jax checkpoint directory.

    Works for a model on one device or sharded over a mesh: each block is written by
    Orbax from wherever it lives. A model quantized by `llama_jax.inference.int8` is
    written as it is (int8 values and float32 scales, "quantization": "int8" in
    llama_jax.json) and `load` reads it back without quantizing again.

    Args:
      model: a `Transformer`, with float or int8 (`Int8Weight`) projections.
      path: the directory to create (atomically: a temporary sibling, then a rename).
      tokenizer: a tokenizer.model file to copy into the checkpoint, or None.
      tokenizer_from: a checkpoint directory whose tokenizer files (tokenizer.model and
        Hugging Face's, whichever it holds) are copied into the new one, e.g. the float
        checkpoint a quantized model was loaded from; `path` must lie outside it.
      force: replace an existing directory.
    Returns:
      The absolute path written.
    Raises:
      LlamaError: before anything is written, for a projection that is neither float nor
        int8 (LoRA: merge it first) or a mix of both (see `model_quantization`).
    """
    cfg = model.cfg
    if tokenizer is not None:
        tokenizer = os.path.expanduser(os.fspath(tokenizer))
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise LlamaError(f"tokenizer {tokenizer}: no such file.")
    quantization = model_quantization(model)
    extra = {} if quantization is None else {"quantization": quantization}
    copied = []
    if tokenizer_from is not None:
        tokenizer_from = _abs(tokenizer_from)
        names = (TOKENIZER_FILE, *HF_TOKENIZER_FILES)
        copied = [n for n in names if os.path.isfile(os.path.join(tokenizer_from, n))]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    protect = () if tokenizer_from is None else (tokenizer_from,)
    with atomic_directory(path, force, protect) as tmp:
        write_group(tmp, top_dir(("tok_embeddings",)), {"tok_embeddings": params["tok_embeddings"]})
        write_group(tmp, top_dir(("norm",)), {"norm": {"weight": params["norm"]["weight"]}})
        if not cfg.tie_word_embeddings:
            write_group(tmp, top_dir(("output",)), {"output": params["output"]})
        for i in range(cfg.n_layers):
            write_group(tmp, layer_dir(i), params["layers"][i])
        write_config(tmp, cfg, tokenizer, **extra)
        for name in copied if _primary() else ():
            shutil.copyfile(os.path.join(tokenizer_from, name), os.path.join(tmp, name))
    return _abs(path)


def _abs(path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


# Reading ------------------------------------------------------------------------------


def _read_meta(path: str) -> dict:
    if not os.path.isdir(path):
        raise LlamaError(f"{path}: no such checkpoint directory.")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise LlamaError(
            f"{path}: no {CONFIG_FILE}, so this is not a llama-jax checkpoint. Convert Meta or "
            "Hugging Face weights first: llama-jax convert SRC DST."
        )
    meta = read_json(file)
    if not isinstance(meta, dict) or "config" not in meta:
        raise LlamaError(f"{file}: expected a JSON object with a 'config'; the file is corrupt.")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LlamaError(
            f"{file}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{FORMAT!r} version {VERSION}."
        )
    return meta


def _quantization(meta: dict, file: str) -> str | None:
    if "quantization" not in meta:
        return None
    value = meta["quantization"]
    if value not in QUANTIZATIONS:
        raise LlamaError(
            f'{file}: "quantization": {json.dumps(value)} is not one this version reads '
            f"({', '.join(QUANTIZATIONS)}; absent for float weights). The file was edited or "
            "written by a newer llama-jax; re-create the checkpoint."
        )
    return value


def read_quantization(path: str | os.PathLike) -> str | None:
    """How a llama-jax checkpoint stores its projection weights.

    Args:
      path: the checkpoint directory.
    Returns:
      None for float weights (no "quantization" in llama_jax.json), or "int8" (int8
      values and float32 scales per output channel, `llama_jax.inference.int8`).
    Raises:
      LlamaError: not a checkpoint, or a "quantization" value this version cannot read.
    """
    path = _abs(path)
    return _quantization(_read_meta(path), os.path.join(path, CONFIG_FILE))


def load_config(path: str | os.PathLike) -> LlamaConfig:
    """The `LlamaConfig` recorded in a llama-jax checkpoint.

    Args:
      path: the checkpoint directory.
    Returns:
      The config, with the dtypes the weights were stored in.
    """
    return read_header(path)[0]


def read_header(path: str | os.PathLike) -> tuple[LlamaConfig, str | None]:
    """The config and the quantization a checkpoint records, from one read of llama_jax.json.

    Whatever is read from the checkpoint afterwards is sized and typed from these two,
    so they come from the same version of the file.

    Args:
      path: the checkpoint directory.
    Returns:
      (config, quantization): as `load_config` and `read_quantization` give them.
    Raises:
      LlamaError: not a checkpoint, an invalid config or quantization, or a depth that
        does not match the blocks on disk.
    """
    path = _abs(path)
    file = os.path.join(path, CONFIG_FILE)
    meta = _read_meta(path)
    quantization = _quantization(meta, file)
    try:
        cfg = LlamaConfig.from_dict(meta["config"])
    except LlamaError as e:
        raise LlamaError(f"{file}: {e}") from None
    # Compare the recorded depth with the blocks on disk before anything is sized from
    # it: a config claiming 10^9 layers must not allocate 10^9 of anything.
    layers = os.path.join(path, "params", "layers")
    if os.path.isdir(layers):
        present = {n for n in os.listdir(layers) if len(n) == 5 and n.isdigit()}
        missing = sorted(set(range(cfg.n_layers)) - {int(n) for n in present})
        if missing:
            raise LlamaError(
                f"{os.path.join(layers, f'{missing[0]:05d}')}: missing; the checkpoint is "
                f"incomplete ({len(missing)} of the {cfg.n_layers} blocks {CONFIG_FILE} "
                "records are absent). Convert or save it again."
            )
        if len(present) != cfg.n_layers:
            raise LlamaError(
                f"{file}: n_layers={cfg.n_layers} but {layers} holds {len(present)} blocks; "
                "the config was edited or belongs to another checkpoint."
            )
    return cfg, quantization


def read_group(root: str, sub: str, targets: dict) -> dict:
    """Restore one tensor group.

    Args:
      root: the checkpoint directory.
      sub: the group's directory under it.
      targets: a tree like the group's, whose leaves are (shape, dtype, sharding) or
        (shape, dtype, None) for host numpy arrays.
    Returns:
      The tree with jax arrays placed on their shardings (or numpy arrays).
    """
    import orbax.checkpoint as ocp

    where = os.path.join(root, sub)
    check_group(where)

    def args(t):
        shape, dtype, sharding = t
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dtype)

    is_leaf = lambda x: isinstance(x, tuple)
    # Orbax pads or truncates to the requested global shape, so check the stored shapes
    # against the config first.
    try:
        stored = _checkpointer().metadata(where).item_metadata.tree
    except Exception as e:  # Orbax and tensorstore raise many types for a damaged group
        raise _broken(where, f"cannot read its metadata: {type(e).__name__}: {e}") from None
    flat_stored = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    for key, t in jax.tree_util.tree_flatten_with_path(targets, is_leaf=is_leaf)[0]:
        got = flat_stored.get(key)
        if got is None:
            raise _missing(where, key, flat_stored)
        if tuple(got.shape) != tuple(t[0]):
            raise LlamaError(
                f"{where}: array {jax.tree_util.keystr(key)} has shape {tuple(got.shape)} on "
                f"disk but the recorded config needs {tuple(t[0])}; the checkpoint is "
                f"inconsistent with {CONFIG_FILE}."
            )
        # Orbax casts to the requested dtype whatever is stored: int8 values read as
        # floats (or floats as int8) would load without a word. Float to float is the
        # `dtype=` override and stays allowed.
        stored_dtype = getattr(got, "dtype", None)
        if stored_dtype is not None and _kind(stored_dtype) != _kind(t[1]):
            raise LlamaError(
                f"{where}: array {jax.tree_util.keystr(key)} is {np.dtype(stored_dtype).name} "
                f"on disk but the recorded config needs {np.dtype(t[1]).name}; the checkpoint "
                f'is inconsistent with {CONFIG_FILE} (its "quantization" field was edited, '
                "or a group was replaced). Re-create the checkpoint."
            )
    restore_args = jax.tree.map(args, targets, is_leaf=is_leaf)
    item = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t[0], t[1]), targets, is_leaf=is_leaf)
    try:
        out = _checkpointer().restore(
            where, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        )
    except LlamaError:
        raise
    except Exception as e:
        raise _broken(where, f"cannot restore it: {type(e).__name__}: {e}") from None
    return out


def _kind(dtype) -> str:
    """The dtype's kind ("float", "int", else its name): what a read may not change."""
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if jnp.issubdtype(dtype, jnp.integer):
        return "int"
    return np.dtype(dtype).name


def _missing(where: str, key: tuple, flat_stored: dict) -> LlamaError:
    """The error for a wanted array absent from a group, saying what is there instead."""
    name = jax.tree_util.keystr(key)
    inside = [k for k in flat_stored if len(k) > len(key) and k[: len(key)] == key]
    names = lambda k: getattr(k[-1], "key", k[-1])
    fix = "The file was edited or belongs to another checkpoint; re-create the checkpoint."
    if inside and {names(k) for k in inside} == {"values", "scale"}:
        return LlamaError(
            f"{where}: {name} is stored as int8 values and scales but {CONFIG_FILE} records a "
            f'float checkpoint (no "quantization": "int8"). {fix}'
        )
    if names(key) in ("values", "scale") and key[:-1] in flat_stored:
        return LlamaError(
            f"{where}: {jax.tree_util.keystr(key[:-1])} is stored as one float array but "
            f'{CONFIG_FILE} records "quantization": "int8" (int8 values and scales). {fix}'
        )
    return LlamaError(
        f"{where}: array {name} is not on disk but the recorded config needs it; the "
        f"checkpoint is inconsistent with {CONFIG_FILE}."
    )


_OCDBT_MAGIC = b"\x0c\xdb"  # first bytes of every manifest and data file of Orbax's OCDBT store


def _broken(where: str, why: str) -> LlamaError:
    return LlamaError(
        f"{where}: this tensor group is damaged ({why[:300]}). Re-create the checkpoint "
        "(convert or save it again) or use an intact copy; for a training run, resume from "
        "an earlier step."
    )


def check_group(where: str) -> None:
    """Check that one Orbax tensor group is complete and not visibly damaged.

    Cheap (reads a few bytes per file): the directory, its metadata (JSON with a tree)
    and the OCDBT manifests must be present and start as they should, and every data
    file must be non-empty: this catches truncated, zeroed and half-deleted groups.
    Damage inside the data is still reported by `read_group` when restoring.

    Args:
      where: the group's directory (e.g. CKPT/params/layers/00003, or one item of a
        training step).
    Raises:
      LlamaError: naming the group, what is wrong and what to do.
    """
    if not os.path.isdir(where):
        raise _broken(where, "the directory is missing")
    meta_file = os.path.join(where, "_METADATA")
    if not os.path.isfile(meta_file):
        raise _broken(where, "its _METADATA file is missing")
    try:
        meta = read_json(meta_file)
    except LlamaError as e:
        raise _broken(where, f"_METADATA is unreadable: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
        raise _broken(where, "_METADATA holds no tree")
    if not meta.get("use_ocdbt", True):
        return
    manifest = os.path.join(where, "manifest.ocdbt")
    if not os.path.isfile(manifest):
        raise _broken(where, "manifest.ocdbt is missing")
    data_files = 0
    for dirpath, _, files in os.walk(where):
        for name in files:
            file = os.path.join(dirpath, name)
            manifest_file = name == "manifest.ocdbt"
            if not manifest_file and os.path.basename(dirpath) != "d":
                continue
            data_files += not manifest_file
            try:
                with open(file, "rb") as f:
                    head = f.read(len(_OCDBT_MAGIC))
            except OSError as e:
                raise _broken(where, f"{file} is unreadable ({e.strerror})") from None
            # Manifests start with the store's magic; data files (b-tree nodes or raw
            # array bytes) can only be checked for being there and non-empty.
            if not head or (manifest_file and head != _OCDBT_MAGIC):
                raise _broken(where, f"{file} is empty, truncated or overwritten")
    if not data_files:
        raise _broken(where, "its data files (d/) are missing")


def read_layer_host(path: str, cfg: LlamaConfig, layer: int, quantization: str | None) -> dict:
    """Block `layer` as host numpy arrays in its stored dtype: {"attention": {"wq": ...}}.

    `cfg` and `quantization` are the checkpoint's (`read_header`). In an int8 checkpoint
    each projection is {"values": int8, "scale": float32}.
    """
    block = _abstract_params(cfg, quantization)["layers"][0]
    targets = jax.tree.map(lambda s: (s.shape, s.dtype, None), block)
    return read_group(path, layer_dir(layer), targets)


def read_top_host(
    path: str, cfg: LlamaConfig, name: tuple[str, ...], quantization: str | None
) -> np.ndarray | dict:
    """A top-level parameter (tok_embeddings, norm/weight, output) as a host numpy array.

    `cfg` and `quantization` are the checkpoint's (`read_header`). In an int8 checkpoint
    `output` is {"values": int8, "scale": float32}.
    """
    params = _abstract_params(cfg, quantization)
    leaf = params[name[0]] if len(name) == 1 else params[name[0]][name[1]]
    target = jax.tree.map(lambda s: (s.shape, s.dtype, None), leaf)
    target = {name[0]: target} if len(name) == 1 else {name[0]: {name[1]: target}}
    out = read_group(path, top_dir(name), target)
    return out[name[0]] if len(name) == 1 else out[name[0]][name[1]]


@functools.lru_cache(maxsize=4)
def _abstract_params(cfg: LlamaConfig, quantization: str | None = None) -> dict:
    from llama_jax.inference import int8
    from llama_jax.model import Transformer

    create = lambda: Transformer(cfg, rngs=nnx.Rngs(0))
    if quantization is not None:
        create = lambda: int8.quantize(Transformer(cfg, rngs=nnx.Rngs(0)), quantization)
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(create), nnx.Param))


def load(
    path: str | os.PathLike,
    mesh=None,
    dtype: str | None = None,
    *,
    remat: str = "none",
    attention: str = "xla",
    quantize: str | None = None,
):
    """A ready model from a llama-jax checkpoint, each array on its final sharding.

    Each block is read by Orbax straight onto the target devices (every device reads only
    its own slice); no parameter is first gathered on the host or on one device. A
    checkpoint written from any mesh loads onto any other.

    Args:
      path: the checkpoint directory (from `convert` or `save`).
      mesh: a `jax.sharding.Mesh` with axes among ("data", "fsdp", "tensor") or a spec for
        `sharding.make_mesh`; parameters are placed by the rules in llama_jax.sharding.
        None: the first local device.
      dtype: "float32", "bfloat16" or "float16" to override both the stored parameter
        dtype and the compute dtype; None keeps the recorded config.
      remat: rematerialisation policy of the returned model (see model.REMAT_POLICIES).
      attention: the attention kernel (see model.Transformer).
      quantize: "int8" to quantize the projection weights as each block is read
        (`llama_jax.inference.int8`: host and device memory stay near the int8 model
        plus one float block); None keeps them in the parameter dtype. An int8
        checkpoint ("quantization": "int8", written by `save` of an int8 model) is read
        as it is stored, with None or "int8" alike: its values and scales go straight
        onto their shardings, not quantized again.
    Returns:
      The model, a CompiledTransformer: `model(tokens)` runs compiled (model/compiled.py).
    """
    from llama_jax.inference import int8
    from llama_jax.model.compiled import CompiledTransformer
    from llama_jax.sharding import make_mesh, param_shardings

    if quantize is not None:
        int8.check_method(quantize)
    mesh = make_mesh(mesh)
    path = _abs(path)
    cfg, stored = read_header(path)
    quantize = quantize or stored
    requantize = quantize is not None and stored is None
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    create = lambda: CompiledTransformer(cfg, rngs=nnx.Rngs(0), remat=remat, attention=attention)

    def targets_of(state):
        shapes = nnx.to_pure_dict(state)
        if mesh is None:
            one = SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: one, shapes)
        else:
            shardings = nnx.to_pure_dict(param_shardings(state, mesh))
        return jax.tree.map(lambda s, sh: (s.shape, s.dtype, sh), shapes, shardings)

    # What the model holds: the float parameters, or int8 values and scales in place of
    # the projections. What is read from disk: the same, except when quantizing a float
    # checkpoint: then the floats, one block at a time, quantized onto their final
    # shardings. The int8 targets' shardings come from the same rules either way.
    graphdef, state, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    targets = read = targets_of(state)
    if quantize is not None:
        quantized = lambda: int8.quantize(create(), quantize)
        graphdef, state, rest = nnx.split(nnx.eval_shape(quantized), nnx.Param, ...)
        targets = targets_of(state)
        if not requantize:
            read = targets
    is_target = lambda x: isinstance(x, tuple)
    placement = lambda tree: jax.tree.map(lambda t: t[2], tree, is_leaf=is_target)

    values: dict = {}
    for name in TOP:
        if name == ("output",) and cfg.tie_word_embeddings:
            continue
        tree = {name[0]: read[name[0]]}
        if len(name) == 2:
            tree = {name[0]: {name[1]: read[name[0]][name[1]]}}
        group = read_group(path, top_dir(name), tree)
        if requantize and name == ("output",):
            out = placement(targets["output"])
            q, scale = int8.quantize_array(group["output"], name, (out["values"], out["scale"]))
            group = {"output": {"values": q, "scale": scale}}
        values.update(group)
    values["layers"] = {}
    for i in range(cfg.n_layers):
        block = read_group(path, layer_dir(i), read["layers"][i])
        if requantize:
            block = int8.quantize_block(block, placement(targets["layers"][i]))
        values["layers"][i] = block
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state, rest)
