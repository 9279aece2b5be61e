"""`llama-jax convert SRC DST`: Meta, Hugging Face or GGUF weights -> a llama-jax checkpoint."""

from __future__ import annotations

import argparse

from llama_jax.checkpoint.convert import convert
from llama_jax.config import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="Meta (params.json + consolidated.*.pth) or HF model directory, or a .gguf"
    )
    p.add_argument("dst", help="llama-jax checkpoint directory to create")
    p.add_argument("--from", dest="source", choices=("meta", "hf"), help="force the layout")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--rope-scaling-factor",
        type=float,
        metavar="F",
        help="Llama 3.1-style rope scaling factor (params.json cannot say it; "
        "default: the release's for an official shape, else 8 as Meta's code)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help="context length to record (default: the release's, else 4096, or "
        "131072 with scaled rope)",
    )
    p.add_argument(
        "--tie-word-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tie the output layer to the embedding (default: the "
        "release's; a custom model is tied only without output.weight)",
    )


def run(args: argparse.Namespace) -> int:
    convert(
        args.src,
        args.dst,
        source=args.source,
        dtype=args.dtype,
        force=args.force,
        rope_scaling_factor=args.rope_scaling_factor,
        max_seq_len=args.max_seq_len,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    return 0
