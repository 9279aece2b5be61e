"""`llama-jax convert SRC DST`: Meta or Hugging Face weights -> a llama-jax checkpoint.

    llama-jax convert ~/llama-3.1-8b ~/ckpt/llama3.1-8b             # layout detected
    llama-jax convert ~/hf/Llama-2-7b-hf ~/ckpt/l2-7b --dtype bfloat16 --from hf

Tensors are read, converted and written one block at a time, so host memory stays near
the size of one block (a few times the largest tensor) whatever the model's size.
"""

from __future__ import annotations

import os
import time

import numpy as np

from llama_jax.checkpoint import layout, store
from llama_jax.checkpoint.mapped import release_freed_memory
from llama_jax.checkpoint.sources import detect
from llama_jax.checkpoint.tokenizer_files import copy_tokenizer_files
from llama_jax.config import DTYPES
from llama_jax.errors import LlamaError


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    source: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    rope_scaling_factor: float | None = None,
    max_seq_len: int | None = None,
    tie_word_embeddings: bool | None = None,
) -> dict:
    """Convert a Meta or Hugging Face checkpoint directory into a llama-jax checkpoint.

    Args:
      src: the source directory.
      dst: the checkpoint directory to create; it appears only once complete.
      source: "meta" or "hf" to force the layout; None detects it.
      dtype: "float32", "bfloat16" or "float16" to cast to; None keeps the source dtype
        (bf16 stays bf16, bit for bit).
      force: replace an existing `dst`.
      progress: show a progress bar per tensor, print the constants that were assumed
        (before the bar) and a closing summary.
      rope_scaling_factor, max_seq_len, tie_word_embeddings: the constants a Meta
        params.json cannot hold (see checkpoint.configs); None keeps what the file says
        or what is assumed. A tied output layer is only dropped when it is bit-identical
        to the embedding.
    Returns:
      A summary dict: parameters, dtype, bytes, seconds, dst, notes (the assumptions).
    Raises:
      LlamaError: bad input (nothing is written), DST is SRC, inside it or contains it,
        or a write failed (the path and the cause; nothing is left behind).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    src = os.path.expanduser(os.fspath(src))
    dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    if dtype is not None and dtype not in DTYPES:
        raise LlamaError(f"--dtype {dtype!r}: expected one of {DTYPES}.")
    store.check_destination(dst, force, protect=(src,))
    reader = detect(
        src,
        source,
        rope_scaling_factor=rope_scaling_factor,
        max_seq_len=max_seq_len,
        tie_word_embeddings=tie_word_embeddings,
    )
    _settle_output(reader, forced=tie_word_embeddings)
    cfg = reader.cfg
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    target = _np_dtype(cfg.param_dtype)
    names = layout.meta_names(cfg)
    totals = {"parameters": 0, "bytes": 0}
    if progress:
        for note in reader.notes:
            print(f"note: {note}", flush=True)

    def get(name: str):
        """(parameter path, layer, array in our layout and the target dtype)."""
        path, layer, shape = layout.param_slot(name, cfg)
        w = np.empty(shape, target)
        # Read straight into the final layout and dtype: no intermediate copies.
        reader.read_into(name, layout.meta_view(name, w, cfg))
        totals["parameters"] += w.size
        totals["bytes"] += w.nbytes
        bar.update(1)
        bar.set_postfix_str(name, refresh=False)
        return path, layer, w

    with (
        store.atomic_directory(dst, force, protect=(src,)) as tmp,
        tqdm(total=len(names), unit="tensor", desc="convert", disable=not progress) as bar,
    ):
        _, _, emb = get("tok_embeddings.weight")
        store.write_group(tmp, store.top_dir(("tok_embeddings",)), {"tok_embeddings": emb})
        del emb
        release_freed_memory()
        for i in range(cfg.n_layers):
            block = {}
            for name in names:
                if name.startswith(f"layers.{i}."):
                    path, _, w = get(name)
                    block[path[1:]] = w
            store.write_group(tmp, store.layer_dir(i), store.layer_tree(block))
            del block
            release_freed_memory()
        _, _, norm = get("norm.weight")
        store.write_group(tmp, store.top_dir(("norm",)), {"norm": {"weight": norm}})
        if not cfg.tie_word_embeddings:
            _, _, out = get("output.weight")
            store.write_group(tmp, store.top_dir(("output",)), {"output": out})
            del out
        store.write_config(tmp, cfg, reader.tokenizer, source={"kind": reader.kind, "path": src})
        found_tokenizer = copy_tokenizer_files(reader, tmp)
    seconds = time.perf_counter() - t0
    summary = {
        "parameters": totals["parameters"],
        "dtype": cfg.param_dtype,
        "bytes": totals["bytes"],
        "seconds": seconds,
        "dst": dst,
        "notes": list(reader.notes),
    }
    if progress:
        print(
            f"converted {reader.kind} -> {dst}: {summary['parameters']:,} parameters, "
            f"{cfg.param_dtype}, {human_bytes(summary['bytes'])} in {seconds:.1f} s "
            f"({human_bytes(summary['bytes'] / max(seconds, 1e-9))}/s)"
        )
        print(found_tokenizer)
    return summary


def _settle_output(reader, forced: bool | None) -> None:
    """Untie a tied config whose weights carry a distinct output layer; never drop it.

    A file may hold output.weight although its config ties it (some Llama 3.2 files);
    it is dropped only when bit-identical to the embedding. Otherwise the model is
    converted untied, with a note, or refused when --tie-word-embeddings asked for ties.
    """
    cfg = reader.cfg
    if not cfg.tie_word_embeddings and not reader.has_output:
        raise LlamaError(
            f"{reader.src}: the model has an untied output layer but the weights hold no "
            "output.weight; drop --no-tie-word-embeddings or add the tensor."
        )
    if not cfg.tie_word_embeddings or not reader.has_output or reader.output_is_embedding():
        return
    if forced:
        raise LlamaError(
            f"{reader.src}: --tie-word-embeddings would drop output.weight, which differs from "
            "tok_embeddings.weight; convert without it to keep both."
        )
    reader.cfg = cfg.replace(tie_word_embeddings=False)
    reader.notes.append(
        "output.weight differs from tok_embeddings.weight, so the output layer is kept "
        "(untied) although the config ties it."
    )
