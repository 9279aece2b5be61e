"""Sharding as data: logical axis names and the one rules table that maps them to a mesh.

The model never names a device or a mesh axis. Every parameter and every activation at a
block boundary carries *logical* axis names (`embed`, `heads`, `mlp`, ...); one table,
`RULES`, maps those onto the three mesh axes:

    data    pure data parallelism: batch split, weights replicated
    fsdp    batch split *and* weights split along `embed` (ZeRO-3), gathered per use
    tensor  Megatron-style tensor parallelism: heads, MLP width and vocabulary split

In the notation of the scaling book, with X = (data, fsdp) and Y = tensor, an MLP is
`In[B_X, D] . W1[D_fsdp, F_Y] -> [B_X, F_Y]`, then `[B_X, F_Y] . W2[F_Y, D_fsdp] -> [B_X, D]`
(a reduce-scatter over Y). Every sharding decision of the package (parameters, the KV
cache, batches, the checks in `validate`) is read from this table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import LlamaError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axes of parameters (the names in PARAM_AXES) and of activations (act_*, batch,
# length). Weights and activations are named apart because the same model dimension is
# split differently in each: `embed` of a weight goes to fsdp, `act_embed` of an
# activation stays whole (its batch is already split over fsdp).
RULES: dict[str, tuple[str, ...] | str | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "lora_rank": None,  # a LoRA adapter's inner width: small, kept whole
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# Logical axes of every parameter, by its path in the model with the layer number left
# out (`layers/3/attention/wq` -> ("layers", "attention", "wq")). Paths follow Meta's
# checkpoint keys.
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("tok_embeddings",): ("vocab", "embed"),
    ("layers", "attention", "wq"): ("embed", "heads", "head_dim"),
    ("layers", "attention", "wk"): ("embed", "kv_heads", "head_dim"),
    ("layers", "attention", "wv"): ("embed", "kv_heads", "head_dim"),
    ("layers", "attention", "wo"): ("heads", "head_dim", "embed"),
    ("layers", "feed_forward", "w1"): ("embed", "mlp"),
    ("layers", "feed_forward", "w3"): ("embed", "mlp"),
    ("layers", "feed_forward", "w2"): ("mlp", "embed"),
    ("layers", "attention_norm", "weight"): ("embed",),
    ("layers", "ffn_norm", "weight"): ("embed",),
    ("norm", "weight"): ("embed",),
    ("output",): ("embed", "vocab"),
}
# A projection wrapped by a LoRA adapter (training/lora.py) keeps its weight under `base`
# and adds A [inputs..., rank] and B [rank, outputs...]: A is split like the weight's
# input axes, B like its output axes, the rank stays whole.
_LORA_INPUTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1}
for _path, _axes in list(PARAM_AXES.items()):
    if _path[-1] in _LORA_INPUTS:
        _n = _LORA_INPUTS[_path[-1]]
        PARAM_AXES[(*_path, "base")] = _axes
        PARAM_AXES[(*_path, "lora_a")] = (*_axes[:_n], "lora_rank")
        PARAM_AXES[(*_path, "lora_b")] = ("lora_rank", *_axes[_n:])
del _path, _axes, _n

# The output channels of the matrices int8 quantization replaces (llama_jax.inference.int8),
# as they come out of each einsum: wq "BTD,DNH->BTNH" -> heads, head_dim; wo -> embed; ...
# The int8 values keep the weight's axes; the per-channel scales have these.
QUANTIZED_OUTPUT_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("layers", "attention", "wq"): ("heads", "head_dim"),
    ("layers", "attention", "wk"): ("kv_heads", "head_dim"),
    ("layers", "attention", "wv"): ("kv_heads", "head_dim"),
    ("layers", "attention", "wo"): ("embed",),
    ("layers", "feed_forward", "w1"): ("mlp",),
    ("layers", "feed_forward", "w3"): ("mlp",),
    ("layers", "feed_forward", "w2"): ("embed",),
    ("output",): ("vocab",),
}
for _path, _out in QUANTIZED_OUTPUT_AXES.items():
    PARAM_AXES[(*_path, "values")] = PARAM_AXES[_path]
    PARAM_AXES[(*_path, "scale")] = _out
    if (*_path, "base") in PARAM_AXES:  # an int8 weight under a LoRA adapter
        PARAM_AXES[(*_path, "base", "values")] = PARAM_AXES[_path]
        PARAM_AXES[(*_path, "base", "scale")] = _out

# Parameter axes that must divide over their mesh axis (the config field that sets them);
# a mesh that cannot split them is refused rather than silently left replicated.
MUST_SPLIT = {"heads": "n_heads", "mlp": "ffn_hidden_dim", "embed": "dim"}

# Logical axes of the KV cache's fields (model.kv_cache.KVCache, and the scales of
# inference.int8.Int8KVCache) and of a batch of tokens.
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    # each layer's [B, K, S, H]
    "k": ("batch", "act_kv_heads", "length", None),
    "v": ("batch", "act_kv_heads", "length", None),
    "valid": ("batch", "length"),
    "index": (),
    # each layer's [B, K, S]
    "k_scale": ("batch", "act_kv_heads", "length"),
    "v_scale": ("batch", "act_kv_heads", "length"),
}
BATCH_AXES = ("batch", "length")


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through `RULES`.

    A mesh axis is used at most once per array, and, when `shape` and `mesh` are given,
    only where it divides the dimension; otherwise that dimension stays replicated (for
    example 2 KV heads on a tensor axis of 4: the KV projections are replicated and
    every device computes its own copy). Mesh axes of size 1 are left out.

    Args:
      axes: one logical name (or None) per dimension.
      shape: the array's shape, to skip mesh axes that do not divide a dimension.
      mesh: a Mesh or AbstractMesh; axes it lacks are skipped.
    Returns:
      The PartitionSpec.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = RULES.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for mesh_axis in names:
            if mesh_axis in used:
                continue
            if mesh is not None:
                if mesh_axis not in mesh.shape or mesh.shape[mesh_axis] == 1:
                    continue
                if shape is not None:
                    split = math.prod(mesh.shape[a] for a in kept) * mesh.shape[mesh_axis]
                    if shape[i] % split:
                        continue
            kept.append(mesh_axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None
) -> NamedSharding:
    """The NamedSharding of an array with these logical axes on `mesh`.

    Args:
      mesh: the mesh.
      axes: one logical name (or None) per dimension.
      shape: the array's shape, so that axes that do not divide a dimension are skipped.
    Returns:
      NamedSharding(mesh, logical_to_spec(axes, shape, mesh)).
    """
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def param_axes(path: Sequence[Any]) -> tuple[str, ...]:
    """The logical axes of the parameter at `path` (e.g. ('layers', 'attention', 'wq'))."""
    key = tuple(str(p) for p in path)
    try:
        return PARAM_AXES[key]
    except KeyError:
        raise LlamaError(
            f"No logical axes are known for parameter {'/'.join(key)}; add it to "
            "llama_jax.sharding.PARAM_AXES."
        ) from None


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _param_path(path) -> tuple[str, ...]:
    # A leaf's path in an nnx.State ends inside the Variable node (e.g. '.value'); only
    # the dict keys name the parameter, and layer numbers (integer keys) are left out.
    return tuple(
        _key_name(p)
        for p in path
        if isinstance(p, jax.tree_util.DictKey) and not isinstance(p.key, int | np.integer)
    )


def param_shardings(state, mesh: Mesh):
    """NamedShardings for the model's parameters, in the structure of `state`.

    Args:
      state: an nnx.State of the model (real or abstract, e.g. `nnx.split(model)[1]` or
        `nnx.state(abstract_model(cfg))`), or a nested dict of arrays/ShapeDtypeStructs
        keyed like Meta's checkpoint (`nnx.to_pure_dict(state)`).
      mesh: the device mesh.
    Returns:
      The same tree with a NamedSharding in place of every array: usable as a jit's
      in/out_shardings for that state, or with jax.device_put.
    """

    check_mesh(mesh)

    def one(path, leaf):
        names = _param_path(path)
        axes = param_axes(names)
        for axis, size in zip(axes, leaf.shape, strict=True):
            # These must split (see `validate`); kv_heads and vocab may stay whole.
            field = MUST_SPLIT.get(axis)
            for mesh_axis in mesh_axes_of(axis) if field else ():
                if mesh.shape.get(mesh_axis, 1) > 1 and size % mesh.shape[mesh_axis]:
                    raise LlamaError(
                        f"Parameter {'/'.join(names)}: its {axis} dimension ({field}={size}) "
                        f"cannot be split over the mesh axis {mesh_axis}="
                        f"{mesh.shape[mesh_axis]}. Choose a {mesh_axis} size that divides {size}."
                    )
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def cache_shardings(cache, mesh: Mesh):
    """NamedShardings for a KVCache (or an Int8KVCache), by CACHE_AXES.

    Args:
      cache: a KVCache of arrays or ShapeDtypeStructs.
      mesh: the mesh.
    Returns:
      A cache of the same type holding a NamedSharding per field (a jit's
      in/out_shardings for it).
    """
    fields = {}
    for field in dataclasses.fields(cache):
        name, axes = field.name, CACHE_AXES[field.name]
        value = getattr(cache, name)
        if isinstance(value, tuple):  # one array per layer
            fields[name] = tuple(logical_sharding(mesh, axes, x.shape) for x in value)
        else:
            fields[name] = logical_sharding(mesh, axes, value.shape)
    return type(cache)(**fields)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """The sharding of a [B, T] (or [B], [B, ...]) batch: rows split as RULES["batch"] says.

    Args:
      mesh: the mesh.
      shape: the global batch shape.
    Returns:
      The NamedSharding.
    Raises:
      LlamaError when B does not divide over those mesh axes (an uneven batch would
      silently fall back to replication, leaving devices idle).
    """
    check_batch(mesh, shape[0])
    axes = (*BATCH_AXES, *([None] * (len(shape) - 2)))[: len(shape)]
    return logical_sharding(mesh, axes, shape)


def batch_split(mesh: Mesh) -> int:
    """How many ways a batch's rows are split on `mesh` (by RULES["batch"])."""
    return math.prod(mesh.shape.get(a, 1) for a in mesh_axes_of("batch"))


def check_batch(mesh: Mesh, rows: int, what: str = "Batch size") -> None:
    """Raise a LlamaError unless `rows` divides over the mesh axes of RULES["batch"]."""
    split = batch_split(mesh)
    if rows % split:
        axes = " x ".join(f"{a}={mesh.shape.get(a, 1)}" for a in mesh_axes_of("batch"))
        raise LlamaError(
            f"{what}: {rows} rows do not divide over the mesh's batch axes {axes} = "
            f"{split} devices. Use a multiple of {split} rows."
        )


def bytes_per_device(tree, shardings) -> int:
    """The bytes one device holds of `tree` placed on `shardings`, without allocating.

    Args:
      tree: arrays or ShapeDtypeStructs (e.g. the abstract model's parameters).
      shardings: the matching tree of NamedShardings (e.g. `param_shardings(tree, mesh)`).
    Returns:
      Bytes per device (every device holds the same amount under these rules).
    """
    return sum(
        math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
        for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that puts a full copy on every device (scalars, RNG keys, ...).

    Args:
      mesh: the mesh.
    Returns:
      NamedSharding(mesh, PartitionSpec()).
    """
    return NamedSharding(mesh, PartitionSpec())


def validate(cfg, mesh: Mesh | None) -> None:
    """Refuse, before any compilation, a mesh the model cannot be split over.

    Every parameter axis in MUST_SPLIT (query heads, MLP width, model width) must divide
    over the mesh axes RULES maps it to: otherwise those weights would quietly stay whole
    on every device. KV heads fewer than their mesh axis are fine (GQA/MQA): the KV
    projections are replicated and each device keeps the KV heads its query heads use.

    Args:
      cfg: the LlamaConfig.
      mesh: the mesh, or None (always valid).
    Raises:
      LlamaError naming the config field, the mesh axis and both numbers.
    """
    if mesh is None:
        return
    check_mesh(mesh)
    name = cfg.name or "The model"
    for axis, field in MUST_SPLIT.items():
        value = getattr(cfg, field)
        for mesh_axis in mesh_axes_of(axis):
            size = mesh.shape.get(mesh_axis, 1)
            if size > 1 and value % size:
                raise LlamaError(
                    f"{name}: {field}={value} cannot be split over the mesh axis "
                    f"{mesh_axis}={size} ({value} % {size} = {value % size}). Choose a "
                    f"{mesh_axis} size that divides {value} (e.g. --mesh with {mesh_axis}="
                    f"{math.gcd(value, size)} and the rest on another axis)."
                )
    K = cfg.kv_heads
    for mesh_axis in mesh_axes_of("kv_heads"):
        size = mesh.shape.get(mesh_axis, 1)
        if size > 1 and K % size and size % K:
            raise LlamaError(
                f"{name}: n_kv_heads={K} and the mesh axis {mesh_axis}={size}: neither "
                "divides the other, so the query heads of one device would need KV heads "
                f"held by others. Use a {mesh_axis} size that divides {K} or a multiple of it."
            )


def mesh_axes_of(logical: str) -> tuple[str, ...]:
    """The mesh axes RULES maps a logical axis to, e.g. "batch" -> ("data", "fsdp")."""
    target = RULES.get(logical)
    return (target,) if isinstance(target, str) else tuple(target or ())


def check_mesh(mesh) -> None:
    """Raise a LlamaError unless every axis of `mesh` is one of MESH_AXES.

    Args:
      mesh: a Mesh or AbstractMesh.
    """
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise LlamaError(
            f"The mesh has axes {tuple(mesh.axis_names)}; the rules table only knows "
            f"{MESH_AXES}. Make it with jax.make_mesh(shape, {MESH_AXES}) or "
            "llama_jax.sharding.make_mesh."
        )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axes when a mesh is in context; else a no-op.

    Args:
      x: the activation.
      axes: one logical name (or None) per dimension, e.g. ("batch", "length", "act_embed").
    Returns:
      x, with a sharding constraint under a context mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
