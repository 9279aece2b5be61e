"""`llama-jax train`: train or fine-tune on text/JSONL, sharded, resumable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from llama_jax.config import DTYPES
from llama_jax.errors import LlamaError
from llama_jax.model import REMAT_POLICIES
from llama_jax.training.checkpoints import read_checkpoint_meta
from llama_jax.training.loop import train
from llama_jax.training.step import TrainConfig


def add_arguments(p) -> None:
    """Flags of `llama-jax train`."""
    from llama_jax.cli.common import add_attention_argument, add_mesh_argument

    d = TrainConfig()
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="training text: .txt/.jsonl files or directories (JSONL 'text' field; "
        "for --task sft, prompt/response or messages records)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory: checkpoints/, metrics.jsonl, "
        "model/ (a llama-jax checkpoint of the final weights); reused to resume",
    )
    p.add_argument(
        "--task",
        choices=("pretrain", "sft"),
        default="pretrain",
        help="pretrain: pack documents; sft: loss on responses only",
    )
    p.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out data")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.05,
        help="without --eval-data, hold out this fraction of the documents",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset", default=None, help="train from scratch with this preset (default: tiny)"
    )
    src.add_argument(
        "--init",
        metavar="CKPT",
        help="fine-tune from a llama-jax checkpoint (from `llama-jax convert`; an int8 one "
        "from `llama-jax quantize` with --lora-rank only)",
    )
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --init)")
    for flag, field, kind in [
        ("--steps", "steps", int),
        ("--batch-size", "batch_size", int),
        ("--micro-batches", "micro_batches", int),
        ("--seq-len", "seq_len", int),
        ("--lr", "learning_rate", float),
        ("--warmup", "warmup_steps", int),
        ("--min-lr-ratio", "min_lr_ratio", float),
        ("--weight-decay", "weight_decay", float),
        ("--clip", "clip_norm", float),
        ("--seed", "seed", int),
        ("--eval-every", "eval_every", int),
        ("--eval-batches", "eval_batches", int),
        ("--save-every", "save_every", int),
        ("--keep", "keep", int),
        ("--log-every", "log_every", int),
    ]:
        p.add_argument(
            flag,
            dest=field,
            type=kind,
            default=getattr(d, field),
            help=f"default {getattr(d, field)}",
        )
    p.add_argument(
        "--dtype",
        dest="compute_dtype",
        default=d.compute_dtype,
        choices=DTYPES,
        help="matmul dtype (weights and optimizer state stay float32)",
    )
    p.add_argument(
        "--remat",
        default=d.remat,
        choices=sorted(REMAT_POLICIES),
        help="rematerialisation policy of the layer scan",
    )
    add_attention_argument(p, d.attention)
    lora = p.add_argument_group("LoRA (train low-rank adapters on a frozen --init model)")
    lora.add_argument(
        "--lora-rank",
        dest="lora_rank",
        type=int,
        default=d.lora_rank,
        help="adapter rank r; 0 (default) trains every weight",
    )
    lora.add_argument(
        "--lora-alpha",
        dest="lora_alpha",
        type=float,
        default=d.lora_alpha,
        help=f"the update is scaled by alpha / r (default {d.lora_alpha})",
    )
    lora.add_argument(
        "--lora-targets",
        dest="lora_targets",
        default=",".join(d.lora_targets),
        help="projections to adapt, any of wq,wk,wv,wo,w1,w2,w3 "
        f"(default {','.join(d.lora_targets)})",
    )
    lora.add_argument(
        "--lora-dropout",
        dest="lora_dropout",
        type=float,
        default=d.lora_dropout,
        help="dropout on the adapters' input (default 0)",
    )
    add_mesh_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_data(args, seed: int):
    """(train, eval) raw documents or SFT examples from --data/--eval-data/--task.

    Read before anything else is loaded, so a wrong path or an empty corpus fails first.
    """
    from llama_jax.training import data

    read = data.read_sft_examples if args.task == "sft" else data.read_documents
    train_items = read(args.data)
    if args.eval_data:
        return train_items, read(args.eval_data)
    if args.eval_fraction > 0 and len(train_items) > 1:
        idx = list(range(len(train_items)))
        train_idx, eval_idx = data.split_documents(idx, args.eval_fraction, seed)
        return [train_items[i] for i in train_idx], [train_items[i] for i in eval_idx]
    return train_items, None


def tokenize_data(args, items, tokenizer, seq_len: int, what: str):
    """A TokenDataset from `read_data` output: packed documents or masked SFT rows."""
    from llama_jax.training import data

    if args.task == "sft":
        return data.tokenize_sft(items, tokenizer, seq_len)
    try:
        return data.pack_documents(items, tokenizer, seq_len, progress=not args.no_progress)
    except LlamaError as e:
        raise LlamaError(f"{what} data: {e}") from None


def run(args) -> int:
    """`llama-jax train`: train or fine-tune, resumably; exit 0 when done, 143 on SIGTERM."""
    from llama_jax import checkpoint
    from llama_jax.checkpoint import store
    from llama_jax.config import get_preset
    from llama_jax.sharding import describe_mesh, make_mesh
    from llama_jax.tokenizer import Tokenizer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train_items, eval_items = read_data(args, tc.seed)
    init_params = None
    if tc.lora_rank and not args.init:
        raise LlamaError("--lora-rank trains adapters on a frozen model: give it with --init CKPT.")
    if args.init:
        cfg, quantization = store.read_header(args.init)
        if quantization is not None and not tc.lora_rank:
            # int8 values have no gradient: only adapters on them can be trained.
            raise LlamaError(
                f'--init {args.init}: this checkpoint holds int8 weights ("quantization" '
                f"in {store.CONFIG_FILE}), which cannot be trained. Train LoRA adapters on "
                "it with --lora-rank R, or give --init the float checkpoint it was "
                "quantized from."
            )
        if quantization is not None:
            # The frozen base stays int8, as stored; only the adapters are float32.
            tc = dataclasses.replace(tc, base_quantization=quantization)
        tok_path = args.tokenizer or str(Path(args.init) / "tokenizer.model")
    else:
        cfg = get_preset(args.preset or "tiny")
        tok_path = args.tokenizer
    if tok_path is None:
        raise LlamaError("--tokenizer is required when training from a preset.")
    if tc.seq_len > cfg.max_seq_len:
        raise LlamaError(
            f"--seq-len {tc.seq_len} is longer than the model's context "
            f"max_seq_len={cfg.max_seq_len}; lower it."
        )
    tokenizer = Tokenizer.load(tok_path)
    if not args.init and tokenizer.vocab_size != cfg.vocab_size:
        # A model trained from scratch takes its vocabulary from its tokenizer.
        print(f"vocab_size {cfg.vocab_size} -> {tokenizer.vocab_size} (the tokenizer's)")
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LlamaError(
            f"The tokenizer {tok_path} has {tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {cfg.vocab_size}; use a matching tokenizer or preset."
        )
    train_ds = tokenize_data(args, train_items, tokenizer, tc.seq_len, "The training")
    eval_ds = None
    if eval_items:
        eval_ds = tokenize_data(args, eval_items, tokenizer, tc.seq_len, "The held-out")
    mesh = make_mesh(args.mesh)
    print(
        f"{cfg.name}: {cfg.num_params():,} parameters; {describe_mesh(mesh)}; "
        f"{len(train_ds)} training rows of {tc.seq_len} tokens"
    )
    extra_meta = None
    if tc.lora_rank:
        # The run's checkpoints hold the adapters only: the base is read again on resume
        # (in its own dtype, or int8 as stored), and its path is recorded for
        # `llama-jax export-lora`.
        from llama_jax.training.lora import count_lora_params

        model = checkpoint.load(args.init, mesh=mesh)
        init_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del model
        extra_meta = {"lora_base": str(Path(args.init).expanduser().absolute())}
        n = count_lora_params(cfg, tc.lora_targets, tc.lora_rank)
        on_int8 = "; the base stays int8" if tc.base_quantization else ""
        print(
            f"LoRA: {n:,} trainable parameters (rank {tc.lora_rank} on "
            f"{','.join(tc.lora_targets)}; {n / cfg.num_params():.3%} of the model{on_int8})"
        )
    elif args.init and read_checkpoint_meta(Path(args.out) / "checkpoints") is None:
        model = checkpoint.load(args.init, mesh=mesh, dtype="float32")
        init_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    result = train(
        cfg,
        tc,
        train_ds,
        args.out,
        eval_ds,
        init_params=init_params,
        mesh=mesh,
        progress=not args.no_progress,
        extra_meta=extra_meta,
    )
    if result.preempted:
        return 143
    if tc.lora_rank:
        from llama_jax.training.lora import export_peft

        adapter_dir = Path(args.out) / "adapter"
        model = result.trainer.model(result.params)
        export_peft(model, adapter_dir, base_model=extra_meta["lora_base"], force=True)
        # Merging needs float weights: those of the checkpoint an int8 base came from.
        base_flag = " --base FLOAT_CKPT" if tc.base_quantization else ""
        print(
            f"adapter: {adapter_dir} (peft format); merged weights: "
            f"llama-jax export-lora {args.out} MERGED --merge{base_flag}"
        )
        return 0
    model_dir = Path(args.out) / "model"
    model = result.trainer.model(result.params)
    checkpoint.save(model, model_dir, tokenizer=tok_path, force=True)
    print(f"final weights: {model_dir} (llama-jax checkpoint; `llama-jax export` converts it)")
    return 0
