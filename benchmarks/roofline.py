"""The machine's ceilings, measured: float32 matmul rate and memory streaming bandwidth.

Each is measured on both sides (XLA here, PyTorch in the peer's process) and the better
of the two is taken as the machine's: a roofline no framework reaches on this machine
would not be a fair one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.harness import Results, run_peer, time_calls


def measure_ours(size: int = 2048, stream_mib: int = 256, repeats: int = 5) -> dict:
    """float32 `size`^3 matmul FLOP/s and [1, n] x [n, n] matrix-vector bytes/s.

    The matrix holds `stream_mib` MiB: far more than the caches, so it streams from memory.
    """
    a = jnp.ones((size, size), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    t_mm = time_calls(lambda: mm(a).block_until_ready(), repeats)
    n = int((stream_mib * 2**20 / 4) ** 0.5)
    w, x = jnp.ones((n, n), jnp.float32), jnp.ones((1, n), jnp.float32)
    mv = jax.jit(lambda x, w: x @ w)
    t_mv = time_calls(lambda: mv(x, w).block_until_ready(), repeats)
    return {"matmul_flops": 2 * size**3 / t_mm["min"], "stream_bytes": 4 * n * n / t_mv["min"]}


def run(res: Results, quick: bool) -> dict:
    """Add the four roofline figures; return the machine's {"matmul_flops", "stream_bytes"}."""
    kw = {"size": 512, "stream_mib": 16} if quick else {}
    ours = measure_ours(**kw)
    peer = run_peer("roofline", **kw)
    gflops = (ours["matmul_flops"] / 1e9, peer["matmul_flops"] / 1e9)
    res.add("matmul float32 2048^3", "GFLOP/s", *gflops)
    res.add("memory stream float32", "GB/s", ours["stream_bytes"] / 1e9, peer["stream_bytes"] / 1e9)
    return {k: max(ours[k], peer[k]) for k in ours}
