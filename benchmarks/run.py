"""Run every CPU benchmark and write the results and the plot.

    python -m benchmarks                                   # bench-134m, ~6-9 min on 2 cores
    python -m benchmarks --quick                           # tiny model: checks the code
    python -m benchmarks --out docs/benchmark_cpu.json --plot docs/benchmark_cpu.png

Our side runs in this process as a user runs it: a plain `python`, the default API, no
environment variables. Every peer figure comes from a fresh `python` that imports
PyTorch/transformers only (see harness.run_peer), run right after ours.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from benchmarks import convert, decode, prefill, roofline, train, weights
from benchmarks.harness import Results, load_average, machine_record


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny preset, few repeats")
    p.add_argument("--out", default="docs/benchmark_cpu.json", help="JSON results ('' for none)")
    p.add_argument("--plot", default="docs/benchmark_cpu.png", help="PNG chart ('' for none)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["roofline", "prefill", "decode", "train", "convert"],
        help="a subset",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import jax

    import llama_jax

    preset = "tiny" if args.quick else "bench-134m"
    repeats = args.repeats or (2 if args.quick else 3)
    record = machine_record(["-m", "benchmarks", *argv])
    record.update(
        preset=preset,
        repeats=repeats,
        jax=jax.__version__,
        llama_jax=llama_jax.__version__,
        device=jax.devices()[0].device_kind,
    )
    res = Results(args.out or None, record)
    print(f"{record['date_utc']} UTC  {record['cpu']} x{record['cores']}  load {load_average()}")
    todo = set(args.only or ["roofline", "prefill", "decode", "train", "convert"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llama-jax-bench-") as work:
        ckpt, hf = weights.make(work, preset)
        roof = roofline.run(res, args.quick)  # every ratio to the roofline needs it
        if "prefill" in todo:
            prefill.run(res, ckpt, hf, 128, repeats)
        if "decode" in todo:
            batches = (1, 8) if args.quick else (1, 8, 32)
            new = 9 if args.quick else 33
            decode.run(res, ckpt, hf, batches, 64, new, repeats, roof)
        if "train" in todo:
            train.run(res, preset, hf, 4, 128, repeats, roof)
        if "convert" in todo:
            convert.run(res, hf, work, 1 if args.quick else 2)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["load_average_end"] = load_average()
    res.save()
    print(f"done in {record['seconds']} s; load average {record['load_average_end']}")
    if args.plot:
        plot(res, args.plot)
    return 0


def plot(res: Results, path: str) -> None:
    """A bar per figure with a peer: llama-jax / peer (above 1: llama-jax better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [f for f in res.figures if f["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(figs) + 1.5))
    names = [f["figure"] for f in figs][::-1]
    ratios = [f["ratio"] for f in figs][::-1]
    ax.barh(names, ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax.axvline(1.0, color="black", lw=0.8)
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}", va="center", fontsize=8)
    m = res.record
    ax.set_xlabel("llama-jax / transformers (>1: llama-jax better; RSS: peer / ours)")
    ax.set_title(
        f"{m['preset']}, {m['cpu'][:40]} x{m['cores']}, {m['date_utc']} UTC, "
        f"load {m['load_average_start'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
