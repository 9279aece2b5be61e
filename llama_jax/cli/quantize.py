"""`llama-jax quantize SRC DST`: a checkpoint -> the same model with int8 weights.

Without `--calibration` each projection weight is rounded to its nearest int8 step (what
`load(..., quantize="int8")` does while loading); with a text file the values are chosen
by GPTQ on the model's activations over that text (`llama_jax.inference.gptq`), which
keeps the model's predictions closer to the float model's.
"""

from __future__ import annotations

import argparse
import os

from llama_jax.config import DTYPES
from llama_jax.errors import LlamaError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="llama-jax checkpoint directory with float weights")
    p.add_argument("dst", help="checkpoint directory to create, with int8 projection weights")
    p.add_argument(
        "--calibration",
        metavar="TEXT_FILE",
        help="UTF-8 text like what the model will read; quantize by GPTQ on it "
        "(default: round each weight to the nearest step)",
    )
    p.add_argument(
        "--rows", type=int, default=16, help="calibration rows, one forward pass (default 16)"
    )
    p.add_argument(
        "--length", type=int, default=512, help="tokens per calibration row (default 512)"
    )
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ Hessian dampening (default 0.01)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        help="dtype of the calibration pass and the float "
        "parameters kept (embeddings, norms); default: as stored",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    import llama_jax
    from llama_jax import checkpoint
    from llama_jax.checkpoint.store import check_destination
    from llama_jax.inference import gptq

    dst = os.path.abspath(os.path.expanduser(args.dst))
    check_destination(dst, args.force, protect=(args.src,))
    if args.calibration is None:
        model = llama_jax.load(args.src, dtype=args.dtype, quantize="int8")
    else:
        cfg = checkpoint.load_config(args.src)
        if args.length > cfg.max_seq_len:
            raise LlamaError(
                f"--length {args.length} exceeds the model's max_seq_len={cfg.max_seq_len}."
            )
        try:
            with open(args.calibration, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise LlamaError(f"--calibration {args.calibration}: {why}.") from None
        tokens = gptq.calibration_rows(
            llama_jax.Tokenizer.load(args.src), text, args.rows, args.length
        )
        model = llama_jax.load(args.src, dtype=args.dtype)
        print(f"calibrating on {tokens.shape[0]} x {tokens.shape[1]} tokens")
        gptq.quantize(model, tokens, damp=args.damp)
    out = checkpoint.save(model, dst, tokenizer_from=args.src, force=args.force)
    print(f"wrote {out} (int8 projections{'' if args.calibration is None else ', GPTQ'})")
    return 0
