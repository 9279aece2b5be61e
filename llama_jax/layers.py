"""The small pieces of a LLaMA block: RMSNorm, rotary embedding and the SwiGLU MLP.

Dimension letters (see model.py): B batch, T query length, D model width, F MLP width,
N query heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.sharding import constrain

# Weights start as N(0, 0.02), like Hugging Face's LlamaConfig.initializer_range.
INIT_STD = 0.02


def dtype_of(name: str) -> jnp.dtype:
    """`"bfloat16"` -> `jnp.bfloat16`; configs keep dtypes as strings so they stay JSON."""
    return jnp.dtype(name)


def on_cpu() -> bool:
    """True when JAX computes on the CPU (decides the CPU-specific paths at trace time)."""
    return jax.default_backend() == "cpu"


def dense(x: jax.Array, w: jax.Array, out_dtype=None, *, transposed: bool = False) -> jax.Array:
    """[M, K] x [K, N] -> [M, N], accumulated in float32, returned in `out_dtype` (x's dtype).

    On the CPU, bfloat16 products take XLA's fast path (XNNPACK's bfloat16 kernels, about
    twice float32's speed) only when they return float32 and have at least two rows; with a
    bfloat16 result or a single row XLA converts both operands to float32 first, which made
    bfloat16 decoding several times slower than float32. So there a single row is doubled
    and the result is computed in float32, then rounded: the same numbers as the plain
    product (which accumulates in float32 too), at bfloat16's speed.

    Args:
      x: [M, K].
      w: [K, N], or [N, K] with `transposed` (see `inference_layout`).
      out_dtype: the result's dtype; default x's.
      transposed: w is stored output-first.
    """
    out_dtype = out_dtype or x.dtype
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    if x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16 and on_cpu():
        rows = x.shape[0]
        xx = jnp.concatenate([x, x]) if rows == 1 else x
        y = jax.lax.dot_general(xx, w, dims, preferred_element_type=jnp.float32)
        return y[:rows].astype(out_dtype)
    if out_dtype == x.dtype:
        return jax.lax.dot_general(x, w, dims)
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype).astype(out_dtype)


def inference_layout(param_dtype) -> bool:
    """Whether `unstack_layers` stores matrices output-first ([out, in]) for inference.

    On the CPU, XLA's bfloat16 products ran 15-20% faster with the weight's input axis
    contiguous (contracting the minor axis of both operands); float32 ones ran slower.
    """
    return jnp.dtype(param_dtype) == jnp.bfloat16 and on_cpu()


class RMSNorm(nnx.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * weight, computed in float32.

    Unlike LayerNorm it neither centres x nor adds a bias; the gain starts at one.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype: str = "float32"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype_of(param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [H/2] of the rotary embedding, with Llama 3.1's scaling.

    Pair i of each head rotates by angle `position * theta^(-2i/H)`. Llama 3.1/3.2
    stretch the slow (long-wavelength) pairs by `factor` so that positions beyond the
    original context look like positions inside it, leave the fast pairs alone, and blend
    smoothly in between (Meta's `apply_scaling` in llama/model.py).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is not None:
        wavelen = 2 * np.pi / inv_freq
        low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
        high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
        smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen < high_freq_wavelen,
            inv_freq,
            np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, blended),
        )
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by `position * inv_freq[i]`.

    This is Meta's convention (interleaved pairs, as complex numbers in llama/model.py).
    Hugging Face checkpoints use the half-split form (x[i], x[i + H/2]); their wq and wk
    rows are permuted back to this form by `llama_jax.checkpoint.layout`.

    Args:
      x: [B, T, N, H] queries or keys.
      positions: [B, T] int positions of each token (rows may differ: left padding).
      inv_freq: [H/2] from `rope_frequencies`.
    Returns:
      [B, T, N, H], same dtype as x; the rotation itself runs in float32.
    """
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B, T, N, H/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)  # [B, T, N, H]


class FeedForward(nnx.Module):
    """SwiGLU MLP: w2(silu(x w1) * (x w3)), with Meta's names w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        D, F = cfg.dim, cfg.ffn_hidden_dim
        init = nnx.initializers.normal(INIT_STD)
        pdt = dtype_of(cfg.param_dtype)
        self.dtype = dtype_of(cfg.dtype)
        self.w1 = nnx.Param(init(rngs.params(), (D, F), pdt))
        self.w3 = nnx.Param(init(rngs.params(), (D, F), pdt))
        self.w2 = nnx.Param(init(rngs.params(), (F, D), pdt))
        # True when the matrices are stored output-first (w1, w3 [F, D], w2 [D, F]): the
        # inference layout that unstack_layers chooses for bfloat16 on the CPU.
        self.transposed = False

    def __call__(self, x: jax.Array) -> jax.Array:
        dt, tr = self.dtype, self.transposed
        B, T, D = x.shape
        # 'BTD,DF->BTF' and 'BTF,FD->BTD' as [B*T, ...] matrix products (free reshapes).
        x2 = x.reshape(B * T, D)
        gate = dense(x2, self.w1[...].astype(dt), transposed=tr).reshape(B, T, -1)
        up = dense(x2, self.w3[...].astype(dt), transposed=tr).reshape(B, T, -1)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        out = dense(hidden.reshape(B * T, -1), self.w2[...].astype(dt), transposed=tr)
        return out.reshape(B, T, D)

    def transpose_weights(self) -> None:
        """Switch between input-first and output-first storage (see `transposed`)."""
        for name in ("w1", "w2", "w3"):
            setattr(self, name, nnx.Param(getattr(self, name)[...].T))
        self.transposed = not self.transposed
