"""Inference: prefill and decode over the static KV cache, sampling, text in and out.

generate       prompts (token ids) -> new token ids; generate_stream, generate_text
sampling       greedy / temperature / top-k / top-p
speculative    a draft model proposes, the target verifies: speculative_generate
int8           weight-only int8 (rounded per output channel), with CPU and GPU kernels;
               the int8 KV cache (Int8KVCache, cache_dtype="int8")
gptq           the same int8 format with values chosen by GPTQ on calibration text
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
