"""Timing, the machine record, the peer runner and the results file; standard library only.

This module imports neither JAX nor PyTorch, so that both sides can use it: our figures
are timed in the benchmark's own process, a peer's in a child `python` process
(`run_peer`) that never imports JAX, with PyTorch's threads set to the core count.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Seconds per call of `fn` (which must wait for its own result).

    Args:
      fn: the work, run `warmup` times untimed (compilation, caches), then `repeats` times.
      repeats: timed calls.
      warmup: untimed calls first.
    Returns:
      {"median", "min", "times"} in seconds.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "times": times}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total RAM in GiB (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def machine_record(argv: list[str]) -> dict:
    """Where, when and how the figures were taken."""
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([os.path.basename(sys.executable), *argv]),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
        "environment": {
            k: os.environ[k] for k in ("GLIBC_TUNABLES", "XLA_FLAGS") if k in os.environ
        },
    }


def run_peer(task: str, timeout: float = 900, **kwargs) -> dict:
    """Run one task of `benchmarks.peer_torch` in a fresh `python` process.

    The child imports only PyTorch/transformers (no JAX: XLA's thread pools would slow
    PyTorch's OpenMP threads) and uses as many threads as there are cores.

    Args:
      task: a task name of peer_torch.TASKS.
      timeout: seconds before the child is stopped.
      **kwargs: the task's arguments (JSON-serialisable).
    Returns:
      The task's result dict, with "load_average" at its end.
    Raises:
      RuntimeError: the child failed (its stderr's tail is in the message).
    """
    cmd = [sys.executable, "-m", "benchmarks.peer_torch", task, json.dumps(kwargs)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peer task {task} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average"] = load_average()
    return result


def peak_rss_mb() -> float | None:
    """This process's peak resident set in MB (VmHWM; Linux), None elsewhere.

    Not `getrusage`'s ru_maxrss: a child started by a large parent inherits the
    parent's figure through fork and exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def peak_rss_mb_of_child(code: str, extra_env: dict | None = None) -> dict:
    """Run `code` (which sets a dict RESULT) in a fresh `python -c`; RESULT is returned
    with the child's peak resident set (MB) added."""
    wrapped = f"{code}\nimport json as _j\nfrom benchmarks.harness import peak_rss_mb as _p\n"
    wrapped += "print(_j.dumps({**RESULT, 'peak_rss_mb': _p()}))"
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", wrapped], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Results:
    """Figures as they are measured, printed at once and saved to JSON after each.

    Each figure: name, unit, ours, peer (or None), ratio (ours / peer, or peer / ours
    where lower is better), the load average when it was taken, and notes.
    """

    def __init__(self, path: str | None, record: dict):
        self.path = path
        self.record = record
        self.figures: list[dict] = []

    def add(self, name: str, unit: str, ours, peer=None, *, lower_is_better=False, **notes):
        ratio = None
        if ours is not None and peer:
            ratio = (peer / ours) if lower_is_better else (ours / peer)
        fig = {
            "figure": name,
            "unit": unit,
            "llama_jax": ours,
            "peer": peer,
            "ratio": ratio,
            "load_average": load_average(),
            **notes,
        }
        self.figures.append(fig)
        peer_s = "" if peer is None else f"  peer {fmt(peer)}"
        ratio_s = "" if ratio is None else f"  ratio {ratio:.2f}"
        print(f"{name:<40} {fmt(ours):>10} {unit:<10}{peer_s}{ratio_s}", flush=True)
        self.save()
        return fig

    def get(self, name: str) -> dict | None:
        return next((f for f in self.figures if f["figure"] == name), None)

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump({"machine": self.record, "figures": self.figures}, f, indent=1)
                f.write("\n")


def fmt(x) -> str:
    """Three significant figures, or the value as text."""
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)
