"""Sharding as data: logical axis names, one rules table, mesh presets and `make_mesh`.

The model never names a device or a mesh axis. Every parameter and every activation at a
block boundary carries *logical* axis names (`embed`, `heads`, `mlp`, ...); one table,
`RULES`, maps those onto the three mesh axes:

    data    pure data parallelism: batch split, weights replicated
    fsdp    batch split *and* weights split along `embed` (ZeRO-3), gathered per use
    tensor  Megatron-style tensor parallelism: heads, MLP width and vocabulary split

In the notation of the scaling book, with X = (data, fsdp) and Y = tensor, an MLP is
`In[B_X, D] . W1[D_fsdp, F_Y] -> [B_X, F_Y]`, then `[B_X, F_Y] . W2[F_Y, D_fsdp] -> [B_X, D]`
(a reduce-scatter over Y).

`pjit` is gone: `jax.jit` takes `in_shardings`/`out_shardings` built from `NamedSharding`
(a `Mesh` plus a `PartitionSpec`), and XLA's partitioner inserts the collectives. With no
mesh everything runs on one device, unchanged.

Meshes: `make_mesh("data=2,fsdp=-1,tensor=2")` or a preset name (`MESH_PRESETS`). The model
also runs on a mesh made with plain `jax.make_mesh(shape, ("data", "fsdp", "tensor"))`,
whose axes are Explicit in current JAX: the forward runs its body with the axes Auto (see
`auto_axes_call`), so the embedding gather needs no hand-written output sharding.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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

# Parameter axes that must divide over their mesh axis (the config field that sets them);
# a mesh that cannot split them is refused rather than silently left replicated.
MUST_SPLIT = {"heads": "n_heads", "mlp": "ffn_hidden_dim", "embed": "dim"}

# Logical axes of the KV cache's fields (attention.KVCache) and of a batch of tokens.
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    # [L, B, K, S, H]; a per-layer cache's [B, K, S, H] arrays take the same axes less "layers"
    "k": ("layers", "batch", "act_kv_heads", "length", None),
    "v": ("layers", "batch", "act_kv_heads", "length", None),
    "valid": ("batch", "length"),
    "index": (),
}
BATCH_AXES = ("batch", "length")

# Mesh presets: axis sizes, one of them -1 for "all remaining devices".
MESH_PRESETS: dict[str, dict[str, int]] = {
    "dp": {"data": -1},  # weights replicated, batch split: the model must fit one device
    "fsdp": {"fsdp": -1},  # weights and batch split over every device
    "tp": {"tensor": -1},  # heads/MLP/vocab split; the batch is not
    "fsdp_tp": {"fsdp": -1, "tensor": 2},  # tensor inside a host (fast links), fsdp across
}
MESH_PRESETS["replicated"] = MESH_PRESETS["dp"]

MESH_HELP = (
    "device mesh: 'data=2,fsdp=-1,tensor=2' (one -1 takes the remaining devices; missing "
    f"axes are 1) or a preset: {', '.join(MESH_PRESETS)}. Default: one device, no sharding"
)


# --------------------------------------------------------------------------- meshes


def parse_mesh_spec(spec: str | dict[str, int]) -> dict[str, int]:
    """Axis sizes from a mesh spec, before resolving -1.

    Args:
      spec: a preset name ("dp", "fsdp", "tp", "fsdp_tp", "replicated"), a string
        "data=2,fsdp=-1,tensor=2", or a dict {axis: size}.
    Returns:
      {axis: size} for all three axes in MESH_AXES order; missing axes are 1, at most one
      size is -1.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text in MESH_PRESETS:
            sizes: dict[str, Any] = dict(MESH_PRESETS[text])
        else:
            sizes = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, eq, value = part.partition("=")
                name = name.strip()
                if not eq:
                    raise LlamaError(
                        f"--mesh {spec!r}: {part!r} is not AXIS=SIZE and {text!r} is not a "
                        f"preset. Write e.g. 'data=2,fsdp=-1,tensor=2' or one of "
                        f"{sorted(MESH_PRESETS)}."
                    )
                if name in sizes:
                    raise LlamaError(f"--mesh {spec!r}: axis {name!r} is given twice.")
                try:
                    sizes[name] = int(value)
                except ValueError:
                    raise LlamaError(
                        f"--mesh {spec!r}: the size of {name!r} must be an integer "
                        f"(or -1 for the rest), got {value.strip()!r}."
                    ) from None
    elif isinstance(spec, dict):
        sizes = dict(spec)
    else:
        raise LlamaError(f"A mesh spec must be a string or a dict, got {type(spec).__name__}.")
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise LlamaError(
            f"Mesh {spec!r}: unknown axis {', '.join(map(repr, unknown))}; the axes are "
            f"{', '.join(MESH_AXES)}."
        )
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise LlamaError(
                f"Mesh {spec!r}: {name}={size} must be a positive integer or -1 (the rest)."
            )
    if sum(1 for s in sizes.values() if s == -1) > 1:
        raise LlamaError(f"Mesh {spec!r}: at most one axis may be -1, the rest of the devices.")
    return {name: int(sizes.get(name, 1)) for name in MESH_AXES}


def resolve_mesh_shape(spec: str | dict[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes with -1 filled in, checked to multiply to `n_devices`.

    Args:
      spec: as for `parse_mesh_spec`.
      n_devices: the number of devices the mesh must cover (all of them).
    Returns:
      {axis: size} in MESH_AXES order, product == n_devices.
    """
    sizes = parse_mesh_spec(spec)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    shown = ",".join(f"{k}={v}" for k, v in sizes.items())
    if -1 in sizes.values():
        if n_devices % fixed:
            raise LlamaError(
                f"Mesh {shown}: the fixed axes need a multiple of {fixed} devices, but there "
                f"are {n_devices}; {n_devices} / {fixed} is not a whole number. Choose sizes "
                f"that divide {n_devices}."
            )
        sizes = {k: (n_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    elif fixed != n_devices:
        raise LlamaError(
            f"Mesh {shown} has {fixed} devices but there are {n_devices}. Make the sizes "
            f"multiply to {n_devices}, or use -1 for one axis to take the rest."
        )
    return sizes


def make_mesh(
    spec: str | dict[str, int] | Mesh | None,
    *,
    devices: Sequence[Any] | None = None,
    axis_types: str = "auto",
) -> Mesh | None:
    """A device mesh with axes ("data", "fsdp", "tensor") over all devices.

    Args:
      spec: None (no mesh: run on one device), a preset name, "data=2,fsdp=-1,tensor=2",
        a dict of sizes, or a Mesh (returned after checking its axis names).
      devices: the devices to use; default all of `jax.devices()` (every host's).
      axis_types: "auto" (XLA's partitioner propagates shardings between the constraints
        the model names: the default, since it needs no per-op annotations) or "explicit"
        (sharding in types, JAX's own default for `jax.make_mesh`). The model runs on both.
    Returns:
      A `jax.sharding.Mesh`, or None when spec is None.
    """
    if spec is None:
        return None
    if isinstance(spec, Mesh):
        check_mesh(spec)
        return spec
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(spec, len(devices))
    if axis_types not in ("auto", "explicit"):
        raise LlamaError(f"axis_types must be 'auto' or 'explicit', got {axis_types!r}.")
    kind = AxisType.Auto if axis_types == "auto" else AxisType.Explicit
    return jax.make_mesh(
        tuple(sizes.values()), MESH_AXES, axis_types=(kind,) * len(MESH_AXES), devices=devices
    )


def abstract_mesh(spec: str | dict[str, int], n_devices: int) -> jax.sharding.AbstractMesh:
    """A mesh of `n_devices` that need not exist: to plan shardings and memory per device.

    Args:
      spec: as for `make_mesh`.
      n_devices: the device count to plan for (e.g. 256 for 256 accelerator chips).
    Returns:
      A `jax.sharding.AbstractMesh` with axes MESH_AXES; `param_shardings` and
      `bytes_per_device` accept it.
    """
    sizes = resolve_mesh_shape(spec, n_devices)
    return jax.sharding.AbstractMesh(
        tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axes with every axis Auto.

    For code that owns its arrays from creation to the end (a training loop creating its
    own parameters), this sidesteps Explicit-axes typing rules in every op it runs, e.g. a
    cross-entropy gathering target logits from a vocabulary split over `tensor`.

    Args:
      mesh: a Mesh, of any axis types.
    Returns:
      A Mesh over the same device grid with AxisType.Auto axes.
    """
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def check_mesh(mesh: Mesh) -> None:
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


def describe_mesh(mesh: Mesh | None) -> str:
    """One line such as 'mesh data=1 fsdp=4 tensor=2 (8 devices, 2 processes, Auto axes)'.

    Args:
      mesh: a Mesh, an AbstractMesh (a planned mesh), or None (one device).
    Returns:
      The description, for logs and the CLI.
    """
    if mesh is None:
        return f"no mesh: one device ({jax.devices()[0].platform})"
    sizes = " ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    kinds = sorted({str(t).split(".")[-1] for t in mesh.axis_types})
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return f"planned mesh {sizes} ({mesh.size} devices, {'/'.join(kinds)} axes)"
    return (
        f"mesh {sizes} ({mesh.size} device{'s' if mesh.size > 1 else ''}, "
        f"{jax.process_count()} process"
        f"{'es' if jax.process_count() > 1 else ''}, {'/'.join(kinds)} axes)"
    )


def add_mesh_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add `--mesh SPEC` and the multi-host flags to a command.

    `--mesh` becomes a Mesh with `make_mesh(args.mesh)`. The multi-host flags
    (`--distributed`, or `--coordinator/--num-processes/--process-id`) are acted on by the
    `llama-jax` entry point before the command runs (`initialize_from_args`), since
    `jax.distributed.initialize` must precede any other use of JAX.

    Args:
      parser: the command's argparse parser.
      default: the spec used when the flag is absent (None: one device).
    """
    parser.add_argument("--mesh", default=default, metavar="SPEC", help=MESH_HELP)
    group = parser.add_argument_group(
        "multi-host", "every host runs the same command; only process 0 prints"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run whose peers JAX finds itself (TPU pods, SLURM, MPI)",
    )
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="GPU/CPU hosts: process 0's address and a free port (needs the two flags below)",
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")


def initialize_from_args(args: argparse.Namespace) -> bool:
    """Start the multi-process runtime when a command's flags ask for it.

    Args:
      args: parsed arguments of a command that called `add_mesh_argument` (others are
        ignored).
    Returns:
      True when `jax.distributed` was initialised.
    Raises:
      LlamaError for an incomplete or inconsistent set of flags.
    """
    coordinator = getattr(args, "coordinator", None)
    n, i = getattr(args, "num_processes", None), getattr(args, "process_id", None)
    manual = (coordinator, n, i)
    if all(v is None for v in manual):
        if getattr(args, "distributed", False):
            initialize_distributed()
            return True
        return False
    if any(v is None for v in manual):
        raise LlamaError(
            "--coordinator, --num-processes and --process-id go together (got "
            f"--coordinator={coordinator}, --num-processes={n}, --process-id={i}); on TPU "
            "pods, SLURM or MPI use --distributed alone."
        )
    if n < 1 or not 0 <= i < n:
        raise LlamaError(f"--process-id {i} must be in 0 .. {n - 1} (--num-processes {n}).")
    if ":" not in coordinator:
        raise LlamaError(f"--coordinator {coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:1234.")
    initialize_distributed(coordinator, n, i)
    return True


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Make `mesh` the context mesh (so `constrain` takes effect); a no-op for None.

    Args:
      mesh: the mesh to enter (`jax.set_mesh`), or None.
    Yields:
      The mesh.
    """
    if mesh is None:
        yield None
        return
    with jax.set_mesh(mesh):
        yield mesh


# --------------------------------------------------------------------------- rules


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
    # the dict keys name the parameter.
    return tuple(
        _key_name(p)
        for p in path
        if isinstance(p, jax.tree_util.DictKey | jax.tree_util.SequenceKey)
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
            mesh_axis = RULES[axis] if field else None
            if field and mesh.shape.get(mesh_axis, 1) > 1 and size % mesh.shape[mesh_axis]:
                raise LlamaError(
                    f"Parameter {'/'.join(names)}: its {axis} dimension ({field}={size}) "
                    f"cannot be split over the mesh axis {mesh_axis}={mesh.shape[mesh_axis]}. "
                    f"Choose a {mesh_axis} size that divides {size}."
                )
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def cache_shardings(cache, mesh: Mesh):
    """NamedShardings for a KVCache, by CACHE_AXES.

    Args:
      cache: a KVCache of arrays or ShapeDtypeStructs.
      mesh: the mesh.
    Returns:
      A KVCache holding a NamedSharding per field (a jit's in/out_shardings for it).
    """
    fields = {}
    for name, axes in CACHE_AXES.items():
        value = getattr(cache, name)
        if isinstance(value, (tuple, list)):  # per-layer arrays: the same axes less "layers"
            fields[name] = tuple(logical_sharding(mesh, axes[1:], x.shape) for x in value)
        else:
            fields[name] = logical_sharding(mesh, axes, value.shape)
    return type(cache)(**fields)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """The sharding of a [B, T] (or [B, ...]) batch: rows split over data and fsdp.

    Args:
      mesh: the mesh.
      shape: the global batch shape.
    Returns:
      The NamedSharding.
    Raises:
      LlamaError when B does not divide over data x fsdp (an uneven batch would silently
      fall back to replication, leaving devices idle).
    """
    rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if shape[0] % rows:
        raise LlamaError(
            f"Batch size {shape[0]} does not divide over the mesh's data x fsdp = "
            f"{mesh.shape.get('data', 1)} x {mesh.shape.get('fsdp', 1)} = {rows} devices. "
            f"Use a batch size that is a multiple of {rows}."
        )
    axes = (*BATCH_AXES, *([None] * (len(shape) - 2)))[: len(shape)]
    return logical_sharding(mesh, axes, shape)


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


# --------------------------------------------------------------------------- checks


def validate(cfg, mesh: Mesh | None) -> None:
    """Refuse, before any compilation, a mesh the model cannot be split over.

    Query heads and the MLP width must divide over `tensor`, and the model width over
    `fsdp`: otherwise those weights would quietly stay whole on every device. KV heads
    fewer than the tensor axis are fine (GQA/MQA): the KV projections are replicated
    and each device keeps the KV heads its query heads use.

    Args:
      cfg: the LlamaConfig.
      mesh: the mesh, or None (always valid).
    Raises:
      LlamaError naming the config field, the mesh axis and both numbers.
    """
    if mesh is None:
        return
    check_mesh(mesh)
    tensor = mesh.shape.get("tensor", 1)
    fsdp = mesh.shape.get("fsdp", 1)
    checks = [
        ("n_heads", cfg.n_heads, "tensor", tensor),
        ("ffn_hidden_dim (ffn_dim)", cfg.ffn_hidden_dim, "tensor", tensor),
        ("dim", cfg.dim, "fsdp", fsdp),
    ]
    for field, value, axis, size in checks:
        if size > 1 and value % size:
            raise LlamaError(
                f"{cfg.name or 'The model'}: {field}={value} cannot be split over the mesh "
                f"axis {axis}={size} ({value} % {size} = {value % size}). Choose a {axis} "
                f"size that divides {value} (e.g. --mesh with {axis}="
                f"{math.gcd(value, size)} and the rest on data or fsdp)."
            )
    K = cfg.kv_heads
    if tensor > 1 and K % tensor and tensor % K:
        raise LlamaError(
            f"{cfg.name or 'The model'}: n_kv_heads={K} and the mesh axis tensor={tensor}: "
            "neither divides the other, so the query heads of one device would need KV "
            f"heads held by others. Use a tensor size that divides {K} or a multiple of it."
        )


# --------------------------------------------------------------------------- placement


def shard_model(model, mesh: Mesh | None):
    """Move a model's parameters onto their shardings on `mesh`, in place.

    For a model that already exists on the host or one device; to create or restore a
    large model directly in its sharded form, use `build_model(cfg, mesh=mesh)` or the
    checkpoint loader with a mesh.

    Args:
      model: a Transformer.
      mesh: the mesh; None leaves the model as it is.
    Returns:
      The same model object.
    """
    from flax import nnx

    if mesh is None:
        return model
    validate(model.cfg, mesh)
    state = nnx.state(model)
    placed = jax.device_put(state, param_shardings(state, mesh))
    nnx.update(model, placed)
    return model


def put_global(host: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host array on `sharding`, each process copying only the shards it holds.

    Every process passes the same full value (a numpy array, or a memory-mapped tensor
    of a checkpoint file, which is then read only where a local shard needs it); no
    device ever holds more than its shard. On one process this is `jax.device_put`.

    Args:
      host: an array-like with the global shape.
      sharding: the target sharding (e.g. one leaf of `param_shardings`).
    Returns:
      The global jax.Array.
    """
    shape = tuple(host.shape)
    return jax.make_array_from_callback(shape, sharding, lambda index: np.asarray(host[index]))


def shard_batch(local: Any, mesh: Mesh | None) -> jax.Array:
    """A global [B, ...] array from this process's rows of the batch.

    On one process `local` is the whole batch. On several, each process passes only
    its own rows (B / process_count of them, in process order), and the result is one
    array spanning every host: the per-host data loading of multi-host training.

    Args:
      local: this process's rows, a numpy or jax array.
      mesh: the mesh; None returns `jnp.asarray(local)`.
    Returns:
      A jax.Array sharded like `batch_sharding`.
    """
    import jax.numpy as jnp

    if mesh is None:
        return jnp.asarray(local)
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    sharding = batch_sharding(mesh, shape)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, shape)


def jit_forward(model, mesh: Mesh | None = None) -> Callable[..., jax.Array]:
    """The model's forward as one `jax.jit` with explicit in/out shardings (what was pjit).

    Parameters go in with their `param_shardings`, the tokens split over data x fsdp, the
    logits come out split over the batch and the vocabulary; the mesh is in context while
    tracing, so the model's `constrain` calls pin the activations at block boundaries.
    One compilation per token shape.

    Args:
      model: a Transformer, its parameters already on `mesh` (`build_model(cfg,
        mesh=mesh)`, `shard_model`) or on one device when mesh is None.
      mesh: the mesh, or None for a plain single-device jit.
    Returns:
      forward(tokens [B, T] int32, attention_mask=None) -> float32 logits [B, T, V]. On
      several processes, pass a global array (`shard_batch`).
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    # Without a mask the model may take its plain-causal path (no [B, T, S] mask array).
    apply = lambda state, tokens, mask: nnx.merge(graphdef, state)(tokens, attention_mask=mask)
    if mesh is None:
        plain = jax.jit(apply)
        return lambda tokens, attention_mask=None: plain(state, tokens, attention_mask)
    validate(model.cfg, mesh)
    state_shardings = param_shardings(state, mesh)
    compiled: dict[tuple, Any] = {}

    def forward(tokens, attention_mask=None):
        shape = tuple(tokens.shape)
        rows = batch_sharding(mesh, shape)
        key = (shape, attention_mask is None)
        if key not in compiled:
            logits = logical_sharding(
                mesh, ("batch", "length", "act_vocab"), (*shape, model.cfg.vocab_size)
            )
            mask_sharding = None if attention_mask is None else rows
            compiled[key] = jax.jit(
                apply, in_shardings=(state_shardings, rows, mask_sharding), out_shardings=logits
            )
        tokens = jax.device_put(tokens, rows)
        if attention_mask is not None:
            attention_mask = jax.device_put(attention_mask, rows)
        with use_mesh(mesh):
            return compiled[key](state, tokens, attention_mask)

    return forward


# --------------------------------------------------------------------------- explicit axes


def explicit_mesh(tree) -> Any:
    """The mesh in use when it has Explicit axes, else None.

    Args:
      tree: arrays whose types may carry a mesh (consulted when no mesh is in context).
    Returns:
      The context mesh, or else the mesh of the first sharded array in `tree`, when it
      has Explicit axes; otherwise None.
    """
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty:
        return ctx if ctx.explicit_axes else None
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty and mesh.explicit_axes:
            return mesh
    return None


def auto_axes_call(fn: Callable, args: tuple, mesh, out_shardings):
    """Call `fn(*args)` with every axis of the Explicit-axes `mesh` made Auto.

    Under a mesh with Explicit axes (the default of `jax.make_mesh`), every operation
    must resolve its output sharding from its inputs' types; a gather from a sharded
    embedding table by batch-sharded ids cannot, and raises a ShardingTypeError. Inside
    this call the axes are Auto, so XLA's partitioner places the intermediates between
    the constraints the model names (one code path for both kinds of mesh); the outputs
    come back as Explicit-typed arrays with `out_shardings`.

    Args:
      fn: the function.
      args: its positional arguments (pytrees of arrays).
      mesh: the mesh (from `explicit_mesh`).
      out_shardings: a pytree, matching fn's output, of NamedShardings on `mesh`.
    Returns:
      fn's output.
    """
    with contextlib.ExitStack() as stack:
        if jax.sharding.get_abstract_mesh().empty:
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
        return jax.sharding.auto_axes(fn, out_sharding=out_shardings)(*args)


# --------------------------------------------------------------------------- activations


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


# --------------------------------------------------------------------------- multi-host


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
) -> None:
    """Start JAX's multi-process runtime; every host must call it, before any other JAX use.

    On TPU pods (and SLURM/Open MPI clusters) call it with no arguments: the runtime
    finds its peers itself. On GPU or CPU hosts pass the coordinator's address (process
    0's host and a free port), the number of processes and this process's id. CPU
    processes talk through gloo collectives.

    Args:
      coordinator: "host:port" of process 0, or None to auto-detect.
      num_processes: the number of processes, or None to auto-detect.
      process_id: this process's id in [0, num_processes), or None to auto-detect.
      local_device_count: on CPU, how many devices this process simulates.
    """
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    # Only the CPU backend reads this; without it CPU processes cannot reach each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (RuntimeError, ValueError) as e:
        raise LlamaError(
            f"jax.distributed.initialize(coordinator={coordinator!r}, num_processes="
            f"{num_processes}, process_id={process_id}) failed: {e}. Every process must "
            "run the same command with the same coordinator and process count, each with "
            "its own process id."
        ) from e


def is_main_process() -> bool:
    """True on process 0, the one that prints, logs and writes single-writer files."""
    return jax.process_index() == 0


def print0(*args, **kwargs) -> None:
    """`print`, on process 0 only (every host runs the same program).

    Args:
      *args, **kwargs: as for print.
    """
    if is_main_process():
        print(*args, **kwargs)
