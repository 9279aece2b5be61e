"""`llama-jax quickstart`: the whole system end to end, with nothing to download.

    bash scripts/run.sh llama-jax quickstart                 # a few minutes on 2 CPU cores
    bash scripts/run.sh llama-jax quickstart --steps 20      # a smoke run

The corpus is the Python standard library's own source, which ships with every
interpreter. The command

  1. picks a deterministic set of its modules and holds some out for evaluation,
  2. trains a SentencePiece tokenizer on the rest (Llama 2's settings),
  3. trains a small LLaMA on a mesh of the local devices (`llama_jax.train`), with
     Orbax checkpoints, so an interrupted quickstart resumes where it stopped,
  4. saves the weights as a llama-jax checkpoint, exports them to Meta's layout
     (params.json + consolidated.00.pth) and converts that back with the real converter,
  5. reloads the converted model, checks its logits equal the trained model's, and
     generates samples from it,
  6. prints the held-out loss before and after training and draws the loss curve.

Everything lands in one directory (default runs/quickstart):

    tokenizer.model   run/ (checkpoints/, metrics.jsonl)   model/   meta/   reloaded/
    loss.png   samples.txt   summary.json
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError

DEFAULT_OUT = "runs/quickstart"
PROMPTS = ("import ", "def ", "class ", "    for ", "if __name__")


def stdlib_corpus(max_bytes: int = 3_000_000, root: str | None = None) -> list[Path]:
    """A deterministic subset of the standard library's top-level modules.

    Modules of 2 to 100 kB, in name order, until `max_bytes` (the tiny ones are mostly
    boilerplate, the huge ones mostly one module's idioms).

    Args:
      max_bytes: stop adding files at this total size.
      root: the stdlib directory (default: this interpreter's).
    Returns:
      The file paths.
    """
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root_path.glob("*.py")):
        size = f.stat().st_size
        if 2_000 <= size <= 100_000:
            if total + size > max_bytes:
                break
            files.append(f)
            total += size
    if len(files) < 2:
        raise LlamaError(
            f"Found {len(files)} standard-library modules under {root_path}; the quickstart "
            "needs the interpreter's Python sources (some distributions ship them separately)."
        )
    return files


def model_config(vocab_size: int, seq_len: int) -> LlamaConfig:
    """The quickstart's model: 4 layers of width 256, GQA 8/4 heads, ~4M parameters.

    Args:
      vocab_size: the tokenizer's size.
      seq_len: the training sequence length (the context is at least 256).
    Returns:
      The LlamaConfig.
    """
    return LlamaConfig(
        name="quickstart",
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=vocab_size,
        ffn_dim=704,
        max_seq_len=max(256, seq_len),
        norm_eps=1e-5,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `llama-jax quickstart`."""
    from llama_jax.cli.common import add_mesh_argument

    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer size (default 2048)")
    p.add_argument(
        "--corpus-mb",
        type=float,
        default=3.0,
        help="megabytes of standard-library source to use (default 3)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="matmul dtype (default: float32 on CPU, bfloat16 elsewhere)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_mesh_argument(p, default="fsdp")


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Draw training and held-out loss against step from a metrics.jsonl file.

    Args:
      metrics_path: a metrics.jsonl written by `llama_jax.training.train`.
      png_path: the PNG to write.
      title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    # A resumed run re-logs the steps after its checkpoint: keep each step's last value.
    train = {e["step"]: e["loss"] for e in entries if "loss" in e}
    held = {e["step"]: e["eval_loss"] for e in entries if "eval_loss" in e}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="training loss")
    ax.plot(sorted(held), [held[s] for s in sorted(held)], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run the quickstart; returns 0."""
    import jax
    import numpy as np

    from llama_jax import checkpoint, training
    from llama_jax.inference.generate import generate_text
    from llama_jax.sharding import describe_mesh, make_mesh
    from llama_jax.tokenizer import Tokenizer, train_sentencepiece
    from llama_jax.training import data

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def phase(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 1)
        return time.perf_counter()

    # 1. Corpus.
    t = time.perf_counter()
    files = stdlib_corpus(int(args.corpus_mb * 1e6))
    docs = data.read_documents(files)
    train_docs, eval_docs = data.split_documents(docs, 0.05, seed=args.seed)
    print(
        f"corpus: {len(docs)} standard-library modules from {files[0].parent} "
        f"({sum(map(len, docs)) / 1e6:.1f} M characters), {len(eval_docs)} held out"
    )

    # 2. Tokenizer (reused when resuming into the same directory).
    tok_path = out / "tokenizer.model"
    if tok_path.is_file():
        tokenizer = Tokenizer.load(tok_path)
        print(f"tokenizer: reusing {tok_path}")
    else:
        print(f"tokenizer: training SentencePiece BPE, {args.vocab_size} pieces ...")
        tokenizer = train_sentencepiece(iter(train_docs), tok_path, args.vocab_size)
    t = phase("tokenizer", t)

    # 3. Train on a mesh of the local devices.
    train_ds = data.pack_documents(train_docs, tokenizer, args.seq_len, not args.no_progress)
    eval_ds = data.pack_documents(eval_docs, tokenizer, args.seq_len)
    cfg = model_config(tokenizer.vocab_size, args.seq_len)
    mesh = make_mesh(args.mesh)
    dtype = args.dtype or ("float32" if jax.devices()[0].platform == "cpu" else "bfloat16")
    tc = training.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 20),
        min_lr_ratio=0.1,
        weight_decay=0.1,
        compute_dtype=dtype,
        seed=args.seed,
        eval_every=max(1, args.steps // 6),
        eval_batches=4,
        save_every=max(1, args.steps // 3),
        keep=2,
        log_every=max(1, min(10, args.steps // 20)),
    )
    print(
        f"model: {cfg.num_params() / 1e6:.1f}M parameters (D={cfg.dim}, L={cfg.n_layers}, "
        f"N={cfg.n_heads}, K={cfg.kv_heads}, V={cfg.vocab_size}); {describe_mesh(mesh)}; "
        f"{len(train_ds)} rows of {args.seq_len} tokens; matmuls in {dtype}"
    )
    result = training.train(
        cfg, tc, train_ds, out / "run", eval_ds, mesh=mesh, progress=not args.no_progress
    )
    if result.preempted:
        print(f"stopped by SIGTERM; run the same command to resume from {out / 'run'}")
        return 143
    t = phase("training", t)

    # 4. Save, export to Meta's layout, convert back with the real converter.
    trained = result.trainer.model(result.params)
    model_dir, meta_dir, back_dir = out / "model", out / "meta", out / "reloaded"
    quiet = dict(force=True, progress=False)
    checkpoint.save(trained, model_dir, tokenizer=str(tok_path), force=True)
    checkpoint.export(model_dir, meta_dir, to="meta", **quiet)
    checkpoint.convert(meta_dir, back_dir, **quiet)
    reloaded = checkpoint.load(back_dir)
    t = phase("save_export_convert", t)

    # 5. The round trip must be exact (float32 all the way); then sample.
    probe = jax.numpy.asarray(eval_ds.tokens[:2, :-1])
    a, b = np.asarray(trained(probe)), np.asarray(reloaded(probe))
    diff = float(np.max(np.abs(a - b)))
    if diff > 1e-5:
        raise LlamaError(
            f"The model converted back from Meta's layout differs (max |dlogit| "
            f"{diff:.2e}); the export/convert round trip is broken."
        )
    samples = generate_text(
        reloaded,
        tokenizer,
        list(PROMPTS),
        max_new_tokens=96,
        temperature=0.7,
        top_k=40,
        seed=args.seed,
    )
    text = "".join(
        f"--- sample {i} (prompt {p!r}) ---\n{p}{s}\n\n"
        for i, (p, s) in enumerate(zip(PROMPTS, samples, strict=True))
    )
    (out / "samples.txt").write_text(text)
    t = phase("samples", t)

    # 6. Losses and the curve.
    entries = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    held = {e["step"]: e["eval_loss"] for e in entries if "eval_loss" in e}
    before, after = held[min(held)], held[max(held)]
    title = f"quickstart: {cfg.num_params() / 1e6:.1f}M-parameter LLaMA on the stdlib"
    plot_losses(out / "run" / "metrics.jsonl", out / "loss.png", title)
    timings["total"] = round(time.perf_counter() - t_start, 1)
    summary = {
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "steps": tc.steps,
        "round_trip_max_abs_logit_diff": diff,
        "params": cfg.num_params(),
        "mesh": describe_mesh(mesh),
        "seconds": timings,
        "devices": [str(d) for d in jax.devices()],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(text, end="")
    print(
        f"held-out loss: {before:.3f} before training -> {after:.3f} after {tc.steps} steps "
        f"(perplexity {np.exp(before):.0f} -> {np.exp(after):.1f})"
    )
    print(f"export to Meta's layout and back: logits equal (max |diff| {diff:.1e})")
    print(
        f"everything is in {out}/: tokenizer.model, run/ (Orbax checkpoints, metrics.jsonl), "
        "model/, meta/, reloaded/, loss.png, samples.txt, summary.json"
    )
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0
