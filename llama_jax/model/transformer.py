"""The LLaMA transformer in Flax NNX, written to be read beside Meta's llama/model.py.

Dimension letters, used in every einsum and shape comment of the package:

    B batch          T query length      S key length (cache slots when decoding)
    D model width    F MLP width         V vocabulary
    N query heads    K key/value heads   G = N / K query heads per KV head
    H head dim       L layers

Parameter names are Meta's checkpoint keys (tok_embeddings, layers.3.attention.wq, ...,
norm, output). Matrices are stored input-first, shaped for their einsum: wq is [D, N, H]
where Meta's `wq.weight` is [N * H, D]. The L blocks are separate modules run by a
Python loop, as in Meta's code: each block's weights and each layer's cache are arrays
of their own, read in place.

Numerics: parameters are stored in `cfg.param_dtype`, matmuls run in `cfg.dtype` with
float32 accumulation, and RMSNorm, rotary embedding, softmax and the logits are computed
in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError
from llama_jax.model.attention import KERNELS, Attention
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.layers import INIT_STD, FeedForward, RMSNorm, linear, rope_frequencies
from llama_jax.sharding.rules import constrain

# Rematerialisation policies for training, by name: what each block keeps for the
# backward pass (the rest is recomputed). Inference uses "none".
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """One pre-norm transformer block: h = x + attention(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, attention: str = "xla"):
        self.attention = Attention(cfg, rngs=rngs, kernel=attention)
        self.feed_forward = FeedForward(cfg, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype)

    def __call__(self, x, positions, inv_freq, mask, cache=None, layer=0, start=None):
        """x: [B, T, D] -> ([B, T, D], the updated cache or None); see Attention for the rest."""
        attn, cache = self.attention(
            self.attention_norm(x), positions, inv_freq, mask, cache, layer, start
        )
        h = x + attn
        out = h + self.feed_forward(self.ffn_norm(h))
        return constrain(out, ("batch", "length", "act_embed")), cache


class Transformer(nnx.Module):
    """A LLaMA model: token embedding, L blocks, a final RMSNorm and the output projection.

    Call it on int32 token ids [B, T] to get float32 logits [B, T, V]:

        model = Transformer(PRESETS["tiny"], rngs=nnx.Rngs(0))
        logits = model(jnp.array([[1, 2, 3]]))      # [1, 3, 256]

    Args:
      cfg: the configuration.
      rngs: random keys for the initial weights.
      remat: what training recomputes in the backward pass (REMAT_POLICIES).
      attention: how attention is computed: "xla" (the reference einsums, every backend)
        or a fused kernel of llama_jax.kernels ("cudnn" on NVIDIA GPUs, "splash" on TPUs).
    """

    def __init__(
        self, cfg: LlamaConfig, *, rngs: nnx.Rngs, remat: str = "none", attention: str = "xla"
    ):
        if remat not in REMAT_POLICIES:
            raise LlamaError(f"remat={remat!r} is not one of {sorted(REMAT_POLICIES)}.")
        if attention not in KERNELS:
            raise LlamaError(f"attention={attention!r} is not one of {list(KERNELS)}.")
        self.cfg = cfg
        self.remat = remat
        init = nnx.initializers.normal(INIT_STD)
        V, D = cfg.vocab_size, cfg.dim
        self.tok_embeddings = nnx.Param(init(rngs.params(), (V, D), cfg.param_dtype))
        self.layers = nnx.List(
            [Block(cfg, rngs=rngs, attention=attention) for _ in range(cfg.n_layers)]
        )
        self.norm = RMSNorm(D, cfg.norm_eps, param_dtype=cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.output = nnx.Param(init(rngs.params(), (D, V), cfg.param_dtype))

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
        """An empty KVCache for this model (see KVCache.create)."""
        return KVCache.create(self.cfg, batch, max_len, dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ):
        """Run the model (on one device, or sharded over the mesh its parameters live on).

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] rotary positions; default 0 .. T-1 (or, with a cache, the
            slots index .. index + T - 1). Left-padded rows pass their own positions.
          attention_mask: [B, T] bool, False for padding tokens, which no token attends
            to. Default: all True.
          cache: a KVCache to extend by these T tokens (prefill or decode).
        Returns:
          logits [B, T, V] float32; with a cache, (logits, updated cache).
        """
        cfg = self.cfg
        B, T = tokens.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        inv_freq = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

        # Causal mask over key slots: query t sits in slot start + t and sees the slots up
        # to it that hold real tokens. No cache and no padding: plain causal attention,
        # which `attend` (or a fused kernel) builds without a [B, T, S] array.
        mask = None
        if cache is not None or attention_mask is not None:
            if attention_mask is None:
                attention_mask = jnp.ones((B, T), bool)
            if cache is None:
                key_valid = attention_mask  # [B, S = T]
            else:
                cache = cache.advance(attention_mask)
                key_valid = cache.valid  # [B, S]
            S = key_valid.shape[1]
            causal = jnp.arange(S)[None, :] <= start + jnp.arange(T)[:, None]  # [T, S]
            mask = causal[None] & key_valid[:, None, :]  # [B, T, S]

        h = jnp.take(self.tok_embeddings[...], tokens, axis=0).astype(cfg.dtype)  # [B, T, D]
        h = constrain(h, ("batch", "length", "act_embed"))
        for layer, block in enumerate(self.layers):
            if self.remat != "none" and cache is None:  # training: recompute in the backward
                h, _ = _remat_block(block, h, positions, inv_freq, mask, self.remat)
            else:
                h, cache = block(h, positions, inv_freq, mask, cache, layer, start)

        h = self.norm(h)
        out = self.tok_embeddings if cfg.tie_word_embeddings else self.output
        spec = "BTD,VD->BTV" if cfg.tie_word_embeddings else "BTD,DV->BTV"
        logits = linear(spec, h, out, cfg.dtype, jnp.float32)  # [B, T, V]
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        return logits if cache is None else (logits, cache)


def _remat_block(block, h, positions, inv_freq, mask, remat: str):
    """`block(h, ...)` whose activations are recomputed in the backward pass by `remat`."""
    run = nnx.remat(
        lambda block, h: block(h, positions, inv_freq, mask),
        policy=REMAT_POLICIES[remat],
        prevent_cse=False,
    )
    return run(block, h)
