"""Sharding: the rules table (rules), meshes (mesh), placement, multi-host start-up.

    rules         logical axis names, RULES, parameter/cache/batch shardings, validate
    mesh          MESH_AXES and presets, make_mesh (Auto axes), describe_mesh, use_mesh
    placement     shard_model, put_global, shard_batch, jit_forward (what pjit was)
    distributed   initialize_distributed, print0

Everything is importable from here: `from llama_jax import sharding; sharding.make_mesh`.
"""

from llama_jax.sharding.distributed import initialize_distributed, is_main_process, print0
from llama_jax.sharding.mesh import (
    MESH_HELP,
    MESH_PRESETS,
    abstract_mesh,
    auto_mesh,
    describe_mesh,
    make_mesh,
    parse_mesh_spec,
    resolve_mesh_shape,
    use_mesh,
)
from llama_jax.sharding.placement import jit_forward, put_global, shard_batch, shard_model
from llama_jax.sharding.rules import (
    BATCH_AXES,
    CACHE_AXES,
    MESH_AXES,
    MUST_SPLIT,
    PARAM_AXES,
    RULES,
    batch_sharding,
    batch_split,
    bytes_per_device,
    cache_shardings,
    check_batch,
    check_mesh,
    constrain,
    logical_sharding,
    logical_to_spec,
    mesh_axes_of,
    param_axes,
    param_shardings,
    replicated,
    validate,
)

__all__ = [
    "BATCH_AXES",
    "CACHE_AXES",
    "MESH_AXES",
    "MESH_HELP",
    "MESH_PRESETS",
    "MUST_SPLIT",
    "PARAM_AXES",
    "RULES",
    "abstract_mesh",
    "auto_mesh",
    "batch_sharding",
    "batch_split",
    "bytes_per_device",
    "cache_shardings",
    "check_batch",
    "check_mesh",
    "constrain",
    "describe_mesh",
    "initialize_distributed",
    "is_main_process",
    "jit_forward",
    "logical_sharding",
    "logical_to_spec",
    "make_mesh",
    "mesh_axes_of",
    "param_axes",
    "param_shardings",
    "parse_mesh_spec",
    "print0",
    "put_global",
    "replicated",
    "resolve_mesh_shape",
    "shard_batch",
    "shard_model",
    "use_mesh",
    "validate",
]
