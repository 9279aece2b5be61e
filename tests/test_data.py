"""Training data: reading, packing, fine-tuning masks and the deterministic batch order."""

import json

import numpy as np
import pytest

from llama_jax.errors import LlamaError
from llama_jax.training import data


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids: a tokenizer every test can build."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text, bos=True, eos=False):
        ids = [b + 3 for b in text.encode()]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


TOK = ByteTokenizer()


def test_read_documents_from_text_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third", "id": 3}) + "\n"
    )
    (tmp_path / "empty.txt").write_text("   \n")
    assert data.read_documents(tmp_path) == ["first document", "second", "third"]
    assert data.read_documents([tmp_path / "sub" / "b.jsonl"]) == ["second", "third"]


def test_bad_data_paths_and_files_raise_clear_errors(tmp_path):
    with pytest.raises(LlamaError, match="does not exist"):
        data.read_documents(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(LlamaError, match="holds no text"):
        data.read_documents(tmp_path / "blank.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LlamaError, match=r"bad.jsonl:2: not valid JSON"):
        data.read_documents(bad)
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(LlamaError, match="no string field 'text'"):
        data.read_documents(bad)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LlamaError, match="not UTF-8"):
        data.read_documents(tmp_path / "latin1.txt")


def test_pack_documents_concatenates_bos_text_eos_into_rows():
    ds = data.pack_documents(["ab", "cde", "f"], TOK, seq_len=3)
    stream = [1, *TOK.encode("ab", bos=False), 2, 1, *TOK.encode("cde", False), 2, 1, 105, 2]
    assert len(stream) == 12
    np.testing.assert_array_equal(ds.tokens, np.array(stream[:12]).reshape(3, 4))
    assert ds.seq_len == 3 and ds.weights.shape == (3, 3) and ds.weights.all()
    with pytest.raises(LlamaError, match="fewer than one training row"):
        data.pack_documents(["ab"], TOK, seq_len=64)


def test_sft_weights_cover_exactly_the_response_and_its_end_token(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text(
        json.dumps({"prompt": "2+2?", "response": "4"})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "bye"},
                    {"role": "assistant", "content": "ciao"},
                ]
            }
        )
        + "\n"
    )
    examples = data.read_sft_examples(f)
    ds = data.tokenize_sft(examples, TOK, seq_len=80)
    # Row 0: <s>[INST] 2+2? [/INST] 4 </s> padding; only "4" and </s> are targets to learn.
    prompt = [1, *TOK.encode("[INST] 2+2? [/INST]", bos=False)]
    row = [*prompt, *TOK.encode("4", bos=False), 2]
    np.testing.assert_array_equal(ds.tokens[0, : len(row)], row)
    assert (ds.tokens[0, len(row) :] == TOK.pad_id).all()
    trained = ds.tokens[0, 1:][ds.weights[0] > 0]
    np.testing.assert_array_equal(trained, [*TOK.encode("4", bos=False), 2])
    # Row 1: the system prompt folds into the first [INST]; both answers are trained.
    trained = TOK.decode(ds.tokens[1, 1:][ds.weights[1] > 0])
    assert trained == "yociao"
    text = TOK.decode(ds.tokens[1])
    assert text.startswith("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST]yo[INST] bye")
    assert (ds.tokens[1, 1:][ds.weights[1] > 0] == 2).sum() == 2  # two </s> trained


def test_sft_rejects_malformed_records_and_prompts_that_fill_the_row(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(LlamaError, match=r"sft.jsonl:1: expected 'prompt' and 'response'"):
        data.read_sft_examples(f)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}))
    with pytest.raises(LlamaError, match="no assistant turn"):
        data.read_sft_examples(f)
    f.write_text(json.dumps({"prompt": "a long prompt " * 10, "response": "r"}))
    with pytest.raises(LlamaError, match="no response token within seq_len=16"):
        data.tokenize_sft(data.read_sft_examples(f), TOK, seq_len=16)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    rng = np.random.default_rng(0)
    ds = data.TokenDataset(rng.integers(0, 100, (10, 5)), rng.random((10, 4)))
    # Every epoch visits each row exactly once, in a seed-dependent order.
    epoch0 = ds.row_indices(0, 10, seed=3)
    epoch1 = ds.row_indices(10, 10, seed=3)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert list(epoch0) != list(epoch1)
    assert list(ds.row_indices(0, 10, seed=4)) != list(epoch0)
    # Steps straddling an epoch boundary: the same rows whether asked step by step or at once.
    per_step = np.concatenate([ds.row_indices(s * 4, 4, seed=3) for s in range(5)])
    np.testing.assert_array_equal(per_step, ds.row_indices(0, 20, seed=3))
    b = ds.batch(step=2, batch_size=4, seed=3, micro_batches=2)
    assert b["tokens"].shape == (2, 2, 4) and b["weights"].shape == (2, 2, 4)
    rows = ds.row_indices(8, 4, seed=3).reshape(2, 2)
    np.testing.assert_array_equal(b["tokens"], ds.tokens[rows][..., :-1])
    np.testing.assert_array_equal(b["targets"], ds.tokens[rows][..., 1:])
    np.testing.assert_array_equal(b["weights"], ds.weights[rows])


def test_hosts_split_every_micro_batch_into_disjoint_slices():
    ds = data.TokenDataset(np.arange(64 * 3).reshape(64, 3), np.ones((64, 2)))
    whole = ds.batch(5, batch_size=16, seed=1, micro_batches=2)["tokens"]  # [2, 8, 2]
    parts = [ds.batch(5, 16, 1, 2, process_index=i, process_count=4)["tokens"] for i in range(4)]
    assert all(p.shape == (2, 2, 2) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    with pytest.raises(LlamaError, match="not divisible"):
        ds.batch(0, batch_size=6, seed=0, micro_batches=4)


def test_split_documents_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(20)]
    train, held = data.split_documents(docs, 0.2, seed=0)
    assert len(held) == 4 and set(train).isdisjoint(held) and len(train) + len(held) == 20
    assert data.split_documents(docs, 0.2, seed=0) == (train, held)
    assert data.split_documents(docs, 0.2, seed=1)[1] != held
    with pytest.raises(LlamaError, match="at least two documents"):
        data.split_documents(["only one"], 0.1)
