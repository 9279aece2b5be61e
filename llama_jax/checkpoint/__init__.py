"""Checkpoints: Meta and Hugging Face weights into Orbax and back.

    convert(src, dst)            Meta .pth or HF safetensors/.bin -> a llama-jax checkpoint
    load(path, mesh=None)        a ready Transformer, each array placed on its sharding
    save(model, path)            a model's weights -> a llama-jax checkpoint
    export(ckpt, out, to="hf")   a llama-jax checkpoint -> an HF or Meta model directory
    load_config(path)            the LlamaConfig a checkpoint records

Modules: layout (names, shapes, the rotary permutation), torch_zip (.pth without torch
or unpickling code), safetensors_io, sources (the Meta and HF readers), store (the
on-disk format, save and load), convert, export.
"""

from llama_jax.checkpoint.convert import convert
from llama_jax.checkpoint.export import export
from llama_jax.checkpoint.store import load, load_config, save

__all__ = ["convert", "export", "load", "load_config", "save"]
