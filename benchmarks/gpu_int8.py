"""The GPU int8 kernel's tiles, chosen by timing a batch-1 decode step's projections.

    python benchmarks/gpu_int8.py --out DIR          # writes DIR/benchmark_gpu_int8.json
    python benchmarks/gpu_int8.py --smoke --out DIR  # tiny shapes, Pallas interpreter (CPU)

1. Correctness: `llama_jax.inference.int8_gpu` against float64 products of the same
   bfloat16 inputs and int8 values on fresh random inputs: every tile candidate before
   it is timed, the chosen tiles on five model shapes afterwards; a relative error over
   1e-4 stops the script.
2. Speed: one jitted function runs every projection of a decode step of one row in
   layer order (wq, wk, wv -> wo -> w1, w3 -> w2, each feeding the next as in a block,
   with distinct weights per layer so nothing stays in the L2 cache; then an untied
   model's output projection) for the `llama3.2-1b` shape (16 layers). Ten calls are
   queued per timing, so the GPU and not Python's dispatch sets the pace. Variants:
   bfloat16 weights through XLA, int8 through XLA's fused product (`Int8Weight`'s path
   without the kernel), and the kernel with each candidate `Tiles`. Printed: ms per
   step and the weight bytes read per second.
3. The fastest tiles are written to the JSON, then timed on the `llama3.1-8b` shape
   (32 layers and the output projection) against the two XLA variants.
   `benchmarks/gpu.py --int8-tiles DIR/benchmark_gpu_int8.json` decodes with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/gpu_int8.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import llama_jax as lj
from benchmarks.harness import machine_record, time_calls
from llama_jax.inference import int8_gpu
from llama_jax.inference.int8_gpu import Tiles

CANDIDATES = [  # programs=1 would never split K; see Tiles
    Tiles(block_n=64, block_k=128, programs=132),
    Tiles(block_n=64, block_k=128, programs=528),
    Tiles(block_n=64, block_k=64, programs=528, min_steps=2),
    Tiles(block_n=64, block_k=128, programs=264, min_steps=4),
    # Wide tiles: each thread loads 16 contiguous bytes of a row and a warp reads 512.
    Tiles(block_n=128, block_k=32, programs=132),
    Tiles(block_n=256, block_k=16, programs=132),
    Tiles(block_n=256, block_k=32, programs=132),
    Tiles(block_n=256, block_k=32, programs=264),
    Tiles(block_n=256, block_k=32, programs=132, num_stages=3, min_steps=4),
    Tiles(block_n=256, block_k=64, programs=132, num_warps=8),
    Tiles(block_n=512, block_k=16, programs=132),
    Tiles(block_n=512, block_k=32, programs=132, num_warps=8),
]
# The same kernel reading bfloat16 weights (scales of one): a one-row product that does
# not go through XLA's. Twice the bytes per element, so half the channels per row.
BF16_CANDIDATES = [
    Tiles(block_n=64, block_k=64, programs=132),
    Tiles(block_n=128, block_k=16, programs=132),
    Tiles(block_n=128, block_k=32, programs=264),
    Tiles(block_n=256, block_k=16, programs=132, num_warps=8),
]


def layer_shapes(cfg) -> dict[str, tuple[int, int]]:
    """[K, N] of each projection in one block."""
    d, hd = cfg.dim, cfg.head_dim
    return {
        "wq": (d, cfg.n_heads * hd),
        "wk": (d, cfg.n_kv_heads * hd),
        "wv": (d, cfg.n_kv_heads * hd),
        "wo": (cfg.n_heads * hd, d),
        "w1": (d, cfg.ffn_hidden_dim),
        "w3": (d, cfg.ffn_hidden_dim),
        "w2": (cfg.ffn_hidden_dim, d),
    }


def make_weights(cfg, layers: int, seed: int) -> list:
    """Per layer, each projection as int8 values and scales keeping activations O(1);
    last, the output projection (None when the model ties it to the embedding)."""
    key = jax.random.key(seed)

    def matrix(k, n):
        nonlocal key
        key, sub = jax.random.split(key)
        values = jax.random.randint(sub, (k, n), -127, 128, jnp.int8)
        return values, jnp.full((n,), 1.0 / (73.0 * math.sqrt(k)), jnp.float32)

    out = [
        {name: matrix(k, n) for name, (k, n) in layer_shapes(cfg).items()} for _ in range(layers)
    ]
    return out + [None if cfg.tie_word_embeddings else matrix(cfg.dim, cfg.vocab_size)]


def product(kind: str, tiles: Tiles | None):
    """x [1, K] bfloat16, (values, scale) -> [1, N] bfloat16 by one of the variants.

    "..._rows8" variants pad x to eight rows (zeros) and keep the first: the same
    weight bytes, but XLA's eight-row product instead of its one-row product.
    """

    def bf16(x, w):
        return jnp.dot(x, w[0], preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    def xla_int8(x, w):
        return int8_gpu._xla(x, *w).astype(jnp.bfloat16)

    def kernel(x, w):
        return int8_gpu._kernel(x, *w, tiles=tiles).astype(jnp.bfloat16)

    def kernel_bf16(x, w):
        return int8_gpu._kernel(x, w[0], jnp.ones_like(w[1]), tiles=tiles).astype(jnp.bfloat16)

    def rows8(fn):
        return lambda x, w: fn(jnp.pad(x, ((0, 7), (0, 0))), w)[:1]

    kinds = {"bf16": bf16, "int8_xla": xla_int8, "kernel": kernel, "kernel_bf16": kernel_bf16}
    kinds.update(bf16_rows8=rows8(bf16), int8_xla_rows8=rows8(xla_int8))
    return kinds[kind]


def step_fn(prod, n_rep: int):
    """Every projection of a decode step, in block order, as one jitted function.

    `weights` is a list of blocks, then (for an untied model) the output projection.
    """

    def run(x, weights):
        *blocks, output = weights
        for block in blocks:
            q = prod(x, block["wq"])
            k = prod(x, block["wk"])
            v = prod(x, block["wv"])
            h = q + jnp.tile(k + v, (1, n_rep))
            h = prod(h, block["wo"]) + x
            f = prod(h, block["w1"]) * prod(h, block["w3"])
            x = prod(f, block["w2"]) + h
        return x if output is None else prod(x, output)

    return jax.jit(run)


def weight_bytes(weights) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights))


def queued(fn, x, w, calls: int):
    for _ in range(calls):
        y = fn(x, w)
    return jax.block_until_ready(y)


def check(candidates, shapes, interpret=False, dtype=jnp.int8) -> float:
    """Largest relative error of the kernel against float64 over tiles x shapes.

    dtype int8: random values and scales; bfloat16: random weights, scales of one.
    """
    rng = np.random.default_rng(int(time.time()))
    worst = 0.0
    for k, n in shapes:
        if dtype == jnp.int8:
            values = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
            scale = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
        else:
            values = jnp.asarray(rng.standard_normal((k, n)), dtype)
            scale = jnp.ones((n,), jnp.float32)
        for _ in range(2):
            x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
            ref = np.asarray(x, np.float64) @ np.asarray(values, np.float64) * np.asarray(scale)
            for tiles in candidates:
                if int8_gpu.plan(k, n, tiles) is None:
                    continue
                y = int8_gpu._kernel(x, values, scale, tiles=tiles, interpret=interpret)
                err = float(np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref))
                if not np.isfinite(err) or err > 1e-4:
                    raise SystemExit(f"kernel wrong: {k}x{n} {np.dtype(dtype)}, {tiles}: {err:.2e}")
                worst = max(worst, err)
    return worst


def tiles_label(kind: str, t: Tiles) -> str:
    return (
        f"{kind} {t.block_n}x{t.block_k} p{t.programs} w{t.num_warps} s{t.num_stages} "
        f"m{t.min_steps}"
    )


def time_variants(cfg, layers, variants, repeats, seed=0, hlo=None):
    """Rows of ms per step for each (label, kind, tiles); `hlo`: a path for the optimized
    HLO of the bfloat16 variant (which products XLA chose)."""
    weights = make_weights(cfg, layers, seed)
    int8_bytes = weight_bytes(weights)
    bf16_weights = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.int8 else a, weights
    )
    bf16_bytes = sum(a.size * 2 for a in jax.tree.leaves(bf16_weights) if a.ndim == 2)
    x = jax.random.normal(jax.random.key(seed + 1), (1, cfg.dim), jnp.bfloat16)
    n_rep = cfg.n_heads // cfg.n_kv_heads
    out = []
    for label, kind, tiles in variants:
        w = bf16_weights if kind.startswith("bf16") or kind == "kernel_bf16" else weights
        nbytes = bf16_bytes if w is bf16_weights else int8_bytes
        fn = step_fn(product(kind, tiles), n_rep)
        t0 = time.perf_counter()
        try:
            jax.block_until_ready(fn(x, w))
        except Exception as e:  # a tile the compiler rejects is reported, not fatal
            print(f"  {label}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        if hlo and kind == "bf16":
            with open(hlo, "w") as f:
                f.write(fn.lower(x, w).compile().as_text())
        # Calls are queued without waiting: the GPU, not Python's dispatch of the many
        # weight arguments, sets the pace.
        t = time_calls(lambda fn=fn, w=w: queued(fn, x, w, 10), repeats, warmup=1)
        t = {k: v / 10 for k, v in t.items() if k != "times"}
        row = {
            "variant": label,
            "ms_per_step": 1e3 * t["median"],
            "weight_gb_per_s": nbytes / t["median"] / 1e9,
            "compile_s": compile_s,
            "tiles": None if tiles is None else dataclasses.asdict(tiles),
        }
        out.append(row)
        print(
            f"  {cfg.name:<12} {label:<40} {row['ms_per_step']:8.3f} ms"
            f"  {row['weight_gb_per_s']:7.0f} GB/s",
            flush=True,
        )
    del weights, bf16_weights
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes in Pallas's interpreter")
    p.add_argument(
        "--xla-only",
        metavar="NAME",
        help="time only XLA's products at 1B (e.g. under other XLA_FLAGS) and write "
        "benchmark_gpu_int8_NAME.json and hlo_bf16_rows1_NAME.txt",
    )
    p.add_argument(
        "--chosen",
        metavar="JSON",
        help="an earlier run's benchmark_gpu_int8.json: skip the sweep and time its chosen "
        "tiles against XLA's products (bfloat16 and int8, one row and padded to eight) at "
        "8B; writes benchmark_gpu_int8_8b.json",
    )
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.smoke:
        print("no GPU: pass --smoke to check the script on the CPU")
        return 2
    start = time.perf_counter()
    results = {"machine": machine_record(sys.argv[1:] if argv is None else argv)}
    results["machine"].update(
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    os.makedirs(args.out, exist_ok=True)
    tag = f"_{args.xla_only}" if args.xla_only else "_8b" if args.chosen else ""
    path = os.path.join(args.out, f"benchmark_gpu_int8{tag}.json")
    hlo = os.path.join(args.out, f"hlo_bf16_rows1{tag}.txt")

    def save():
        results["elapsed_s"] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    if args.smoke:  # the interpreter: small shapes
        worst = check(CANDIDATES, [(256, 128), (512, 64)], True)
        worst = max(worst, check(BF16_CANDIDATES, [(256, 128)], True, jnp.bfloat16))
        print(f"kernel matches float64: worst relative error {worst:.2e}")
        return 0

    small, big = lj.get_preset("llama3.2-1b"), lj.get_preset("llama3.1-8b")
    xla = [
        ("bf16 xla", "bf16", None),
        ("bf16 xla rows8", "bf16_rows8", None),
        ("int8 xla fused", "int8_xla", None),
        ("int8 xla fused rows8", "int8_xla_rows8", None),
    ]
    if args.xla_only:
        results["rows1"] = time_variants(small, small.n_layers, xla, repeats=5, hlo=hlo)
        save()
        print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
        return 0

    if args.chosen:
        with open(args.chosen) as f:
            chosen = Tiles(**json.load(f)["chosen"])
        results["chosen"] = dataclasses.asdict(chosen)
        results["max_relative_error"] = check([chosen], [(4096, 14336), (4096, 128256)])
        save()
        variants = xla + [("kernel chosen", "kernel", chosen)]
        results["rows1_8b"] = time_variants(big, big.n_layers, variants, repeats=5)
        save()
        print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
        return 0

    # Every candidate once before it is timed; the chosen tiles on more shapes at the end.
    worst = check(CANDIDATES, [(2048, 512)])
    worst = max(worst, check(BF16_CANDIDATES, [(2048, 512)], dtype=jnp.bfloat16))
    save()
    kernels = {tiles_label("kernel", t): t for t in CANDIDATES}
    kernels_bf16 = {tiles_label("kernel bf16", t): t for t in BF16_CANDIDATES}
    one = (
        xla
        + [(name, "kernel", tiles) for name, tiles in kernels.items()]
        + [(name, "kernel_bf16", tiles) for name, tiles in kernels_bf16.items()]
    )
    results["rows1"] = time_variants(small, small.n_layers, one, repeats=5, hlo=hlo)
    save()

    def fastest(names):
        timed = [r for r in results["rows1"] if r["variant"] in names]
        return names[min(timed, key=lambda r: r["ms_per_step"])["variant"]]

    chosen, chosen_bf16 = fastest(kernels), fastest(kernels_bf16)
    results["chosen"] = dataclasses.asdict(chosen)
    results["chosen_bf16"] = dataclasses.asdict(chosen_bf16)
    print(f"chosen: {chosen}; bfloat16 weights: {chosen_bf16}", flush=True)
    shapes = [(2048, 512), (8192, 2048), (3072, 8192), (4096, 14336), (4096, 128256)]
    worst = max(worst, check([chosen], shapes), check([chosen_bf16], shapes, dtype=jnp.bfloat16))
    results["max_relative_error"] = worst
    print(f"kernel matches float64: worst relative error {worst:.2e}", flush=True)
    save()

    final = xla[:3] + [
        ("kernel chosen", "kernel", chosen),
        ("kernel 64x128 p132 (earlier default)", "kernel", Tiles()),
        ("kernel bf16 chosen", "kernel_bf16", chosen_bf16),
    ]
    results["rows1_8b"] = time_variants(big, big.n_layers, final, repeats=5)
    save()
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
