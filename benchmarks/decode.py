"""Decode throughput through `llama_jax.generate`, against transformers' `generate`.

Each side generates 1 and then N new tokens for the same B prompts (greedy, the default
cache of each library, no stop tokens); decode tokens/s is B * (N - 1) divided by the
difference of the two medians, so the prefill and the first token cancel out. Batch-1
bytes per step: every weight matrix once (the embedding is gathered, not read whole) plus
the filled part of the KV cache, over the step time: the fraction of the measured
streaming bandwidth it reaches. Then the same decode with the KV cache in int8
(`cache_dtype="int8"`), at the default cache and at a cache of 2048 slots (or the
model's context), which every step reads whole.
"""

from __future__ import annotations

import importlib.util

import numpy as np

import llama_jax as lj
from benchmarks.harness import Results, run_peer, time_calls
from llama_jax.model import count_params

BYTES = {"float32": 4, "bfloat16": 2}


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """B prompts of `length` random token ids, the same on both sides."""
    return np.random.default_rng(2).integers(3, vocab, (batch, length)).tolist()


def our_rate(model, rows, new_tokens: int, repeats: int, **kw) -> tuple[float, list[int]]:
    """(decode tokens/s, row 0's tokens) of `llama_jax.generate(model, rows, n, **kw)`."""
    one = time_calls(lambda: lj.generate(model, rows, 1, **kw), repeats)
    many = time_calls(lambda: lj.generate(model, rows, new_tokens, **kw), repeats)
    steps = new_tokens - 1
    return len(rows) * steps / (many["median"] - one["median"]), lj.generate(
        model, rows, new_tokens, **kw
    )[0]


def peer_rate(hf: str, rows, new_tokens: int, repeats: int, dtype: str = "float32"):
    """(decode tokens/s, row 0's tokens, the peer's result) of transformers' `generate`."""
    r = run_peer(
        "decode", hf_dir=hf, prompts=rows, new_tokens=new_tokens, repeats=repeats, dtype=dtype
    )
    rate = len(rows) * (new_tokens - 1) / (r["many"]["median"] - r["one"]["median"])
    return rate, r["tokens_row0"], r


def step_bytes(model, batch: int, context: float, weight_bytes: int) -> float:
    """Bytes a decode step must read: the weight matrices and the cache's filled slots."""
    cfg = model.cfg
    matrices = count_params(model) - cfg.vocab_size * cfg.dim  # all but the gathered embedding
    if cfg.tie_word_embeddings:
        matrices += cfg.vocab_size * cfg.dim  # the output layer reads it whole
    cache = 2 * cfg.n_layers * batch * cfg.kv_heads * cfg.head_dim * context * weight_bytes
    return matrices * weight_bytes + cache


def run(
    res: Results,
    ckpt: str,
    hf: str,
    batches,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    roof: dict,
) -> None:
    model = lj.load(ckpt)
    context = prompt_len + new_tokens / 2  # filled slots, on average over the steps
    for b in batches:
        rows = prompts(b, prompt_len, model.cfg.vocab_size)
        ours, toks = our_rate(model, rows, new_tokens, repeats)
        peer, peer_toks, _ = peer_rate(hf, rows, new_tokens, repeats)
        same = sum(a == b for a, b in zip(toks, peer_toks, strict=False))
        notes = {"greedy_tokens_agree": f"{same}/{len(toks)} (row 0)"}
        if b == 1:
            f32_toks = toks  # row 0 with the float32 cache, for the int8 cache below
            gbs = step_bytes(model, 1, context, 4) * ours / 1e9
            notes["bytes_per_s"] = gbs * 1e9
            notes["fraction_of_bandwidth"] = gbs * 1e9 / roof["stream_bytes"]
        res.add(f"decode batch {b}, float32", "tokens/s", ours, peer, **notes)
        if b == 1:
            res.add(
                "decode batch 1, % of bandwidth",
                "%",
                100 * notes["fraction_of_bandwidth"],
                bytes_per_s=notes["bytes_per_s"],
                bandwidth=roof["stream_bytes"],
            )
    cfg = model.cfg
    del model

    rows = prompts(1, prompt_len, cfg.vocab_size)
    bf16 = lj.load(ckpt, dtype="bfloat16")
    ours16, _ = our_rate(bf16, rows, new_tokens, repeats)
    peer16, _, _ = peer_rate(hf, rows, new_tokens, repeats, dtype="bfloat16")
    f32 = res.get("decode batch 1, float32")["llama_jax"]
    res.add(
        "decode batch 1, bfloat16", "tokens/s", ours16, peer16, ours_vs_our_float32=ours16 / f32
    )
    del bf16

    if importlib.util.find_spec("llama_jax.inference.int8") is None:
        print("decode batch 1, int8: skipped (llama_jax.inference.int8 is not in this tree)")
        return
    q8 = lj.load(ckpt, quantize="int8")
    ours8, _ = our_rate(q8, rows, new_tokens, repeats)
    res.add(
        "decode batch 1, int8",
        "tokens/s",
        ours8,
        None,
        ours_vs_our_bfloat16=ours8 / ours16,
        ours_vs_our_float32=ours8 / f32,
    )
    del q8

    # The KV cache in int8: one byte per number and a scale per vector, dequantized
    # when attention reads it.
    model = lj.load(ckpt)
    ours, toks = our_rate(model, rows, new_tokens, repeats, cache_dtype="int8")
    same = sum(a == b for a, b in zip(toks, f32_toks, strict=True))
    res.add(
        "decode batch 1, int8 KV cache",
        "tokens/s",
        ours,
        None,
        ours_vs_float32_cache=ours / f32,
        greedy_tokens_agree_with_float32_cache=f"{same}/{len(toks)}",
    )
    slots = min(2048, cfg.max_seq_len)
    for b in batches[:2]:
        rows_b = prompts(b, prompt_len, cfg.vocab_size)
        plain, _ = our_rate(model, rows_b, new_tokens, repeats, cache_len=slots)
        res.add(f"decode batch {b}, {slots} slots, float32 cache", "tokens/s", plain)
        int8, _ = our_rate(model, rows_b, new_tokens, repeats, cache_len=slots, cache_dtype="int8")
        res.add(
            f"decode batch {b}, {slots} slots, int8 cache",
            "tokens/s",
            int8,
            ours_vs_float32_cache=int8 / plain,
        )
