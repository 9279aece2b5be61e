"""How `model(x)` runs: the Transformer's call compiled as one XLA program per input shape.

`lj.load` and `lj.build_model` return a `CompiledTransformer`: the `Transformer` of
transformer.py, unchanged, whose `model(tokens, ...)` hands the whole call to one
`nnx.jit` instead of dispatching its few hundred operations one by one. XLA then fuses
the elementwise work (norms, rotary, softmax) into the products around it, and a new
input shape costs one compilation rather than one per operation.

Inside a trace (your own `jax.jit`, `jax.grad`, `lj.generate`, the Trainer's step) the
call is exactly `Transformer.__call__`, inlined into the program being traced. To run
the model op by op, e.g. to print or inspect values inside it, call
`Transformer.__call__(model, tokens)` or wrap the call in `jax.disable_jit()`.
"""

from __future__ import annotations

import jax
from flax import nnx

from llama_jax.model.transformer import Transformer

# graph_updates=False: the compiled call returns only the Variables it changed (none,
# for a forward). With Flax's default, nnx.jit also hands every parameter back out of
# the program, which costs a batch-1 call more than the model itself (docs/performance.md).
_compiled_call = nnx.jit(Transformer.__call__, graph_updates=False)


class CompiledTransformer(Transformer):
    """A Transformer whose call outside any trace is compiled (see the module docstring)."""

    def __call__(self, tokens, positions=None, attention_mask=None, cache=None):
        """Transformer.__call__, compiled once per input shape when called on arrays."""
        # Traced tokens, or traced weights (a gradient taken with concrete tokens).
        if any(isinstance(a, jax.core.Tracer) for a in (tokens, self.norm.weight[...])):
            return Transformer.__call__(self, tokens, positions, attention_mask, cache)
        return _compiled_call(self, tokens, positions, attention_mask, cache)
