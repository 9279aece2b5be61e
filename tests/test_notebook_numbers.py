"""Numbers the teaching notebooks quote, checked against the presets and the data sheets.

Fast and without executing a notebook: each figure is recomputed here from published
architecture numbers (Meta's model cards and params.json files) and compared with what
the notebooks compute from `llama_jax.PRESETS`, and the hardware figures their text
cites are compared with `llama_jax.perf.PEAK_FLOPS`.
"""

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax.perf import PEAK_FLOPS, forward_flops_per_token

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# (dim, layers, heads, kv heads, FFN width, vocabulary, tied) as Meta published them.
PUBLISHED = {
    "llama1-7b": (4096, 32, 32, 32, 11008, 32000, False),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, False),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, False),
    "llama2-70b": (8192, 80, 64, 8, 28672, 32000, False),
    "llama3.1-8b": (4096, 32, 32, 8, 14336, 128256, False),
    "llama3.1-70b": (8192, 80, 64, 8, 28672, 128256, False),
    "llama3.2-1b": (2048, 16, 32, 8, 8192, 128256, True),
}


def mlp_share_published(name):
    D, L, N, K, F, V, tied = PUBLISHED[name]
    H = D // N
    block = 2 * D * N * H + 2 * D * K * H + 3 * D * F + 2 * D
    total = V * D * (1 if tied else 2) + L * block + D
    return L * 3 * D * F / total


@functools.cache
def mlp_share_counted(name):
    """As notebook 02 counts it: feed_forward leaves of the abstract model."""
    state = nnx.to_pure_dict(nnx.state(lj.abstract_model(lj.PRESETS[name]), nnx.Param))
    mlp = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        size = int(np.prod(leaf.shape))
        total += size
        mlp += size if "feed_forward" in [str(getattr(k, "key", k)) for k in path] else 0
    return mlp / total


@pytest.mark.parametrize("name", ["llama1-7b", "llama2-7b", "llama2-13b"])
def test_mlp_share_of_7b_and_13b_is_below_two_thirds(name):
    # Notebook 02: "the MLP holds two thirds" is false for these; they are 64-65%.
    share = mlp_share_counted(name)
    assert share == pytest.approx(mlp_share_published(name), rel=1e-12)
    assert 0.64 <= share < 0.66


def test_mlp_share_of_llama2_7b_value():
    assert round(100 * mlp_share_counted("llama2-7b"), 1) == 64.2


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_published_shapes(name):
    c = lj.PRESETS[name]
    got = (c.dim, c.n_layers, c.n_heads, c.kv_heads, c.ffn_hidden_dim, c.vocab_size)
    assert (*got, c.tie_word_embeddings) == PUBLISHED[name]


def kv_bytes_per_token(c, bytes_per=2):  # notebook 04's formula
    return 2 * c.n_layers * c.kv_heads * c.head_dim * bytes_per


def test_kv_bytes_per_token():
    # Llama 3.1 8B: 2 (K and V) x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB.
    assert kv_bytes_per_token(lj.PRESETS["llama3.1-8b"]) == 128 * 1024
    assert kv_bytes_per_token(lj.PRESETS["llama3.1-8b"].replace(n_kv_heads=None)) == 512 * 1024
    assert kv_bytes_per_token(lj.PRESETS["llama3.1-70b"]) == 320 * 1024
    assert kv_bytes_per_token(lj.PRESETS["llama2-7b"]) == 512 * 1024
    # KVCache.create allocates exactly that (shapes only, nothing allocated).
    c = lj.PRESETS["llama3.1-8b"]
    cache = jax.eval_shape(lambda: lj.KVCache.create(c, batch=1, max_len=16, dtype="bfloat16"))
    assert sum(a.size * 2 for a in (*cache.k, *cache.v)) == 16 * kv_bytes_per_token(c)


def test_decode_cost_model_numbers():
    c = lj.PRESETS["llama3.1-8b"]
    weights = c.num_params() * 2
    assert 16.0e9 < weights < 16.1e9  # 8.03B parameters in bf16
    # The cache of one 8192-token sequence overtakes the weights at batch 15 (GQA).
    assert weights / (kv_bytes_per_token(c) * 8192) == pytest.approx(14.96, abs=0.01)
    # Weights-only critical batch on an H100: rate / bandwidth, up to the embedding.
    b_star = weights / 3.35e12 / (forward_flops_per_token(c, 0) / PEAK_FLOPS["NVIDIA H100"])
    assert 295 < b_star < 320
    # 32 sequences of 8192 tokens for Llama 3.1 70B: 85.9 GB of cache, two H100s' worth.
    assert kv_bytes_per_token(lj.PRESETS["llama3.1-70b"]) * 8192 * 32 / 1e9 == pytest.approx(
        85.9, abs=0.05
    )


def test_data_sheet_figures_in_the_text_match_perf():
    text = (NOTEBOOKS / "04_generation.py").read_text()
    assert f"TPU v5e: {PEAK_FLOPS['TPU v5e'] / 1e12:.0f} TFLOP/s, 819 GB/s" in text
    assert f"H100 SXM: {PEAK_FLOPS['NVIDIA H100'] / 1e12:.0f} TFLOP/s, 3.35 TB/s" in text
    assert '"TPU v5e": dict(flops=PEAK_FLOPS["TPU v5e"], bandwidth=819e9)' in text
    assert "trap 6" not in text


def test_training_flops_are_six_p_plus_attention():
    # Notebook 05: training costs 6 x P x tokens plus three times the attention term.
    from llama_jax.perf import model_flops_per_token

    c = lj.PRESETS["llama2-7b"]
    matmul = c.num_params() - c.vocab_size * c.dim - (2 * c.dim * c.n_layers + c.dim)
    attention = 4 * c.n_layers * 2048 * c.n_heads * c.head_dim
    assert model_flops_per_token(c, 2048) == 6 * matmul + 3 * attention
