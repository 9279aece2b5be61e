"""`llama-jax generate`: continue a prompt (streamed), greedy or sampled."""

from __future__ import annotations

from llama_jax.errors import LlamaError
from llama_jax.inference.generate import CACHE_FULL, generate_text
from llama_jax.inference.sampling import SamplingParams


def add_sampling_arguments(p, max_new_tokens: int) -> None:
    """The flags `generate` and `chat` share: checkpoint, tokenizer, sampling, mesh."""
    from llama_jax.cli.common import add_attention_argument, add_mesh_argument

    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a llama-jax checkpoint directory (from `llama-jax convert`)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="tokenizer.model, tokenizer.json or a directory holding one (default: the "
        "checkpoint's own)",
    )
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.6,
        help="0 for greedy decoding (default 0.6, Meta's example setting)",
    )
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="compute and parameter dtype (default: as stored)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: projection weights in int8 with per-channel scales, quantized while "
        "loading (a quarter of float32's memory; see docs/performance.md for the quality)",
    )
    p.add_argument(
        "--cache-len",
        type=int,
        default=None,
        help="KV cache slots (default: enough for prompt and answer, at most the model's context)",
    )
    p.add_argument(
        "--cache-dtype",
        choices=["float32", "bfloat16", "float16", "int8"],
        default=None,
        help="KV cache dtype (default: the compute dtype); int8 keeps one byte per number "
        "plus a scale per key or value vector (see docs/performance.md for the quality)",
    )
    add_attention_argument(p)
    add_mesh_argument(p)


def load_for_generation(args):
    """(model, tokenizer) from the command-line flags, checked against each other."""
    import os

    import llama_jax
    from llama_jax.sharding import describe_mesh, make_mesh, print0
    from llama_jax.tokenizer import Tokenizer, find_tokenizer_file

    if not os.path.isdir(args.checkpoint):
        raise LlamaError(f"--checkpoint {args.checkpoint}: no such directory.")
    if args.tokenizer is None and find_tokenizer_file(args.checkpoint) is None:
        raise LlamaError(
            f"--checkpoint {args.checkpoint} holds no tokenizer (tokenizer.model, "
            "tokenizer.json or original/tokenizer.model); pass --tokenizer FILE."
        )
    tokenizer = Tokenizer.load(args.tokenizer or args.checkpoint)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # check flags early
    mesh = make_mesh(args.mesh)
    model = llama_jax.load(
        args.checkpoint,
        mesh=mesh,
        dtype=args.dtype,
        quantize=args.quantize,
        attention=args.attention,
    )
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LlamaError(
            f"The tokenizer ({getattr(tokenizer, 'source', '?')}) has {tokenizer.vocab_size} ids "
            f"but the model only {model.cfg.vocab_size}: they do not belong together. Pass the "
            "tokenizer that came with the weights (--tokenizer)."
        )
    print0(
        f"{model.cfg.name or 'model'}: {tokenizer.kind} tokenizer, {describe_mesh(mesh)}",
        file=__import__("sys").stderr,
    )
    return model, tokenizer


def add_arguments(p) -> None:
    """Flags of `llama-jax generate`."""
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="the prompt; repeat the flag for a batch of prompts",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the model's chat format",
    )
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="a string that ends the text (repeatable)",
    )
    add_sampling_arguments(p, max_new_tokens=256)
    g = p.add_argument_group("speculative decoding (the output is the model's own)")
    draft = g.add_mutually_exclusive_group()
    draft.add_argument(
        "--draft",
        metavar="DIR",
        help="a smaller llama-jax checkpoint with the same tokenizer as draft",
    )
    draft.add_argument(
        "--draft-layers",
        type=int,
        metavar="N",
        help="draft with the model's own first N layers (no extra memory)",
    )
    g.add_argument(
        "--speculate",
        type=int,
        default=4,
        metavar="K",
        help="tokens the draft proposes per round (default 4)",
    )


def _load_draft(args, model):
    """The draft model of --draft / --draft-layers, or None."""
    import os

    import llama_jax
    from llama_jax.inference.speculative import draft_from_layers
    from llama_jax.sharding import make_mesh

    if args.draft_layers is not None:
        return draft_from_layers(model, args.draft_layers)
    if args.draft is None:
        return None
    if not os.path.isdir(args.draft):
        raise LlamaError(f"--draft {args.draft}: no such directory.")
    return llama_jax.load(
        args.draft, mesh=make_mesh(args.mesh), dtype=args.dtype, attention=args.attention
    )


def run(args) -> int:
    """`llama-jax generate`: print the continuation of each prompt, streaming a single one."""
    import sys
    import time

    from llama_jax.sharding import is_main_process

    model, tokenizer = load_for_generation(args)
    draft = _load_draft(args, model)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [[*system, {"role": "user", "content": p}] for p in args.prompt]
    else:
        if args.system:
            raise LlamaError("--system needs --chat.")
        prompts = list(args.prompt)
    show = is_main_process()
    single = len(prompts) == 1

    def on_text(row, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if show and single and not args.chat:
        sys.stdout.write(args.prompt[0])
    # The same generation settings on both paths: token budget, sampling, seed, options.
    sampling = (args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    options = dict(
        chat=args.chat, stop=args.stop, cache_len=args.cache_len, cache_dtype=args.cache_dtype
    )
    start = time.perf_counter()
    if draft is not None:
        from llama_jax.inference.speculative import speculative_generate_text

        texts, reasons, rate = speculative_generate_text(
            model,
            draft,
            tokenizer,
            prompts,
            *sampling,
            speculate_k=args.speculate,
            on_text=on_text if show and single else None,
            **options,
        )
        if show:
            print(
                f"[speculative decoding: k={args.speculate}, {rate:.1%} of the draft's "
                "tokens accepted]",
                file=sys.stderr,
            )
    else:
        texts, reasons = generate_text(
            model,
            tokenizer,
            prompts,
            *sampling,
            on_text=on_text if show and single else None,
            return_finish_reasons=True,
            **options,
        )
    seconds = time.perf_counter() - start
    if show:
        if single:
            print()
        else:
            for i, (prompt, text) in enumerate(zip(args.prompt, texts, strict=True)):
                print(f"--- prompt {i}: {prompt}\n{text}")
        for i, reason in enumerate(reasons):
            if reason == CACHE_FULL:
                print(
                    f"[prompt {i}: stopped because the KV cache is full (the model's context "
                    f"is {model.cfg.max_seq_len} tokens)]",
                    file=sys.stderr,
                )
        print(f"[{seconds:.1f} s, compilation included]", file=sys.stderr)
    return 0
