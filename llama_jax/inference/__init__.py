"""Inference: prefill and decode over the static KV cache, sampling, text in and out.

generate       prompts (token ids) -> new token ids; generate_stream, generate_text
sampling       greedy / temperature / top-k / top-p
speculative    a draft model proposes, the target verifies: speculative_generate
"""

from llama_jax.inference.generate import Generation, generate, generate_stream, generate_text
from llama_jax.inference.sampling import SamplingParams, sample
from llama_jax.inference.speculative import (
    SpeculativeGeneration,
    draft_from_layers,
    speculative_generate,
)

__all__ = [
    "Generation",
    "SamplingParams",
    "SpeculativeGeneration",
    "draft_from_layers",
    "generate",
    "generate_stream",
    "generate_text",
    "sample",
    "speculative_generate",
]
