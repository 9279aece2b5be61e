"""The small pieces of a LLaMA block: RMSNorm, rotary embedding and the SwiGLU MLP.

Dimension letters (see transformer.py): B batch, T query length, D model width,
F MLP width, N query heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import precision
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.sharding.rules import constrain

# Weights start as N(0, 0.02), like Hugging Face's LlamaConfig.initializer_range.
INIT_STD = 0.02


def linear(spec: str, x: jax.Array, w, dtype, out_dtype=None) -> jax.Array:
    """Activations times a weight matrix: `jnp.einsum(spec, x, w)` computed in `dtype`.

    Every matrix product of the model goes through here. `w` is a parameter, or a module
    that computes the same product its own way: an int8 weight with its scales
    (`llama_jax.inference.int8`) or a weight with a LoRA adapter (`llama_jax.training.lora`).

    Args:
      spec: the einsum, e.g. "BTD,DNH->BTNH".
      x: the activations.
      w: an nnx.Param, or an nnx.Module called as `w(spec, x, dtype, out_dtype)`.
      dtype: the dtype the product's inputs are cast to.
      out_dtype: the result's dtype (the logits ask for float32); default `dtype`.
    Returns:
      The product; its gradient products are computed in `dtype` too (`precision.einsum`).
    """
    if isinstance(w, nnx.Module):
        return w(spec, x, dtype, out_dtype)
    return precision.einsum(weight_order(spec), x.astype(dtype), w[...].astype(dtype), out_dtype)


def weight_order(spec: str) -> str:
    """The einsum with the weight's letters renamed in axis order ("BTab,abc->BTc" for wo).

    `jnp.einsum` contracts shared axes in the alphabetical order of their letters and XLA
    lays both operands out in that order: for wo that is (H, N), a transposed copy of the
    weight on every call. Renamed, the weight is read where it lies.
    """
    w_letters = spec.split("->")[0].split(",")[1]
    unused = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in spec]
    return spec.translate(str.maketrans(w_letters, "".join(unused[: len(w_letters)])))


class RMSNorm(nnx.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * weight, computed in float32.

    Unlike LayerNorm it neither centres x nor adds a bias; the gain starts at one.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype: str = "float32"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

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
        self.dtype = cfg.dtype
        self.w1 = nnx.Param(init(rngs.params(), (D, F), cfg.param_dtype))
        self.w3 = nnx.Param(init(rngs.params(), (D, F), cfg.param_dtype))
        self.w2 = nnx.Param(init(rngs.params(), (F, D), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = linear("BTD,DF->BTF", x, self.w1, self.dtype)
        up = linear("BTD,DF->BTF", x, self.w3, self.dtype)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return linear("BTF,FD->BTD", hidden, self.w2, self.dtype)
