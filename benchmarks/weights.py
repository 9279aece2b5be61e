"""The benchmark's model: one random checkpoint, in llama-jax's format and in Hugging Face's.

Both sides load the same weights from disk, each through its own loader (`llama_jax.load`,
`LlamaForCausalLM.from_pretrained`), so they compute the same function.
"""

from __future__ import annotations

import os

import llama_jax as lj
from llama_jax.checkpoint import export, save


def make(workdir: str, preset: str) -> tuple[str, str]:
    """Write a seed-0 random model of `preset` to WORKDIR/llama_jax and WORKDIR/hf.

    Returns:
      (llama-jax checkpoint directory, Hugging Face directory).
    """
    ours, hf = os.path.join(workdir, "llama_jax"), os.path.join(workdir, "hf")
    model = lj.build_model(lj.get_preset(preset), seed=0)
    save(model, ours, force=True)
    export(ours, hf, to="hf", force=True, progress=False)
    return ours, hf
