"""Grouped-query attention with a causal mask and a static key/value cache.

Dimension letters (see model.py): B batch, T query length, S key length (the cache
length when decoding), D width, N query heads, K key/value heads, G = N / K query heads
per KV head, H head dim, L layers.

MHA (K = N), GQA (1 < K < N) and MQA (K = 1) are one code path: queries are grouped
as [B, T, K, G, H] so that each KV head serves its G query heads without copying keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.layers import INIT_STD, apply_rope, dense, dtype_of, on_cpu
from llama_jax.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for a fixed number of slots S.

    Slots are written left to right; `index` is the next free slot, the same for every
    row. Rows of a batch may hold prompts of different lengths: prompts are left-padded
    and the padding slots are marked invalid, so they are never attended to.

    The keys and values come in one of two forms, matching the model's layers:

    - stacked, one [L, B, K, S, H] array each, for the layer scan (layers stacked, as
      built or loaded): the scan carries the cache and updates each layer's slots in
      place;
    - per layer, a tuple of L arrays [B, K, S, H] each, for a model whose blocks are
      separate (`model.unstack_layers`): each layer reads its own keys in place. With a
      stacked cache such a model would have XLA copy every layer's [B, K, S, H] slice out
      of the stack on every step, which at batch 32 cost as much as the weights.

    `Transformer.init_cache` picks the form that suits the model.

    Attributes:
      k, v: keys (already rotated) and values, [L, B, K, S, H] or L x [B, K, S, H]. Slots
        S come after the KV heads K so that each head's keys are contiguous: the
        attention products then read the cache in place (with [.., S, K, H] XLA
        transposed the cache of every layer on every decode step).
      valid: [B, S] bool, True where a slot holds a real token.
      index: int32 scalar, the number of slots written so far.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return self.valid.shape[1]

    @property
    def per_layer(self) -> bool:
        """True when k and v are tuples of per-layer arrays rather than [L, ...] stacks."""
        return isinstance(self.k, (tuple, list))

    @classmethod
    def create(
        cls,
        cfg: LlamaConfig,
        batch: int,
        max_len: int,
        dtype: str | None = None,
        *,
        per_layer: bool = False,
    ):
        """An empty cache for `batch` rows of up to `max_len` tokens each.

        Memory: 2 * L * B * S * K * H elements, e.g. 128 KiB per token for Llama 3 8B in
        bfloat16 (GQA's 8 KV heads instead of 32 make it four times smaller).

        Args:
          cfg: the model's configuration.
          batch: B, the number of rows.
          max_len: S, the number of slots (prompt plus generated tokens).
          dtype: the cache's dtype; default the dtype attention computes in
            (`attention_dtype`: the model's compute dtype, but float32 for a bfloat16
            model on the CPU).
          per_layer: L separate arrays instead of one stack (see the class docstring).
        """
        dt = dtype_of(dtype) if dtype else attention_dtype(cfg.dtype)
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        if per_layer:
            k = tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))
            v = tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))
        else:
            k = jnp.zeros((cfg.n_layers, *shape), dt)
            v = jnp.zeros((cfg.n_layers, *shape), dt)
        return cls(
            k=k, v=v, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32)
        )


_IMPLEMENTATION = contextvars.ContextVar("attention_implementation", default="xla")


@contextlib.contextmanager
def attention_implementation(name: str):
    """Choose how `attend` computes plain causal attention while tracing in this block.

        with attention_implementation("cudnn"):
            step = train_step.lower(...).compile()

    "xla" (the default) is the einsum-softmax-einsum below, on every backend. "cudnn" is
    cuDNN's fused flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
    bfloat16/float16): it never materialises the [T, S] scores, which is what lets long
    training sequences fit. Masked attention (padding, a KV cache) always uses "xla".

    Args:
      name: "xla" or "cudnn".
    """
    if name not in ("xla", "cudnn"):
        from llama_jax.errors import LlamaError

        raise LlamaError(f"attention implementation {name!r}: expected 'xla' or 'cudnn'.")
    token = _IMPLEMENTATION.set(name)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention of grouped queries over keys, in float32.

    Args:
      q: [B, T, N, H] queries; k, v: [B, K, S, H].
      mask: [B, T, S] bool, True = may attend; or None for plain causal attention of T
        queries over the same T keys.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    if mask is None:
        if _IMPLEMENTATION.get() == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, H]
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        mask = jnp.tril(jnp.ones((T, S), bool))[None]  # [1, T, S]
    q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]; query head n uses KV head n // G
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (H**-0.5)
    # A large finite negative rather than -inf: a row with nothing to attend to (a
    # padding query) gets uniform weights instead of NaN, and its output is ignored.
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v)
    return out.reshape(B, T, N, H)  # [B, T, N, H]


def project(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """'BTD,DNH->BTNH' as one [B*T, D] x [D, N*H] matrix product.

    The reshapes of a row-major [D, N, H] weight are free, and a plain 2-D product is what
    XLA's CPU backend runs fastest: with the einsum it sometimes chooses to transpose the
    weight on every call. With `transposed` the weight is stored [N, H, D].
    """
    B, T, D = x.shape
    N, H = w.shape[:2] if transposed else w.shape[1:]
    w2 = w.reshape(N * H, D) if transposed else w.reshape(D, N * H)
    y = dense(x.reshape(B * T, D), w2, transposed=transposed)  # [B*T, N*H]
    return y.reshape(B, T, N, H)


def attention_dtype(dtype) -> jnp.dtype:
    """The dtype attention computes in for a model computing in `dtype`.

    On the CPU bfloat16 attention runs in float32: XLA's CPU backend has no fast bfloat16
    kernel for the batched score and value products of attention (they ran 6x slower than
    float32 at batch 8), and converting a bfloat16 cache costs as much as reading it.
    Elsewhere attention runs in the model's dtype (with float32 scores and softmax).
    """
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype == jnp.bfloat16 and on_cpu() else dtype


class Attention(nnx.Module):
    """Multi-head attention with rotary positions and grouped KV heads (Meta's wq/wk/wv/wo)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        init = nnx.initializers.normal(INIT_STD)
        pdt = dtype_of(cfg.param_dtype)
        self.dtype = dtype_of(cfg.dtype)
        self.wq = nnx.Param(init(rngs.params(), (D, N, H), pdt))
        self.wk = nnx.Param(init(rngs.params(), (D, K, H), pdt))
        self.wv = nnx.Param(init(rngs.params(), (D, K, H), pdt))
        self.wo = nnx.Param(init(rngs.params(), (N, H, D), pdt))
        # True when the matrices are stored output-first (wq/wk/wv [N, H, D], wo [D, N, H]):
        # the inference layout that unstack_layers chooses for bfloat16 on the CPU.
        self.transposed = False

    def transpose_weights(self) -> None:
        """Switch between input-first and output-first storage (see `transposed`)."""
        for name in ("wq", "wk", "wv"):
            axes = (1, 2, 0) if not self.transposed else (2, 0, 1)
            setattr(self, name, nnx.Param(getattr(self, name)[...].transpose(axes)))
        axes = (2, 0, 1) if not self.transposed else (1, 2, 0)
        self.wo = nnx.Param(self.wo[...].transpose(axes))
        self.transposed = not self.transposed

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attend from x to itself, or to a cache of earlier tokens plus x.

        Args:
          x: [B, T, D] normalised input.
          positions: [B, T] rotary positions.
          inv_freq: [H/2] rotary inverse frequencies.
          mask: [B, T, S] bool, True where query t may attend to key s; None for plain
            causal attention (no cache, no padding).
          kv: optional (k_cache, v_cache, layer, index): either the whole stacked cache
            [L, B, K, S, H] and this layer's number, or this layer's own [B, K, S, H]
            arrays and None; then the first free slot. The new keys and values are
            written in place at slots index .. index + T - 1.
        Returns:
          ([B, T, D] output, the updated (k_cache, v_cache) or None).
        """
        dt, tr = self.dtype, self.transposed
        B, T, D = x.shape
        q = project(x, self.wq[...].astype(dt), tr)  # [B, T, N, H]
        k = project(x, self.wk[...].astype(dt), tr)  # [B, T, K, H]
        v = project(x, self.wv[...].astype(dt), tr)  # [B, T, K, H]
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))

        new_kv = None
        if kv is not None:
            k_cache, v_cache, layer, index = kv
            zero = jnp.zeros((), jnp.int32)
            start = (zero, zero, index.astype(jnp.int32), zero)
            k_new = k.transpose(0, 2, 1, 3).astype(k_cache.dtype)  # [B, K, T, H]
            v_new = v.transpose(0, 2, 1, 3).astype(v_cache.dtype)
            if layer is None:  # this layer's own arrays
                k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, start)
                v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, start)
                k, v = k_cache, v_cache  # [B, K, S, H]
            else:  # the stack of every layer
                start = (layer.astype(jnp.int32), *start)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[None], start)
                v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[None], start)
                k, v = k_cache[layer], v_cache[layer]  # [B, K, S, H]
            new_kv = (k_cache, v_cache)
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S = T, H]

        adt = attention_dtype(dt)
        out = attend(q.astype(adt), k.astype(adt), v.astype(adt), mask).astype(dt)  # [B,T,N,H]
        out = constrain(out, ("batch", "length", "act_heads", None))
        wo = self.wo[...].astype(dt)
        N, H = out.shape[2:]
        # 'BTNH,NHD->BTD' as one [B*T, N*H] x [N*H, D] product: the reshapes are free, and
        # XLA's CPU backend otherwise transposes wo on every call.
        wo2 = wo.reshape(D, N * H) if tr else wo.reshape(N * H, D)
        y = dense(out.reshape(B * T, N * H), wo2, transposed=tr)  # [B*T, D]
        return y.reshape(B, T, D), new_kv
