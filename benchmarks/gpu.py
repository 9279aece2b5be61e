"""GPU figures on one NVIDIA GPU: MFU, decode against HBM, int8 decode, prefill.

    pip install -e . && pip install -U "jax[cuda12]"     # or jax[cuda13] for CUDA 13 drivers
    python benchmarks/gpu.py --out DIR                    # writes DIR/benchmark_gpu.json
    python benchmarks/gpu.py --smoke --out DIR            # tiny shapes on any backend (CPU)

Figures, all through the library's entry points on random weights in bfloat16, in this
order (`--sections` picks some; `--budget S` starts no new one after S seconds):

- the card's measured ceilings: bfloat16 matmul FLOP/s (8192^3) and copy bandwidth
  (`x + 1` over 2 GiB, bytes read plus written);
- decode: `llama3.2-1b` (1.24B parameters) at batch 1 and 8 through `llama_jax.generate`,
  tokens/s and the weight bytes read per second as a fraction of the copy bandwidth;
- kvcache: the same model at batch 1 and 8 over a cache of 8192 slots, with the
  bfloat16 cache and with the int8 one (`cache_dtype="int8"`);
- int8: the same model quantized in place (`llama_jax.inference.int8.quantize`), decoded
  the same way (one-row products as the library does them), against bfloat16;
- int8kernel: int8 again with one-row products by the Pallas kernel
  (`int8_gpu.ONE_ROW = "kernel"`, tiles from `--int8-tiles`), at 1B and (with big) 8B;
- train: `training.Trainer.step` on 4 x 2048 tokens, bfloat16 compute, cuDNN attention,
  no remat; MFU against the data-sheet peak (`llama_jax.perf.PEAK_FLOPS`) and against
  the measured matmul rate;
- prefill: 1 x 2048, `model(x)` (compiled, model/compiled.py) with attention "xla" and
  "cudnn";
- big: `llama3.1-8b` decoded at batch 1 in bfloat16, then in int8;
- train8: 8 x 2048 tokens in one batch;
- train2x: 8 x 2048 tokens as two micro-batches of 4.

The JSON is rewritten after every figure, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/gpu.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import llama_jax as lj
from benchmarks.harness import load_average, machine_record, time_calls
from llama_jax.inference import int8_gpu
from llama_jax.inference.generate import bucket_length, default_cache_len
from llama_jax.model import Transformer, count_params
from llama_jax.perf import PEAK_FLOPS, model_flops_per_token
from llama_jax.training import TrainConfig, Trainer

DEFAULT_ONE_ROW = int8_gpu.ONE_ROW


def sync(x):
    return jax.block_until_ready(x)


def ceilings(smoke: bool) -> dict:
    """Measured bfloat16 matmul FLOP/s and copy bytes/s (read + write) of the device."""
    n = 256 if smoke else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    t_mm = time_calls(lambda: sync(mm(a)), 5)
    count = (1 << 20) if smoke else (1 << 30)  # bfloat16 elements: 2 MiB or 2 GiB
    x = jnp.ones((count,), jnp.bfloat16)
    add = jax.jit(lambda x: x + 1)
    t_cp = time_calls(lambda: sync(add(x)), 5)
    return {"matmul_flops": 2 * n**3 / t_mm["min"], "copy_bytes": 2 * 2 * count / t_cp["min"]}


def make_trainer(cfg, tc, attention: str) -> Trainer:
    """A Trainer whose model computes attention with `attention`.

    Uses TrainConfig's own field when it has one; otherwise the trainer's graph
    definition is rebuilt with the kernel (the step is traced from it on first call).
    """
    if "attention" in {f.name for f in dataclasses.fields(TrainConfig)}:
        return Trainer(cfg, dataclasses.replace(tc, attention=attention))
    trainer = Trainer(cfg, tc)
    abstract = nnx.eval_shape(
        lambda: Transformer(trainer.cfg, rngs=nnx.Rngs(0), remat=tc.remat, attention=attention)
    )
    trainer.graphdef = nnx.graphdef(abstract)
    return trainer


def training(
    cfg, batch: int, seq: int, attention: str, roof: dict, repeats: int, micro: int = 1
) -> dict:
    tc = TrainConfig(
        batch_size=batch,
        micro_batches=micro,
        seq_len=seq,
        compute_dtype="bfloat16",
        steps=100,
        warmup_steps=10,
    )
    trainer = make_trainer(cfg, tc, attention)
    params = trainer.init_params()
    state = [params, trainer.init_opt_state(params)]
    rows = np.random.default_rng(0).integers(3, cfg.vocab_size, (micro, batch // micro, seq + 1))
    data = trainer.put_batch(
        {
            "tokens": rows[..., :-1].astype(np.int32),
            "targets": rows[..., 1:].astype(np.int32),
            "weights": np.ones(rows[..., 1:].shape, np.float32),
        }
    )

    def step():
        state[0], state[1], metrics = trainer.step(state[0], state[1], data)
        sync(metrics["loss"])

    t = time_calls(step, repeats, warmup=2)
    tokens_s = batch * seq / t["median"]
    flops = model_flops_per_token(cfg, seq) * tokens_s
    peak = next(
        (v for k, v in PEAK_FLOPS.items() if jax.devices()[0].device_kind.startswith(k)), None
    )
    return {
        "tokens_per_s": tokens_s,
        "seconds_per_step": t["median"],
        "mfu_datasheet": None if peak is None else flops / peak,
        "mfu_measured": flops / roof["matmul_flops"],
    }


def decode(
    model, batch: int, prompt: int, new: int, roof: dict, repeats: int, slots=None, cache=None
) -> dict:
    """Decode tokens/s of `lj.generate` and weight bytes per second over the copy bandwidth.

    `slots`: the cache's size (default: what `generate` picks for the prompt and the new
    tokens); `cache`: its dtype (`cache_dtype`; default the model's).
    """
    cfg = model.cfg
    rows = np.random.default_rng(1).integers(3, cfg.vocab_size, (batch, prompt)).tolist()
    # One cache size for both calls: one compilation, and the steps timed at that size.
    if slots is None:
        slots = default_cache_len(bucket_length(prompt, cfg.max_seq_len), new, cfg.max_seq_len)
    kw = dict(cache_len=slots, cache_dtype=cache)
    one = time_calls(lambda: lj.generate(model, rows, 1, **kw), repeats)
    many = time_calls(lambda: lj.generate(model, rows, new, **kw), repeats)
    step_s = (many["median"] - one["median"]) / (new - 1)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    read = weights - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.dim * 2)
    return {
        "tokens_per_s": batch / step_s,
        "ms_per_step": 1e3 * step_s,
        "weight_bytes_per_s": read / step_s,
        "fraction_of_copy_bandwidth": read / step_s / roof["copy_bytes"],
    }


def prefill(cfg, length: int, attention: str, repeats: int) -> dict:
    model = lj.build_model(cfg, seed=0, attention=attention)
    x = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (1, length)), jnp.int32)
    t = time_calls(lambda: sync(model(x)), repeats, warmup=2)
    return {"tokens_per_s": length / t["median"], "seconds": t["median"]}


SECTIONS = (
    "decode",
    "kvcache",
    "int8",
    "int8kernel",
    "train",
    "prefill",
    "big",
    "train8",
    "train2x",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for benchmark_gpu.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on any backend")
    p.add_argument(
        "--int8-tiles",
        metavar="JSON",
        help="benchmark_gpu_int8.json from benchmarks/gpu_int8.py: decode int8 with its "
        "chosen tiles instead of the library's",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0,
        metavar="S",
        help="skip the figures not yet started once S seconds have passed (0: no limit)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated figures to take, in this order: {','.join(SECTIONS)} (default: all)",
    )
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        p.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    smoke = args.smoke
    start = time.perf_counter()
    device = jax.devices()[0]
    if device.platform != "gpu" and not smoke:
        print(
            f"no GPU: JAX runs on {device.platform} ({device.device_kind}); install "
            "jax[cuda12] on a CUDA machine, or pass --smoke to check the script."
        )
        return 2
    if args.int8_tiles:
        try:
            with open(args.int8_tiles) as f:
                chosen = json.load(f)["chosen"]
        except (OSError, ValueError, KeyError) as e:  # a tiling run cut short: no choice
            print(f"--int8-tiles {args.int8_tiles}: no chosen tiles ({e}); using the library's")
            args.int8_tiles = None
        else:
            fields = {f.name for f in dataclasses.fields(int8_gpu.Tiles)}
            int8_gpu.TILES = int8_gpu.Tiles(**{k: v for k, v in chosen.items() if k in fields})
    base = lj.get_preset("tiny" if smoke else "llama3.2-1b")
    big = lj.get_preset("tiny" if smoke else "llama3.1-8b")
    cfg = base.replace(dtype="bfloat16", param_dtype="bfloat16")
    batch, seq = (2, 64) if smoke else (4, 2048)
    prompt, new = (16, 9) if smoke else (128, 65)
    repeats = 2 if smoke else 5
    # cuDNN needs a GPU; the smoke run checks the same code with the reference kernel.
    fused = "xla" if smoke else "cudnn"

    record = machine_record(sys.argv[1:] if argv is None else argv)
    record.update(
        device=device.device_kind,
        jax=jax.__version__,
        smoke=smoke,
        preset=base.name,
        parameters=count_params(lj.abstract_model(cfg)),
    )
    if args.int8_tiles:
        record["int8_tiles"] = dataclasses.asdict(int8_gpu.TILES)
    results: dict = {"machine": record, "skipped": []}

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "benchmark_gpu.json")

    def row(name, value, note=""):
        # The JSON is rewritten after every figure: a run cut short keeps what it measured.
        elapsed = time.perf_counter() - start
        print(f"{elapsed:5.0f}s {name:<40} {value:>14} {note}", flush=True)
        record["load_average_end"] = load_average()
        record["elapsed_s"] = elapsed
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    def in_budget(name, section):
        if section not in sections:
            return False
        if args.budget and time.perf_counter() - start > args.budget:
            results["skipped"].append(name)
            row(name, "skipped", f"(past --budget {args.budget:.0f} s)")
            return False
        return True

    roof = ceilings(smoke)
    results["ceilings"] = roof
    row("bf16 matmul (measured)", f"{roof['matmul_flops'] / 1e12:.1f} TFLOP/s")
    row("copy bandwidth (measured, read+write)", f"{roof['copy_bytes'] / 1e12:.2f} TB/s")

    def decode_rows(model, label, sizes, key):
        results["decode"][key] = figures = {}
        for b in sizes:
            figures[f"batch{b}"] = d = decode(model, b, prompt, new, roof, repeats)
            row(
                f"{label} decode batch {b} bf16",
                f"{d['tokens_per_s']:.0f} tok/s",
                f"{d['ms_per_step']:.2f} ms/step, weights at "
                f"{100 * d['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth",
            )

    def cache_rows(model, label, sizes, key, slots):
        """Decode over `slots` cache slots with the model's cache and with the int8 one."""
        figures = results["decode"][key]
        for b in sizes:
            plain = decode(model, b, prompt, new, roof, repeats, slots)
            int8 = decode(model, b, prompt, new, roof, repeats, slots, "int8")
            int8["vs_bfloat16_cache"] = int8["tokens_per_s"] / plain["tokens_per_s"]
            figures[f"batch{b}_{slots}slots"] = plain
            figures[f"batch{b}_{slots}slots_int8cache"] = int8
            row(
                f"{label} decode batch {b}, {slots} slots",
                f"{plain['tokens_per_s']:.0f} tok/s",
                f"int8 cache {int8['tokens_per_s']:.0f} tok/s "
                f"({int8['vs_bfloat16_cache']:.2f}x the bfloat16 cache)",
            )

    def int8_rows(model, label, sizes, key, one_row=None):
        """Quantize `model` in place (one weight at a time), then decode it as bfloat16 was.

        `one_row`: how one-row int8 products run (`int8_gpu.ONE_ROW`; None: the library's).
        """
        from llama_jax.inference.int8 import quantize

        quantize(model)
        one_row = one_row or DEFAULT_ONE_ROW
        int8_gpu.ONE_ROW = one_row
        jax.clear_caches()  # the decode functions are traced again with this choice
        figures = results["decode"][key]
        suffix = "" if one_row == DEFAULT_ONE_ROW else f"_{one_row}"
        for b in sizes:
            d = decode(model, b, prompt, new, roof, repeats)
            d["vs_bfloat16"] = d["tokens_per_s"] / figures[f"batch{b}"]["tokens_per_s"]
            figures[f"batch{b}_int8{suffix}"] = d
            row(
                f"{label} decode batch {b} int8 {one_row}",
                f"{d['tokens_per_s']:.0f} tok/s",
                f"{d['ms_per_step']:.2f} ms/step, {d['vs_bfloat16']:.2f}x bfloat16",
            )

    results["decode"] = {}
    if in_budget(f"{base.name} decode", "decode"):
        model = lj.build_model(cfg, seed=0)
        decode_rows(model, base.name, (1, 8), "small")
        if in_budget(f"{base.name} int8 KV cache", "kvcache"):
            cache_rows(model, base.name, (1, 8), "small", min(8192, cfg.max_seq_len))
        if in_budget(f"{base.name} int8 decode", "int8"):
            int8_rows(model, base.name, (1, 8), "small")
        if in_budget(f"{base.name} int8 decode, kernel", "int8kernel"):
            int8_rows(model, base.name, (1,), "small", "kernel")
        del model

    def train_row(rows, key, section, micro=1):
        name = f"train {rows}x{seq}" + (f" in {micro} micro-batches" if micro > 1 else "")
        if not in_budget(name, section):
            return
        tr = training(cfg, rows, seq, fused, roof, repeats, micro)
        results[key] = {"batch": rows, "micro_batches": micro, "seq": seq, "attention": fused}
        results[key].update(tr)
        mfu = "n/a" if tr["mfu_datasheet"] is None else f"{100 * tr['mfu_datasheet']:.1f}%"
        row(
            name + f" bf16, {fused}",
            f"{tr['tokens_per_s']:.0f} tok/s",
            f"MFU {mfu} of data sheet, {100 * tr['mfu_measured']:.1f}% of measured",
        )
        jax.clear_caches()

    train_row(batch, "train", "train")

    results["prefill"] = {}
    for attention in dict.fromkeys(("xla", fused)):
        if in_budget(f"prefill {attention}", "prefill"):
            pf = prefill(cfg, seq, attention, repeats)
            results["prefill"][attention] = pf
            row(f"prefill 1x{seq}, attention={attention}", f"{pf['tokens_per_s']:.0f} tok/s")

    if in_budget(f"{big.name} decode", "big"):
        jax.clear_caches()
        model = lj.build_model(big.replace(dtype="bfloat16", param_dtype="bfloat16"), seed=0)
        decode_rows(model, big.name, (1,), "big")
        int8_rows(model, big.name, (1,), "big")
        if "int8kernel" in sections:
            int8_rows(model, big.name, (1,), "big", "kernel")
        del model

    train_row(2 * batch, "train_8", "train8")
    train_row(2 * batch, "train_2x", "train2x", micro=2)

    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
