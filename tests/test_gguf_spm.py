"""GGUF files with a SentencePiece vocabulary ("llama", Llama 1/2): the rebuilt tokenizer.

The vocabulary is a SentencePiece BPE model trained here, written into the GGUF as
llama.cpp's converter writes it (`_set_vocab_sentencepiece`); the model itself and
transformers' GGUF tokenizer are the references.
"""

import json

import pytest
import sentencepiece as spm

from llama_jax.checkpoint.convert import convert
from llama_jax.checkpoint.gguf import GGUFSource
from llama_jax.errors import LlamaError
from llama_jax.tokenizer import Tokenizer, train_sentencepiece
from tests.test_gguf import CFG, write_gguf

VOCAB = 400
CFG_SPM = CFG.replace(vocab_size=VOCAB)

TEXTS = [
    "Hello world",
    "def dumps(obj, *, skipkeys=False):",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside",
    "line one\nline two\n\n  indented\n",
    "\n",
    "\ttab\tseparated",
    "digits 1234567890 and 3.14159",
    "café naïve résumé",
    "日本語のテキスト",  # outside the vocabulary: byte fallback
    "Ελληνικά и русский",
    "emoji 😀🎉 and 👍🏽",
    "literal <s> and </s> and <unk> are plain text",
    "<0x41> spelled out",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from tests.test_train import stdlib_docs

    path = tmp_path_factory.mktemp("spm") / "tok.model"
    train_sentencepiece(iter(stdlib_docs()[:4]), path, vocab_size=VOCAB)
    return path


def sp_vocab(model_path):
    """Tokens, scores and types exactly as llama.cpp's `_set_vocab_sentencepiece` writes them."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(2)
        elif sp.IsControl(i):
            types.append(3)
        elif sp.IsUnused(i):
            types.append(5)
        elif sp.IsByte(i):
            types.append(6)
        else:
            types.append(1)
    return sp, tokens, scores, types


TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def vocab_setup(model_path, tamper=None, add_bos=True, template=TEMPLATE):
    sp, tokens, scores, types = sp_vocab(model_path)
    meta = {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos": sp.bos_id(),
        "eos": sp.eos_id(),
        "unk": sp.unk_id(),
    }
    if tamper:
        tamper(meta)

    def setup(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(meta["tokens"])
        w.add_token_scores(meta["scores"])
        w.add_token_types(meta["types"])
        w.add_bos_token_id(meta["bos"])
        w.add_eos_token_id(meta["eos"])
        w.add_unk_token_id(meta["unk"])
        w.add_add_bos_token(add_bos)
        w.add_add_eos_token(False)
        w.add_chat_template(template)

    return setup


@pytest.fixture(scope="module")
def converted(sp_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    write_gguf(d / "m.gguf", CFG_SPM, setup=vocab_setup(sp_model))
    convert(d / "m.gguf", d / "ckpt", progress=False)
    return d


def test_encode_and_decode_match_the_sentencepiece_model(sp_model, converted):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer.load(converted / "ckpt")
    assert tok.kind == "hf" and tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (sp.bos_id(), sp.eos_id(), {sp.eos_id()})
    # The corpus must exercise byte fallback and the many-space pieces, or parity is hollow.
    pieces = {sp.IdToPiece(i) for s in TEXTS for i in sp.encode(s)}
    assert "<0xE6>" in pieces and any(set(p) == {"▁"} and len(p) > 1 for p in pieces)
    for s in TEXTS:
        ids = tok.encode(s)
        assert ids == [sp.bos_id(), *sp.encode(s)], s
        assert tok.encode(s, bos=False, eos=True) == [*sp.encode(s), sp.eos_id()], s
        assert tok.decode(ids[1:]) == sp.decode(ids[1:]) == s, s
    # Text that is not a whole encoding: a continuation, a lone byte of a character.
    ids = sp.encode("one two three")
    assert tok.decode(ids[1:]) == sp.decode(ids[1:])
    assert tok.decode(sp.encode("日")[1:2]) == sp.decode(sp.encode("日")[1:2])


def test_tokenizer_files_match_transformers_gguf_tokenizer(converted):
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(converted), gguf_file="m.gguf")
    except Exception as e:  # a transformers without GGUF tokenizer support for this file
        pytest.skip(f"transformers cannot load the GGUF tokenizer: {e}")
    tok = Tokenizer.load(converted / "ckpt")
    # transformers' Metaspace leaves out the dummy prefix of a text that starts with a
    # space, SentencePiece does not (" a" is "▁▁a"); there the model itself is the
    # reference (the test above).
    texts = [s for s in TEXTS if not s[:1].isspace()]
    assert len(texts) > 10
    for s in texts:
        want = hf(s, split_special_tokens=True)["input_ids"]
        assert tok.encode(s) == want, s
        assert tok.decode(want[1:]) == hf.decode(want[1:]), s
    # transformers reading our files (not the GGUF) agrees as well, BOS from the post-processor.
    ours = AutoTokenizer.from_pretrained(str(converted / "ckpt"))
    for s in TEXTS:
        assert ours(s, split_special_tokens=True)["input_ids"] == tok.encode(s), s
        assert ours.decode(tok.encode(s, bos=False)) == s, s


def test_config_files_say_what_the_gguf_says(sp_model, converted, tmp_path):
    config = json.loads((converted / "ckpt" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    assert config["unk_token"] == "<unk>" and config["add_bos_token"] is True
    assert config["add_eos_token"] is False and config["model_max_length"] == CFG.max_seq_len
    assert config["chat_template"].startswith("{{ bos_token }}")
    generation = json.loads((converted / "ckpt" / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [2]}
    # A file that says add_bos_token false gets no BOS, as llama.cpp would feed it.
    write_gguf(tmp_path / "m.gguf", CFG_SPM, setup=vocab_setup(sp_model, add_bos=False))
    files = GGUFSource(str(tmp_path / "m.gguf")).tokenizer_files()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.encode("Hello world") == sp.encode("Hello world")


def _tampered(path):
    def scores_short(m):
        m["scores"] = m["scores"][:-1]

    def eos_out_of_range(m):
        m["eos"] = VOCAB + 5

    def duplicate(m):
        m["tokens"][10] = m["tokens"][11]

    def score_nan(m):
        m["scores"][7] = float("nan")

    def bad_type(m):
        m["types"][7] = 9

    def types_short(m):
        m["types"] = m["types"][:-3]

    return {
        "scores": (scores_short, "400 tokens but 399 scores"),
        "eos": (eos_out_of_range, "eos_token_id = 405 is not a token id"),
        "dup": (duplicate, "twice"),
        "nan": (score_nan, "not a finite number"),
        "type": (bad_type, "token_type holds 9"),
        "types": (types_short, "397 token types"),
    }


def test_a_tampered_vocabulary_is_refused_and_nothing_is_written(sp_model, tmp_path):
    for name, (tamper, match) in _tampered(sp_model).items():
        path = tmp_path / f"{name}.gguf"
        write_gguf(path, CFG_SPM, setup=vocab_setup(sp_model, tamper))
        with pytest.raises(LlamaError, match=match) as e:
            convert(path, tmp_path / f"out_{name}", progress=False)
        assert str(path) in str(e.value), name
        assert not (tmp_path / f"out_{name}").exists(), name
    # A vocabulary larger than the embedding table.
    write_gguf(tmp_path / "big.gguf", CFG.replace(vocab_size=256), setup=vocab_setup(sp_model))
    with pytest.raises(LlamaError, match="256 embeddings"):
        convert(tmp_path / "big.gguf", tmp_path / "out_big", progress=False)
    assert not (tmp_path / "out_big").exists()


def test_added_tokens_follow_llama_cpp(sp_model, tmp_path):
    # llama.cpp's converter appends a model's added tokens after the SentencePiece pieces:
    # user-defined ones (4) are matched whole in any text, control ones (3) only where a
    # template writes them. llama.cpp encodes the text between them as separate texts, each
    # with the space prefix: the SentencePiece model's encoding of each piece.
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))

    def add(m):
        m["tokens"] += ["<tag>", "<|end|>"]
        m["scores"] += [0.0, 0.0]
        m["types"] += [4, 3]

    template = TEMPLATE + "<|end|>ok"
    setup = vocab_setup(sp_model, add, template=template)
    write_gguf(tmp_path / "m.gguf", CFG.replace(vocab_size=VOCAB + 2), setup=setup)
    convert(tmp_path / "m.gguf", tmp_path / "ckpt", progress=False)
    tok = Tokenizer.load(tmp_path / "ckpt")
    for s in ("a <tag> b", "<tag>x", "x<tag>", "one<tag><tag> two\n"):
        want = [1]
        for i, part in enumerate(s.split("<tag>")):
            want += ([VOCAB] if i else []) + sp.encode(part)
        assert tok.encode(s) == want, s
    assert tok.encode("a <|end|>", bos=False) == sp.encode("a <|end|>")
    # Written by the template, control tokens are ids; a user's text spelling one is not.
    ids = tok.encode_dialog([{"role": "user", "content": "hi <|end|>"}])
    assert ids == [1, *sp.encode("hi <|end|>"), VOCAB + 1, *sp.encode("ok")]


def test_a_model_without_the_space_prefix(tmp_path):
    # SentencePiece's add_dummy_prefix=False, which llama.cpp stores as add_space_prefix.
    import io

    from tests.test_train import stdlib_docs

    buf = io.BytesIO()
    lines = [line for doc in stdlib_docs()[:4] for line in doc.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    (tmp_path / "tok.model").write_bytes(buf.getvalue())
    base = vocab_setup(tmp_path / "tok.model")

    def setup(w):
        base(w)
        w.add_add_space_prefix(False)

    write_gguf(tmp_path / "m.gguf", CFG_SPM, setup=setup)
    convert(tmp_path / "m.gguf", tmp_path / "ckpt", progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    tok = Tokenizer.load(tmp_path / "ckpt")
    assert sp.IdToPiece(sp.encode("a")[0]) == "a"  # no "▁" before the text
    for s in TEXTS:
        assert tok.encode(s, bos=False) == sp.encode(s), s
        assert tok.decode(sp.encode(s)) == s, s
