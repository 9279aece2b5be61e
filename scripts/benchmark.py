"""Speed of llama-jax against transformers (PyTorch) on the same machine, in one run.

    python scripts/benchmark.py                          # bench-134m, every section (< 10 min)
    python scripts/benchmark.py --preset tiny --quick    # seconds: checks the script itself
    python scripts/benchmark.py --sections roofline,decode --json out.json --plot ratios.png
    python scripts/benchmark.py --gpu --out DIR          # on a GPU: ~1B training MFU, decode

CPU mode builds one random model, gives transformers' LlamaForCausalLM the same weights
(after checking that both produce the same logits), and times each figure for both back
to back, interleaved, taking medians, because a shared machine is noisy. Figures:

    roofline   the machine: float32/bfloat16 matmul FLOP/s, matrix-vector bytes/s
    prefill    forward over B x T prompt tokens (tokens/s), compile time
    decode     greedy decode steps over a KV cache at batch 1, 8, 32 (tokens/s), with the
               bytes a step must read (weights + the filled part of the cache) as roofline
    bf16       decode at batch 1 with bfloat16 parameters, against float32
    train      forward + backward + AdamW update (tokens/s, MFU against the measured matmul)
    convert    HF safetensors -> llama-jax checkpoint, in a child process (MB/s, peak RSS);
               the peer is transformers' from_pretrained of the same files

Each figure prints as it is measured; a table with the ratio ours/peer closes the run
(ratio > 1 means llama-jax is faster, or for peak RSS, that it uses more memory).

GPU mode (--gpu) measures the card's bf16 matmul rate and copy bandwidth, the training
MFU of a Llama 3.2 1B-shaped model in bfloat16, and batch-1 decode against the HBM
roofline; it writes results as it goes to --out (JSON), and a failing section does not
stop the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from llama_jax.attention import attention_implementation  # noqa: E402
from llama_jax.layers import dense  # noqa: E402

from llama_jax.config import LlamaConfig, get_preset  # noqa: E402
from llama_jax.model import build_model, set_params, unstack_layers  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import torch_in_child  # noqa: E402

SECTIONS = ("roofline", "prefill", "decode", "bf16", "train", "convert")


# --------------------------------------------------------------------------- timing


def _sync(x):
    """Wait for a jax or torch result."""
    if isinstance(x, jax.Array) or isinstance(x, (tuple, list, dict)):
        jax.block_until_ready(x)
    return x


def paired(ours, peer, repeats: int) -> tuple[float, float | None]:
    """Median seconds of two callables: a warm-up call of each, then each one's repeats.

    The repeats of one side run back to back, as in a real decode or training loop, not
    alternating with the other side: in one process the two frameworks disturb each other
    (allocator, caches). Alternating them cost our train step a quarter of its speed (154
    vs 214 tokens/s) while PyTorch's was unchanged. Run on a quiet machine: the two sides
    are measured a few seconds apart.
    """
    ours()
    if peer is not None:
        peer()

    def times(fn):
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return float(np.median(out))

    t_ours = times(ours)
    return t_ours, (times(peer) if peer is not None else None)


class Results:
    """Rows of (section, figure, ours, peer, unit, note), printed as they come."""

    def __init__(self, json_path: str | None):
        self.rows: list[dict] = []
        self.info: dict = {}
        self.json_path = json_path

    def add(self, section, figure, ours, peer=None, unit="", note="", higher_is_better=True):
        ratio = None
        if ours is not None and peer not in (None, 0):
            ratio = ours / peer
        row = dict(section=section, figure=figure, ours=ours, peer=peer, unit=unit,
                   ratio=ratio, note=note, higher_is_better=higher_is_better)  # fmt: skip
        self.rows.append(row)
        peer_s = "" if peer is None else f"  peer {_fmt(peer)}"
        ratio_s = "" if ratio is None else f"  ratio {ratio:.2f}x"
        print(f"  {figure:<34} {_fmt(ours):>10} {unit:<9}{peer_s}{ratio_s}  {note}", flush=True)
        self.save()

    def save(self):
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"info": self.info, "rows": self.rows}, f, indent=1)

    def table(self) -> str:
        lines = [
            f"{'figure':<36} {'llama-jax':>11} {'transformers':>13} {'ratio':>7}  unit",
            "-" * 80,
        ]
        for r in self.rows:
            peer = "" if r["peer"] is None else _fmt(r["peer"])
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            lines.append(
                f"{r['figure']:<36} {_fmt(r['ours']):>11} {peer:>13} {ratio:>7}  {r['unit']}"
            )
        return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


@contextlib.contextmanager
def section(name: str, results: Results):
    """Print a header; report (not raise) an error so that later sections still run."""
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except Exception as e:  # a failed section is reported, the run goes on
        traceback.print_exc()
        results.add(name, f"{name}: FAILED", None, note=f"{type(e).__name__}: {e}"[:200])
    print(f"   ({name}: {time.perf_counter() - t0:.0f}s)", flush=True)


# --------------------------------------------------------------------------- peers


def torch_peer(cfg: LlamaConfig, threads: int):
    """transformers' LlamaForCausalLM with random weights, and our model with the same."""
    import torch
    import transformers

    from llama_jax.checkpoint.configs import config_to_hf
    from llama_jax.checkpoint.layout import params_from_hf

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg.replace(param_dtype="float32")))
    hf_cfg._attn_implementation = "sdpa"  # transformers' fastest CPU attention
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = set_params(build_model(cfg), params_from_hf(state, cfg))
    return hf, ours


def check_same_logits(hf, ours, cfg) -> float:
    """Largest logit difference relative to the largest logit, on 16 random tokens."""
    import torch

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.float().numpy()
    got = np.asarray(ours(jnp.asarray(tokens, jnp.int32)))
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# --------------------------------------------------------------------------- sections


def measure_roofline(res: Results, quick: bool) -> dict:
    """float32/bf16 matmul FLOP/s and matrix-vector streaming bytes/s, jax and torch."""
    import torch

    n = 1024 if quick else 2048
    rep = 3 if quick else 5
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    # The model's own product (layers.dense): for bfloat16 on the CPU a float32 result
    # and at least two rows, which is what puts XLA on its fast bfloat16 kernels.
    mm = jax.jit(dense)
    out = {}
    for name, jdt, tdt in [("float32", jnp.float32, torch.float32),
                           ("bfloat16", jnp.bfloat16, torch.bfloat16)]:  # fmt: skip
        ja = jnp.asarray(a, jdt)
        ta = torch.from_numpy(a).to(tdt)
        t_j, t_t = paired(lambda ja=ja: _sync(mm(ja, ja)), lambda ta=ta: ta @ ta, rep)
        fl = 2 * n**3
        res.add("roofline", f"matmul {n}^3 {name}", fl / t_j / 1e9, fl / t_t / 1e9, "GFLOP/s")
        out[f"matmul_{name}"] = max(fl / t_j, fl / t_t)
    # Matrix-vector: streams a matrix far larger than the caches, like a decode step.
    rows, cols = (2048, 8192) if quick else (8192, 8192)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal((1, rows), dtype=np.float32)
    for name, jdt, tdt, size in [("float32", jnp.float32, torch.float32, 4),
                                 ("bfloat16", jnp.bfloat16, torch.bfloat16, 2)]:  # fmt: skip
        jw, jx = jnp.asarray(w, jdt), jnp.asarray(x, jdt)
        tw, tx = torch.from_numpy(w).to(tdt), torch.from_numpy(x).to(tdt)
        t_j, t_t = paired(lambda jw=jw, jx=jx: _sync(mm(jx, jw)), lambda tw=tw, tx=tx: tx @ tw, rep)
        nb = rows * cols * size
        res.add("roofline", f"matvec stream {name}", nb / t_j / 1e9, nb / t_t / 1e9, "GB/s")
        out[f"bandwidth_{name}"] = max(nb / t_j, nb / t_t)
    # The memory roofline is the best streaming rate either framework reaches.
    out["bandwidth"] = max(out["bandwidth_float32"], out["bandwidth_bfloat16"])
    return out


def measure_prefill(res, cfg, hf, ours, batch, seq, repeats, peaks):
    import torch

    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, seq))
    jt, tt = jnp.asarray(tokens, jnp.int32), torch.tensor(tokens)
    t0 = time.perf_counter()
    fwd.lower(state, jt).compile()
    res.add("prefill", "prefill compile", time.perf_counter() - t0, unit="s")

    def peer():
        with torch.no_grad():
            return hf(tt, use_cache=False).logits

    t_j, t_t = paired(lambda: _sync(fwd(state, jt)), peer, repeats)
    ntok = batch * seq
    res.add("prefill", f"prefill {batch}x{seq}", ntok / t_j, ntok / t_t, "tokens/s")
    flops = cfg.flops_per_token(seq) * ntok
    res.add("prefill", "prefill achieved", flops / t_j / 1e9, flops / t_t / 1e9, "GFLOP/s",
            note=f"matmul peak {peaks.get('matmul_float32', 0) / 1e9:.0f} GFLOP/s")  # fmt: skip


def decode_bytes(cfg: LlamaConfig, batch: int, context: int, param_bytes: int, kv_bytes: int):
    """Bytes one decode step must read: every weight matrix once (not the embedding table,
    of which it gathers B rows, unless it doubles as the tied output) plus the keys and
    values of `context` filled slots per row."""
    D, V = cfg.dim, cfg.vocab_size
    weights = cfg.num_params() - (0 if cfg.tie_word_embeddings else V * D)
    kv = 2 * cfg.n_layers * batch * context * cfg.kv_heads * cfg.head_dim
    return weights * param_bytes + kv * kv_bytes


def our_decoder(model, cache_len: int):
    """(prefill, step) jitted for greedy decoding with the cache donated (updated in place)."""
    graphdef, state = nnx.split(model)

    @partial(jax.jit, donate_argnums=(2,))
    def prefill(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    @partial(jax.jit, donate_argnums=(2,))
    def step(state, token, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    return state, prefill, step


def decode_loop(model):
    """n greedy decode steps in one jitted on-device loop (no Python between tokens)."""
    graphdef, _ = nnx.split(model)

    @partial(jax.jit, static_argnums=(3,), donate_argnums=(2,))
    def loop(state, token, cache, n):
        def body(_, carry):
            token, cache = carry
            logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, n, body, (token, cache))

    return loop


def time_decode_pair(cfg, hf, ours, batch, prompt, steps, repeats):
    """Median seconds per decode step for ours and the peer; compile seconds of our step."""
    import torch

    cache_len = prompt + steps * (repeats + 2) + 1
    state, prefill, step = our_decoder(ours, cache_len)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (batch, prompt))
    jt, tt = jnp.asarray(tokens, jnp.int32), torch.tensor(tokens)
    cache = ours.init_cache(batch, cache_len)
    t0 = time.perf_counter()
    step_c = step.lower(state, jnp.zeros((batch,), jnp.int32), cache).compile()
    compile_s = time.perf_counter() - t0
    tok, cache = prefill(state, jt, cache)
    box = {"tok": tok, "cache": cache}

    def run_ours():
        tok, cache = box["tok"], box["cache"]
        for _ in range(steps):
            tok, cache = step_c(state, tok, cache)
        box["tok"], box["cache"] = _sync((tok, cache))

    with torch.no_grad():
        out = hf(tt, use_cache=True)
    pbox = {"tok": out.logits[:, -1].argmax(-1), "cache": out.past_key_values}

    def run_peer():
        with torch.no_grad():
            tok, cache = pbox["tok"], pbox["cache"]
            for _ in range(steps):
                out = hf(tok[:, None], cache=cache, use_cache=True)
                tok, cache = out.logits[:, -1].argmax(-1), out.past_key_values
            pbox["tok"], pbox["cache"] = tok, cache

    t_j, t_t = paired(run_ours, run_peer, repeats)
    return t_j / steps, t_t / steps, compile_s, cache_len


def measure_decode(res, cfg, hf, ours, batches, prompt, steps, repeats, peaks, tag=""):
    bw = peaks.get("bandwidth")
    for b in batches:
        t_j, t_t, comp, _ = time_decode_pair(cfg, hf, ours, b, prompt, steps, repeats)
        pbytes = np.dtype(cfg.param_dtype).itemsize if cfg.param_dtype != "bfloat16" else 2
        kbytes = 2 if cfg.dtype == "bfloat16" else 4
        nbytes = decode_bytes(cfg, b, prompt + steps, pbytes, kbytes)
        name = f"decode batch {b}{tag}"
        res.add("decode", f"{name} compile", comp, unit="s")
        res.add("decode", name, b / t_j, b / t_t, "tokens/s")
        note = f"roofline {bw / nbytes * b:.0f} tokens/s" if bw else ""
        roof = f" ({nbytes / t_j / bw:.0%} of bandwidth)" if bw else ""
        res.add("decode", f"{name} bytes/s", nbytes / t_j / 1e9, nbytes / t_t / 1e9, "GB/s",
                note=note + roof)  # fmt: skip


def measure_bf16(res, cfg, prompt, steps, repeats, peaks, threads, f32_rate=None, unstack=True):
    """Batch-1 decode with bfloat16 parameters and activations, both frameworks."""
    import torch

    cfg16 = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    hf, ours = torch_peer(cfg16, threads)
    ours = unstack_layers(ours) if unstack else ours
    hf = hf.to(torch.bfloat16)
    t_j, t_t, comp, _ = time_decode_pair(cfg16, hf, ours, 1, prompt, steps, repeats)
    res.add("bf16", "decode batch 1 bf16", 1 / t_j, 1 / t_t, "tokens/s")
    nbytes = decode_bytes(cfg16, 1, prompt + steps, 2, 2)
    bw = peaks.get("bandwidth")
    res.add("bf16", "decode batch 1 bf16 bytes/s", nbytes / t_j / 1e9, nbytes / t_t / 1e9,
            "GB/s", note=f"{nbytes / t_j / bw:.0%} of bandwidth" if bw else "")  # fmt: skip
    if f32_rate:
        res.add("bf16", "bf16 / float32 decode (ours)", (1 / t_j) / f32_rate, unit="x",
                note="goal > 1: bf16 reads half the bytes")  # fmt: skip


def measure_train(res, cfg, hf, batch, seq, repeats, peaks):
    """One optimizer update of the product's train step against PyTorch's.

    Ours is `training.Trainer.step` (forward, backward, global-norm clipping, AdamW with no
    decay on norms; params and optimizer state donated), float32, in this process. The
    peer is transformers' LlamaForCausalLM with the same loss, clipping and AdamW
    settings (`bench_train.torch_step_times`), in a child process with glibc's default
    malloc (`bench_train.torch_in_child`), so that each side runs in its own best
    environment and neither disturbs the other.
    """
    import torch

    from llama_jax import training
    from llama_jax.checkpoint.layout import params_from_hf

    tc = training.TrainConfig(batch_size=batch, seq_len=seq, learning_rate=1e-4)
    trainer = training.Trainer(cfg, tc)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    params = trainer.init_params(params=params_from_hf(sd, cfg))
    opt_state = trainer.init_opt_state(params)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (batch, seq + 1))
    jb = trainer.put_batch({
        "tokens": tokens[None, :, :-1].astype(np.int32),
        "targets": tokens[None, :, 1:].astype(np.int32),
        "weights": np.ones((1, batch, seq), np.float32),
    })  # fmt: skip
    t0 = time.perf_counter()
    params, opt_state, metrics = trainer.step(params, opt_state, jb)  # compiles
    _sync(metrics)
    res.add("train", "train step compile", time.perf_counter() - t0, unit="s")
    box = {"p": params, "o": opt_state}

    def run_ours():
        box["p"], box["o"], metrics = trainer.step(box["p"], box["o"], jb)
        _sync(metrics)

    t_j, _ = paired(run_ours, None, repeats)
    box.clear()  # free our model and optimizer state before the peer starts
    del params, opt_state
    t_t, _ = torch_in_child(cfg.name, batch, seq, repeats, 1, threads=torch.get_num_threads())
    ntok = batch * seq
    res.add("train", f"train step {batch}x{seq}", ntok / t_j, ntok / t_t, "tokens/s",
            note="peer in a child process, default malloc")  # fmt: skip
    flops = 3 * cfg.flops_per_token(seq) * ntok
    peak = peaks.get("matmul_float32")
    if peak:
        res.add("train", "train MFU", 100 * flops / t_j / peak, 100 * flops / t_t / peak, "%",
                note=f"of the measured {peak / 1e9:.0f} GFLOP/s float32 matmul")  # fmt: skip


_CONVERT_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
if {peer!r}:
    import torch, transformers
    transformers.LlamaForCausalLM.from_pretrained({src!r}, dtype=torch.float32)
else:
    from llama_jax.checkpoint.convert import convert
    convert({src!r}, {dst!r}, progress=False)
seconds = time.perf_counter() - t0
# VmHWM is this process's own peak (ru_maxrss would include the parent's, from the fork).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps(dict(seconds=seconds, rss=hwm * 1024)))
"""


def measure_convert(res, hf, repeats):
    """Conversion of the HF checkpoint into ours, timed in a fresh process each time."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "hf")
        hf.save_pretrained(src, safe_serialization=True)
        nbytes = sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))

        def child(peer: bool, i: int) -> dict:
            code = _CONVERT_CHILD.format(root=str(ROOT), src=src, dst=os.path.join(tmp, f"o{i}"),
                                         peer=peer)  # fmt: skip
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True)  # fmt: skip
            return json.loads(out.stdout.strip().splitlines()[-1])

        ours = [child(False, i) for i in range(repeats)]
        peer = [child(True, i) for i in range(repeats)]
    t_j = float(np.median([r["seconds"] for r in ours]))
    t_t = float(np.median([r["seconds"] for r in peer]))
    res.add("convert", "convert HF -> llama-jax", nbytes / t_j / 1e6, nbytes / t_t / 1e6, "MB/s",
            note=f"{nbytes / 1e6:.0f} MB of safetensors; peer: from_pretrained")  # fmt: skip
    rss_j = max(r["rss"] for r in ours) / 1e6
    rss_t = max(r["rss"] for r in peer) / 1e6
    res.add("convert", "convert peak RSS", rss_j, rss_t, "MB", higher_is_better=False,
            note="whole process, Python and libraries included")  # fmt: skip


# --------------------------------------------------------------------------- GPU


def gpu_suite(args) -> int:
    """On an accelerator: bf16 matmul rate, copy bandwidth, ~1B training MFU, decode."""
    import optax

    out_dir = Path(args.out or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    res = Results(str(out_dir / "gpu_results.json"))
    dev = jax.devices()[0]
    res.info = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))  # fmt: skip
    print(res.info, flush=True)
    res.save()
    peaks = {}

    def bench(fn, repeats=10):
        _sync(fn())
        t0 = time.perf_counter()
        for _ in range(repeats):
            r = fn()
        _sync(r)
        return (time.perf_counter() - t0) / repeats

    with section("gpu roofline", res):
        n = 1024 if args.quick else 8192
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        mm = jax.jit(lambda x, y: x @ y)
        t = bench(lambda: mm(a, a))
        peaks["matmul"] = 2 * n**3 / t
        res.add("gpu", f"matmul {n}^3 bf16", peaks["matmul"] / 1e12, unit="TFLOP/s")
        big = jnp.ones((64 if args.quick else 1024, 1024, 1024), jnp.bfloat16)  # 2 GiB
        cp = jax.jit(lambda x: x + 1)
        t = bench(lambda: cp(big))
        peaks["bandwidth"] = 2 * big.nbytes / t
        res.add("gpu", "copy bandwidth (read+write)", peaks["bandwidth"] / 1e12, unit="TB/s")

    cfg = get_preset(args.gpu_preset).replace(param_dtype="bfloat16", dtype="bfloat16")
    res.info["model"] = cfg.name
    res.info["params"] = cfg.num_params()

    with section("gpu train", res):
        for batch, seq, remat, attn in args.gpu_train_shapes:
            try:
                model = build_model(cfg, remat=remat)
                graphdef, params, rest = nnx.split(model, nnx.Param, ...)
                tx = optax.adamw(1e-4, weight_decay=0.1)
                opt_state = tx.init(params)

                def loss_fn(params, tokens, graphdef=graphdef, rest=rest):
                    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
                    logp = jax.nn.log_softmax(logits, -1)
                    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

                @partial(jax.jit, donate_argnums=(0, 1))
                def train_step(params, opt_state, tokens, tx=tx, loss_fn=loss_fn):
                    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return optax.apply_updates(params, updates), opt_state, loss

                tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
                t0 = time.perf_counter()
                with attention_implementation(attn):
                    step_c = train_step.lower(params, opt_state, tokens).compile()
                compile_s = time.perf_counter() - t0
                params, opt_state, loss = step_c(params, opt_state, tokens)
                _sync(loss)
                n = 10
                t0 = time.perf_counter()
                for _ in range(n):
                    params, opt_state, loss = step_c(params, opt_state, tokens)
                _sync(loss)
                t = (time.perf_counter() - t0) / n
                flops = 3 * cfg.flops_per_token(seq) * batch * seq
                tag = f"{batch}x{seq} remat={remat} attn={attn}"
                res.add("gpu", f"train {tag}", batch * seq / t, unit="tokens/s",
                        note=f"compile {compile_s:.0f}s, loss {float(loss):.2f}")  # fmt: skip
                res.add("gpu", f"train MFU {tag} (vs measured)", 100 * flops / t / peaks["matmul"],
                        unit="%")  # fmt: skip
                res.add("gpu", f"train MFU {tag} (vs 989 TFLOP/s)", 100 * flops / t / 989e12,
                        unit="%", note="H100/H200 SXM dense bf16 datasheet")  # fmt: skip
                del params, opt_state, model
                break
            except Exception as e:  # e.g. out of memory: try the next, smaller shape
                print(f"   train {batch}x{seq} {remat} {attn}: {type(e).__name__}: {e}"[:300])
                res.add("gpu", f"train {batch}x{seq} {remat} {attn}: FAILED", None,
                        note=str(e)[:200])  # fmt: skip

    with section("gpu decode", res):
        # HBM datasheet rates; the measured copy rate is usually below them.
        sheet = {"H200": 4.8e12, "H100": 3.35e12}
        spec = next((v for k, v in sheet.items() if k in dev.device_kind), None)
        stacked = build_model(cfg)
        runs = [(1, "unstacked", "loop"), (1, "unstacked", "step"), (1, "stacked", "loop"),
                (8, "unstacked", "loop")]  # fmt: skip
        for batch, layers, how in runs:
            model = unstack_layers(stacked) if layers == "unstacked" else stacked
            prompt, steps = 128, 64
            state, prefill, step = our_decoder(model, prompt + steps + 1)
            loop = decode_loop(model)
            cache = model.init_cache(batch, prompt + 3 * steps + 1)
            tokens = jax.random.randint(jax.random.key(2), (batch, prompt), 0, cfg.vocab_size)
            tok, cache = prefill(state, tokens, cache)
            if how == "loop":  # the steps in one on-device loop, as llama_jax.generate runs
                loop_c = loop.lower(state, tok, cache, steps).compile()
                tok, cache = loop_c(state, tok, cache)
                _sync(tok)
                t0 = time.perf_counter()
                tok, cache = loop_c(state, tok, cache)
                _sync(tok)
            else:  # one jitted call per token, dispatched from Python
                step_c = step.lower(state, tok, cache).compile()
                for _ in range(steps):
                    tok, cache = step_c(state, tok, cache)
                _sync(tok)
                t0 = time.perf_counter()
                for _ in range(steps):
                    tok, cache = step_c(state, tok, cache)
                _sync(tok)
            t = (time.perf_counter() - t0) / steps
            nbytes = decode_bytes(cfg, batch, prompt + 2 * steps, 2, 2)
            tag = f"decode batch {batch} {layers} {how}"
            res.add("gpu", tag, batch / t, unit="tokens/s", note=f"{t * 1e3:.2f} ms/step")
            res.add("gpu", f"{tag}: of measured copy rate",
                    100 * nbytes / t / peaks.get("bandwidth", np.nan), unit="%",
                    note=f"{nbytes / t / 1e12:.2f} TB/s of {nbytes / 1e9:.2f} GB/step")  # fmt: skip
            if spec:
                res.add("gpu", f"{tag}: of datasheet HBM", 100 * nbytes / t / spec, unit="%",
                        note=f"{spec / 1e12:.2f} TB/s")  # fmt: skip
    print("\n" + res.table())
    return 0


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-134m", help="model preset (default bench-134m)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--plot", default=None, help="write a bar chart of the ratios (PNG)")
    p.add_argument("--layers", choices=("unstacked", "stacked"), default="unstacked",
                   help="inference on model.unstack_layers (default) or the scan")  # fmt: skip
    p.add_argument("--gpu", action="store_true", help="run the accelerator suite instead")
    p.add_argument("--gpu-preset", default="llama3.2-1b")
    p.add_argument("--out", default=None, help="GPU mode: folder for gpu_results.json")
    p.add_argument("--gpu-train",
                   default="8x2048:none:cudnn,4x2048:none:cudnn,8x2048:dots_no_batch:xla",
                   help="GPU mode: BxT:remat:attention training runs, tried in order until "
                        "one fits in memory")  # fmt: skip
    args = p.parse_args(argv)
    args.gpu_train_shapes = []
    for item in args.gpu_train.split(","):
        shape, remat, attn = item.split(":")
        b, t = shape.split("x")
        args.gpu_train_shapes.append((int(b), int(t), remat, attn))
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def plot_ratios(res: Results, path: str) -> None:
    """A horizontal bar per figure with a peer: ours/peer, with the 1x line drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res.rows if r["ratio"] is not None and r["unit"] not in ("GB/s",)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    names = [r["figure"] for r in rows][::-1]
    vals = [r["ratio"] for r in rows][::-1]
    better = [(r["ratio"] >= 1) == r["higher_is_better"] for r in rows][::-1]
    colors = ["tab:green" if ok else "tab:red" for ok in better]
    ax.barh(names, vals, color=colors)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("llama-jax / transformers, same run (green: llama-jax better)")
    ax.set_title(res.info.get("title", "llama-jax vs transformers"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpu:
        return gpu_suite(args)
    import torch

    quick = args.quick
    rep = args.repeats or (2 if quick else 5)
    cfg = get_preset(args.preset)
    sections = args.sections.split(",")
    res = Results(args.json)
    res.info = dict(
        preset=cfg.name, params=cfg.num_params(), cpus=os.cpu_count(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        jax=jax.__version__, torch=torch.__version__, device=jax.devices()[0].device_kind,
        machine=platform.processor() or platform.machine(),
        xla_flags=os.environ.get("XLA_FLAGS", ""), torch_threads=args.threads,
        load_average_at_start=os.getloadavg()[0], layers=args.layers,
        title=f"{cfg.name} on {os.cpu_count()} CPU cores",
    )  # fmt: skip
    print(json.dumps(res.info))
    t_start = time.perf_counter()
    peaks: dict = {}
    if "roofline" in sections:
        with section("roofline", res):
            peaks = measure_roofline(res, quick)
    hf, ours = torch_peer(cfg, args.threads)
    err = check_same_logits(hf, ours, cfg)
    print(f"\nsame weights: max logit difference {err:.1e} of the largest logit")
    if err > 1e-3:
        print("WARNING: the two models disagree; the comparison is not like for like.")
    prompt, steps = (16, 4) if quick else (64, 16)
    f32_rate = None
    # Inference runs on separate per-layer arrays (model.unstack_layers); training, which
    # needs the scan for memory and compile time, on the stacked model.
    unstack = args.layers == "unstacked"
    infer = unstack_layers(ours) if unstack else ours
    if "prefill" in sections:
        with section("prefill", res):
            measure_prefill(res, cfg, hf, infer, 1, 32 if quick else 128, rep, peaks)
    if "decode" in sections:
        with section("decode", res):
            measure_decode(res, cfg, hf, infer, (1, 8) if quick else (1, 8, 32), prompt, steps,
                           rep, peaks)  # fmt: skip
            f32_rate = next(r["ours"] for r in res.rows if r["figure"] == "decode batch 1")
            # The other layer layout at batch 1, to show what unstacking buys.
            other = ours if unstack else unstack_layers(ours)
            tag = " (layer scan)" if unstack else " (unstacked)"
            measure_decode(res, cfg, hf, other, (1,), prompt, steps, rep, peaks, tag=tag)
    if "bf16" in sections:
        with section("bf16", res):
            measure_bf16(res, cfg, prompt, steps, rep, peaks, args.threads, f32_rate, unstack)
    if "train" in sections:
        with section("train", res):
            measure_train(res, cfg, hf, 2 if quick else 4, 32 if quick else 128, rep, peaks)
    if "convert" in sections:
        with section("convert", res):
            measure_convert(res, hf, 1 if quick else 3)
    res.info["seconds"] = time.perf_counter() - t_start
    res.info["load_average_at_end"] = os.getloadavg()[0]
    res.save()
    print(f"\n{res.info['title']}, {res.info['date']} ({res.info['seconds']:.0f}s)\n")
    print(res.table())
    if args.plot:
        plot_ratios(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
