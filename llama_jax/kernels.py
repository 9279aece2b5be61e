"""Fused attention kernels, opt-in by name: `Transformer(cfg, attention="cudnn")`.

The model's own attention (`llama_jax.model.attention.attend`) is the reference: plain
einsums and a softmax that run on every backend. A fused kernel computes the same
function without materialising the [T, S] scores, which is what lets long training
sequences fit in memory. Each kernel takes the reference's arguments and layouts.

    cudnn   cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
            bfloat16/float16; plain causal or masked)
    splash  Pallas splash attention for TPUs (jax.experimental.pallas.ops.tpu), causal.
            A mask (padding, or a KV cache: decoding) goes to the reference instead, so
            on TPUs it speeds up training and unpadded prefill. Off TPUs it runs in
            Pallas interpret mode: correct, slow, for tests. One device: under a mesh
            the kernel would need a shard_map over batch and heads (not provided).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.errors import LlamaError

NAMES = ("cudnn", "splash")

# splash attention works on blocks of 128 query and key positions (the TPU's lane width);
# sequences are padded up to a multiple of it.
SPLASH_BLOCK = 128


def attention(name: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None):
    """Attention by kernel `name`, with `attend`'s arguments.

    Args:
      name: the kernel ("cudnn" or "splash").
      q: [B, T, N, H] queries; k, v: [B, K, S, H] keys and values.
      mask: [B, T, S] bool (True = may attend), or None for plain causal attention.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if name == "cudnn":
        return cudnn_attention(q, k, v, mask)
    if name == "splash":
        return splash_attention(q, k, v, mask)
    raise LlamaError(f"attention kernel {name!r} is not one of: {', '.join(NAMES)}.")


def cudnn_attention(q, k, v, mask):
    """cuDNN's fused attention; GQA natively (K KV heads serve N query heads)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise LlamaError(
            f"the cudnn attention kernel runs in bfloat16 or float16; this model computes in "
            f"{q.dtype}. Use a bfloat16 config (dtype='bfloat16') or attention='xla'."
        )
    return dot_product_attention(q, k, v, mask, implementation="cudnn")


def dot_product_attention(q, k, v, mask, implementation: str):
    """`jax.nn.dot_product_attention` on `attend`'s layouts.

    Args:
      q: [B, T, N, H]; k, v: [B, K, S, H]; mask: [B, T, S] bool or None (causal).
      implementation: "cudnn" (the fused kernel) or "xla" (jax's own reference, which
        lets the layout handling be tested on any backend).
    Returns:
      [B, T, N, H].
    """
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, H]
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], implementation=implementation
    )  # mask [B, 1, T, S]: the same for every head


def splash_attention(q, k, v, mask, *, interpret: bool | None = None):
    """Pallas splash attention (causal); masked or cached attention falls back to `attend`.

    GQA: the kernel's multi-head form takes N query heads over K KV heads and gives
    query head n the KV head n // (N / K), the grouping `attend` uses.

    Args:
      q: [B, T, N, H]; k, v: [B, K, S, H]; mask: [B, T, S] bool or None (causal, S = T).
      interpret: run the kernel in Pallas interpret mode; default: unless on a TPU.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if mask is not None:
        # Padding or a KV cache: the kernel's masks are static per head, not per row;
        # the reference handles these (decoding reads one query row, where a fused
        # kernel gains little).
        from llama_jax.model.attention import attend

        return attend(q, k, v, mask)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    B, T, N, H = q.shape
    padded = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK
    kernel = _splash_kernel(N, padded, interpret)
    # Keys past T are padding; causality already hides them from every real query.
    pad = ((0, 0), (0, 0), (0, padded - T), (0, 0))
    q = jnp.pad((q * H**-0.5).astype(q.dtype).transpose(0, 2, 1, 3), pad)  # [B, N, T', H]
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)  # [B, K, T', H]
    out = jax.vmap(kernel)(q, k, v)  # [B, N, T', H]; the kernel has no batch axis
    return out[:, :, :T].transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, N, H]


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * heads)
    # The kernel keeps its mask tables as arrays: make them constants, not values of
    # whichever jit first asked for this kernel.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
