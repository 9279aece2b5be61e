"""Flags shared by several commands: the attention kernel, the mesh and the multi-host runtime."""

from __future__ import annotations

import argparse

from llama_jax.errors import LlamaError
from llama_jax.sharding.distributed import initialize_distributed
from llama_jax.sharding.mesh import MESH_HELP

ATTENTION_HELP = (
    "how attention is computed: xla (the reference, every backend; default), cudnn "
    "(NVIDIA GPUs, bfloat16/float16) or splash (TPUs: splash attention and ragged decode)"
)


def add_attention_argument(parser: argparse.ArgumentParser, default: str = "xla") -> None:
    """Add `--attention KERNEL`: the reference einsums or a kernel of llama_jax.kernels."""
    from llama_jax.model.attention import KERNELS

    parser.add_argument("--attention", default=default, choices=KERNELS, help=ATTENTION_HELP)


def add_mesh_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add `--mesh SPEC` and the multi-host flags to a command.

    `--mesh` becomes a Mesh with `make_mesh(args.mesh)`. The multi-host flags
    (`--distributed`, or `--coordinator/--num-processes/--process-id`) are acted on by the
    `llama-jax` entry point before the command runs (`initialize_from_args`), since
    `jax.distributed.initialize` must precede any other use of JAX.

    Args:
      parser: the command's argparse parser.
      default: the spec used when the flag is absent (None: one device).
    """
    parser.add_argument("--mesh", default=default, metavar="SPEC", help=MESH_HELP)
    group = parser.add_argument_group(
        "multi-host", "every host runs the same command; only process 0 prints"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run whose peers JAX finds itself (TPU pods, SLURM, MPI)",
    )
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="GPU/CPU hosts: process 0's address and a free port (needs the two flags below)",
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")


def initialize_from_args(args: argparse.Namespace) -> bool:
    """Start the multi-process runtime when a command's flags ask for it.

    Args:
      args: parsed arguments of a command that called `add_mesh_argument` (others are
        ignored).
    Returns:
      True when `jax.distributed` was initialised.
    Raises:
      LlamaError for an incomplete or inconsistent set of flags.
    """
    coordinator = getattr(args, "coordinator", None)
    n, i = getattr(args, "num_processes", None), getattr(args, "process_id", None)
    manual = (coordinator, n, i)
    if all(v is None for v in manual):
        if getattr(args, "distributed", False):
            initialize_distributed()
            return True
        return False
    if any(v is None for v in manual):
        raise LlamaError(
            "--coordinator, --num-processes and --process-id go together (got "
            f"--coordinator={coordinator}, --num-processes={n}, --process-id={i}); on TPU "
            "pods, SLURM or MPI use --distributed alone."
        )
    if n < 1 or not 0 <= i < n:
        raise LlamaError(f"--process-id {i} must be in 0 .. {n - 1} (--num-processes {n}).")
    if ":" not in coordinator:
        raise LlamaError(f"--coordinator {coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:1234.")
    initialize_distributed(coordinator, n, i)
    return True
