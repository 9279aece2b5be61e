"""Inference: prefill and decode over the static KV cache, sampling, text in and out.

generate       prompts (token ids) -> new token ids; generate_stream, generate_text
sampling       greedy / temperature / top-k / top-p
"""

from llama_jax.inference.generate import Generation, generate, generate_stream, generate_text
from llama_jax.inference.sampling import SamplingParams, sample

__all__ = ["Generation", "SamplingParams", "generate", "generate_stream", "generate_text", "sample"]
