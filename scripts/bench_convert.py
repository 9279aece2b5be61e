"""Peak host memory and throughput of `llama-jax convert` on a generated multi-GB checkpoint.

    .venv/bin/python scripts/bench_convert.py --workdir /tmp/bench_convert          # ~2.2 GB
    .venv/bin/python scripts/bench_convert.py --layers 40 --plot docs/convert_rss.png

Writes a random bfloat16 Meta checkpoint (params.json + consolidated.NN.pth, split over
--shards model-parallel files like Meta's), then converts it in a fresh child process
and reports the child's peak RSS (VmHWM) and throughput. Two peers run the same way:
the bare interpreter with the package imported (the floor), and torch.load of the same
files (what a conversion that loads the state dict first would hold). The workdir is
deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama_jax.checkpoint import layout  # noqa: E402
from llama_jax.checkpoint.torch_zip import write_pth  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
mode, src, dst = sys.argv[1:4]
t0 = time.perf_counter()
out = {{}}
if mode == "convert":
    from llama_jax.checkpoint import convert
    out = convert(src, dst, progress=False)
elif mode == "torch_load":
    import glob, torch
    sds = [torch.load(p, weights_only=True) for p in sorted(glob.glob(src + "/*.pth"))]
    out = {{"bytes": sum(t.numel() * t.element_size() for sd in sds for t in sd.values())}}
else:
    import llama_jax.checkpoint  # the floor: interpreter + jax + orbax imported
out["seconds"] = time.perf_counter() - t0
# VmHWM: this process image's peak resident set. (ru_maxrss would also count the
# parent's resident set at fork time, which Linux carries over the exec.)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
out["peak_rss"] = int(hwm.split()[1]) * 1024
print(json.dumps(out))
"""


def generate(cfg: LlamaConfig, src: str, shards: int, seed: int = 0) -> int:
    """Random bf16 weights in Meta's layout, split over `shards` files; returns bytes."""
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "params.json"), "w") as f:
        json.dump(layout.meta_params(cfg), f)
    rng = np.random.default_rng(seed)
    total = 0

    def pieces(rank: int):
        for name in layout.meta_names(cfg):
            shape = list(layout.meta_shape(name, cfg))
            key = name.removeprefix("layers.").split(".", 1)[-1].removesuffix(".weight")
            if key in ("attention.wo", "feed_forward.w2"):
                shape[1] //= shards  # row-parallel
            elif len(shape) == 2:
                shape[0] //= shards  # column-parallel, and Llama 3's vocab-parallel embedding
            w = rng.standard_normal(shape, dtype=np.float32) * 0.02
            yield name, w.astype(ml_dtypes.bfloat16)

    for rank in range(shards):
        total += write_pth(os.path.join(src, f"consolidated.{rank:02d}.pth"), pieces(rank))
    return total


def child(mode: str, src: str, dst: str) -> dict:
    code = CHILD.format(root=ROOT)
    run = subprocess.run([sys.executable, "-c", code, mode, src, dst], capture_output=True,
                         text=True)  # fmt: skip
    if run.returncode:
        sys.exit(f"{mode} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--layers", type=int, default=20, help="20 layers of dim 2048: ~2.2 GB bf16")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip the torch.load peer")
    p.add_argument("--plot", help="write a bar chart of peak RSS to this PNG")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()

    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128,
                      n_kv_heads=max(1, args.dim // 256), vocab_size=32000, multiple_of=256,
                      param_dtype="bfloat16", dtype="bfloat16", name="bench-convert")  # fmt: skip
    src, dst = os.path.join(args.workdir, "meta"), os.path.join(args.workdir, "ckpt")
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.perf_counter()
    size = generate(cfg, src, args.shards)
    print(f"generated {size / 2**30:.2f} GiB ({cfg.num_params():,} bf16 parameters, "
          f"{args.shards} shards) in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    largest = max(
        int(np.prod(layout.meta_shape(n, cfg))) * 2 for n in layout.meta_names(cfg)
    )  # fmt: skip
    block = sum(
        int(np.prod(layout.meta_shape(n, cfg))) * 2
        for n in layout.meta_names(cfg)
        if n.startswith("layers.0.")
    )
    try:
        floor = child("floor", src, dst)
        conv = child("convert", src, dst)
        peer = None if args.no_peer else child("torch_load", src, dst)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    gib = 2**30
    rows = [("checkpoint size", size), ("largest tensor", largest), ("one block", block),
            ("floor: python + jax + orbax imported", floor["peak_rss"]),
            ("llama-jax convert peak RSS", conv["peak_rss"])]  # fmt: skip
    if peer:
        rows.append(("peer: torch.load of the same files", peer["peak_rss"]))
    for label, value in rows:
        print(f"{label:40s} {value / gib:7.2f} GiB  ({value / size:6.1%} of the checkpoint)")
    print(f"convert: {conv['bytes'] / gib:.2f} GiB in {conv['seconds']:.1f} s = "
          f"{conv['bytes'] / 2**20 / conv['seconds']:.0f} MiB/s")  # fmt: skip
    above = conv["peak_rss"] - floor["peak_rss"]
    print(f"convert peak RSS above the floor: {above / gib:.2f} GiB = "
          f"{above / largest:.1f} x largest tensor, {above / block:.1f} x a block")  # fmt: skip
    if peer:
        print(
            f"peak RSS ratio convert / torch.load peer: {conv['peak_rss'] / peer['peak_rss']:.2f}"
        )
    ok = conv["peak_rss"] < size / 4
    print(f"goal: peak RSS < 1/4 of the checkpoint: {'met' if ok else 'NOT met'}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [r[0] for r in rows]
        values = [r[1] / gib for r in rows]
        fig, ax = plt.subplots(figsize=(8, 3.2))
        colors = ["C7", "C7", "C7", "C0", "C2", "C1"][: len(rows)]
        ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        ax.axvline(size / 4 / gib, color="C3", ls="--", label="goal: 1/4 of the checkpoint")
        ax.set_xlabel("GiB")
        ax.set_title(f"llama-jax convert, {size / gib:.2f} GiB bf16 Meta checkpoint")
        ax.legend(loc="center right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
