"""The converted-weights checkpoint: an Orbax checkpoint per tensor group, plus the config.

On disk:

    DST/
      llama_jax.json              {"format": "llama-jax", "version": 1, "config": {...}}
      tokenizer.model             copied from the source when it has one
      params/tok_embeddings/      Orbax PyTree checkpoint {"tok_embeddings": [V, D]}
      params/norm/                {"norm": {"weight": [D]}}
      params/output/              {"output": [D, V]} (absent with tied embeddings)
      params/layers/00000/        one block: {"attention": {"wq": [D, N, H], ...},
      ...                          "feed_forward": {...}, "attention_norm": ..., "ffn_norm": ...}

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
import uuid
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError

CONFIG_FILE = "llama_jax.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = "llama-jax"
VERSION = 1
TOP = (("tok_embeddings",), ("norm", "weight"), ("output",))


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


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, force: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of `dst` to fill; rename it to `dst` on success.

    On a multi-host run every process must enter it (as with Orbax saves): process 0
    creates and renames the directory, the others wait at barriers, and all of them
    write into the same temporary directory in between.

    Args:
      dst: the directory to create.
      force: replace `dst` if it exists (only after the new one is complete).
    Yields:
      The temporary directory's path. On any exception (Ctrl-C included) it is deleted
      and `dst` is left as it was.
    """
    dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    if os.path.exists(dst) and not force:
        raise LlamaError(f"{dst} already exists; choose another destination or pass --force.")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise LlamaError(f"{parent}: the destination's parent directory does not exist.")
    tag = _shared_tag()
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{tag}")
    if _primary():
        os.makedirs(tmp)
    _sync(f"created-{tag}")
    try:
        yield tmp
        _sync(f"written-{tag}")
        if _primary():
            if os.path.exists(dst):
                old = os.path.join(parent, f".{os.path.basename(dst)}.old-{tag}")
                os.rename(dst, old)
                os.rename(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dst)
        _sync(f"renamed-{tag}")
    except BaseException:
        if _primary():
            shutil.rmtree(tmp, ignore_errors=True)
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


def save(model, path: str | os.PathLike, *, tokenizer: str | None = None, force: bool = False):
    """Write a model's weights and config as a llama-jax checkpoint directory.

    Works for a model on one device or sharded over a mesh: each block is written by
    Orbax from wherever it lives.

    Args:
      model: a `Transformer`.
      path: the directory to create (atomically: a temporary sibling, then a rename).
      tokenizer: a tokenizer.model file to copy into the checkpoint, or None.
      force: replace an existing directory.
    Returns:
      The absolute path written.
    """
    cfg = model.cfg
    if tokenizer is not None:
        tokenizer = os.path.expanduser(os.fspath(tokenizer))
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise LlamaError(f"tokenizer {tokenizer}: no such file.")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with atomic_directory(path, force) as tmp:
        write_group(tmp, top_dir(("tok_embeddings",)), {"tok_embeddings": params["tok_embeddings"]})
        write_group(tmp, top_dir(("norm",)), {"norm": {"weight": params["norm"]["weight"]}})
        if not cfg.tie_word_embeddings:
            write_group(tmp, top_dir(("output",)), {"output": params["output"]})
        for i in range(cfg.n_layers):
            write_group(tmp, layer_dir(i), params["layers"][i])
        write_config(tmp, cfg, tokenizer)
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
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise LlamaError(f"{file}: unreadable ({e}).") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LlamaError(
            f"{file}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{FORMAT!r} version {VERSION}."
        )
    return meta


def load_config(path: str | os.PathLike) -> LlamaConfig:
    """The `LlamaConfig` recorded in a llama-jax checkpoint.

    Args:
      path: the checkpoint directory.
    Returns:
      The config, with the dtypes the weights were stored in.
    """
    return LlamaConfig.from_dict(_read_meta(_abs(path))["config"])


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
    if not os.path.isdir(where):
        raise LlamaError(f"{where}: missing; the checkpoint is incomplete.")

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
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise LlamaError(f"{where}: cannot read its metadata ({e}).") from None
    flat_stored = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    for key, t in jax.tree_util.tree_flatten_with_path(targets, is_leaf=is_leaf)[0]:
        got = flat_stored.get(key)
        if got is None or tuple(got.shape) != tuple(t[0]):
            raise LlamaError(
                f"{where}: array {jax.tree_util.keystr(key)} has shape "
                f"{None if got is None else tuple(got.shape)} on disk but the recorded config "
                f"needs {tuple(t[0])}; the checkpoint is inconsistent with {CONFIG_FILE}."
            )
    restore_args = jax.tree.map(args, targets, is_leaf=is_leaf)
    item = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t[0], t[1]), targets, is_leaf=is_leaf)
    try:
        out = _checkpointer().restore(
            where, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        )
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise LlamaError(f"{where}: cannot restore ({e}).") from None
    return out


def read_layer_host(path: str, cfg: LlamaConfig, layer: int) -> dict:
    """Block `layer` as host numpy arrays in its stored dtype: {"attention": {"wq": ...}}."""
    block = _abstract_params(cfg)["layers"][0]
    targets = jax.tree.map(lambda s: (s.shape, s.dtype, None), block)
    return read_group(path, layer_dir(layer), targets)


def read_top_host(path: str, cfg: LlamaConfig, name: tuple[str, ...]) -> np.ndarray:
    """A top-level parameter (tok_embeddings, norm/weight, output) as a host numpy array."""
    params = _abstract_params(cfg)
    leaf = params[name[0]] if len(name) == 1 else params[name[0]][name[1]]
    target = {name[0]: (leaf.shape, leaf.dtype, None)}
    if len(name) == 2:
        target = {name[0]: {name[1]: (leaf.shape, leaf.dtype, None)}}
    out = read_group(path, top_dir(name), target)
    return out[name[0]] if len(name) == 1 else out[name[0]][name[1]]


@functools.lru_cache(maxsize=4)
def _abstract_params(cfg: LlamaConfig) -> dict:
    from llama_jax.model import abstract_model

    return nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))


def load(
    path: str | os.PathLike,
    mesh=None,
    dtype: str | None = None,
    *,
    remat: str = "none",
    attention: str = "xla",
):
    """A ready `Transformer` from a llama-jax checkpoint, each array on its final sharding.

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
    Returns:
      The model.
    """
    from llama_jax.model import Transformer
    from llama_jax.sharding import make_mesh, param_shardings

    mesh = make_mesh(mesh)
    path = _abs(path)
    cfg = load_config(path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    create = lambda: Transformer(cfg, rngs=nnx.Rngs(0), remat=remat, attention=attention)
    graphdef, state, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    shapes = nnx.to_pure_dict(state)
    if mesh is None:
        one = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    else:
        shardings = nnx.to_pure_dict(param_shardings(state, mesh))
    targets = jax.tree.map(lambda s, sh: (s.shape, s.dtype, sh), shapes, shardings)

    values: dict = {}
    for name in TOP:
        if name == ("output",) and cfg.tie_word_embeddings:
            continue
        tree = {name[0]: targets[name[0]]}
        if len(name) == 2:
            tree = {name[0]: {name[1]: targets[name[0]][name[1]]}}
        values.update(read_group(path, top_dir(name), tree))
    values["layers"] = {
        i: read_group(path, layer_dir(i), targets["layers"][i]) for i in range(cfg.n_layers)
    }
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state, rest)
