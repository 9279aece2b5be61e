"""The quickstart's pieces, and a reduced end-to-end run of it."""

import json

import pytest

from llama_jax import cli
from llama_jax.cli import quickstart
from llama_jax.errors import LlamaError


def test_stdlib_corpus_is_deterministic_and_bounded():
    files = quickstart.stdlib_corpus(max_bytes=300_000)
    assert files == quickstart.stdlib_corpus(max_bytes=300_000)
    assert files == sorted(files) and len(files) >= 2
    assert sum(f.stat().st_size for f in files) <= 300_000
    assert all(f.suffix == ".py" and 2_000 <= f.stat().st_size <= 100_000 for f in files)


def test_stdlib_corpus_without_sources_says_what_is_missing(tmp_path):
    with pytest.raises(LlamaError, match="needs the interpreter's Python sources"):
        quickstart.stdlib_corpus(root=str(tmp_path))


def test_loss_plot_keeps_the_last_value_of_re_logged_steps(tmp_path):
    lines = [
        {"step": 0, "eval_loss": 6.0},
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 4.5},
        {"step": 2, "loss": 4.4},
        {"step": 2, "eval_loss": 4.6},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    quickstart.plot_losses(tmp_path / "m.jsonl", tmp_path / "loss.png", "t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reduced_quickstart_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = [
        "quickstart",
        "--out",
        str(out),
        "--steps",
        "4",
        "--corpus-mb",
        "0.3",
        "--vocab-size",
        "400",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert summary["round_trip_max_abs_logit_diff"] <= 1e-5
    assert "held-out loss:" in printed and "logits equal" in printed
    for name in (
        "tokenizer.model",
        "loss.png",
        "samples.txt",
        "run/metrics.jsonl",
        "model/llama_jax.json",
        "meta/params.json",
        "meta/consolidated.00.pth",
        "reloaded/llama_jax.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "samples.txt").read_text().count("--- sample") == len(quickstart.PROMPTS)
