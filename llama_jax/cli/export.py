"""`llama-jax export CKPT OUT --to hf|meta`: a llama-jax checkpoint back to PyTorch layouts."""

from __future__ import annotations

import argparse

from llama_jax.checkpoint.export import export


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="llama-jax checkpoint directory")
    p.add_argument("out", help="directory to create")
    p.add_argument("--to", choices=("hf", "meta"), default="hf", help="output layout")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    export(args.ckpt, args.out, to=args.to, force=args.force)
    return 0
