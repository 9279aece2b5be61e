"""GPTQ int8 quantization (llama_jax.inference.gptq) and `llama-jax quantize`.

No GPTQ implementation installs beside this package's pins (llmcompressor pins an older
transformers; auto-gptq builds CUDA kernels), so the algorithm is checked against its
definition, computed a different way: each input row in turn is rounded, then the rows
not yet rounded are set to the exact minimiser of the (damped) output error given the
rows already fixed, by a direct linear solve. GPTQ's Cholesky factor and lazy block
updates must reproduce that sequence. The quality is measured on a real trained model
(SmolLM2-135M) against float32 on real text that was not used for calibration.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax import examples
from llama_jax.checkpoint.store import save
from llama_jax.cli import main
from llama_jax.errors import LlamaError
from llama_jax.inference import gptq, int8
from tests.test_int8 import PROSE, model_of


def greedy_reference(w, x, damp):
    """The rounding sequence GPTQ computes, by direct solves in float64 (no Cholesky)."""
    w = np.asarray(w, np.float64)
    H = 2 * x.T.astype(np.float64) @ x / len(x)
    diag = np.diag(H).copy()
    diag[diag == 0] = 1
    np.fill_diagonal(H, diag)
    order = np.argsort(-diag, kind="stable")
    W0, H = w[order], H[order][:, order]
    H = H + damp * diag.mean() * np.eye(len(H))
    scale = np.abs(w).max(0) / 127
    current, Q = W0.copy(), np.zeros(W0.shape)
    for i in range(len(W0)):
        Q[i] = np.clip(np.round(current[i] / scale), -127, 127)
        # Rows 0..i are fixed at Q * scale; the rest minimise (W - W0)^T H (W - W0).
        delta = Q[: i + 1] * scale - W0[: i + 1]
        rest = slice(i + 1, None)
        current[rest] = W0[rest] - np.linalg.solve(H[rest, rest], H[rest, : i + 1] @ delta)
    values = np.empty_like(Q)
    values[order] = Q
    return values.astype(np.int8), scale


def correlated_inputs(rng, rows, k):
    """Activations with correlated inputs of unequal sizes, like a layer's."""
    return (rng.normal(size=(rows, k)) @ rng.normal(size=(k, k))) * rng.uniform(0.1, 2, k)


@pytest.mark.parametrize("k, n, seed", [(40, 12, 0), (160, 8, 1), (300, 5, 2)])
def test_gptq_follows_the_greedy_optimal_sequence(k, n, seed):
    # k = 160 and 300 cross the 128-row blocks whose errors are passed on lazily.
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = correlated_inputs(rng, 4 * k, k).astype(np.float32)
    values, scale = gptq.gptq_weight(w, x, out_ndim=1, damp=0.01)
    want_values, want_scale = greedy_reference(w, x, 0.01)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    assert values.dtype == np.int8 and values.shape == w.shape
    assert (values == want_values).mean() >= 0.999, (values != want_values).sum()


def output_error(w, values, scale, x):
    return np.linalg.norm(x @ (w - values.astype(np.float64) * scale))


def test_gptq_lowers_the_output_error_that_rounding_leaves():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(96, 32)).astype(np.float32)
    mixing = rng.normal(size=(96, 96)) * rng.uniform(0.1, 2, 96)
    x, held_out = (rng.normal(size=(512, 96)) @ mixing for _ in range(2))
    rtn = [np.asarray(a) for a in int8.quantize_array(jnp.asarray(w), ("output",))]
    values, scale = gptq.gptq_weight(w, x, out_ndim=1)
    np.testing.assert_allclose(scale, rtn[1], rtol=1e-6)  # same format, same scales
    assert output_error(w, values, scale, x) < 0.7 * output_error(w, *rtn, x)
    assert output_error(w, values, scale, held_out) < 0.8 * output_error(w, *rtn, held_out)


def test_an_input_never_active_is_plainly_rounded():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(32, 8)).astype(np.float32)
    x = correlated_inputs(rng, 128, 32)
    x[:, 5] = 0
    values, scale = gptq.gptq_weight(w, x, out_ndim=1)
    np.testing.assert_array_equal(values[5], np.round(w[5] / scale).astype(np.int8))


def test_non_finite_weights_or_activations_are_refused():
    w, x = np.ones((8, 4), np.float32), np.ones((16, 8))
    for bad_w, bad_x, what in [(True, False, "weight"), (False, True, "calibration activations")]:
        ww, xx = w.copy(), x.copy()
        if bad_w:
            ww[2, 1] = np.nan
        if bad_x:
            xx[3, 0] = np.inf
        with pytest.raises(LlamaError, match=f"non-finite {what}"):
            gptq.gptq_weight(ww, xx, out_ndim=1)


def test_multi_axis_weights_keep_their_shape_and_scales():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 4, 8)).astype(np.float32)  # wq-like [D, N, H]
    x = rng.normal(size=(2, 10, 16))
    values, scale = gptq.gptq_weight(w, x, out_ndim=2)
    assert values.shape == (16, 4, 8) and scale.shape == (4, 8)
    flat_values, flat_scale = gptq.gptq_weight(w.reshape(16, 32), x.reshape(20, 16), out_ndim=1)
    np.testing.assert_array_equal(values.reshape(16, 32), flat_values)
    np.testing.assert_array_equal(scale.reshape(32), flat_scale)


# --------------------------------------------------------------------------- the model


# Random ids: 1024 tokens, several times the widest input (128), so that the activations
# span every input direction.
CALIBRATION = np.random.default_rng(6).integers(0, 256, (16, 64)).astype(np.int32)


def test_quantize_makes_every_projection_int8_and_tracks_the_float_model_better():
    model = model_of()
    float_model, rtn = nnx.clone(model), int8.quantize(nnx.clone(model))
    out = gptq.quantize(model, CALIBRATION, progress=False)
    assert out is model
    kinds = {type(getattr(owner, name)) for owner, name, _ in int8.projections(model)}
    assert kinds == {int8.Int8Weight}
    for (owner, name, _), (r_owner, r_name, _) in zip(
        int8.projections(model), int8.projections(rtn), strict=True
    ):  # the same scales as rounding, bit for bit; only the values differ
        got, want = getattr(owner, name), getattr(r_owner, r_name)
        np.testing.assert_array_equal(np.asarray(got.scale[...]), np.asarray(want.scale[...]))
        assert (np.asarray(got.values[...]) != np.asarray(want.values[...])).any()
    held_out = np.random.default_rng(7).integers(0, 256, (4, 64))
    for tokens, bound in [(CALIBRATION, 0.9), (held_out, 0.95)]:
        tokens = jnp.asarray(tokens, jnp.int32)
        want = np.asarray(float_model(tokens))
        err_gptq = np.abs(np.asarray(model(tokens)) - want).mean()
        err_rtn = np.abs(np.asarray(rtn(tokens)) - want).mean()
        assert 0 < err_gptq < bound * err_rtn, (err_gptq, err_rtn)


def test_a_failed_pass_leaves_the_model_as_it_was(monkeypatch):
    model = model_of()
    before = nnx.to_pure_dict(nnx.state(nnx.clone(model), nnx.Param))
    calls = []
    real = gptq.gptq_weight

    def fail_on_the_fifth(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise LlamaError("stop")
        return real(*args, **kw)

    monkeypatch.setattr(gptq, "gptq_weight", fail_on_the_fifth)
    with pytest.raises(LlamaError, match="stop"):
        gptq.quantize(model, CALIBRATION, progress=False)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(isinstance(getattr(o, n), nnx.Param) for o, n, _ in int8.projections(model))
    for a, b in zip(
        [np.asarray(v) for v in jax.tree.leaves(before)],
        [np.asarray(v) for v in jax.tree.leaves(after)],
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "tokens, kw, match",
    [
        (np.zeros(8, np.int32), {}, r"\[batch, length\]"),
        (np.zeros((1, 0), np.int32), {}, r"non-empty"),
        (np.zeros((1, 8), np.float32), {}, r"ints"),
        (np.full((1, 8), 256, np.int32), {}, r"\[0, 256\)"),
        (np.full((1, 8), -1, np.int32), {}, r"\[0, 256\)"),
        (np.zeros((1, 129), np.int32), {}, r"max_seq_len=128"),
        (np.zeros((1, 8), np.int32), {"damp": 0.0}, r"damp=0.0"),
    ],
)
def test_bad_calibration_is_refused(tokens, kw, match):
    with pytest.raises(LlamaError, match=match):
        gptq.quantize(model_of(), tokens, progress=False, **kw)


def test_an_int8_model_is_refused():
    with pytest.raises(LlamaError, match="Int8Weight, not a float parameter"):
        gptq.quantize(int8.quantize(model_of()), CALIBRATION, progress=False)


def test_calibration_rows_are_consecutive_pieces_each_after_bos():
    tok = lj.Tokenizer.load(trained())
    text = PROSE
    ids = tok.encode(text, bos=False)
    rows = gptq.calibration_rows(tok, text, rows=3, length=100)
    assert rows.shape == (3, 100) and rows.dtype == np.int32
    assert (rows[:, 0] == tok.bos_id).all()
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1), ids[: 3 * 99])
    short = gptq.calibration_rows(tok, PROSE[:200], length=512)
    assert short.shape[0] == 1 and short.shape[1] < 512
    with pytest.raises(LlamaError, match="at least 16"):
        gptq.calibration_rows(tok, "Bread.")


# --------------------------------------------------------------------------- the command


def test_quantize_command_without_calibration_rounds_as_load_does(tmp_path, capsys):
    src, dst = tmp_path / "f32", tmp_path / "int8"
    save(model_of(), src)
    assert main(["quantize", str(src), str(dst)]) == 0
    got = nnx.to_pure_dict(nnx.state(lj.load(dst), nnx.Param))
    want = nnx.to_pure_dict(nnx.state(lj.load(src, quantize="int8"), nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "int8" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no file", "not text", "too long", "exists", "inside source"])
def test_quantize_command_refuses_bad_requests(tmp_path, capsys, case):
    src = tmp_path / "f32"
    save(model_of(), src)
    dst, args = tmp_path / "int8", []
    if case == "no file":
        args = ["--calibration", str(tmp_path / "missing.txt")]
    elif case == "not text":
        (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 50)
        args = ["--calibration", str(tmp_path / "bin.txt")]
    elif case == "too long":
        (tmp_path / "t.txt").write_text(PROSE)
        args = ["--calibration", str(tmp_path / "t.txt"), "--length", "129"]
    elif case == "exists":
        dst.mkdir()
        (dst / "keep").write_text("mine")
    else:
        dst = src / "int8"
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["quantize", str(src), str(dst), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama-jax quantize: error:"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # nothing written or removed


# --------------------------------------------------------------------------- a real model


def trained():
    from tests.smollm2 import trained_checkpoint

    return trained_checkpoint()


def test_gptq_int8_agrees_with_float32_on_held_out_text(tmp_path, capsys):
    # docs/performance.md ("int8") quotes this test's figures. Calibration and held-out
    # text: two disjoint sets of topics of Python's own documentation.
    src = trained()
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(examples.python_docs(examples.CALIBRATION_TOPICS)))
    dst = tmp_path / "gptq"
    assert main(["quantize", str(src), str(dst), "--calibration", str(text), "--rows", "8"]) == 0
    assert "calibrating on 8 x 512 tokens" in capsys.readouterr().out
    tok = lj.Tokenizer.load(dst)  # the tokenizer files came along
    held_out = [tok.encode(t)[:1024] for t in examples.python_docs(examples.HELD_OUT_TOPICS)]
    f32, q_gptq = lj.load(src), lj.load(dst)
    q_rtn = lj.load(src, quantize="int8")

    def agreement(model, texts):
        hits = [
            np.asarray(model(jnp.asarray([ids])))[0].argmax(-1)
            == np.asarray(f32(jnp.asarray([ids])))[0].argmax(-1)
            for ids in texts
        ]
        return np.concatenate(hits)

    gptq_hits, rtn_hits = agreement(q_gptq, held_out), agreement(q_rtn, held_out)
    prose = [tok.encode(PROSE)]
    gptq_prose, rtn_prose = agreement(q_gptq, prose).mean(), agreement(q_rtn, prose).mean()
    print(
        f"top-1 agreement with float32 on {gptq_hits.size} held-out tokens: GPTQ "
        f"{gptq_hits.mean():.4f}, rounding {rtn_hits.mean():.4f}; on PROSE: GPTQ "
        f"{gptq_prose:.4f}, rounding {rtn_prose:.4f}"
    )
    assert gptq_hits.mean() >= 0.98
    assert gptq_hits.mean() > rtn_hits.mean() + 0.01
    assert gptq_prose >= rtn_prose
