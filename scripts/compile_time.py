"""Compile time of the forward pass against depth.

    python scripts/compile_time.py            # 2, 8 and 32 layers of the tiny preset

The blocks are a Python loop (as in Meta's model.py), so XLA traces and compiles every
layer: compile time grows about linearly with depth. This prints what it costs here.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import PRESETS
from llama_jax.model import build_model


def compile_seconds(n_layers: int) -> float:
    """Seconds to trace and compile one forward of a 1 x 64 batch at this depth."""
    cfg = PRESETS["tiny"].replace(n_layers=n_layers)
    model = build_model(cfg)
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 64), jnp.int32)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    t0 = time.perf_counter()
    jax.jit(forward).lower(state, tokens).compile()
    return time.perf_counter() - t0


def main() -> None:
    compile_seconds(2)  # warm up JAX itself
    print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}")
    base = None
    for depth in (2, 8, 32):
        seconds = compile_seconds(depth)
        base = base or seconds
        print(f"compile {depth:2d} layers: {seconds:.3f}s ({seconds / base:.1f}x 2 layers)")


if __name__ == "__main__":
    main()
