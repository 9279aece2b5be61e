"""int8 weight-only quantization (llama_jax.inference.int8).

The scales and int8 values are checked against PyTorch's own per-channel symmetric
quantizer; the quantized model against the float model it came from (the same function
up to rounding of the weights) and against a float model holding the dequantized
weights (the same function exactly); `load(quantize="int8")` against `quantize(load())`;
and the quality on a real trained model (SmolLM2-135M) against float32 on real text.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import llama_jax as lj
from llama_jax.checkpoint.store import save
from llama_jax.inference import int8, int8_cpu
from llama_jax.sharding import make_mesh, param_shardings
from llama_jax.sharding.rules import QUANTIZED_OUTPUT_AXES
from tests.hlo import dot_generals, takes_float32

CFG = lj.LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    ffn_dim=128,
    max_seq_len=128,
    tie_word_embeddings=False,
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)), jnp.int32)


def model_of(cfg=CFG, **kw):
    return lj.build_model(cfg, seed=3, **kw)


def dequantized(model):
    """A float copy of a quantized model whose projections hold values * scale."""
    q = nnx.clone(model)
    for owner, name, _ in int8.projections(q):
        setattr(owner, name, nnx.Param(getattr(owner, name).dequantize()))
    return q


# --------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("path", sorted(QUANTIZED_OUTPUT_AXES))
def test_values_and_scales_match_torch_per_channel_quantizer(path):
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    model = model_of()
    w = (
        model.output[...]
        if path == ("output",)
        else getattr(getattr(model.layers[0], path[1]), path[2])[...]
    )
    values, scale = int8.quantize_array(w, path)
    n_out = len(QUANTIZED_OUTPUT_AXES[path])
    assert values.dtype == jnp.int8 and values.shape == w.shape
    assert scale.dtype == jnp.float32 and scale.shape == w.shape[w.ndim - n_out :]
    # torch: output channels flattened into one axis of a [inputs, outputs] matrix.
    w2 = torch.from_numpy(np.array(w).reshape(-1, int(np.prod(scale.shape))))
    observer = PerChannelMinMaxObserver(
        ch_axis=1,
        dtype=torch.qint8,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
    )
    observer(w2)
    t_scale, t_zero = observer.calculate_qparams()
    np.testing.assert_allclose(np.asarray(scale).reshape(-1), t_scale.numpy(), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's quantized dtypes are deprecated
        t_values = torch.quantize_per_channel(w2, t_scale, t_zero, 1, torch.qint8).int_repr()
    ours = np.asarray(values).reshape(w2.shape).astype(np.int32)
    diff = np.abs(ours - t_values.numpy().astype(np.int32))
    # torch multiplies by 1/scale, we divide: a value on a rounding tie may land one apart.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_round_trip_error_is_at_most_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 4, 16)).astype(np.float32) * rng.uniform(0.01, 3, (4, 16))
    w[:, 2, 5] = 0.0  # an all-zero output channel
    values, scale = int8.quantize_array(jnp.asarray(w), ("layers", "attention", "wq"))
    back = np.asarray(int8.Int8Weight(values, scale).dequantize())
    step = np.asarray(scale)
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5))
    assert np.abs(np.asarray(values)).max() == 127  # every channel's largest weight maps to +-127
    assert np.all(back[:, 2, 5] == 0) and np.isfinite(step).all()
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < 0.01, rel  # ~ 1/(127 * sqrt(12)) per channel for Gaussian weights


@pytest.mark.parametrize(
    "spec, w_shape, x_shape",
    [
        ("BTD,DNH->BTNH", (8, 3, 4), (2, 5, 8)),
        ("BTNH,NHD->BTD", (3, 4, 8), (2, 5, 3, 4)),
        ("BTD,DF->BTF", (8, 6), (2, 5, 8)),
        ("BTD,DNH->BNTH", (8, 3, 4), (2, 5, 8)),  # output channels apart in the result
        # At most int8_cpu.MAX_ROWS rows: on the CPU the kernel computes these.
        ("BTD,DNH->BTNH", (8, 3, 4), (1, 1, 8)),
        ("BTNH,NHD->BTD", (3, 4, 8), (1, 3, 3, 4)),
        ("BTD,DF->BTF", (8, 6), (2, 2, 8)),
        ("BTD,DNH->BNTH", (8, 3, 4), (1, 1, 8)),
    ],
)
def test_int8_product_is_the_product_with_the_dequantized_weight(spec, w_shape, x_shape):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    path = {3: ("layers", "attention", "wq"), 2: ("layers", "feed_forward", "w1")}[len(w_shape)]
    if spec.startswith("BTNH"):
        path = ("layers", "attention", "wo")
    weight = int8.Int8Weight(*int8.quantize_array(w, path))
    got = weight(spec, x, jnp.float32)
    want = jnp.einsum(spec, x, weight.dequantize())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert weight(spec, x, jnp.bfloat16, jnp.float32).dtype == jnp.float32
    assert weight(spec, x, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_a_bfloat16_int8_products_gradient_is_a_bfloat16_product(out_dtype):
    """The product is accumulated in float32, but its gradient product to x (what LoRA on
    an int8 base trains through) runs in bfloat16, and agrees with float32 arithmetic."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(64, 96)) / 8, jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)  # 10 rows: XLA's product
    weight = int8.Int8Weight(*int8.quantize_array(w, ("layers", "feed_forward", "w1")))

    def loss(x, dtype):
        y = weight("BTD,DF->BTF", x, dtype, out_dtype)
        return jnp.mean(jnp.sin(y.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    text = grad.lower(x, "bfloat16").as_text()
    dots = dot_generals(text)
    assert len(dots) == 2  # the product and its gradient to x
    assert not any(takes_float32(d) for d in dots), dots
    ours, exact = grad(x, "bfloat16"), grad(x, "float32")
    np.testing.assert_allclose(ours, exact, rtol=0.05, atol=0.02 * float(jnp.abs(exact).max()))


# --------------------------------------------------------------------------- models


def test_quantized_model_is_close_to_the_float_model():
    model = model_of()
    want = np.asarray(model(TOKENS))
    q = int8.quantize(nnx.clone(model))
    for owner, name, _ in int8.projections(q):
        assert isinstance(getattr(owner, name), int8.Int8Weight)
    assert isinstance(q.tok_embeddings, nnx.Param) and q.tok_embeddings[...].dtype == jnp.float32
    got = np.asarray(q(TOKENS))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 0.03, rel
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
    # Exactly the float model with the dequantized weights (the same function).
    np.testing.assert_allclose(got, np.asarray(dequantized(q)(TOKENS)), rtol=1e-5, atol=1e-5)
    # Memory: the projections hold a quarter of their float32 bytes (plus the scales).
    nbytes = lambda m: sum(x.nbytes for x in jax.tree.leaves(nnx.state(m)))
    assert nbytes(q) < 0.45 * nbytes(model)


def test_tied_embeddings_stay_float_and_quantize_is_idempotent():
    model = model_of(CFG.replace(tie_word_embeddings=True))
    q = int8.quantize(model)
    assert not hasattr(q, "output") and q.tok_embeddings[...].dtype == jnp.float32
    before = nnx.to_pure_dict(nnx.state(q))
    int8.quantize(q)
    after = nnx.to_pure_dict(nnx.state(q))
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, before, after))
    assert np.isfinite(np.asarray(q(TOKENS))).all()


def test_load_quantized_equals_quantize_of_load(tmp_path):
    path = save(model_of(), tmp_path / "ckpt")
    a = lj.load(path, quantize="int8")
    b = int8.quantize(lj.load(path))
    sa, sb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(a(TOKENS)), np.asarray(b(TOKENS)))
    c = lj.load(path, dtype="bfloat16", quantize="int8")
    assert c.layers[0].attention.wq.values[...].dtype == jnp.int8
    assert c.layers[0].attention_norm.weight[...].dtype == jnp.bfloat16
    assert c(TOKENS).dtype == jnp.float32


@pytest.mark.parametrize("bad", ["int4", "INT8", "", 8])
def test_bad_quantize_values_are_refused(tmp_path, bad):
    path = save(model_of(), tmp_path / "ckpt")
    with pytest.raises(lj.LlamaError, match="quantize="):
        lj.load(path, quantize=bad)
    model = model_of()
    with pytest.raises(lj.LlamaError, match="int8"):
        int8.quantize(model, bad)
    assert isinstance(model.layers[0].attention.wq, nnx.Param)  # nothing half-done


def test_cli_refuses_an_unknown_quantization(tmp_path, capsys):
    from llama_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a", "--quantize", "int4"])
    assert e.value.code == 2 and "--quantize" in capsys.readouterr().err


def assert_placed_by_the_rules(q, mesh) -> None:
    """Every parameter of int8 model `q` lies as the rules table places it on `mesh`
    ("fsdp=4,tensor=2": wq's values split over fsdp and tensor, the scales over tensor)."""
    state = nnx.state(q, nnx.Param)
    expected = param_shardings(state, mesh)
    for arr, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        assert arr.sharding.is_equivalent_to(sharding, arr.ndim), (arr.shape, arr.sharding)
    wq = q.layers[0].attention.wq
    assert wq.values[...].sharding.spec == P("fsdp", "tensor", None)
    assert wq.scale[...].sharding.spec == P("tensor", None)
    assert q.output.scale[...].sharding.spec == P("tensor")


def test_quantize_on_a_mesh_keeps_the_shardings_of_the_rules(tmp_path):
    mesh = make_mesh("fsdp=4,tensor=2")
    single = int8.quantize(model_of())
    want = np.asarray(single(TOKENS))
    q = int8.quantize(model_of(mesh=mesh))
    assert_placed_by_the_rules(q, mesh)
    state = nnx.state(q)
    from llama_jax import sharding as sh

    got = np.asarray(sh.jit_forward(q, mesh)(TOKENS, jnp.ones(TOKENS.shape, bool)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # load(quantize=) onto the mesh: each block quantized onto the same shardings.
    loaded = lj.load(save(model_of(), tmp_path / "ckpt"), mesh=mesh, quantize="int8")
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(state), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_runs_on_the_int8_model():
    q = int8.quantize(model_of())
    prompts = [[1, 5, 9, 3], [7, 2]]
    got = lj.generate(q, prompts, 8)
    want = lj.generate(dequantized(q), prompts, 8)
    assert [len(r) for r in got] == [8, 8] and list(got) == list(want)


def test_generate_command_with_quantize(tmp_path, capsys):
    from llama_jax.cli import main
    from llama_jax.inference.generate import generate_text
    from llama_jax.tokenizer import train_sentencepiece
    from tests.test_generate_cli import greedy_argv

    words = "the llama ate grass while alpacas watched the quiet hills at dawn".split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, size=12)) for _ in range(300)]
    tok = train_sentencepiece(corpus, tmp_path / "tokenizer.model", 300)
    path = save(
        model_of(CFG.replace(vocab_size=300)),
        tmp_path / "ckpt",
        tokenizer=str(tmp_path / "tokenizer.model"),
    )
    assert main(greedy_argv(path, 6, "--quantize", "int8")) == 0
    want = generate_text(lj.load(path, quantize="int8"), tok, "the llama", 6)
    assert capsys.readouterr().out == "the llama" + want + "\n"


# --------------------------------------------------------------------------- a real model

# Three paragraphs of plain English prose (a story, an explanation, a scene), written for
# this test: 491 SmolLM2 tokens.
PROSE = (
    "The lighthouse stood at the end of a narrow spit of land, where the river met the "
    "sea. For more than a century its keepers had climbed the spiral stairs each evening "
    "to light the lamp, and each morning they had come down again to trim the wicks, "
    "polish the brass and write a few lines in the log. Most entries were short: the "
    "direction of the wind, the height of the tide, a ship that passed too close to the "
    "rocks. In the winter storms the waves broke over the lower windows, and the keepers "
    "listened to the whole tower hum like a struck bell. When the lamp was finally "
    "replaced by an automatic beacon, the last keeper packed his books into a wooden "
    "crate, locked the door behind him and walked along the shore to the village. He "
    "never went back inside, but on clear nights he would sit on the harbour wall and "
    "watch the light turn, counting the seconds between the flashes out of habit, as if "
    "someone might still need him to notice when it stopped.\n\n"
    "Bread is one of the oldest prepared foods. The simplest loaf needs only flour, "
    "water, salt and time: wild yeasts and bacteria in the flour feed on its sugars, "
    "release carbon dioxide and fill the dough with small bubbles. Kneading stretches the "
    "gluten proteins into long elastic strands that trap the gas, so the dough rises "
    "instead of leaking. In the oven the water turns to steam, the bubbles expand once "
    "more, and the outside dries into a brown crust as sugars and proteins react in the "
    "heat. A baker judges the loaf by its sound as much as by its colour: tapped on the "
    "bottom, a finished loaf sounds hollow. Many families keep a sourdough starter alive "
    "for years, feeding it every few days and sharing a spoonful with friends who want to "
    "bake their own.\n\n"
    "On Monday morning the train to the city was late again. The passengers on the "
    "platform checked their phones, stamped their feet against the cold and complained to "
    "each other about the timetable. A woman with a large suitcase asked whether this was "
    "the right platform for the airport, and three people answered at once, each giving a "
    "different answer. When the train finally arrived, it was so crowded that the doors "
    "could barely close. Nobody spoke for the first few stations. Then a child near the "
    "window began to name every station as it passed, loudly and with great care, and by "
    "the time the train reached the centre half the carriage was smiling."
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from llama_jax.checkpoint.convert import convert
    from tests.smollm2 import gguf_file

    dst = tmp_path_factory.mktemp("smollm2") / "ckpt"
    convert(gguf_file(), dst, progress=False)
    return dst


def next_token_stats(model, ids):
    """(logits [T, V], perplexity of ids[1:] given their prefixes)."""
    logits = np.asarray(model(jnp.asarray([ids])))[0]
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:-1]), axis=-1))
    return logits, float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_int8_quality_on_smollm2(smollm2):
    # The figures in docs/performance.md ("int8") come from this test. A 135M model
    # has many near-ties between its two best tokens, where int8's weight rounding (about
    # 1% of each matrix's norm, four times bfloat16's) flips the choice: agreement is
    # 95.5% (bfloat16 weights: 97.8%) while the perplexity moves by 0.04%.
    ids = lj.Tokenizer.load(smollm2).encode(PROSE)
    assert len(ids) == 491
    want, ppl_f32 = next_token_stats(lj.load(smollm2), ids)
    got, ppl_int8 = next_token_stats(lj.load(smollm2, quantize="int8"), ids)
    agree = got.argmax(-1) == want.argmax(-1)
    top2 = np.sort(want, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # float32's lead of its best token over the next
    assert 32.0 < ppl_f32 < 33.5, ppl_f32
    assert abs(ppl_int8 / ppl_f32 - 1) < 0.005, (ppl_int8, ppl_f32)
    assert agree.mean() >= 0.95, agree.mean()
    # Every disagreement is a near-tie: where float32 leads by 0.3 logits or more
    # (three positions in four), int8 picks the same token.
    assert agree[margin >= 0.3].all(), margin[~agree]
    assert (margin >= 0.3).mean() > 0.7
    # For scale: bfloat16 weights (and compute) flip fewer near-ties.
    half, ppl_bf16 = next_token_stats(lj.load(smollm2, dtype="bfloat16"), ids)
    agree_bf16 = half.argmax(-1) == want.argmax(-1)
    assert agree.mean() < agree_bf16.mean() and abs(ppl_bf16 / ppl_f32 - 1) < 0.005
    print(
        f"int8 vs float32 on {len(ids)} tokens: top-1 agreement {agree.sum()}/{len(ids)}, "
        f"perplexity {ppl_f32:.3f} (float32) {ppl_int8:.3f} (int8) {ppl_bf16:.3f} (bfloat16), "
        f"bfloat16 agreement {agree_bf16.sum()}/{len(ids)}"
    )


# --------------------------------------------------------------------------- the CPU kernel


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    k=st.integers(1, 300),
    n=st.integers(1, 600),
    seed=st.integers(0, 2**16),
)
def test_cpu_kernel_equals_xla_product(rows, k, n, seed):
    """The C++ kernel against XLA's (x @ values) * scale, across its row and column tiles."""
    assert int8_cpu.available()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    values = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-1, n), jnp.float32)
    got = jax.jit(int8_cpu.int8_matmul)(x, values, scale)
    want = jnp.dot(x, values.astype(jnp.float32), precision="highest") * scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("rows, k, n", [(1, 768, 2048), (3, 700, 1001), (40, 512, 640)])
def test_cpu_kernel_shares_large_products_over_threads(rows, k, n):
    """Weights of 256 KiB or more are split into column tiles over XLA's thread pool
    (several products at once too, as in a decode step): every tile is computed, once."""
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    weights = [jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8) for _ in range(3)]
    scale = jnp.asarray(rng.uniform(1e-3, 1e-1, n), jnp.float32)
    three = jax.jit(lambda x, ws: [int8_cpu.int8_matmul(x, w, scale) for w in ws])
    for _ in range(3):  # repeated calls reuse the pool's threads
        for got, values in zip(three(x, weights), weights, strict=True):
            want = np.asarray(x, np.float64) @ np.asarray(values, np.float64) * np.asarray(scale)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cpu_kernel_gradients_equal_xla_gradients():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 40)), jnp.float32)
    values = jnp.asarray(rng.integers(-127, 128, (40, 70)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-1, 70), jnp.float32)

    def loss(product):
        return lambda x, s: jnp.sum(jnp.sin(product(x, values, s)))

    reference = lambda x, v, s: jnp.dot(x, v.astype(jnp.float32), precision="highest") * s
    got = jax.grad(loss(int8_cpu.int8_matmul), (0, 1))(x, scale)
    want = jax.grad(loss(reference), (0, 1))(x, scale)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("batch, kernel", [(1, True), (int8_cpu.MAX_ROWS + 1, False)])
def test_a_cpu_decode_step_reads_the_int8_weights(batch, kernel):
    """Few rows: the kernel reads int8 values; no float copy of a weight is made."""
    from tests.test_model import LAYOUT_CFG, decode_step_hlo

    hlo = decode_step_hlo(LAYOUT_CFG, batch, "int8")
    assert (int8_cpu.TARGET in hlo) == kernel
    D, F = LAYOUT_CFG.dim, LAYOUT_CFG.ffn_hidden_dim
    float_w1 = f"f32[{D},{F}]{{1,0}} convert("  # w1's int8 values converted to float32
    assert (float_w1 in hlo) != kernel


def test_without_a_compiler_int8_products_use_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))
    int8_cpu.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU int8 kernel is not available"):
            assert not int8_cpu.available()
        weight = int8.Int8Weight(
            *int8.quantize_array(jnp.ones((8, 6)), ("layers", "feed_forward", "w1"))
        )
        x = jnp.ones((1, 1, 8))
        np.testing.assert_allclose(
            weight("BTD,DF->BTF", x, jnp.float32), jnp.einsum("BTD,DF->BTF", x, weight.dequantize())
        )
        assert not list(tmp_path.glob("kernels/*"))  # nothing half-written left behind
    finally:
        int8_cpu.available.cache_clear()
