"""Tiny checkpoints on disk for the checkpoint tests, written with torch and transformers.

`write_hf_dir` saves a transformers model the way the Hub serves it; `write_meta_dir`
writes Meta's layout from the same weights: the inverse of HF's rotary permutation,
then Meta's model-parallel split into `consolidated.NN.pth` files with torch.save.
"""

from __future__ import annotations

import copy
import json
import os

import ml_dtypes
import numpy as np
import torch

from llama_jax import LlamaConfig
from llama_jax.checkpoint import layout

COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW = ("attention.wo", "feed_forward.w2")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 kept bit-exact (ml_dtypes)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def hf_state(model, dtype=torch.float32) -> dict[str, np.ndarray]:
    """The HF model's state dict in `dtype`, as numpy (no rotary buffers)."""
    return {k: to_numpy(v.to(dtype)) for k, v in model.state_dict().items() if "rotary" not in k}


def write_hf_dir(model, path, dtype=torch.float32, **save_kwargs) -> str:
    """save_pretrained in `dtype` (safetensors; `max_shard_size` for several files)."""
    copy.deepcopy(model).to(dtype).save_pretrained(path, **save_kwargs)
    return str(path)


def meta_state(model, cfg: LlamaConfig, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Meta's state dict (names and rotary convention) from an HF model."""
    out = {}
    for name, w in model.state_dict().items():
        if "rotary" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        meta, arr = layout.hf_to_meta_tensor(name, w.detach().float().numpy(), cfg)
        out[meta] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    return out


def write_meta_dir(
    model,
    cfg: LlamaConfig,
    path,
    n_shards: int = 1,
    *,
    embed_axis: int = 0,
    dtype=torch.float32,
    rope_freqs: bool = False,
    mha_without_n_kv_heads: bool = False,
    tied_output: bool = False,
) -> str:
    """Write params.json + consolidated.NN.pth as Meta's model-parallel code saves them.

    Args:
      embed_axis: 1 splits tok_embeddings like Llama 1/2 (ParallelEmbedding), 0 like
        Llama 3 (VocabParallelEmbedding).
      rope_freqs: add the `rope.freqs` buffer Llama 1/2 files carry.
      mha_without_n_kv_heads: leave n_kv_heads out of params.json (Llama 1/2 style).
      tied_output: also store output.weight for a tied model (some Llama 3.2 files do).
    With more shards than KV heads, each shard holds one KV head, repeated over
    n_shards / K consecutive shards (Llama 3.1 405B's 16-shard files).
    """
    os.makedirs(path, exist_ok=True)
    state = meta_state(model, cfg, dtype)
    if tied_output:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    K, H = cfg.kv_heads, cfg.head_dim
    shards: list[dict] = [{} for _ in range(n_shards)]
    for name, w in state.items():
        key = name.removeprefix("layers.").split(".", 1)[-1].removesuffix(".weight")
        if key in ("attention.wk", "attention.wv") and n_shards > K:
            heads = w.reshape(K, H, -1)
            for i in range(n_shards):
                shards[i][name] = heads[i // (n_shards // K)].clone()
            continue
        if key in COLUMN or name == "output.weight":
            axis = 0
        elif key in ROW:
            axis = 1
        elif name == "tok_embeddings.weight":
            axis = embed_axis
        else:
            axis = None  # norms are replicated
        parts = [w] * n_shards if axis is None else torch.chunk(w, n_shards, dim=axis)
        for i, part in enumerate(parts):
            shards[i][name] = part.clone()
    for i, shard in enumerate(shards):
        if rope_freqs:
            shard["rope.freqs"] = torch.ones(H // 2)
        torch.save(shard, os.path.join(path, f"consolidated.{i:02d}.pth"))
    params = layout.meta_params(cfg)
    if mha_without_n_kv_heads:
        params.pop("n_kv_heads", None)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    return str(path)
