"""Throughput arithmetic: peak FLOP/s per device and model FLOPs per token (for MFU)."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig

# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

_measured_peak: dict[str, float] = {}


def peak_flops(device=None) -> float:
    """Peak FLOP/s of one device: the data-sheet figure, or for CPUs a measured one.

    A CPU has no single published figure, so its peak is measured once as the best of a
    few float32 1024^3 matmuls on that device; CPU MFU is relative to that.
    """
    device = device or jax.devices()[0]
    for name, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(name):
            return flops
    key = device.device_kind
    if key not in _measured_peak:
        a = jax.device_put(jnp.ones((1024, 1024), jnp.float32), device)
        mm = jax.jit(lambda x: x @ x)
        mm(a).block_until_ready()
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            mm(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _measured_peak[key] = 2 * 1024**3 / best
    return _measured_peak[key]


def model_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x the forward (the backward pass costs two forwards).

    Recomputation from rematerialisation is not counted: MFU measures useful work.
    """
    return 3 * forward_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per weight multiply-add, plus attention scores.

    Training costs about three times this (forward + two backward matmuls).
    """
    D, F, H, N, K = cfg.dim, cfg.ffn_hidden_dim, cfg.head_dim, cfg.n_heads, cfg.kv_heads
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    # The embedding lookup is a gather (no FLOPs); the output projection always runs.
    matmul_params = cfg.n_layers * per_layer + D * cfg.vocab_size
    attention = 2 * 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 2 * matmul_params + attention
