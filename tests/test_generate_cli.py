"""`llama-jax generate` and `llama-jax chat` on a tiny saved checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax import runtime
from llama_jax.checkpoint import save
from llama_jax.cli import main
from llama_jax.cli.chat import chat_loop, fit_history
from llama_jax.inference.generate import generate_text
from llama_jax.tokenizer import train_sentencepiece

CFG = lj.LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, max_seq_len=128
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    words = "the llama ate grass while alpacas watched the quiet hills at dawn".split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, size=12)) for _ in range(300)]
    tok = train_sentencepiece(corpus, root / "tokenizer.model", 300)
    model = lj.Transformer(CFG, rngs=nnx.Rngs(2))
    save(model, root / "ckpt", tokenizer=str(root / "tokenizer.model"))
    return root / "ckpt", model, tok


def greedy_argv(path, new_tokens: int, *flags: str) -> list[str]:
    """`llama-jax generate` on "the llama", greedy, with extra flags."""
    return [
        "generate",
        "--checkpoint",
        str(path),
        "--prompt",
        "the llama",
        "--temperature",
        "0",
        "--max-new-tokens",
        str(new_tokens),
        *flags,
    ]


def test_generate_command_streams_the_greedy_text(checkpoint, capsys):
    path, model, tok = checkpoint
    assert main(greedy_argv(path, 12)) == 0
    out = capsys.readouterr().out
    pieces = []
    want = generate_text(model, tok, "the llama", 12, on_text=lambda row, t: pieces.append(t))
    assert out == "the llama" + want + "\n" and len(pieces) > 1
    # The TPU kernels (interpreted here) compute the same function.
    assert main(greedy_argv(path, 12, "--attention", "splash")) == 0
    assert capsys.readouterr().out == out


def test_the_command_keeps_compiled_programs_for_the_next_run(checkpoint, tmp_path):
    path, _, _ = checkpoint
    cache = tmp_path / "xla"
    env = dict(os.environ, LLAMA_JAX_COMPILE_CACHE=str(cache))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny model compiles fast
    cmd = [sys.executable, "-m", "llama_jax.cli", *greedy_argv(path, 6)]

    def run():
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "compilation cache" not in done.stderr  # no entry failed to load or save
        return done.stdout

    first = run()
    (folder,) = cache.iterdir()  # one folder per kind of processor
    loop = list(folder.glob("jit__decode_step-*-cache"))  # streamed: a step per call
    assert len(loop) == 1, sorted(p.name for p in folder.iterdir())
    # JAX stamps an entry's "-atime" file when it loads the entry.
    stamp = loop[0].with_name(loop[0].name.replace("-cache", "-atime"))
    before = stamp.read_bytes()
    assert run() == first
    assert stamp.read_bytes() != before


def compile_cache_in_a_subprocess(env: dict) -> subprocess.CompletedProcess:
    """`use_compilation_cache()` in a fresh process with `env` added; prints its result
    and JAX's cache size limit."""
    code = (
        "import jax; from llama_jax.runtime import use_compilation_cache; "
        "print(use_compilation_cache()); print(jax.config.jax_compilation_cache_max_size)"
    )
    base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(
    "env, expect, says",
    [
        ({"LLAMA_JAX_COMPILE_CACHE": "off"}, "None", None),
        ({"LLAMA_JAX_COMPILE_CACHE": "0"}, "None", None),
        ({"LLAMA_JAX_COMPILE_CACHE": "relative/xla"}, "None", "must be an absolute path"),
        ({"LLAMA_JAX_COMPILE_CACHE": "{tmp}/file/xla"}, "None", "cannot make"),
        ({"LLAMA_JAX_COMPILE_CACHE": "{tmp}/shared"}, "None", "others may write to {tmp}/shared/"),
        ({"LLAMA_JAX_COMPILE_CACHE": "{tmp}/pub/xla"}, "None", "others may write to {tmp}/pub "),
        ({"LLAMA_JAX_COMPILE_CACHE": "{tmp}/x"}, "{tmp}/x/{tag}", None),
        (
            {"JAX_COMPILATION_CACHE_DIR": "{tmp}/mine", "LLAMA_JAX_COMPILE_CACHE": "{tmp}/x"},
            "{tmp}/mine",
            None,
        ),
    ],
)
def test_the_compile_cache_is_private_can_be_turned_off_and_leaves_a_jax_setting_alone(
    tmp_path, monkeypatch, env, expect, says
):
    monkeypatch.chdir(tmp_path)  # a relative folder would land here
    tag = runtime._processor_tag()
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "shared" / tag).mkdir(parents=True)
    (tmp_path / "shared" / tag).chmod(0o777)  # others could plant programs in it
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub").chmod(0o777)  # ... or swap the folder under it for theirs
    done = compile_cache_in_a_subprocess({k: v.format(tmp=tmp_path) for k, v in env.items()})
    used, limit = done.stdout.split()
    assert used == expect.format(tmp=tmp_path, tag=tag)
    if says:
        assert says.format(tmp=tmp_path) in done.stderr
        assert "compiling without it" in done.stderr
    else:
        assert "compile cache" not in done.stderr
    if used.endswith(tag):
        assert int(limit) == runtime.COMPILE_CACHE_BYTES  # JAX drops old programs
        assert os.stat(used).st_mode & 0o777 == 0o700
    else:
        assert not (tmp_path / "x").exists()  # nothing made where it is not used
    assert not (tmp_path / "relative").exists() and not (tmp_path / "0").exists()


def test_the_compile_cache_removes_entries_left_half_written(tmp_path):
    folder = tmp_path / "xla" / runtime._processor_tag()
    folder.mkdir(parents=True, mode=0o700)
    for name in ["whole-cache", "whole-atime", "killed-cache", "lost-atime", "notes.txt"]:
        (folder / name).write_bytes(b"...")
    done = compile_cache_in_a_subprocess({"LLAMA_JAX_COMPILE_CACHE": str(tmp_path / "xla")})
    assert done.stdout.split()[0] == str(folder)
    left = sorted(p.name for p in folder.iterdir() if p.name != ".lockfile")
    assert left == ["notes.txt", "whole-atime", "whole-cache"]


def test_generate_command_batch_and_chat(checkpoint, capsys):
    path, model, tok = checkpoint
    argv = [
        "generate",
        "--checkpoint",
        str(path),
        "--prompt",
        "the llama",
        "--prompt",
        "dawn",
        "--chat",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    system = {"role": "system", "content": "Be brief."}
    want = generate_text(
        model,
        tok,
        [[system, {"role": "user", "content": p}] for p in ("the llama", "dawn")],
        6,
        0.6,
        None,
        0.9,
        3,
        chat=True,
    )
    assert out == f"--- prompt 0: the llama\n{want[0]}\n--- prompt 1: dawn\n{want[1]}\n"


def test_chat_loop_keeps_history(checkpoint):
    _, model, tok = checkpoint
    inputs = iter(["hello there", "", "the quiet hills", "/reset", "at dawn", "/exit"])
    written = []
    dialog = chat_loop(
        model,
        tok,
        lambda prompt: next(inputs),
        written.append,
        system="Be brief.",
        max_new_tokens=5,
        temperature=0.0,
    )
    roles = [m["role"] for m in dialog]
    assert roles == ["system", "user", "assistant"] and dialog[1]["content"] == "at dawn"
    assert "[history cleared]\n" in written
    # The answer streamed to the terminal is the one kept in the history.
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert generate_text(model, tok, first, 5, chat=True) in "".join(written)


@pytest.mark.parametrize("flags", [[], ["--cache-dtype", "int8"]])
def test_chat_command_reads_stdin_until_eof(checkpoint, capsys, monkeypatch, flags):
    path, _, _ = checkpoint
    lines = iter(["hi"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    seen = []  # the cache dtype of every answer: the flag reaches generate_text

    def recording(*args, **kwargs):
        seen.append(kwargs["cache_dtype"])
        return generate_text(*args, **kwargs)

    monkeypatch.setattr("llama_jax.cli.chat.generate_text", recording)
    assert main(["chat", "--checkpoint", str(path), "--max-new-tokens", "4", *flags]) == 0
    assert capsys.readouterr().out.startswith("llama> ")
    assert seen == [flags[1] if flags else None]


def test_history_that_does_not_fit_drops_the_oldest_exchanges(checkpoint):
    _, _, tok = checkpoint
    dialog = [{"role": "system", "content": "s"}]
    for i in range(6):
        dialog += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": "answer " * 5},
        ]
    dialog.append({"role": "user", "content": "last"})
    kept, dropped = fit_history(tok, dialog, 60)
    assert len(tok.encode_dialog(kept)) <= 60 < len(tok.encode_dialog(dialog))
    assert kept[0] == dialog[0] and kept[-1] == dialog[-1] and dropped == len(dialog) - len(kept)
    with pytest.raises(lj.LlamaError, match="too long"):
        fit_history(tok, dialog, 5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "1.5"], "top_p must lie in (0, 1]"),
        (["--prompt", ""], "Prompt 1 is empty"),
        (["--prompt", "the llama " * 70], "more than the model's context of 128"),
        (["--system", "x"], "--system needs --chat"),
    ],
)
def test_generate_command_bad_input(checkpoint, capsys, extra, message):
    path, _, _ = checkpoint
    argv = ["generate", "--checkpoint", str(path), "--prompt", "hi", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "llama-jax generate: error:" in err and message in err


def test_missing_checkpoint_or_tokenizer(checkpoint, capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["chat", "--checkpoint", str(tmp_path)]) == 2
    assert "holds no tokenizer (tokenizer.model, tokenizer.json" in capsys.readouterr().err
    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    path = str(checkpoint[0])
    argv = [
        "generate",
        "--checkpoint",
        path,
        "--prompt",
        "x",
        "--tokenizer",
        str(tmp_path / "bad.model"),
    ]
    assert main(argv) == 2
    assert "neither a SentencePiece model" in capsys.readouterr().err
