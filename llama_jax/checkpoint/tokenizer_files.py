"""The tokenizer files `convert` carries from a source into a llama-jax checkpoint.

A checkpoint directory holds whichever tokenizer its source had, under the names
`Tokenizer.load` looks for:

- `tokenizer.model` (Meta's layout, or `original/tokenizer.model` of HF's Llama 3
  repositories), copied by `store.write_config` from `Source.tokenizer`;
- Hugging Face's `tokenizer.json` with `tokenizer_config.json` (special tokens, chat
  template), `generation_config.json` (stop ids), `special_tokens_map.json` and
  `chat_template.jinja`, copied by `copy_tokenizer_files`;
- for a GGUF file, the same Hugging Face files generated from its vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path

from llama_jax.errors import LlamaError

# Hugging Face's tokenizer and the files beside it that say how to use it.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(reader, dst: str | os.PathLike) -> str:
    """Copy (or, for GGUF, write) the source's Hugging Face tokenizer files into `dst`.

    The files are checked by loading the tokenizer from `dst`: a tokenizer.json that
    cannot be read, or that has more ids than the model, fails the conversion here
    instead of at the first `generate`.

    Args:
      reader: the `Source` being converted (its `src` directory, `tokenizer` path and,
        for GGUF, `tokenizer_files()`).
      dst: the checkpoint directory being written.
    Returns:
      one line saying which tokenizer files the checkpoint got, or that it got none.
    Raises:
      LlamaError: a tokenizer file is unreadable or does not fit the model.
    """
    from llama_jax.tokenizer import _MAX_TOKENIZER_BYTES, _read_bounded

    dst = Path(dst)
    found = []
    if reader.tokenizer is not None:
        found.append(os.path.relpath(reader.tokenizer, reader.src))
    if hasattr(reader, "tokenizer_files"):
        generated = reader.tokenizer_files()
        for name, data in generated.items():
            (dst / name).write_bytes(data)
        written = ", ".join(generated)
        summary = f"tokenizer: wrote {written} from the GGUF vocabulary" if generated else ""
    else:
        src = Path(reader.src)
        copied = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()] if src.is_dir() else []
        if "tokenizer.json" in copied or reader.tokenizer is not None:
            for name in copied:
                (dst / name).write_bytes(_read_bounded(src / name, _MAX_TOKENIZER_BYTES))
        else:
            copied = []  # configs without tokenizer.json are no tokenizer
        found += copied
        summary = f"tokenizer: copied {', '.join(found)} from {src}" if found else ""
    if (dst / "tokenizer.json").is_file():
        _check_loads(dst / "tokenizer.json", reader.cfg.vocab_size)
    if not summary:
        summary = (
            f"tokenizer: none found in {reader.src} (looked for tokenizer.model, "
            "original/tokenizer.model, tokenizer.json"
            + (", a byte-level BPE vocabulary" if hasattr(reader, "tokenizer_files") else "")
            + "); pass --tokenizer FILE to generate and chat."
        )
    return summary


def _check_loads(path: Path, vocab_size: int) -> None:
    from llama_jax.tokenizer import HFTokenizer

    tok = HFTokenizer(path)
    if tok.vocab_size > vocab_size:
        raise LlamaError(
            f"{path.name} has {tok.vocab_size} ids but the model only {vocab_size} "
            "embeddings: they do not belong together."
        )
