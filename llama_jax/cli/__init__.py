"""The `llama-jax` command.

Each subcommand is a module with two functions, `add_arguments(parser)` and `run(args)`;
this file only lists them, and imports just the module of the command being run to
build its flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llama_jax.errors import LlamaError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("llama_jax.cli.info", "describe a preset: shapes, parameters, memory; run a forward"),
    "convert": ("llama_jax.cli.convert", "Meta, Hugging Face or GGUF weights -> a checkpoint"),
    "quantize": ("llama_jax.cli.quantize", "a checkpoint -> int8 weights, rounded or by GPTQ"),
    "export": ("llama_jax.cli.export", "a checkpoint -> Hugging Face or Meta weights"),
    "export-lora": ("llama_jax.cli.export_lora", "a LoRA run -> a peft adapter, or merged weights"),
    "generate": ("llama_jax.cli.generate", "continue a prompt (streamed), greedy or sampled"),
    "chat": ("llama_jax.cli.chat", "an interactive chat with history in the model's chat format"),
    "train": ("llama_jax.cli.train", "train or fine-tune on text/JSONL, sharded, resumable"),
    "quickstart": ("llama_jax.cli.quickstart", "train a small LLaMA on the stdlib, end to end"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="llama-jax",
        description="Meta's LLaMA models in JAX and Flax.",
        epilog="Compiled programs are kept for the next run under $LLAMA_JAX_CACHE/xla, by "
        "default ~/.cache/llama-jax/xla (LLAMA_JAX_COMPILE_CACHE=DIR: under DIR; =off: not "
        "kept).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    from llama_jax.runtime import use_compilation_cache

    use_compilation_cache()
    try:
        if hasattr(args, "coordinator"):
            # A command with the multi-host flags (cli.common.add_mesh_argument):
            # jax.distributed must start before the command touches JAX.
            from llama_jax.cli.common import initialize_from_args

            initialize_from_args(args)
        return importlib.import_module(args._module).run(args) or 0
    except LlamaError as e:
        print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130
