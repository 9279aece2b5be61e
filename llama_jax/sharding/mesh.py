"""Device meshes: the axes ("data", "fsdp", "tensor"), presets, and `make_mesh`.

`pjit` is gone: `jax.jit` takes `in_shardings`/`out_shardings` built from `NamedSharding`
(a `Mesh` plus a `PartitionSpec`), and XLA's partitioner inserts the collectives. The
package runs on meshes whose axes are Auto (the partitioner propagates shardings between
the constraints the model names); `make_mesh` gives one from a spec, and turns a mesh
made with plain `jax.make_mesh` (Explicit axes, JAX's default) into the same grid with
Auto axes. `build_model`, `load`, generation and training all go through it, so the
forward itself never looks at axis types.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from llama_jax.errors import LlamaError
from llama_jax.sharding.rules import MESH_AXES, check_mesh

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
    spec: str | dict[str, int] | Mesh | None, *, devices: Sequence[Any] | None = None
) -> Mesh | None:
    """A device mesh with axes ("data", "fsdp", "tensor") and Auto axis types.

    Args:
      spec: None (no mesh: run on one device), a preset name, "data=2,fsdp=-1,tensor=2",
        a dict of sizes, or a Mesh (e.g. from `jax.make_mesh`, whose axes are Explicit by
        default): its axis names are checked and the same device grid is returned with
        Auto axes.
      devices: the devices to use; default all of `jax.devices()` (every host's).
    Returns:
      A `jax.sharding.Mesh`, or None when spec is None.
    """
    if spec is None:
        return None
    if isinstance(spec, Mesh):
        check_mesh(spec)
        return auto_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(spec, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=auto, devices=devices)


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

    Under Explicit axes every operation must resolve its output sharding from its inputs'
    types; some of the model's cannot (a gather from a sharded embedding table by
    batch-sharded ids, a cross-entropy over vocab-split logits) and raise a
    ShardingTypeError. With Auto axes XLA's partitioner places the intermediates between
    the constraints the model names.

    Args:
      mesh: a Mesh, of any axis types.
    Returns:
      A Mesh over the same device grid with AxisType.Auto axes.
    """
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


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
