"""Plain vs speculative greedy decoding of SmolLM2-135M-Instruct, drafts of its first layers.

Run from the repository root in a plain process:

    python scripts/bench_speculative.py 6,10,15 1,2,4

(the draft sizes in layers, then the values of k). Prints one JSON line per setting:
tokens/s over four prompts of 64 new tokens at batch 1 (compilation excluded), the
speed-up over plain `generate`, the acceptance rate, and whether the tokens equal plain
greedy decoding's.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import llama_jax as lj
from llama_jax.checkpoint.convert import convert
from llama_jax.inference.speculative import draft_from_layers, speculative_generate

sys.path.insert(0, os.getcwd())
from tests.smollm2 import gguf_file  # noqa: E402

ckpt = Path(tempfile.gettempdir()) / "llama-jax-smollm2"
if not (ckpt / "llama_jax.json").exists():
    convert(gguf_file(), ckpt, progress=False)
model, tok = lj.load(ckpt), lj.Tokenizer.load(ckpt)
prompts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
    "The three primary colors are",
]
ids = [[tok.encode(p, bos=True)] for p in prompts]
NEW = 64
stops = sorted(tok.stop_ids)


def timed(fn):
    fn(ids[0])  # compile
    n, seconds, results = 0, 0.0, []
    for x in ids:
        start = time.perf_counter()
        g = fn(x)
        seconds += time.perf_counter() - start
        n += len(g[0])
        results.append(g)
    return n / seconds, results


plain_tps, plain = timed(lambda x: lj.generate(model, x, NEW, stop_ids=stops))
print(json.dumps({"draft_layers": None, "k": 0, "tok_s": round(plain_tps, 2)}), flush=True)
for n in (int(a) for a in sys.argv[1].split(",")):
    draft = draft_from_layers(model, n)
    for k in (int(a) for a in sys.argv[2].split(",")):
        run = lambda x, k=k, draft=draft: speculative_generate(
            model, draft, x, NEW, stop_ids=stops, speculate_k=k
        )
        tps, res = timed(run)
        same = all(a[0] == b[0] for a, b in zip(res, plain, strict=True))
        rate = sum(g.acceptance_rate for g in res) / len(res)
        line = {
            "draft_layers": n,
            "k": k,
            "tok_s": round(tps, 2),
            "speedup": round(tps / plain_tps, 3),
            "acceptance": round(rate, 3),
            "same_as_greedy": same,
        }
        print(json.dumps(line), flush=True)
