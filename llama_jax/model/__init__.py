"""The model, in reading order: layers, attention, the KV cache, the transformer.

`build` makes models from it: random weights, shapes only, or given arrays; `compiled`
is how `model(x)` runs (one compiled program per input shape).
"""

from llama_jax.model.attention import Attention, attend
from llama_jax.model.build import abstract_model, build_model, count_params, set_params
from llama_jax.model.compiled import CompiledTransformer
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.layers import FeedForward, RMSNorm, apply_rope, linear, rope_frequencies
from llama_jax.model.transformer import REMAT_POLICIES, Block, Transformer

__all__ = [
    "REMAT_POLICIES",
    "Attention",
    "Block",
    "CompiledTransformer",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "Transformer",
    "abstract_model",
    "apply_rope",
    "attend",
    "build_model",
    "count_params",
    "linear",
    "rope_frequencies",
    "set_params",
]
