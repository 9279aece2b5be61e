"""Making models: random weights (sharded or not), shapes only, and weights from arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError
from llama_jax.model.compiled import CompiledTransformer
from llama_jax.model.transformer import Transformer


def build_model(
    cfg: LlamaConfig, seed: int = 0, *, mesh=None, remat: str = "none", attention: str = "xla"
) -> Transformer:
    """A model with random weights (N(0, 0.02) matrices, unit norm gains).

    Args:
      cfg: the configuration.
      seed: the random seed; the weights are the same with or without a mesh.
      mesh: a jax Mesh with axes among ("data", "fsdp", "tensor"), a spec for
        `sharding.make_mesh` ("fsdp", "data=2,tensor=-1"), or None for one device.
        With a mesh, every parameter is created directly in its sharded form by a
        jitted initialiser: no device or host ever holds the whole model.
      remat: rematerialisation policy for training (REMAT_POLICIES).
      attention: the attention kernel (see Transformer).
    Returns:
      The model, a CompiledTransformer: `model(tokens)` runs compiled (model/compiled.py).
    """
    from llama_jax import sharding

    mesh = sharding.make_mesh(mesh)
    create = lambda: CompiledTransformer(cfg, rngs=nnx.Rngs(seed), remat=remat, attention=attention)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    # One jitted initialiser rather than one small eager program per parameter.
    shardings = None
    if mesh is not None:
        sharding.validate(cfg, mesh)
        shardings = sharding.param_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: LlamaConfig) -> Transformer:
    """The model's structure with `jax.ShapeDtypeStruct` leaves: no memory allocated.

    Use it to count parameters or plan shardings of models too big for this machine.
    """
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Total number of parameter elements of a real or abstract model."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def set_params(model: Transformer, params: dict) -> Transformer:
    """Replace the model's weights with a nested dict of arrays (e.g. from the converters).

    Args:
      model: the model, changed in place.
      params: {"tok_embeddings": ..., "layers": {0: {"attention": {"wq": ...}}, ...}, ...},
        shapes exactly the model's; arrays are cast to the model's `param_dtype`.
    Returns:
      The model.
    """
    state = nnx.state(model, nnx.Param)
    flat_new = dict(_flatten(params))
    flat_cur = dict(_flatten(nnx.to_pure_dict(state)))
    if set(flat_new) != set(flat_cur):
        missing = sorted("/".join(k) for k in set(flat_cur) - set(flat_new))
        extra = sorted("/".join(k) for k in set(flat_new) - set(flat_cur))
        raise LlamaError(
            f"Parameters do not match the model: missing {missing}, unexpected {extra}."
        )
    for key, value in flat_new.items():
        if tuple(value.shape) != tuple(flat_cur[key].shape):
            raise LlamaError(
                f"Parameter {'/'.join(key)} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(flat_cur[key].shape)}."
            )
    cast = jax.tree.map(lambda a: jnp.asarray(a, dtype=model.cfg.param_dtype), params)
    nnx.replace_by_pure_dict(state, cast)
    nnx.update(model, state)
    return model


def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value
