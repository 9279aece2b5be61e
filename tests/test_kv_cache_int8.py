"""The int8 KV cache (`cache_dtype="int8"`): its quantizer against numpy, generation
with it (plain, streamed, speculative, on a mesh, from the command line), bad values,
and its quality on a trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_jax as lj
from llama_jax import sharding as sh
from llama_jax.errors import LlamaError
from llama_jax.inference.generate import generate, generate_stream
from llama_jax.inference.int8 import Int8KVCache, _quantize_vectors, new_cache
from llama_jax.inference.speculative import draft_from_layers, speculative_generate

CFG = lj.LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, max_seq_len=128
)
PROMPTS = [[1, 17, 33, 5, 90, 12, 7], [1, 4], [1, 100, 3, 3, 64, 2, 9, 11, 58, 20, 21, 99, 6]]


def numpy_quantized(x: np.ndarray) -> np.ndarray:
    """x [..., H] rounded to int8 steps of absmax / 127 per vector, as floats (float64)."""
    x = np.asarray(x, np.float64)
    absmax = np.abs(x).max(-1, keepdims=True)
    step = np.where(absmax > 0, absmax / 127, 1.0)
    return np.clip(np.round(x / step), -127, 127) * step


@pytest.fixture(scope="module")
def model():
    return lj.build_model(CFG, seed=5)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(1, 130)),
    scale=st.floats(1e-3, 1e3),
    zero_rows=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantized_vectors_are_within_half_a_step(shape, scale, zero_rows, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    if zero_rows:
        x[..., 0, :] = 0
    values, scales = _quantize_vectors(jnp.asarray(x))
    values, scales = np.asarray(values), np.asarray(scales)
    assert values.dtype == np.int8 and scales.shape == shape[:-1]
    assert np.abs(values.astype(np.int32)).max() <= 127
    back = values * scales[..., None].astype(np.float64)
    absmax = np.abs(x).max(-1)
    assert np.all(np.abs(back - x) <= np.where(absmax > 0, absmax / 254, 0)[..., None] * 1.0001)
    if zero_rows:
        assert not back[..., 0, :].any()  # an all-zero vector comes back as zeros
    # Each vector's largest number is exactly representable: it is +-127 steps.
    hit = np.abs(values.astype(np.int32)).max(-1)
    assert np.all((hit == 127) | (absmax == 0))


def test_cache_holds_numpy_quantized_keys_and_values(model):
    """Prefill into a float cache and an int8 cache: what the int8 cache hands attention is
    the float cache's keys and values quantized per vector by numpy. Layer 0 only: later
    layers' keys depend on the attention above them, which read quantized keys."""
    tokens = jnp.asarray([[5, 9, 200, 41, 7, 3, 77, 12]] * 2)
    forward = nnx.jit(lambda m, t, c: m(t, cache=c))
    _, float_cache = forward(model, tokens, lj.KVCache.create(CFG, 2, 16))
    _, int8_cache = forward(model, tokens, Int8KVCache.create(CFG, 2, 16))
    assert isinstance(int8_cache, Int8KVCache) and int(int8_cache.index) == 8
    for got, want in zip(int8_cache.read(0), float_cache.read(0), strict=True):
        assert got.dtype == jnp.float32 and got.shape == (2, CFG.kv_heads, 16, CFG.head_dim)
        want = np.asarray(want)[:, :, :8]
        step = np.abs(want).max(-1, keepdims=True) / 127
        diff = np.abs(np.asarray(got)[:, :, :8] - numpy_quantized(want))
        # The two programs may round a key differently in its last bit, which can move
        # one number across a rounding boundary: at most one step, and rarely.
        assert np.all(diff <= step * 1.0001 + 1e-12)
        assert np.mean(diff <= step * 1e-5) > 0.99
        assert not np.asarray(got)[:, :, 8:].any()  # slots not yet written read as zeros
    assert int8_cache.k[0].dtype == jnp.int8 and int8_cache.k_scale[0].shape == (2, 2, 16)


def test_int8_cache_memory_is_a_quarter_of_float32():
    cache = jax.eval_shape(lambda: Int8KVCache.create(CFG, 1, 64))
    float_cache = jax.eval_shape(lambda: lj.KVCache.create(CFG, 1, 64, "float32"))
    fields = ("k", "v", "k_scale", "v_scale")
    nbytes = sum(a.size * a.dtype.itemsize for f in fields for a in getattr(cache, f))
    float_bytes = sum(a.size * 4 for f in ("k", "v") for a in getattr(float_cache, f))
    H = CFG.head_dim
    assert nbytes * 4 * H == float_bytes * (H + 4)  # H int8 numbers + one float32 scale


def test_generate_with_int8_cache_is_close_to_the_float_cache(model):
    """Teacher-forced logits through each cache stay close, greedy decoding mostly agrees,
    and streaming gives the loop's tokens."""
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 40)))
    forward = nnx.jit(lambda m, t, c: m(t, cache=c)[0])
    want = np.asarray(forward(model, tokens, new_cache(model, 3, 48)))
    got = np.asarray(forward(model, tokens, new_cache(model, 3, 48, "int8")))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.9
    plain = generate(model, PROMPTS, 12)
    int8 = generate(model, PROMPTS, 12, cache_dtype="int8")
    assert [len(r) for r in int8] == [12, 12, 12] and int8.finish_reasons == ["length"] * 3
    assert np.mean(np.asarray(int8) == np.asarray(plain)) > 0.5
    stream = generate_stream(model, PROMPTS, 12, cache_dtype="int8")
    for _ in stream:
        pass
    assert stream.tokens == list(int8)


def test_speculative_decoding_with_int8_caches_gives_the_targets_tokens(model):
    # Greedy speculative output is the target's own greedy output, with both caches int8.
    want = generate(model, PROMPTS, 10, cache_dtype="int8")
    got = speculative_generate(
        model, draft_from_layers(model, 1), PROMPTS, 10, speculate_k=3, cache_dtype="int8"
    )
    assert list(got) == list(want)


def test_int8_cache_on_a_mesh_matches_one_device():
    prompts = [*PROMPTS, [1, 50, 60]]  # four rows: one per fsdp shard
    want = generate(lj.build_model(CFG, seed=5), prompts, 8, cache_dtype="int8")
    mesh = sh.make_mesh("data=1,fsdp=4,tensor=2")
    sharded = lj.build_model(CFG, seed=5, mesh=mesh)
    assert list(generate(sharded, prompts, 8, cache_dtype="int8")) == list(want)
    cache = jax.eval_shape(lambda: Int8KVCache.create(CFG, 2, 32))
    shardings = sh.cache_shardings(cache, mesh)
    assert isinstance(shardings, Int8KVCache)
    for name in ("k", "k_scale", "valid"):
        arrays, placed = getattr(cache, name), getattr(shardings, name)
        if not isinstance(arrays, tuple):
            arrays, placed = (arrays,), (placed,)
        for a, s in zip(arrays, placed, strict=True):
            assert s.spec == sh.logical_to_spec(sh.CACHE_AXES[name], a.shape, mesh)
    assert shardings.k_scale[0].spec[1] == "tensor"  # KV heads split like the keys


@pytest.mark.parametrize("bad", ["int4", "fp8", 8, "Int8"])
def test_bad_cache_dtypes_are_refused(model, bad):
    with pytest.raises(LlamaError, match="cache_dtype"):
        generate(model, PROMPTS, 2, cache_dtype=bad)
    with pytest.raises(LlamaError, match="cache_dtype"):
        speculative_generate(model, draft_from_layers(model, 1), PROMPTS, 2, cache_dtype=bad)
    with pytest.raises(LlamaError, match="int8"):
        Int8KVCache.create(CFG, 1, 8, "float32")


# --------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def smollm2():
    from tests.smollm2 import trained_checkpoint

    path = trained_checkpoint()
    return path, lj.load(path), lj.Tokenizer.load(path)


def test_generate_command_with_an_int8_cache(smollm2, capsys):
    from llama_jax.cli import main
    from llama_jax.inference.generate import generate_text

    path, model, tok = smollm2
    prompt = "The capital of France is"
    argv = ["generate", "--checkpoint", str(path), "--prompt", prompt, "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "12", "--cache-dtype", "int8"]) == 0
    want = generate_text(model, tok, prompt, 12, cache_dtype="int8")
    assert capsys.readouterr().out == prompt + want + "\n" and "Paris" in want
    with pytest.raises(SystemExit) as e:
        main([*argv, "--cache-dtype", "int4"])
    assert e.value.code == 2 and "--cache-dtype" in capsys.readouterr().err


def perplexity(logits_and_ids) -> float:
    nll = []
    for logits, ids in logits_and_ids:
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:-1]), axis=-1))
        nll.append(-logp[np.arange(len(ids) - 1), ids[1:]])
    return float(np.exp(np.concatenate(nll).mean()))


def test_int8_cache_quality_on_smollm2(smollm2):
    """The figures in docs/performance.md ("int8 KV cache"): PROSE (491 tokens) and ten
    topics of Python's documentation (1,024 tokens each), each run through a cache in one
    prefill (every attention reads the cache), against float32 without a cache."""
    from llama_jax import examples
    from tests.test_int8 import PROSE

    _, model, tok = smollm2
    texts = {
        "PROSE": [tok.encode(PROSE)],
        "docs": [tok.encode(t)[:1024] for t in examples.python_docs(examples.HELD_OUT_TOPICS)],
    }
    forward = nnx.jit(lambda m, t, c: m(t, cache=c)[0])
    for name, rows in texts.items():
        want = [np.asarray(model(jnp.asarray([ids])))[0] for ids in rows]
        got = {
            dtype: [
                np.asarray(forward(model, jnp.asarray([ids]), new_cache(model, 1, 1024, dtype)))[0]
                for ids in rows
            ]
            for dtype in ("int8", "bfloat16")
        }
        best = np.concatenate([w.argmax(-1) for w in want])
        top2 = np.sort(np.concatenate(want), axis=-1)[:, -2:]
        lead = top2[:, 1] - top2[:, 0]  # float32's lead of its best token over the next
        agree = np.concatenate([g.argmax(-1) for g in got["int8"]]) == best
        agree_bf16 = np.concatenate([g.argmax(-1) for g in got["bfloat16"]]) == best
        ppl_f32, ppl_int8, ppl_bf16 = (
            perplexity(zip(x, rows, strict=True)) for x in (want, got["int8"], got["bfloat16"])
        )
        print(
            f"{name}, {agree.size} tokens: top-1 agreement with float32 {agree.sum()} "
            f"({agree.mean():.2%}) with the int8 cache, {agree_bf16.sum()} with a bfloat16 "
            f"cache; perplexity {ppl_f32:.3f} float32, {ppl_int8:.3f} int8 cache, "
            f"{ppl_bf16:.3f} bfloat16 cache; largest lead flipped {lead[~agree].max():.3f}"
        )
        assert agree.mean() >= 0.98, (name, agree.mean())
        assert abs(ppl_int8 / ppl_f32 - 1) < 0.002, (name, ppl_int8, ppl_f32)
        assert lead[~agree].max() < 0.5, (name, lead[~agree])  # only near-ties flip
