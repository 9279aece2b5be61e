"""The fast inference paths give the same results as the straightforward ones.

`unstack_layers` (separate per-layer arrays, a Python loop instead of the layer scan)
must not change the logits, with or without a KV cache; and both must still agree with
transformers. The benchmark script's smoke run checks that it measures and reports.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax.attention import KVCache
from llama_jax.model import build_model, set_params, unstack_layers
from tests.hf_oracle import hf_logits, hf_params, make_hf_model

ROOT = Path(__file__).resolve().parents[1]
CFG = lj.LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=96,
                     max_seq_len=64)  # fmt: skip


def test_unstacked_model_matches_stacked_and_transformers():
    hf = make_hf_model(CFG, seed=3)
    stacked = set_params(build_model(CFG), hf_params(hf, CFG))
    fast = unstack_layers(stacked)
    assert isinstance(fast.layers, nnx.List)
    assert len(fast.layers) == CFG.n_layers
    assert lj.count_params(fast) == lj.count_params(stacked)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
    want = stacked(jnp.asarray(tokens, jnp.int32))
    got = fast(jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    ref = hf_logits(hf, tokens)
    assert np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)) < 1e-5
    # The stacked model is untouched and still usable.
    assert stacked.layers.attention.wq[...].shape[0] == CFG.n_layers


def test_bfloat16_inference_layout_matches_stacked():
    # On the CPU, unstack_layers stores bfloat16 matrices output-first; the logits must
    # not change beyond float32 summation order, with or without the cache.
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16", tie_word_embeddings=False)
    stacked = build_model(cfg, seed=2)
    fast = unstack_layers(stacked)
    assert fast.transposed and fast.layers[0].attention.transposed
    D, N, H, F = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.ffn_hidden_dim
    assert fast.layers[0].attention.wq[...].shape == (N, H, D)
    assert fast.layers[0].attention.wo[...].shape == (D, N, H)
    assert fast.layers[0].feed_forward.w2[...].shape == (D, F)
    assert fast.output[...].shape == (cfg.vocab_size, D)
    np.testing.assert_array_equal(fast.output_matrix(), stacked.output_matrix())
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    want = np.asarray(stacked(tokens), np.float32)
    got = np.asarray(fast(tokens), np.float32)
    assert np.max(np.abs(got - want)) <= 0.02 * np.max(np.abs(want))
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
    # One token at a time through the per-layer cache gives the same last logits.
    cache = fast.init_cache(2, 16)
    _, cache = fast(tokens[:, :8], cache=cache)
    step, cache = fast(tokens[:, 8:], cache=cache)
    assert np.max(np.abs(np.asarray(step[:, 0], np.float32) - want[:, 8])) <= 0.02 * np.max(
        np.abs(want)
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_separate_layers_is_the_unstacked_model(tmp_path, dtype):
    # load(layers="separate") builds the inference layout straight from the per-block
    # checkpoint: the same arrays and outputs as unstack_layers(load(...)).
    from llama_jax.checkpoint.store import load, save

    cfg = CFG.replace(param_dtype=dtype, dtype=dtype, tie_word_embeddings=False)
    save(build_model(cfg, seed=4), tmp_path / "ck")
    want = unstack_layers(load(tmp_path / "ck"))
    got = load(tmp_path / "ck", layers="separate")
    assert isinstance(got.layers, nnx.List) and got.transposed == want.transposed
    flat = lambda m: jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    for (pa, a), (pb, b) in zip(flat(got), flat(want), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    tokens = jnp.asarray(np.arange(12)[None] % cfg.vocab_size, jnp.int32)
    np.testing.assert_array_equal(np.asarray(got(tokens)), np.asarray(want(tokens)))
    with pytest.raises(lj.LlamaError, match="layers='rows'"):
        load(tmp_path / "ck", layers="rows")
    # The inference layout is not a checkpoint layout: save refuses it, writing nothing.
    with pytest.raises(lj.LlamaError, match="stacked layers"):
        save(got, tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("cache_form", ["stacked", "per_layer"])
@pytest.mark.parametrize("layers", ["stacked", "unstacked"])
def test_cached_decode_matches_full_forward(layers, cache_form):
    model = build_model(CFG, seed=1)
    full = model(jnp.asarray(np.arange(10)[None] % CFG.vocab_size, jnp.int32))
    if layers == "unstacked":
        model = unstack_layers(model)
    tokens = jnp.asarray(np.arange(10)[None] % CFG.vocab_size, jnp.int32)

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tok, cache):
        return nnx.merge(graphdef, state)(tok, cache=cache)

    # Either cache form works with either model (init_cache picks the one that suits it).
    cache = KVCache.create(CFG, 1, 16, per_layer=cache_form == "per_layer")
    logits, cache = step(state, tokens[:, :6], cache)  # prefill 6 tokens
    outs = [logits]
    for t in range(6, 10):  # then one token at a time
        logits, cache = step(state, tokens[:, t : t + 1], cache)
        outs.append(logits)
    got = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=0, atol=2e-5)
    assert int(cache.index) == 10
    assert cache.per_layer == (cache_form == "per_layer")


def test_init_cache_form_follows_the_layers():
    stacked = build_model(CFG, seed=1)
    cache = stacked.init_cache(2, 8)
    assert not cache.per_layer and cache.k.shape == (3, 2, 2, 8, 16)
    cache = unstack_layers(stacked).init_cache(2, 8, dtype="bfloat16")
    assert cache.per_layer and len(cache.k) == len(cache.v) == CFG.n_layers
    forms = {(x.shape, x.dtype) for x in cache.k + cache.v}
    assert forms == {((2, 2, 8, 16), jnp.dtype(jnp.bfloat16))}
    assert cache.max_len == 8


def test_per_layer_cache_is_updated_in_place():
    # Donating the cache must let XLA write the new keys into the same buffers: a decode
    # step that copied each layer's cache would read and write it all on every token.
    model = unstack_layers(build_model(CFG, seed=1))
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c), donate_argnums=2)
    cache = model.init_cache(1, 16)
    before = [x.unsafe_buffer_pointer() for x in cache.k + cache.v]
    _, cache = step(state, jnp.ones((1, 1), jnp.int32), cache)
    assert [x.unsafe_buffer_pointer() for x in cache.k + cache.v] == before


def test_benchmark_smoke_run_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--preset", "tiny", "--quick",
           "--sections", "prefill,decode", "--repeats", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["figure"]: r for r in json.loads(out.read_text())["rows"]}
    assert not [f for f in rows if "FAILED" in f], proc.stdout[-2000:]
    for figure in ("prefill 1x32", "decode batch 1", "decode batch 8"):
        row = rows[figure]
        assert row["ours"] > 0 and row["peer"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["peer"])
    assert "ratio" in proc.stdout and "decode batch 8" in proc.stdout


def test_attention_implementation_choice():
    from llama_jax.attention import attention_implementation

    model = build_model(CFG, seed=2)
    tokens = jnp.asarray(np.arange(8)[None], jnp.int32)
    want = model(tokens)
    # cuDNN's kernel takes only bf16/fp16, so float32 stays on the einsum path anywhere.
    with attention_implementation("cudnn"):
        got = model(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    with pytest.raises(lj.LlamaError, match="flash"):
        with attention_implementation("flash"):
            pass
