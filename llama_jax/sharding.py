"""Sharding as data: logical axis names, one rules table, and meshes.

The model never names a device or a mesh axis. Every parameter and every activation at a
block boundary carries *logical* axis names (`embed`, `heads`, `mlp`, ...); one table,
`RULES`, maps those onto the three mesh axes:

    data    pure data parallelism: batch split, weights replicated
    fsdp    batch split *and* weights split along `embed` (ZeRO-3 style), gathered per use
    tensor  Megatron-style tensor parallelism: heads, MLP width and vocab split

`jax.jit` with these `NamedSharding`s is what used to be called `pjit`: XLA's GSPMD
partitioner inserts the collectives. With no mesh, everything runs on one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    "layers": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# Logical axes of every parameter, by its path in the model (layer stacks lead with
# `layers`). Paths follow Meta's checkpoint keys.
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("tok_embeddings",): ("vocab", "embed"),
    ("layers", "attention", "wq"): ("layers", "embed", "heads", "head_dim"),
    ("layers", "attention", "wk"): ("layers", "embed", "kv_heads", "head_dim"),
    ("layers", "attention", "wv"): ("layers", "embed", "kv_heads", "head_dim"),
    ("layers", "attention", "wo"): ("layers", "heads", "head_dim", "embed"),
    ("layers", "feed_forward", "w1"): ("layers", "embed", "mlp"),
    ("layers", "feed_forward", "w3"): ("layers", "embed", "mlp"),
    ("layers", "feed_forward", "w2"): ("layers", "mlp", "embed"),
    ("layers", "attention_norm", "weight"): ("layers", "embed"),
    ("layers", "ffn_norm", "weight"): ("layers", "embed"),
    ("norm", "weight"): ("embed",),
    ("output",): ("embed", "vocab"),
}


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through `RULES`.

    A mesh axis is used at most once per array, and, when `shape` and `mesh` are given,
    only where it divides the dimension; otherwise that dimension stays replicated (for
    example 2 KV heads on a tensor axis of 4: the KV projections are replicated and
    every device computes its own copy).
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = RULES.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for mesh_axis in names:
            if mesh_axis in used:
                continue
            size = 1 if mesh is None else mesh.shape.get(mesh_axis, 1)
            if mesh is not None and mesh_axis not in mesh.shape:
                continue
            prev = 1
            for a in kept:
                prev *= mesh.shape[a] if mesh is not None else 1
            if shape is not None and mesh is not None and shape[i] % (prev * size):
                continue
            kept.append(mesh_axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def param_axes(path: Sequence[str]) -> tuple[str, ...]:
    """The logical axes of the parameter at `path` (e.g. ('layers', 'attention', 'wq'))."""
    key = tuple(str(p) for p in path)
    try:
        return PARAM_AXES[key]
    except KeyError:
        raise KeyError(f"No logical axes are known for parameter {'/'.join(key)}.") from None


def param_shardings(state, mesh: Mesh):
    """NamedShardings for a (possibly abstract) nnx.State of the model's parameters."""
    from flax import nnx

    def one(path, leaf):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        names = tuple(getattr(p, "key", p) for p in path)
        spec = logical_to_spec(param_axes(names), value.shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: one(path, leaf),
        nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state,
    )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axes when a mesh is in context; else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
