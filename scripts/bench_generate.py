"""Generation speed of `llama_jax.generate` against transformers' `generate`, in one run.

    .venv/bin/python scripts/bench_generate.py                       # bench-134m, B = 1, 8, 32
    .venv/bin/python scripts/bench_generate.py --preset tiny --batches 1 2 --no-write

Both sides get the same random weights (transformers' LlamaForCausalLM, converted with
the checkpoint layout code) in float32, ours with per-layer arrays
(`model.unstack_layers`, as `llama-jax generate` and `chat` use it), the same
left-padded prompts, and greedy decoding without stop tokens, and are measured the same
way, end to end through their public `generate`: prefill tokens/s from a call that makes
1 new token (B * T / time), decode tokens/s from the extra time of a call that makes
N + 1 (B * N / (time(N+1) - time(1))).
Each call runs once untimed first (llama-jax compiles there; its compile time is
reported apart), then the best of `--repeats` is kept.

Results print as they come; unless --no-write, the "Generation" section of
docs/benchmarks.md is replaced with a table (machine, date, load) and a plot is written
to docs/bench_generate.png.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import llama_jax as lj  # noqa: E402
from llama_jax.checkpoint.configs import config_to_hf  # noqa: E402
from llama_jax.checkpoint.layout import params_from_hf  # noqa: E402
from llama_jax.model import set_params, unstack_layers  # noqa: E402


def make_models(cfg: lj.LlamaConfig, seed: int = 0):
    """(transformers model, llama-jax model) with the same random float32 weights."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).float().eval()
    hf.generation_config.eos_token_id = None
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = unstack_layers(
        set_params(lj.Transformer(cfg, rngs=nnx.Rngs(0)), params_from_hf(state, cfg))
    )
    return hf, ours


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` random prompts; the first has `length` tokens, the others up to 25% fewer."""
    rng = np.random.default_rng(seed)
    lengths = [length] + rng.integers(length * 3 // 4, length + 1, size=batch - 1).tolist()
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def hf_generate(hf, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate over left-padded prompts; the new ids per row."""
    P = max(map(len, prompts))
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[:, P:].tolist()


def ours_generate(model, prompts, new_tokens: int) -> list[list[int]]:
    """llama-jax greedy generate (its result is fetched to the host, so it is finished)."""
    return list(lj.generate(model, prompts, new_tokens))


def best_time(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(gen, model, prompts, new_tokens: int, repeats: int) -> dict[str, float]:
    """Prefill and decode tokens/s of one generate function (see the module docstring).

    Returns:
      {"prefill_tps", "decode_tps", "first_call_s"}; first_call_s is the untimed
      first call of the 1-token generate (llama-jax's prefill compile happens there).
    """
    start = time.perf_counter()
    gen(model, prompts, 1)
    first = time.perf_counter() - start
    gen(model, prompts, new_tokens + 1)
    t1 = best_time(lambda: gen(model, prompts, 1), repeats)
    tn = best_time(lambda: gen(model, prompts, new_tokens + 1), repeats)
    B = len(prompts)
    tokens = sum(map(len, prompts))
    return {
        "prefill_tps": tokens / t1,
        "decode_tps": B * new_tokens / max(tn - t1, 1e-9),
        "first_call_s": first,
    }


def machine() -> str:
    """A one-line description of this machine and its load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    device = jax.devices()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, JAX on {device.platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; load average {load:.1f} at the start"
    )


def write_results(rows, args, desc: str, agree: bool) -> None:
    """Replace the "Generation" section of docs/benchmarks.md and draw the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = ROOT / "docs"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(rows))
    for ax, key, title in zip(axes, ("prefill_tps", "decode_tps"), ("prefill", "decode"),
                              strict=True):  # fmt: skip
        ax.bar(x - 0.2, [r["ours"][key] for r in rows], 0.4, label="llama-jax")
        ax.bar(x + 0.2, [r["hf"][key] for r in rows], 0.4, label="transformers")
        ax.set_xticks(x, [f"B={r['batch']}" for r in rows])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{title} ({args.preset}, float32)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "bench_generate.png", dpi=110)

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d, finished %H:%M UTC")
    lines = [
        "## Generation",
        "",
        f"`python scripts/bench_generate.py` ({date}; GLIBC_TUNABLES="
        f"{os.environ.get('GLIBC_TUNABLES', 'unset')}): `{args.preset}` in float32, greedy, "
        f"prompts of up to {args.prompt_len} tokens (left-padded), {args.new_tokens} new "
        "tokens, both sides through their public `generate` (ours on `unstack_layers(model)`, "
        "as the `generate` command runs it), best of "
        f"{args.repeats}. Machine: {desc}, {os.getloadavg()[0]:.1f} at the end.",
        "",
        "![generation speed](bench_generate.png)",
        "",
        "| batch | prefill tok/s llama-jax | transformers | ratio | decode tok/s llama-jax "
        "| transformers | ratio | llama-jax first call (compile) s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, h = r["ours"], r["hf"]
        lines.append(
            f"| {r['batch']} | {o['prefill_tps']:.0f} | {h['prefill_tps']:.0f} | "
            f"{o['prefill_tps'] / h['prefill_tps']:.2f} | {o['decode_tps']:.1f} | "
            f"{h['decode_tps']:.1f} | {o['decode_tps'] / h['decode_tps']:.2f} | "
            f"{o['first_call_s']:.1f} |"
        )
    lines += [
        "",
        "Ratio > 1: llama-jax is faster. Greedy tokens of both sides "
        + ("agreed" if agree else "DID NOT agree")
        + " on the batch-1 check. On a shared machine (load average above the core count) "
        "every figure is depressed and noisy, PyTorch's threads more than XLA's; the ratios "
        "come from the same run, back to back, but are not a clean-machine comparison.",
        "",
    ]
    section = "\n".join(lines)
    path = docs / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Generation\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: section + "\n", text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section
    )  # fmt: skip
    path.write_text(text)
    print(f"wrote {path} and {docs / 'bench_generate.png'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-134m")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    cfg = lj.get_preset(args.preset)
    desc = machine()
    print(desc)
    hf, ours = make_models(cfg)
    rows = []
    for B in args.batches:
        prompts = make_prompts(B, args.prompt_len, cfg.vocab_size, seed=B)
        o = measure(ours_generate, ours, prompts, args.new_tokens, args.repeats)
        h = measure(hf_generate, hf, prompts, args.new_tokens, args.repeats)
        rows.append({"batch": B, "ours": o, "hf": h})
        print(
            f"B={B:3d}  prefill tok/s {o['prefill_tps']:9.0f} vs {h['prefill_tps']:9.0f} "
            f"({o['prefill_tps'] / h['prefill_tps']:.2f}x)   decode tok/s "
            f"{o['decode_tps']:8.1f} vs {h['decode_tps']:8.1f} "
            f"({o['decode_tps'] / h['decode_tps']:.2f}x)   first call {o['first_call_s']:.1f} s",
            flush=True,
        )
    check = make_prompts(1, args.prompt_len, cfg.vocab_size, seed=99)
    agree = ours_generate(ours, check, 16) == hf_generate(hf, check, 16)
    print(f"greedy tokens agree with transformers at batch 1: {agree}")
    if not args.no_write:
        write_results(rows, args, desc, agree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
