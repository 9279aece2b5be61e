"""int8 checkpoints: `save` of a quantized model, `load` of it, and every refusal around them.

What is on disk is checked with Orbax's own reader (dtypes and values of the stored
arrays), what `load` returns against the in-memory int8 model bit for bit, and the
projections in the tests that prove nothing is quantized again hold values and scales
no absmax quantizer would produce (as a calibrated quantizer's would not).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax.checkpoint import store
from llama_jax.checkpoint.store import save
from llama_jax.cli import main
from llama_jax.inference import int8
from llama_jax.sharding import make_mesh
from tests.test_int8 import CFG, TOKENS, assert_placed_by_the_rules

VOCAB = 300  # the test tokenizer's
WORDS = "the llama ate grass while alpacas watched the quiet hills at dawn".split()


def int8_model(cfg=CFG, mesh=None):
    """A quantized model whose layer-0 wq is not what absmax quantization would give."""
    q = int8.quantize(lj.build_model(cfg, seed=3, mesh=mesh))
    wq = q.layers[0].attention.wq
    rng = np.random.default_rng(5)
    values = jnp.asarray(rng.integers(-90, 91, wq.values.shape), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 2e-2, wq.scale.shape), jnp.float32)
    if mesh is not None:
        values = jax.device_put(values, wq.values[...].sharding)
        scale = jax.device_put(scale, wq.scale[...].sharding)
    q.layers[0].attention.wq = int8.Int8Weight(values, scale)
    return q


def leaves(model):
    return jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]


def assert_same_params(a, b):
    la, lb = leaves(a), leaves(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (key, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype, key
        assert np.array_equal(np.asarray(x), np.asarray(y)), key


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llama_jax.tokenizer import train_sentencepiece

    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, size=12)) for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_sentencepiece(corpus, path, VOCAB)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """(int8 model, its checkpoint with the tokenizer, a float checkpoint of the same shape)."""
    cfg = CFG.replace(vocab_size=VOCAB)
    q = int8_model(cfg)
    root = tmp_path_factory.mktemp("ckpts")
    path = save(q, root / "int8", tokenizer=str(tokenizer))
    floats = save(lj.build_model(cfg, seed=3), root / "float", tokenizer=str(tokenizer))
    return q, path, floats


def copy_of(path, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(path, dst)
    return dst


def edit_meta(path, change):
    file = os.path.join(path, store.CONFIG_FILE)
    meta = json.loads(open(file).read())
    change(meta)
    with open(file, "w") as f:
        json.dump(meta, f)


def cli_fails(capsys, argv, *fragments):
    """Run the CLI: exit 2 and one line on stderr holding every fragment, no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --------------------------------------------------------------------------- round trip


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # Orbax reading without targets
def test_saved_int8_checkpoint_holds_the_int8_arrays(saved):
    import orbax.checkpoint as ocp

    q, path, floats = saved
    meta = json.loads(open(os.path.join(path, store.CONFIG_FILE)).read())
    assert meta["quantization"] == "int8"
    assert "quantization" not in json.loads(open(os.path.join(floats, store.CONFIG_FILE)).read())
    # Orbax's own reader, no target given: the stored dtypes and values.
    block = ocp.PyTreeCheckpointer().restore(os.path.join(path, store.layer_dir(0)))
    wq = block["attention"]["wq"]
    assert wq["values"].dtype == np.int8 and wq["scale"].dtype == np.float32
    assert np.array_equal(wq["values"], np.asarray(q.layers[0].attention.wq.values[...]))
    assert np.array_equal(wq["scale"], np.asarray(q.layers[0].attention.wq.scale[...]))
    assert block["attention_norm"]["weight"].dtype == np.float32
    out = ocp.PyTreeCheckpointer().restore(os.path.join(path, store.top_dir(("output",))))
    assert out["output"]["values"].dtype == np.int8

    # On disk a block saves three quarters of its projections' float32 bytes, less the
    # scales and Orbax's metadata for twice as many arrays (about 67-69% here: how OCDBT
    # groups the arrays into files moves the total by a few KB from run to run). Values
    # stored as float32 would save nothing; more than half is the bound.
    def size(root):
        where = os.path.join(root, store.layer_dir(0))
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(where) for f in fs)

    block_0 = [getattr(o, n) for o, n, p in int8.projections(q) if o in vars(q.layers[0]).values()]
    float_bytes = sum(4 * w.values.size for w in block_0)
    assert len(block_0) == 7 and size(floats) - size(path) > float_bytes / 2


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_load_gives_back_the_int8_model_bit_for_bit(saved, quantize, monkeypatch, tmp_path):
    q, path, _ = saved
    # Read as stored: nothing is quantized again (that would rescale layer 0's wq).
    monkeypatch.setattr(int8, "quantize_block", lambda *a, **k: pytest.fail("requantized"))
    loaded = lj.load(path, quantize=quantize)
    for owner, name, _ in int8.projections(loaded):
        assert isinstance(getattr(owner, name), int8.Int8Weight)
    assert_same_params(loaded, q)
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(q(TOKENS)))
    # And again: a loaded int8 model saves to the same checkpoint.
    assert_same_params(lj.load(save(loaded, tmp_path / "again")), q)


def test_dtype_overrides_the_float_params_only(saved):
    q, path, _ = saved
    half = lj.load(path, dtype="bfloat16")
    assert half.cfg.dtype == "bfloat16" and half.cfg.param_dtype == "bfloat16"
    wq, half_wq = q.layers[0].attention.wq, half.layers[0].attention.wq
    assert np.array_equal(np.asarray(half_wq.values[...]), np.asarray(wq.values[...]))
    assert half_wq.scale[...].dtype == jnp.float32
    assert np.array_equal(np.asarray(half_wq.scale[...]), np.asarray(wq.scale[...]))
    assert half.tok_embeddings[...].dtype == jnp.bfloat16
    assert half.layers[1].ffn_norm.weight[...].dtype == jnp.bfloat16
    want = np.asarray(q.tok_embeddings[...]).astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(half.tok_embeddings[...]), want)
    assert half(TOKENS).dtype == jnp.float32  # the logits stay float32


def test_load_onto_a_mesh_keeps_the_shardings_of_the_rules(saved, tmp_path):
    q, path, _ = saved
    mesh = make_mesh("fsdp=4,tensor=2")
    loaded = lj.load(path, mesh=mesh)
    assert_placed_by_the_rules(loaded, mesh)
    assert_same_params(loaded, q)
    # A sharded int8 model saves and loads back onto one device.
    sharded = int8_model(CFG, mesh=mesh)
    back = lj.load(save(sharded, tmp_path / "from-mesh"))
    assert_same_params(back, sharded)
    assert back.layers[0].attention.wq.values[...].sharding.num_devices == 1


def test_tied_embeddings_and_host_readers(tmp_path):
    q = int8_model(CFG.replace(tie_word_embeddings=True))
    path = save(q, tmp_path / "tied")
    assert not os.path.exists(os.path.join(path, store.top_dir(("output",))))
    loaded = lj.load(path)
    assert not hasattr(loaded, "output")
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(q(TOKENS)))
    # One read of llama_jax.json gives what the readers are sized and typed from.
    assert store.read_header(path) == (q.cfg, "int8")
    # The host readers give the stored arrays: {"values", "scale"} for a projection.
    block = store.read_layer_host(path, q.cfg, 0, "int8")
    assert block["attention"]["wq"]["values"].dtype == np.int8
    want = np.asarray(q.layers[0].attention.wq.values[...])
    assert np.array_equal(block["attention"]["wq"]["values"], want)
    emb = store.read_top_host(path, q.cfg, ("tok_embeddings",), "int8")
    assert np.array_equal(emb, np.asarray(q.tok_embeddings[...]))


# --------------------------------------------------------------------------- save refusals


def refused_save(model, tmp_path, match):
    """`save` refuses: nothing at a new destination, an existing one untouched."""
    with pytest.raises(lj.LlamaError, match=match):
        save(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(lj.LlamaError, match=match):
        save(model, tmp_path / "old", force=True)
    assert os.listdir(tmp_path / "old") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["old"]  # no temporary sibling either


def test_save_refuses_a_mix_of_int8_and_float_projections(tmp_path):
    q = int8.quantize(lj.build_model(CFG, seed=3))
    q.layers[1].feed_forward.w2 = nnx.Param(q.layers[1].feed_forward.w2.dequantize())
    refused_save(q, tmp_path, r"layers\.1\.feed_forward\.w2 is float.*Quantize the rest")


@pytest.mark.parametrize("quantized", [False, True])
def test_save_refuses_lora_adapters(tmp_path, quantized):
    from llama_jax.training.lora import apply_lora

    model = lj.build_model(CFG, seed=3)
    if quantized:
        int8.quantize(model)
    apply_lora(model, ("wq", "wv"), rank=2)
    refused_save(model, tmp_path, r"layers\.0\.attention\.wq is a LoRA.*merge")


# --------------------------------------------------------------------------- load refusals


@pytest.mark.parametrize("value", ["int4", "", None, 8])
def test_an_unknown_quantization_is_refused(saved, tmp_path, capsys, value):
    path = copy_of(saved[1], tmp_path)
    edit_meta(path, lambda m: m.update(quantization=value))
    file = os.path.join(path, store.CONFIG_FILE)
    with pytest.raises(lj.LlamaError, match=f'{file}: "quantization": {json.dumps(value)} is'):
        lj.load(path)
    with pytest.raises(lj.LlamaError, match='"quantization"'):
        store.load_config(path)
    cli_fails(capsys, ["generate", "--checkpoint", path, "--prompt", "a"], file, "quantization")


def test_quantization_removed_from_an_int8_checkpoint(saved, tmp_path, capsys):
    path = copy_of(saved[1], tmp_path)
    edit_meta(path, lambda m: m.pop("quantization"))
    with pytest.raises(lj.LlamaError, match="stored as int8 values and scales but"):
        lj.load(path)
    with pytest.raises(lj.LlamaError, match="stored as int8 values and scales but"):
        lj.load(path, quantize="int8")  # would have quantized the int8 values as floats
    cli_fails(capsys, ["generate", "--checkpoint", path, "--prompt", "a"], 'no "quantization"')


def test_quantization_added_to_a_float_checkpoint(saved, tmp_path, capsys):
    path = copy_of(saved[2], tmp_path)
    edit_meta(path, lambda m: m.update(quantization="int8"))
    with pytest.raises(lj.LlamaError, match=r"\['output'\] is stored as one float array"):
        lj.load(path)
    cli_fails(capsys, ["generate", "--checkpoint", path, "--prompt", "a"], "one float array")


def test_read_group_refuses_a_stored_dtype_of_another_kind(saved, tmp_path):
    q, int8_path, float_path = saved
    # An int8 checkpoint whose block 1 holds float values (shapes and tree as expected):
    # Orbax would cast them to int8 without a word.
    path = copy_of(int8_path, tmp_path, "int8")
    block = store.read_layer_host(path, q.cfg, 1, "int8")
    wrong = block["feed_forward"]["w1"]["values"].astype(np.float32) * 1.5
    block["feed_forward"]["w1"]["values"] = wrong
    shutil.rmtree(os.path.join(path, store.layer_dir(1)))
    store.write_group(str(path), store.layer_dir(1), block)
    match = r"\['feed_forward'\]\['w1'\]\['values'\] is float32 on disk but .* needs int8"
    with pytest.raises(lj.LlamaError, match=match):
        lj.load(path)
    # A float checkpoint whose output is int8 of the right shape.
    path = copy_of(float_path, tmp_path, "float")
    out = np.asarray(store.read_top_host(path, q.cfg, ("output",), None) * 100).astype(np.int8)
    shutil.rmtree(os.path.join(path, store.top_dir(("output",))))
    store.write_group(str(path), store.top_dir(("output",)), {"output": out})
    with pytest.raises(lj.LlamaError, match=r"\['output'\] is int8 on disk but .* float32"):
        lj.load(path)
    # Float to float stays allowed: it is what dtype= does.
    target = {"output": (out.shape, jnp.bfloat16, None)}
    with pytest.raises(lj.LlamaError, match="int8 on disk"):
        store.read_group(str(path), store.top_dir(("output",)), target)
    got = store.read_group(str(float_path), store.top_dir(("output",)), target)
    assert got["output"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- other readers


def test_generate_command_on_an_int8_checkpoint(saved, tokenizer, capsys):
    from llama_jax.inference.generate import generate_text
    from llama_jax.tokenizer import Tokenizer
    from tests.test_generate_cli import greedy_argv

    q, path, _ = saved
    want = "the llama" + generate_text(q, Tokenizer.load(tokenizer), "the llama", 6) + "\n"
    assert main(greedy_argv(path, 6)) == 0
    assert capsys.readouterr().out == want
    assert main(greedy_argv(path, 6, "--quantize", "int8")) == 0
    assert capsys.readouterr().out == want


@pytest.mark.parametrize("to", ["hf", "meta"])
def test_export_refuses_an_int8_checkpoint(saved, tmp_path, capsys, to):
    path = saved[1]
    out = tmp_path / "out"
    cli_fails(
        capsys,
        ["export", path, out, "--to", to],
        f"{path}: this checkpoint holds int8 weights",
        "export the float checkpoint it was quantized from",
    )
    assert not out.exists() and os.listdir(tmp_path) == []


def test_plain_training_refuses_to_start_from_an_int8_checkpoint(saved, tmp_path, capsys):
    # int8 values cannot be trained; LoRA on them can (tests/test_qlora.py).
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(WORDS * 20) for _ in range(4)))
    argv = ["train", "--init", saved[1], "--data", tmp_path / "text.txt"]
    argv += ["--out", tmp_path / "run", "--no-progress"]
    cli_fails(
        capsys,
        argv,
        f"--init {saved[1]}: this checkpoint holds int8 weights",
        "cannot be trained",
        "--lora-rank",
        "float checkpoint it was quantized from",
    )
    assert not (tmp_path / "run").exists()
