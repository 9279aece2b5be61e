"""The static key/value cache: every layer's keys and values for a fixed number of slots.

Dimension letters (see transformer.py): B batch, T new tokens, S slots, K key/value
heads, H head dim, L layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for a fixed number of slots S.

    Slots are written left to right; `index` is the next free slot, the same for every
    row. Rows of a batch may hold prompts of different lengths: prompts are left-padded
    and the padding slots are marked invalid, so they are never attended to.

    Each layer has its own [B, K, S, H] arrays: a layer reads and writes its keys in
    place. Slots S come after the KV heads K so that each head's keys are contiguous,
    which is the layout attention's products read without a transpose.

    Memory: 2 * L * B * S * K * H elements, e.g. 128 KiB per token for Llama 3 8B in
    bfloat16 (GQA's 8 KV heads instead of 32 make it four times smaller); in int8, with
    `write` and `read` converting, see llama_jax.inference.int8.Int8KVCache.

    Attributes:
      k, v: L arrays [B, K, S, H] each: keys (already rotated) and values.
      valid: [B, S] bool, True where a slot holds a real token.
      index: int32 scalar, the number of slots written so far.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype: str | None = None):
        """An empty cache for `batch` rows of up to `max_len` tokens each.

        Args:
          cfg: the model's configuration.
          batch: B, the number of rows.
          max_len: S, the number of slots (prompt plus generated tokens).
          dtype: the cache's dtype; default the model's compute dtype `cfg.dtype`.
        """
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)  # [B, K, S, H]
        dt = dtype or cfg.dtype
        return cls(
            k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
            v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return self.valid.shape[1]

    def write(self, layer: int, k: jax.Array, v: jax.Array, index: jax.Array) -> KVCache:
        """Store one layer's new keys and values [B, T, K, H] at slots index .. index + T - 1.

        Returns the updated cache (inside `jax.jit` with the cache donated, in place)."""
        start = (0, 0, index, 0)
        k_new = k.transpose(0, 2, 1, 3).astype(self.k[layer].dtype)  # [B, K, T, H]
        v_new = v.transpose(0, 2, 1, 3).astype(self.v[layer].dtype)
        ks, vs = list(self.k), list(self.v)
        ks[layer] = jax.lax.dynamic_update_slice(self.k[layer], k_new, start)
        vs[layer] = jax.lax.dynamic_update_slice(self.v[layer], v_new, start)
        return dataclasses.replace(self, k=tuple(ks), v=tuple(vs))

    def read(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """One layer's keys and values [B, K, S, H], every slot, as attention reads them."""
        return self.k[layer], self.v[layer]

    def advance(self, new_valid: jax.Array) -> KVCache:
        """Claim the next T slots for new tokens; `new_valid` [B, T] is False for padding.

        Returns:
          The cache with those slots marked and `index` past them; the layers then
          `write` their keys and values at the old index.
        """
        valid = jax.lax.dynamic_update_slice(self.valid, new_valid, (0, self.index))
        return dataclasses.replace(self, valid=valid, index=self.index + new_valid.shape[1])
