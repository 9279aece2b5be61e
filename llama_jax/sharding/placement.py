"""Placing arrays on a mesh: a model, host arrays shard by shard, batches, a jitted forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llama_jax.sharding.mesh import make_mesh, use_mesh
from llama_jax.sharding.rules import batch_sharding, logical_sharding, param_shardings, validate


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

    mesh = make_mesh(mesh)
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

    mesh = make_mesh(mesh)
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
