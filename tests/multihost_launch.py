"""Launch a small multi-host run on loopback: N processes, each with its own CPU devices."""

import os
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    argv_of, processes: int = 2, devices_each: int = 4, timeout: float = 150.0
) -> list[str]:
    """Start `processes` copies of a program, wait for all, kill every one on failure.

    Args:
      argv_of: maps (process id, coordinator port) to that process's command line.
      processes: how many processes.
      devices_each: simulated CPU devices per process.
      timeout: seconds before the survivors are killed.
    Returns:
      Each process's output; asserts that every one exited 0.
    """
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    port = free_port()
    procs = [
        subprocess.Popen(
            argv_of(i, port),
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    report = "\n".join(
        f"--- process {i} (exit {c})\n{log[-3000:]}"
        for i, (c, log) in enumerate(zip(codes, logs, strict=True))
    )
    assert codes == [0] * processes, report
    return logs
