"""Compile time of the forward pass against depth: the layer scan keeps it flat.

    python scripts/compile_time.py            # 2 vs 32 layers of the tiny preset

Prints the time to trace+compile each depth and the ratio (the goal is below 2x).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import PRESETS
from llama_jax.model import build_model


def compile_seconds(n_layers: int) -> float:
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
    shallow, deep = compile_seconds(2), compile_seconds(32)
    print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"compile  2 layers: {shallow:.3f}s")
    print(f"compile 32 layers: {deep:.3f}s")
    print(f"ratio 32/2: {deep / shallow:.2f}x (goal < 2x)")


if __name__ == "__main__":
    main()
