"""Checkpoint conversion: `checkpoint.convert` of a Hugging Face directory, throughput and peak RSS.

Ours converts safetensors to a llama-jax checkpoint on disk; the peer (transformers'
`from_pretrained`) reads the same files into memory. Each runs in a fresh process so
that its peak resident set is its own (ours includes JAX and Orbax).
"""

from __future__ import annotations

import os
import statistics

from benchmarks.harness import Results, peak_rss_mb_of_child, run_peer

OURS = """
from llama_jax.checkpoint import convert
s = convert({src!r}, {dst!r}, force=True, progress=False)
RESULT = {{"seconds": s["seconds"], "bytes": s["bytes"]}}
"""


def run(res: Results, hf: str, workdir: str, repeats: int) -> None:
    dst = os.path.join(workdir, "converted")
    ours = [peak_rss_mb_of_child(OURS.format(src=hf, dst=dst)) for _ in range(repeats)]
    peer = [run_peer("load", hf_dir=hf) for _ in range(repeats)]
    mbs = lambda rs: statistics.median(r["bytes"] / r["seconds"] / 1e6 for r in rs)  # noqa: E731
    rss = lambda rs: statistics.median(r["peak_rss_mb"] for r in rs)  # noqa: E731
    res.add("convert HF -> llama-jax (peer: from_pretrained)", "MB/s", mbs(ours), mbs(peer))
    res.add("convert peak RSS (whole process)", "MB", rss(ours), rss(peer), lower_is_better=True)
