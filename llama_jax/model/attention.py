"""Grouped-query attention with rotary positions, a causal mask and the KV cache.

Dimension letters (see transformer.py): B batch, T query length, S key length (the cache
slots when decoding), D width, N query heads, K key/value heads, G = N / K query heads
per KV head, H head dim.

MHA (K = N), GQA (1 < K < N) and MQA (K = 1) are one code path: queries are grouped
as [B, T, K, G, H] so that each KV head serves its G query heads without copying keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.layers import INIT_STD, apply_rope, linear
from llama_jax.sharding.rules import constrain

# How `attend` may compute attention: "xla" is the reference einsum below, on every
# backend; the others are fused kernels from llama_jax.kernels (opt-in, by device kind).
KERNELS = ("xla", "cudnn", "splash")


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, kernel: str = "xla"
) -> jax.Array:
    """Softmax attention of grouped queries over keys; scores and softmax in float32.

    Args:
      q: [B, T, N, H] queries; k, v: [B, K, S, H] keys and values.
      mask: [B, T, S] bool, True = may attend; or None for plain causal attention of T
        queries over the same T keys (no cache, no padding).
      kernel: "xla", or a fused kernel of llama_jax.kernels.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if kernel != "xla":
        from llama_jax import kernels

        return kernels.attention(kernel, q, k, v, mask)
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), bool))[None]  # [1, T, S]
    q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]; query head n uses KV head n // G
    # The cache comes first in both products, which lets XLA read it where it lies.
    scores = jnp.einsum("BKSH,BTKGH->BKGTS", k, q, preferred_element_type=jnp.float32)
    scores = scores * H**-0.5
    # A large finite negative rather than -inf: a row with nothing to attend to (a
    # padding query) gets uniform weights instead of NaN, and its output is ignored.
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKSH,BKGTS->BTKGH", v, probs)
    return out.reshape(B, T, N, H)


class Attention(nnx.Module):
    """Multi-head attention with rotary positions and grouped KV heads (Meta's wq/wk/wv/wo)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, kernel: str = "xla"):
        D, N, K, H = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        init = nnx.initializers.normal(INIT_STD)
        self.dtype = cfg.dtype
        self.kernel = kernel
        self.wq = nnx.Param(init(rngs.params(), (D, N, H), cfg.param_dtype))
        self.wk = nnx.Param(init(rngs.params(), (D, K, H), cfg.param_dtype))
        self.wv = nnx.Param(init(rngs.params(), (D, K, H), cfg.param_dtype))
        self.wo = nnx.Param(init(rngs.params(), (N, H, D), cfg.param_dtype))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        mask: jax.Array | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attend from x to itself, or to the cached earlier tokens plus x.

        Args:
          x: [B, T, D] normalised input.
          positions: [B, T] rotary positions.
          inv_freq: [H/2] rotary inverse frequencies.
          mask: [B, T, S] bool, True where query t may attend to key s; None for plain
            causal attention (no cache, no padding).
          cache: the KVCache, or None; this layer's new keys and values are written
            into it at slots start .. start + T - 1 and attention reads all S slots.
          layer: this layer's number in the cache.
          start: the first slot to write.
        Returns:
          ([B, T, D] output, the updated cache or None).
        """
        q = linear("BTD,DNH->BTNH", x, self.wq, self.dtype)
        k = linear("BTD,DKH->BTKH", x, self.wk, self.dtype)
        v = linear("BTD,DKH->BTKH", x, self.wv, self.dtype)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))

        if cache is not None:
            cache = cache.write(layer, k, v, start)
            k, v = cache.read(layer)  # [B, K, S, H]
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S = T, H]

        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.kernel)  # [B, T, N, H]
        out = constrain(out, ("batch", "length", "act_heads", None))
        return linear("BTNH,NHD->BTD", out, self.wo, self.dtype), cache
