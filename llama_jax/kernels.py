"""Fused attention kernels, opt-in by name: `Transformer(cfg, attention="cudnn")`.

The model's own attention (`llama_jax.model.attention.attend`) is the reference: plain
einsums and a softmax that run on every backend. A fused kernel computes the same
function without materialising the [T, S] scores, which is what lets long training
sequences fit in memory. Each kernel takes the reference's arguments and layouts.

    cudnn   cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
            bfloat16/float16; plain causal or masked)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.errors import LlamaError


def attention(name: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None):
    """Attention by kernel `name`, with `attend`'s arguments.

    Args:
      name: the kernel ("cudnn").
      q: [B, T, N, H] queries; k, v: [B, K, S, H] keys and values.
      mask: [B, T, S] bool (True = may attend), or None for plain causal attention.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if name == "cudnn":
        return cudnn_attention(q, k, v, mask)
    raise LlamaError(f"attention kernel {name!r} is not one of: cudnn.")


def cudnn_attention(q, k, v, mask):
    """cuDNN's fused attention; GQA natively (K KV heads serve N query heads)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise LlamaError(
            f"the cudnn attention kernel runs in bfloat16 or float16; this model computes in "
            f"{q.dtype}. Use a bfloat16 config (dtype='bfloat16') or attention='xla'."
        )
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, H]
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
