"""Checkpoint round trips, judged by transformers' LlamaForCausalLM and by torch.load.

HF -> llama-jax, Meta (1, 2, 4 shards; Llama 1/2 and 3 splits; 405B's repeated KV heads)
-> llama-jax, llama-jax -> HF -> transformers, llama-jax -> Meta -> llama-jax, bf16 bit
for bit, and restoring onto a mesh of 8 devices and back.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax as lj
from llama_jax.checkpoint import convert, export, load, load_config, save
from llama_jax.checkpoint.layout import hf_to_meta_qk, meta_to_hf_qk
from llama_jax.cli import main
from tests.checkpoint_helpers import hf_state, write_hf_dir, write_meta_dir
from tests.hf_oracle import hf_logits, make_hf_model

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=128, ffn_dim=96, max_seq_len=128)
GQA = lj.LlamaConfig(
    **{**TINY, "n_kv_heads": 2, "rope_theta": 500000.0, "rope_scaling": lj.RopeScaling(factor=8.0)}
)
MHA = lj.LlamaConfig(**TINY, norm_eps=1e-6)
TIED = lj.LlamaConfig(
    **{
        **TINY,
        "n_kv_heads": 2,
        "tie_word_embeddings": True,
        "rope_scaling": lj.RopeScaling(factor=32.0),
    }
)
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 24))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS, jnp.int32)))


def params_of(model) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat[0]}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        x, y = np.ascontiguousarray(a[k]), np.ascontiguousarray(b[k])
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


@pytest.fixture(scope="module")
def gqa_hf():
    return make_hf_model(GQA, seed=0)


@pytest.fixture(scope="module")
def gqa_ckpt(gqa_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa")
    src = write_hf_dir(gqa_hf, root / "hf")
    convert(src, root / "ckpt", progress=False)
    return root / "ckpt"


def test_rotary_permutation_formula_and_inverse():
    # HF row p * H/2 + j of every head holds Meta's row 2j + p (layout.py's formula).
    n, H, D = 3, 8, 5
    w = np.arange(n * H * D, dtype=np.float32).reshape(n * H, D)
    hf = meta_to_hf_qk(w, n)
    for h in range(n):
        for j in range(H // 2):
            for p in range(2):
                assert np.array_equal(hf[h * H + p * H // 2 + j], w[h * H + 2 * j + p])
    assert np.array_equal(hf_to_meta_qk(hf, n), w)


@pytest.mark.parametrize("variant", ["safetensors", "sharded_index", "pytorch_bin", "old_config"])
def test_hf_to_llama_jax_logits_match_transformers(variant, gqa_hf, tmp_path):
    src = tmp_path / "hf"
    if variant == "sharded_index":
        write_hf_dir(gqa_hf, src, max_shard_size="40KB")
        assert (src / "model.safetensors.index.json").exists()
    elif variant == "pytorch_bin":
        os.makedirs(src)
        gqa_hf.config.save_pretrained(src)
        torch.save(gqa_hf.state_dict(), src / "pytorch_model.bin")
    else:
        write_hf_dir(gqa_hf, src)
    if variant == "old_config":  # top-level rope_theta + rope_scaling, no rope_parameters
        c = json.loads((src / "config.json").read_text())
        c.pop("rope_parameters", None)
        c["rope_theta"] = GQA.rope_theta
        s = GQA.rope_scaling
        c["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
        (src / "config.json").write_text(json.dumps(c))
    (src / "tokenizer.model").write_bytes(b"tokenizer bytes")
    assert main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == b"tokenizer bytes"
    cfg = load_config(tmp_path / "ckpt")
    assert (cfg.n_kv_heads, cfg.rope_scaling, cfg.param_dtype) == (2, GQA.rope_scaling, "float32")
    assert rel_err(logits(load(tmp_path / "ckpt")), hf_logits(gqa_hf, TOKENS)) < 1e-5


@pytest.mark.parametrize(
    "cfg,shards,style",
    [(MHA, 2, "llama2"), (GQA, 4, "llama3"), (GQA, 4, "405b_repeated_kv")],
    ids=["llama2_2shards", "llama3_4shards", "405b_repeated_kv"],
)
def test_meta_shards_to_llama_jax_logits_match_transformers(cfg, shards, style, tmp_path):
    hf = make_hf_model(cfg, seed=3)
    if style == "405b_repeated_kv":  # 4 shards, 2 KV heads: each head stored twice
        cfg = cfg.replace(n_heads=8, n_kv_heads=2, dim=128)
        hf = make_hf_model(cfg, seed=3)
    llama2 = style == "llama2"
    write_meta_dir(
        hf,
        cfg,
        tmp_path / "meta",
        shards,
        embed_axis=1 if llama2 else 0,
        rope_freqs=llama2,
        mha_without_n_kv_heads=llama2,
    )
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == shards
    convert(tmp_path / "meta", tmp_path / "ckpt", progress=False)
    assert rel_err(logits(load(tmp_path / "ckpt")), hf_logits(hf, TOKENS)) < 1e-5


@pytest.mark.parametrize("with_output", [True, False])
def test_tied_llama32_meta_with_or_without_output_weight(with_output, tmp_path):
    hf = make_hf_model(TIED, seed=4)
    write_meta_dir(hf, TIED, tmp_path / "meta", 2, tied_output=with_output)
    convert(tmp_path / "meta", tmp_path / "ckpt", progress=False)
    model = load(tmp_path / "ckpt")
    assert model.cfg.tie_word_embeddings and not hasattr(model, "output")
    assert rel_err(logits(model), hf_logits(hf, TOKENS)) < 1e-5
    if with_output:  # and back out: transformers ties lm_head to the embedding again
        export(tmp_path / "ckpt", tmp_path / "hf", to="hf", progress=False)
        back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
        back.config._attn_implementation = "eager"
        assert back.config.tie_word_embeddings
        assert rel_err(hf_logits(back, TOKENS), hf_logits(hf, TOKENS)) < 1e-6


def test_export_hf_loads_in_transformers_with_same_logits(gqa_hf, gqa_ckpt, tmp_path):
    want = hf_logits(gqa_hf, TOKENS)
    assert main(["export", str(gqa_ckpt), str(tmp_path / "hf"), "--to", "hf"]) == 0
    export(gqa_ckpt, tmp_path / "hf_sharded", to="hf", progress=False, max_shard_bytes=30_000)
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    for out in ("hf", "hf_sharded"):
        back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / out).float().eval()
        back.config._attn_implementation = "eager"
        assert rel_err(hf_logits(back, TOKENS), want) < 1e-6
        assert_bitwise_equal(hf_state(back), hf_state(gqa_hf))


def test_llama_jax_to_meta_to_llama_jax_is_identical(gqa_ckpt, tmp_path):
    assert main(["export", str(gqa_ckpt), str(tmp_path / "meta"), "--to", "meta"]) == 0
    # Meta's code reads the file with torch.load; it must need nothing beyond tensors.
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert sd["layers.1.attention.wk.weight"].shape == (2 * 16, 64)
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "again")]) == 0
    assert_bitwise_equal(params_of(load(tmp_path / "again")), params_of(load(gqa_ckpt)))


def test_bfloat16_stays_bitwise_through_every_path(tmp_path):
    hf = make_hf_model(GQA, seed=5).to(torch.bfloat16)
    src = write_hf_dir(hf, tmp_path / "hf", dtype=torch.bfloat16)
    want = hf_state(hf, torch.bfloat16)
    convert(src, tmp_path / "ckpt", progress=False)
    model = load(tmp_path / "ckpt")
    assert model.cfg.param_dtype == "bfloat16"
    ours = params_of(model)
    ref = {}
    for k, v in jax.tree_util.tree_flatten_with_path(hf_params_bf16(want, GQA))[0]:
        ref[jax.tree_util.keystr(k)] = v
    assert_bitwise_equal(ours, ref)
    export(tmp_path / "ckpt", tmp_path / "hf_out", to="hf", progress=False)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_out", dtype=torch.bfloat16)
    assert_bitwise_equal(hf_state(back, torch.bfloat16), want)
    export(tmp_path / "ckpt", tmp_path / "meta", to="meta", progress=False)
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert sd["tok_embeddings.weight"].dtype == torch.bfloat16
    convert(tmp_path / "meta", tmp_path / "again", progress=False)
    assert_bitwise_equal(params_of(load(tmp_path / "again")), ours)


def hf_params_bf16(state: dict, cfg) -> dict:
    from llama_jax.checkpoint.layout import params_from_hf

    return params_from_hf(state, cfg.replace(param_dtype="bfloat16"))


def test_dtype_override_on_convert_and_load(gqa_ckpt, gqa_hf, tmp_path):
    model = load(gqa_ckpt, dtype="bfloat16")
    assert model.tok_embeddings[...].dtype == jnp.bfloat16
    src = write_hf_dir(gqa_hf, tmp_path / "hf")
    convert(src, tmp_path / "ckpt", dtype="bfloat16", progress=False)
    assert load_config(tmp_path / "ckpt").param_dtype == "bfloat16"
    expected = params_of(load(gqa_ckpt))
    got = params_of(load(tmp_path / "ckpt"))
    for k in expected:
        assert np.array_equal(got[k], expected[k].astype(ml_dtypes.bfloat16)), k


def test_restore_onto_8_devices_and_back(gqa_hf, gqa_ckpt, tmp_path):
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = load(gqa_ckpt, mesh=mesh)
    wq = sharded.layers[0].attention.wq[...]
    assert wq.sharding.mesh.shape == mesh.shape and tuple(wq.sharding.spec)[:2] == (
        "fsdp",
        "tensor",
    )
    # Each device holds a quarter of wq (fsdp x tensor), never the whole array.
    assert {s.data.shape for s in wq.addressable_shards} == {(32, 2, 16)}
    assert rel_err(logits(sharded), hf_logits(gqa_hf, TOKENS)) < 1e-5
    save(sharded, tmp_path / "from_mesh")  # written from 8 devices ...
    single = load(tmp_path / "from_mesh")  # ... restored onto one
    assert len(single.layers[0].attention.wq[...].devices()) == 1
    assert_bitwise_equal(params_of(single), params_of(load(gqa_ckpt)))


def test_existing_destination_needs_force(gqa_ckpt, gqa_hf, tmp_path):
    src = write_hf_dir(gqa_hf, tmp_path / "hf")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(src), str(dst)]) == 2
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", str(src), str(dst), "--force"]) == 0
    assert not (dst / "keep.txt").exists() and load_config(dst).n_kv_heads == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # no temporary siblings left


def test_save_copies_tokenizer_and_records_config(tmp_path):
    cfg = lj.PRESETS["tiny"]
    model = lj.build_model(cfg, seed=1)
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"\x00sentencepiece")
    save(model, tmp_path / "ckpt", tokenizer=str(tok))
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == tok.read_bytes()
    assert load_config(tmp_path / "ckpt") == cfg
    assert_bitwise_equal(params_of(lj.load(tmp_path / "ckpt")), params_of(model))
    with pytest.raises(lj.LlamaError, match="already exists"):
        save(model, tmp_path / "ckpt")


def test_pth_reader_handles_views_and_writer_is_read_by_torch(tmp_path):
    from llama_jax.checkpoint.torch_zip import read_pth, write_pth
    from tests.checkpoint_helpers import to_numpy

    base = torch.randn(6, 8)
    sd = {
        "t": base.t(),
        "slice": base[2:5],
        "bf16": torch.randn(3, 4).bfloat16(),
        "f16": torch.randn(5).half(),
    }
    torch.save(sd, tmp_path / "a.pth")  # views share one storage
    lazy = read_pth(tmp_path / "a.pth")
    for k, v in sd.items():
        got = lazy[k].read()
        assert got.dtype == to_numpy(v).dtype and np.array_equal(got, to_numpy(v)), k
    write_pth(tmp_path / "b.pth", ((k, t.read()) for k, t in lazy.items()))
    back = torch.load(tmp_path / "b.pth", weights_only=True)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
