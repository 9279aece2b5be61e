"""GGUF files written by the `gguf` package itself: layouts, tensor types, bad files."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from llama_jax.checkpoint import layout
from llama_jax.checkpoint.convert import convert
from llama_jax.checkpoint.gguf import GGUFSource, llama3_rope_divisors, meta_to_gguf_name
from llama_jax.checkpoint.sources import detect
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.errors import LlamaError

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=96)


def write_gguf(
    path, cfg=CFG, types=None, arch="llama", extra=None, drop=(), rope_freqs=None, setup=None
):
    """A tiny GGUF model: random Meta-layout tensors under llama.cpp's names.

    `setup(writer)`, if given, adds more metadata (a vocabulary) before the file is written.
    """
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_context_length(cfg.max_seq_len)
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    if setup is not None:
        setup(w)
    tensors = {}
    for name in layout.meta_names(cfg):
        if name in drop:
            continue
        t = rng.standard_normal(layout.meta_shape(name, cfg)).astype(np.float32)
        qtype = (types or {}).get(name.split(".")[-2], Q.F32)
        data = quantize(t, qtype) if qtype != Q.F32 else t
        w.add_tensor(meta_to_gguf_name(name), data, raw_dtype=qtype)
        tensors[name] = dequantize(data, qtype).reshape(t.shape)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_gguf_rows_are_metas_rows_against_transformers():
    # transformers un-permutes GGUF's q/k rows to HF's layout; from there HF -> Meta is
    # ours. Composed, that must be what gguf_to_meta_qk gives, for MHA and GQA alike.
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(1)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    for n, name in ((8, "blk.0.attn_q.weight"), (2, "blk.0.attn_k.weight")):
        w = rng.standard_normal((n * 16, 32)).astype(np.float32)
        hf = proc.process(w, name).weights
        np.testing.assert_array_equal(layout.gguf_to_meta_qk(w, n), layout.hf_to_meta_qk(hf, n))
    with pytest.raises(LlamaError, match="does not split"):
        layout.gguf_to_meta_qk(np.zeros((10, 4)), 4)


QUANT_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def test_every_tensor_type_converts_to_the_dequantized_values(tmp_path):
    # Different types in different slots, as llama.cpp's mixed quantizations do.
    slots = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    types = dict(zip(slots, QUANT_TYPES, strict=True))
    want = write_gguf(tmp_path / "m.gguf", types=types)
    src = detect(str(tmp_path / "m.gguf"))
    assert isinstance(src, GGUFSource) and not src.cfg.tie_word_embeddings
    for name, w in want.items():
        np.testing.assert_array_equal(src.tensor(name), w, err_msg=name)
    summary = convert(tmp_path / "m.gguf", tmp_path / "ckpt", progress=False)
    assert summary["dtype"] == "float32"


def test_llama31_rope_freqs_become_rope_scaling(tmp_path):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling(factor=8.0, original_max_seq_len=64)
    cfg = CFG.replace(rope_theta=500000.0, max_seq_len=256)
    # Divisors from transformers' llama3 rope: its inverse frequencies, unscaled / scaled.
    hf = HFConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    divisors = (plain / scaled.double()).numpy()
    np.testing.assert_allclose(llama3_rope_divisors(scaling, 500000.0, 16), divisors, rtol=1e-5)
    extra = {"llama.rope.scaling.original_context_length": 64}
    write_gguf(tmp_path / "m.gguf", cfg, extra=extra, rope_freqs=divisors)
    assert GGUFSource(str(tmp_path / "m.gguf")).cfg.rope_scaling == scaling
    write_gguf(tmp_path / "bad.gguf", cfg, extra=extra, rope_freqs=divisors * 1.5)
    with pytest.raises(LlamaError, match="rope_freqs"):
        GGUFSource(str(tmp_path / "bad.gguf"))


def refused(path, match, dst=None):
    with pytest.raises(LlamaError, match=match):
        convert(path, dst or path.parent / "out", progress=False)
    assert not (dst or path.parent / "out").exists()


def test_bad_gguf_files_are_refused_cleanly(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good)
    data = good.read_bytes()
    cases = {
        "magic.gguf": (b"GGUG" + data[4:], "not a GGUF file"),
        "short.gguf": (data[:10], "shorter than a GGUF header"),
        "version.gguf": (data[:4] + (9).to_bytes(4, "little") + data[8:], "version 9"),
        "counts.gguf": (data[:8] + (2**40).to_bytes(8, "little") + data[16:], "claims"),
        "truncated.gguf": (data[: len(data) // 2], "damaged|truncated"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        refused(tmp_path / name, match)
    write_gguf(tmp_path / "arch.gguf", arch="gpt2")
    refused(tmp_path / "arch.gguf", "general.architecture is 'gpt2'")
    write_gguf(tmp_path / "missing.gguf", drop=("layers.1.feed_forward.w2.weight",))
    refused(tmp_path / "missing.gguf", "blk.1.ffn_down.weight' is missing")
    write_gguf(tmp_path / "shape.gguf", extra={"llama.embedding_length": 128})
    refused(tmp_path / "shape.gguf", "has shape")
    write_gguf(tmp_path / "heads.gguf", extra={"llama.rope.dimension_count": 8})
    refused(tmp_path / "heads.gguf", "whole head")
    refused(tmp_path / "absent.gguf", "no such file")
    # An existing destination is never touched.
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("x")
    with pytest.raises(LlamaError, match="already exists"):
        convert(good, tmp_path / "dst", progress=False)
    assert (tmp_path / "dst" / "keep").read_text() == "x"


def test_convert_says_when_it_found_no_tokenizer(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf")
    convert(tmp_path / "m.gguf", tmp_path / "ckpt", progress=True)
    assert "tokenizer: none found" in capsys.readouterr().out
    assert not any(p.name.startswith("tokenizer") for p in (tmp_path / "ckpt").iterdir())


def byte_level_vocab(n: int = 320) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary trained here, as llama.cpp writes a "gpt2" one: tokens,
    merges ("a b") and token types (3 for the two control tokens, else 1)."""
    import json

    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from llama_jax.examples import CALIBRATION_TOPICS, python_docs

    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=n,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(python_docs(CALIBRATION_TOPICS[:3]), trainer)
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [
        m if isinstance(m, str) else " ".join(m)
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    return tokens, merges, [3 if t in specials else 1 for t in tokens]


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_byte_level_vocabulary_adds_bos_in_tokenizer_json_as_the_gguf_says(tmp_path, add_bos):
    """Llama 3 GGUFs ("gpt2" vocabulary, add_bos_token): the converted tokenizer.json adds
    BOS itself, so transformers reading the folder adds it as llama-jax does, once."""
    from transformers import AutoTokenizer

    from llama_jax.tokenizer import Tokenizer

    tokens, merges, types = byte_level_vocab()

    def setup(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(add_bos)

    write_gguf(tmp_path / "m.gguf", CFG.replace(vocab_size=len(tokens)), setup=setup)
    convert(tmp_path / "m.gguf", tmp_path / "ckpt", progress=False)
    ours = Tokenizer.load(tmp_path / "ckpt")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    for text in ["Return the value of x.", "  two spaces, 3.14 and ünïcode", ""]:
        ids = ours.encode(text)
        assert ids == hf(text, split_special_tokens=True)["input_ids"], text
        assert ids[:1] == [0] if add_bos else 0 not in ids, (text, ids)
        assert ids.count(0) == int(add_bos)
        assert ours.decode(ours.encode(text, bos=False)) == text
