"""Choosing the next token from logits: greedy, temperature, top-k and top-p.

Every setting is a traced value, not a Python constant, so one compiled decode step
serves every temperature, k and p. Dimension letters as in model.py: B batch, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.errors import LlamaError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
      temperature: 0 picks the most likely token (greedy); above 0 samples from
        softmax(logits / temperature).
      top_k: keep only the k most likely tokens (None: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches p,
        computed after top-k (None or 1.0: all). Must lie in (0, 1].
      seed: the random seed; the same seed and inputs give the same tokens.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, int | float) or t < 0 or t != t:
            raise LlamaError(f"temperature must be a number >= 0 (0 is greedy); got {t!r}.")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise LlamaError(f"top_k must be a positive integer or None; got {k!r}.")
        if p is not None and (not isinstance(p, int | float) or not 0.0 < p <= 1.0):
            raise LlamaError(f"top_p must lie in (0, 1] (or be None); got {p!r}.")

    def arrays(self) -> dict[str, jax.Array]:
        """The settings as device scalars (top_k 0 and top_p 1 mean "off")."""
        return {
            "temperature": jnp.asarray(self.temperature, jnp.float32),
            "top_k": jnp.asarray(self.top_k or 0, jnp.int32),
            "top_p": jnp.asarray(1.0 if self.top_p is None else self.top_p, jnp.float32),
        }


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set every logit outside the top-k / top-p set to -inf.

    Args:
      logits: [B, V] float32 (already divided by the temperature).
      top_k: int32 scalar, 0 = no limit.
      top_p: float32 scalar in (0, 1], 1 = no limit.
    Returns:
      [B, V] logits; the most likely token always survives. Tokens tied with the last
      one kept survive as well (they are equally among the best).
    """
    V = logits.shape[-1]
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], most likely first
    rank = jnp.arange(V)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k = rank < k  # [V]
    # Mass before each ranked token, renormalised over the top k (the order HF applies
    # top-k then top-p); a token is kept while the mass before it is below p.
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p) | (rank == 0))  # [B, V]
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)  # [B, 1], >= 1
    threshold = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)  # [B, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """Pick one token per row.

    Args:
      logits: [B, V] float32.
      key: a PRNG key (unused when greedy).
      temperature, top_k, top_p: scalars as from `SamplingParams.arrays()`.
    Returns:
      [B] int32 token ids.
    """

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        x = logits / temperature
        # Sorting V logits per step costs; skip it when neither filter is on.
        x = jax.lax.cond(
            (top_k > 0) | (top_p < 1.0), filter_logits, lambda x, k, p: x, x, top_k, top_p
        )
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, None)
