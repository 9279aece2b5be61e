"""llama-jax: Meta's LLaMA family (Llama 1, 2, 3, 3.1, 3.2) in JAX and Flax NNX.

Read the model top to bottom in this order: config, model/layers, model/attention,
model/kv_cache, model/transformer. Around it, one folder per concern: sharding/,
checkpoint/, inference/, training/, cli/ (docs/architecture.md draws the map).
"""

# Before anything allocates: glibc keeps XLA's freed buffers for reuse (see runtime.py).
from llama_jax import runtime  # noqa: I001

runtime.keep_freed_memory()

from llama_jax.checkpoint import load  # noqa: E402
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, get_preset  # noqa: E402
from llama_jax.errors import LlamaError  # noqa: E402
from llama_jax.inference.generate import generate, generate_text  # noqa: E402
from llama_jax.inference.speculative import draft_from_layers, speculative_generate  # noqa: E402
from llama_jax.model import KVCache, Transformer, abstract_model, build_model, count_params  # noqa: E402
from llama_jax.tokenizer import Tokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "KVCache",
    "LlamaConfig",
    "LlamaError",
    "RopeScaling",
    "Tokenizer",
    "Transformer",
    "abstract_model",
    "build_model",
    "count_params",
    "draft_from_layers",
    "generate",
    "generate_text",
    "get_preset",
    "load",
    "speculative_generate",
]
