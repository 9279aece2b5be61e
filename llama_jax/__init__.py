"""llama-jax: Meta's LLaMA family (Llama 1, 2, 3, 3.1, 3.2) in JAX and Flax NNX.

Read the model top to bottom in this order: config, model/layers, model/attention,
model/kv_cache, model/transformer. Around it, one folder per concern: sharding/,
checkpoint/, inference/, training/, cli/ (docs/architecture.md draws the map).
"""

import ctypes
import sys


def _keep_freed_memory() -> None:
    """Ask glibc's malloc to keep large freed blocks for reuse instead of unmapping them.

    XLA's CPU backend allocates each call's temporary buffers afresh. By default glibc
    serves blocks over 128 KiB-32 MiB with mmap and unmaps them on free, so the next call
    page-faults every page in again (a bench-134m decode step spent more time in the
    kernel than in its products). Serving them from the heap and not trimming it lets the
    next call reuse the same pages. Memory the process no longer needs stays mapped (up to
    `M_TRIM_THRESHOLD` at the top of the heap); `malloc_trim(0)` still returns it.
    No effect outside Linux with glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to set
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
    mallopt(M_MMAP_MAX, 0)  # no mmap per block: large blocks come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # give the heap's top back only beyond 1 GiB free
    mallopt(M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps, not one block at a time


_keep_freed_memory()

from llama_jax.checkpoint import load  # noqa: E402
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, get_preset  # noqa: E402
from llama_jax.errors import LlamaError  # noqa: E402
from llama_jax.inference.generate import generate, generate_text  # noqa: E402
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
    "generate",
    "generate_text",
    "get_preset",
    "load",
]
