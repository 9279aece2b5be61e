"""Multi-host runs: start `jax.distributed`, and print on process 0 only."""

from __future__ import annotations

import jax

from llama_jax.errors import LlamaError


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
) -> None:
    """Start JAX's multi-process runtime; every host must call it, before any other JAX use.

    On TPU pods (and SLURM/Open MPI clusters) call it with no arguments: the runtime
    finds its peers itself. On GPU or CPU hosts pass the coordinator's address (process
    0's host and a free port), the number of processes and this process's id. CPU
    processes talk through gloo collectives.

    Args:
      coordinator: "host:port" of process 0, or None to auto-detect.
      num_processes: the number of processes, or None to auto-detect.
      process_id: this process's id in [0, num_processes), or None to auto-detect.
      local_device_count: on CPU, how many devices this process simulates.
    """
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    # Only the CPU backend reads this; without it CPU processes cannot reach each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (RuntimeError, ValueError) as e:
        raise LlamaError(
            f"jax.distributed.initialize(coordinator={coordinator!r}, num_processes="
            f"{num_processes}, process_id={process_id}) failed: {e}. Every process must "
            "run the same command with the same coordinator and process count, each with "
            "its own process id."
        ) from e


def is_main_process() -> bool:
    """True on process 0, the one that prints, logs and writes single-writer files."""
    return jax.process_index() == 0


def print0(*args, **kwargs) -> None:
    """`print`, on process 0 only (every host runs the same program).

    Args:
      *args, **kwargs: as for print.
    """
    if is_main_process():
        print(*args, **kwargs)
