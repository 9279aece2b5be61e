"""Tokenizers against sentencepiece, transformers and tiktoken themselves."""

import json
import random

import pytest
import sentencepiece as spm
import tiktoken
import transformers
from tiktoken._educational import bpe_train

from llama_jax.errors import LlamaError
from llama_jax.tokenizer import (
    LLAMA3_PATTERN,
    Tokenizer,
    llama3_special_tokens,
    train_sentencepiece,
    write_rank_file,
)

WORDS = (
    "the quick brown fox jumps over a lazy dog while llamas graze near 42 alpacas; "
    "JAX compiles XLA programs, café naïve Ωmega 北京 東京 emoji 😀 don't we'll it's "
    "tokens 2024-11-26 v1.2.3 x=y+z\n\ttabs  and   runs"
).split(" ")

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "numbers 1234567 and 3.14159, dates 2024-11-26",
    "unicode: café naïve Ωmega 北京 😀 ünseen çhars ☃",
    "line one\nline two\n\n\tindented  double  spaces",
    "<s> and </s> typed by a user are text, as is <|eot_id|>",
    "trailing space ",
    "x",
]


def corpus(n_lines=1500, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n_lines)]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    train_sentencepiece(corpus(), path, vocab_size=420)
    return path


@pytest.fixture(scope="module")
def tt_path(tmp_path_factory):
    # A small byte-level BPE trained with Llama 3's split pattern: the 256 byte tokens
    # plus 44 merges, stored in the tiktoken rank-file format of Llama 3's tokenizer.model.
    ranks = bpe_train("\n".join(corpus(200, seed=1)), 300, LLAMA3_PATTERN, visualise=None)
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    write_rank_file(ranks, path)
    return path, ranks


# -- SentencePiece ------------------------------------------------------------------------------


def test_trained_model_has_llamas_settings(sp_path):
    proto = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert (proto.unk_id(), proto.bos_id(), proto.eos_id(), proto.pad_id()) == (0, 1, 2, -1)
    assert proto.id_to_piece(3) == "<0x00>" and proto.id_to_piece(258) == "<0xFF>"
    tok = Tokenizer.load(sp_path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 420
    assert tok.stop_ids == {2} and tok.pad_id == 0


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_ids_match_sentencepiece(sp_path, text):
    tok = Tokenizer.load(sp_path)
    ref = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert tok.encode(text, bos=False) == ref.encode(text)
    assert tok.encode(text) == [1, *ref.encode(text)]
    assert tok.encode(text, bos=True, eos=True) == [1, *ref.encode(text), 2]
    assert tok.decode(tok.encode(text)) == text
    # Characters outside the vocabulary fall back to bytes, never to <unk>.
    assert 0 not in tok.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_ids_match_transformers(sp_path, text):
    hf = transformers.LlamaTokenizer.from_pretrained(sp_path.parent, add_bos_token=True)
    tok = Tokenizer.load(sp_path.parent)  # a checkpoint directory works as well
    # Like Meta's tokenizer, ours reads "<s>" in user text as text; HF must be told to.
    want = hf(text, split_special_tokens=True)["input_ids"]
    assert tok.encode(text) == want
    assert tok.decode(tok.encode(text, bos=False)) == hf.decode(want[1:])


def test_bos_exactly_once(sp_path, tt_path):
    for tok in (Tokenizer.load(sp_path), Tokenizer.load(tt_path[0])):
        ids = tok.encode("hello", bos=True)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        assert tok.bos_id not in tok.encode("hello", bos=False)


def test_llama2_chat_format(sp_path):
    tok = Tokenizer.load(sp_path)
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": " Hello!"},
        {"role": "user", "content": "Name a llama."},
    ]
    # Meta's llama/generation.py format, written out.
    want = (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
        "<s>[INST] Name a llama. [/INST]"
    )
    assert tok.format_dialog(dialog) == want
    ref = spm.SentencePieceProcessor(model_file=str(sp_path))
    want_ids = [
        1,
        *ref.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! "),
        2,
    ] + [1, *ref.encode("[INST] Name a llama. [/INST]")]
    assert tok.encode_dialog(dialog) == want_ids
    single = [{"role": "user", "content": "Hi"}]
    assert tok.format_dialog(single) == "<s>[INST] Hi [/INST]"
    with pytest.raises(LlamaError, match="alternating"):
        tok.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(LlamaError, match="last message"):
        tok.encode_dialog([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


# -- tiktoken (Llama 3) -------------------------------------------------------------------------


def reference_encoding(ranks):
    specials = {s: len(ranks) + i for i, s in enumerate(llama3_special_tokens())}
    return tiktoken.Encoding(
        "ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


def test_llama3_special_tokens(tt_path):
    path, ranks = tt_path
    tok = Tokenizer.load(path)
    n = len(ranks)
    assert tok.kind == "tiktoken" and tok.vocab_size == n + 256
    specials = llama3_special_tokens()
    assert len(specials) == len(set(specials)) == 256
    # The ids Llama 3 uses, offset from 128000 to this vocabulary's size.
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (n, n + 1, n + 9)
    assert tok.encode_special("<|start_header_id|>") == n + 6
    assert tok.stop_ids == {n + 1, n + 8, n + 9}
    assert specials[8] == "<|eom_id|>" and specials[10] == "<|python_tag|>"
    assert tok.decode([n + 8]) == "<|eom_id|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_tiktoken_ids_match_tiktoken(tt_path, text):
    path, ranks = tt_path
    tok = Tokenizer.load(path)
    ref = reference_encoding(ranks)
    want = ref.encode(text, disallowed_special=())
    assert tok.encode(text, bos=False) == want
    assert tok.encode(text, eos=True) == [tok.bos_id, *want, tok.eos_id]
    assert tok.decode(tok.encode(text, bos=False)) == text
    assert tok.decode([tok.bos_id]) == "<|begin_of_text|>"


def test_tiktoken_splits_very_long_runs_like_meta(tt_path):
    tok = Tokenizer.load(tt_path[0])
    text = "a" * 30_000 + " b" + " " * 30_000 + "c"
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_llama3_chat_format(tt_path):
    path, ranks = tt_path
    tok = Tokenizer.load(path)
    dialog = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": " Hi! "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a llama."},
    ]
    # Meta's Llama 3 instruct format (llama3 ChatFormat / the model card), written out.
    want = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n Hi! <|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a llama.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.format_dialog(dialog) == want
    assert tok.encode_dialog(dialog) == reference_encoding(ranks).encode(
        want, allowed_special="all"
    )
    assert tok.decode(tok.encode_dialog(dialog)) == want
    no_prompt = tok.format_dialog(dialog[:2], add_generation_prompt=False)
    assert no_prompt.endswith(" Hi! <|eot_id|>")
    # Meta's ChatFormat: content verbatim (newlines and spaces kept), tool -> ipython.
    tool = [{"role": "tool", "content": '\n  {"temp": 21}\n'}]
    want = '<|begin_of_text|><|start_header_id|>ipython<|end_header_id|>\n\n\n  {"temp": 21}\n'
    assert tok.format_dialog(tool, add_generation_prompt=False) == want + "<|eot_id|>"
    assert tok.encode_dialog(tool, add_generation_prompt=False) == reference_encoding(ranks).encode(
        want + "<|eot_id|>", allowed_special="all"
    )


def test_stream_decoder_reassembles_split_characters(sp_path, tt_path):
    text = "naïve 🦙 ☃ done"  # the llama and snowman are in neither vocabulary: bytes
    for tok in (Tokenizer.load(sp_path), Tokenizer.load(tt_path[0])):
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in tok.encode(text, bos=False)]
        pieces.append(stream.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        # Multi-byte characters span several ids: some pushes must emit nothing.
        assert "" in pieces[:-1]


# -- bad input ----------------------------------------------------------------------------------


def test_file_of_neither_kind(tmp_path):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(LlamaError, match="neither a SentencePiece model"):
        Tokenizer.load(junk)
    junk.write_text("just some text\nthat is not a rank file\n")
    with pytest.raises(LlamaError, match="neither a SentencePiece model"):
        Tokenizer.load(junk)
    with pytest.raises(LlamaError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(LlamaError, match="without tokenizer.model, tokenizer.json"):
        Tokenizer.load(tmp_path / "..")
    broken = tmp_path / "ranks.model"
    broken.write_text("YQ== 0\nYg== 5\n")  # ranks with a gap
    with pytest.raises(LlamaError, match="does not number"):
        Tokenizer.load(broken)


def test_train_from_files_and_bad_training_input(tmp_path):
    text = "\n".join(corpus(300, seed=2))
    (tmp_path / "a.txt").write_text(text)
    for source in (tmp_path / "a.txt", [str(tmp_path / "a.txt")], iter(text.splitlines())):
        tok = train_sentencepiece(source, tmp_path / "t.model", 400)
        assert tok.vocab_size == 400 and tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    with pytest.raises(LlamaError, match="does not exist"):
        train_sentencepiece(tmp_path / "missing.txt", tmp_path / "u.model", 400)
    with pytest.raises(LlamaError, match="Vocabulary size too high"):
        train_sentencepiece(["a b c", "d e f"], tmp_path / "u.model", 100_000)
    assert not (tmp_path / "u.model").exists()


# -- Hugging Face tokenizer.json ----------------------------------------------------------------


def hf_dir(root, template=None, **config):
    """A byte-level BPE tokenizer.json trained by the tokenizers library, with its configs."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(300), trainer)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", **config}
    if template is not None:
        cfg["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root


def test_hf_tokenizer_ids_bos_and_stops_match_transformers(tmp_path):
    root = hf_dir(tmp_path / "hf", add_bos_token=True)
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = Tokenizer.load(root)
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(root / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    assert tok.kind == "hf" and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.stop_ids == {1, 2} and tok.vocab_size == 400
    for text in SAMPLES:
        want = ref(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.encode(text) == [0, *want] and tok.decode(want) == text
    # Without add_bos_token, BOS follows tokenizer.json's post-processor: none here.
    assert Tokenizer.load(hf_dir(tmp_path / "nobos")).encode("hi") == ref.encode(
        "hi", add_special_tokens=False
    )


def test_tokenizer_load_order(tmp_path, sp_path):
    root = hf_dir(tmp_path / "d")
    (root / "original").mkdir()
    (root / "original" / "tokenizer.model").write_bytes(sp_path.read_bytes())
    assert Tokenizer.load(root).kind == "hf"  # tokenizer.json before original/
    (root / "tokenizer.json").unlink()
    assert Tokenizer.load(root).kind == "sentencepiece"
    (root / "tokenizer.model").write_bytes(sp_path.read_bytes())
    assert Tokenizer.load(root).source.endswith("d/tokenizer.model")


TEMPLATE = (
    "{% for m in messages %}{{ bos_token if loop.first }}<|{{ m.role }}|>\n"
    "{{ m.content | trim }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_hf_chat_template_renders_like_transformers(tmp_path):
    root = hf_dir(tmp_path / "hf", template=TEMPLATE)
    tok = Tokenizer.load(root)
    ref = transformers.AutoTokenizer.from_pretrained(root)
    dialog = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "hi"}]
    for gen in (True, False):
        want = ref.apply_chat_template(dialog, tokenize=False, add_generation_prompt=gen)
        assert tok.format_dialog(dialog, add_generation_prompt=gen) == want
        ids = ref.apply_chat_template(dialog, add_generation_prompt=gen, return_dict=False)
        assert tok.encode_dialog(dialog, add_generation_prompt=gen) == ids
    assert tok.encode_dialog(dialog)[0] == tok.bos_id


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ raise_exception('no system role') }}", "refused this dialog: no system role"),
        ("{{ messages.__class__.__mro__ }}", "refused|unsafe"),
        ("{{ ''.__class__.__subclasses__() }}", "refused|unsafe"),
        ("{% for %}", "does not parse"),
    ],
)
def test_chat_template_runs_sandboxed(tmp_path, template, match):
    tok = Tokenizer.load(hf_dir(tmp_path / "hf", template=template))
    with pytest.raises(LlamaError, match=match):
        tok.encode_dialog([{"role": "user", "content": "hi"}])


def test_hf_tokenizer_bad_files(tmp_path):
    root = hf_dir(tmp_path / "hf")
    tok = Tokenizer.load(root)
    with pytest.raises(LlamaError, match="no chat_template"):
        tok.encode_dialog([{"role": "user", "content": "hi"}])
    (root / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
    with pytest.raises(LlamaError, match="not in tokenizer.json"):
        Tokenizer.load(root)
    (root / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(LlamaError, match="not valid JSON"):
        Tokenizer.load(root)
    (root / "tokenizer_config.json").write_text("{}")
    with pytest.raises(LlamaError, match="could never stop"):
        Tokenizer.load(root)
    (root / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(LlamaError, match="not a tokenizer.json"):
        Tokenizer.load(root)
    from llama_jax.tokenizer import read_json_file

    with pytest.raises(LlamaError, match="more than the 10"):
        read_json_file(root / "tokenizer.json", limit=10)
