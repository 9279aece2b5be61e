# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Generation: tokenizers, the KV cache, the cost of decoding, and sampling
#
# **What you will learn.** How text becomes token ids and how a chat model's template
# wraps a conversation; what the key/value cache holds and how much memory it takes for
# real models, with and without grouped-query attention; a cost model of one decode step
# (bytes moved against FLOPs) for Llama 3.1 8B on a TPU v5e and an H100 and for this
# machine, with this package's own measured decode steps laid on it; what the cache saves
# and why `generate()`'s compiled loop is faster still; what temperature, top-k and
# top-p do to a trained model's text; and how weights become int8, by rounding each one
# or by GPTQ, which corrects rounding errors on real activations, and what each costs in
# agreement with the float model.
#
# **The model.** SmolLM2-135M-Instruct, a trained LLaMA-architecture model, fetched and
# converted on first use by `llama_jax.examples.trained_model()` (notebook 02 says more).
#
# **How to run it.**
# - *CPU laptop*: open the `.ipynb` in Jupyter; the install cell at the top installs
#   llama-jax unless it is importable (in a clone, `pip install -e ".[dev]"` first);
#   about three minutes after the first fetch.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`; the measured timings change most.
# - *Colab TPU*: Runtime > Change runtime type > TPU, then run the install cell.
#
# **Other weights.** Set `LLAMA_JAX_CHECKPOINT` to a llama-jax checkpoint that holds its
# tokenizer (`llama-jax convert` copies it), or to `tiny` for a tiny random model with a
# small SentencePiece tokenizer trained here. The random model is also the fallback when
# the trained one cannot be fetched (the cell below says so); it writes random text.

# %%
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import llama_jax as lj
from llama_jax import examples
from llama_jax.examples import notebook_checkpoint
from llama_jax.inference import gptq, int8
from llama_jax.inference.sampling import filter_logits, sample
from llama_jax.perf import PEAK_FLOPS, forward_flops_per_token, peak_flops
from llama_jax.tokenizer import train_sentencepiece

CHECKPOINT = notebook_checkpoint()  # the trained model, a directory you chose, or None
if CHECKPOINT:
    model = lj.load(CHECKPOINT)
    tok = lj.Tokenizer.load(CHECKPOINT)
else:
    workdir = Path(tempfile.mkdtemp(prefix="llama-jax-generation-"))
    sources = sorted(Path(lj.__file__).parent.rglob("*.py"))
    tok = train_sentencepiece(sources, workdir / "tokenizer.model", vocab_size=512)
    cfg = lj.PRESETS["tiny"].replace(vocab_size=tok.vocab_size, name="tiny-RANDOM")
    model = lj.build_model(cfg, seed=0)
cfg = model.cfg
print(cfg.name, f"L={cfg.n_layers} D={cfg.dim} N={cfg.n_heads} K={cfg.kv_heads} "
      f"H={cfg.head_dim} V={cfg.vocab_size} {cfg.param_dtype}")  # fmt: skip

# %% [markdown]
# ## 1. Tokenizers and chat templates
#
# Llama 1 and 2 use a 32k-piece SentencePiece model, Llama 3 a 128k-token tiktoken BPE,
# and most LLaMA-architecture models on the Hugging Face Hub (SmolLM2 among them) a
# `tokenizer.json` read by the `tokenizers` library. `Tokenizer.load` tells them apart by
# the files it finds; all three encode, decode and format chats the same way.

# %%
text = "The KV cache holds 2 * L * K * H numbers per token."
ids = tok.encode(text, bos=False)
print(tok.kind, "vocabulary", tok.vocab_size, "| bos/eos:", tok.bos_id, tok.eos_id)
print(len(text), "characters ->", len(ids), "ids:", ids)
print("pieces:", [tok.decode([i]) for i in ids])
assert tok.decode(ids) == text

texts = {
    "English prose": "Half of this project's users come to learn. The best teaching material "
    "builds each piece in front of the reader, checks it, and shows pictures.",
    "Python source": Path(lj.__file__).read_text()[:400],
    "digits": "3.14159265358979323846264338327950288419716939937510",
    "non-Latin": "Модель читает текст по кусочкам. 模型一次读取一段文本。",
}
ratio = {k: len(v) / len(tok.encode(v, bos=False)) for k, v in texts.items()}
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.barh(list(ratio), list(ratio.values()))
ax.set(xlabel="characters per token", title=f"{tok.kind} tokenizer, {tok.vocab_size} ids")
ax.invert_yaxis()
plt.show()
print("To see: text like the training data packs several characters per token; rare "
      "scripts fall back to about one token per character or byte.")  # fmt: skip

# %% [markdown]
# A chat model was fine-tuned on one fixed template, and generates well only inside it.
# The template comes with the checkpoint (`chat_template` in `tokenizer_config.json`,
# rendered in a sandbox); Meta's own formats are built in for SentencePiece and tiktoken.

# %%
dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a llama."}]
print(tok.format_dialog(dialog))
chat_ids = tok.encode_dialog(dialog)
print(len(chat_ids), "ids; the template adds", len(chat_ids) - len(tok.encode("Be brief. Name a llama.", bos=False)),
      "of them")  # fmt: skip

# %% [markdown]
# ## 2. The KV cache and its memory
#
# A decoder only looks back, so the keys and values of past tokens never change: keeping
# them, each new token computes only its own. The cache holds, per token, a key and a
# value of H numbers for each of the K key/value heads of each of the L layers:
# `2 * L * K * H` numbers. `KVCache.create` allocates it at a fixed number of slots S,
# one [B, K, S, H] array per layer (sizes below chosen distinct so that each axis can be
# told apart).

# %%
B_demo, S_demo = 5, 40
cache = lj.KVCache.create(cfg, batch=B_demo, max_len=S_demo)
B_, K_, S_, H_ = cache.k[0].shape
print(f"cache.k: {len(cache.k)} layers x [B={B_}, K={K_}, S={S_}, H={H_}] {cache.k[0].dtype}; "
      f"valid: [B, S] = {cache.valid.shape}; index: {int(cache.index)}")  # fmt: skip
assert (B_, K_, S_, H_) == (B_demo, cfg.kv_heads, S_demo, cfg.head_dim)


def kv_bytes_per_token(c, bytes_per=2):
    """Bytes of keys and values one token adds to the cache (bf16 by default)."""
    return 2 * c.n_layers * c.kv_heads * c.head_dim * bytes_per


per_token = sum(k.nbytes + v.nbytes for k, v in zip(cache.k, cache.v, strict=True)) / (
    B_demo * S_demo
)
assert per_token == kv_bytes_per_token(cfg, cache.k[0].dtype.itemsize)

# %% [markdown]
# For real models, in bfloat16, as released (GQA where the release has it) and as they
# would be with one KV head per query head (K = N, plain multi-head attention):

# %%
names = ["llama2-7b", "llama2-70b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "llama3.2-1b"]
GiB = 2**30
print(f"{'preset':14s} {'K':>3s} {'N':>4s} {'KiB/token':>10s} {'K=N':>8s} "
      f"{'GiB @ full ctx':>15s} {'K=N':>8s} {'weights GiB':>12s}")  # fmt: skip
for n in names:
    c, mha = lj.PRESETS[n], lj.PRESETS[n].replace(n_kv_heads=None)
    full = c.max_seq_len
    print(f"{n:14s} {c.kv_heads:3d} {c.n_heads:4d} {kv_bytes_per_token(c) / 1024:10.0f} "
          f"{kv_bytes_per_token(mha) / 1024:8.0f} {kv_bytes_per_token(c) * full / GiB:15.1f} "
          f"{kv_bytes_per_token(mha) * full / GiB:8.1f} {c.num_params() * 2 / GiB:12.1f}")  # fmt: skip

contexts = 2 ** np.arange(9, 18)
batches = 2 ** np.arange(0, 9)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for i, n in enumerate(["llama2-7b", "llama3.1-8b", "llama3.1-70b"]):
    c, mha = lj.PRESETS[n], lj.PRESETS[n].replace(n_kv_heads=None)
    ax1.loglog(contexts, kv_bytes_per_token(c) * contexts / GiB, "o-", color=f"C{i}",
               label=f"{n} (K={c.kv_heads})")  # fmt: skip
    if c.kv_heads != c.n_heads:
        ax1.loglog(contexts, kv_bytes_per_token(mha) * contexts / GiB, "--", color=f"C{i}",
                   label=f"{n} if K=N={c.n_heads}")  # fmt: skip
for i, n in enumerate(["llama3.1-8b", "llama3.1-70b"]):
    c, mha = lj.PRESETS[n], lj.PRESETS[n].replace(n_kv_heads=None)
    ax2.loglog(batches, kv_bytes_per_token(c) * 8192 * batches / GiB, "o-", color=f"C{i + 1}",
               label=f"{n} cache, K={c.kv_heads}")  # fmt: skip
    ax2.loglog(batches, kv_bytes_per_token(mha) * 8192 * batches / GiB, "--", color=f"C{i + 1}",
               label=f"{n} cache if K=N")  # fmt: skip
    ax2.axhline(c.num_params() * 2 / GiB, color=f"C{i + 1}", ls=":", label=f"{n} weights")
ax1.set(xlabel="context (tokens)", ylabel="GiB (bf16)", title="KV cache of one sequence")
ax2.set(xlabel="batch (sequences of 8192 tokens)", ylabel="GiB (bf16)",
        title="KV cache of a batch vs the weights")  # fmt: skip
ax1.legend(fontsize=7)
ax2.legend(fontsize=7)
plt.show()
print("To see: GQA (solid) divides the cache by N/K; at 8192 tokens the cache of a modest "
      "batch already outweighs the weights (dotted).")  # fmt: skip

# %% [markdown]
# ## 3. What one decode step costs
#
# A decode step produces one token for each of B sequences. It must read every weight
# once (W bytes) and each sequence's whole cache (B x KV bytes), and it does about
# 2 x P FLOPs per sequence (one multiply-add per weight; attention adds 4 x L x context
# x N x H, included below through `perf.forward_flops_per_token`). A chip moves bytes at its memory
# bandwidth and does FLOPs at its peak rate, so a step takes at least
#
#     time = max( (W + B x KV) / bandwidth ,  B x FLOPs per token / FLOP rate ).
#
# With the KV term left out, the two are equal at the *critical batch*
# B* = (W / bandwidth) / (FLOPs per token / FLOP rate): below it, decoding is bound by
# memory and a bigger batch is nearly free. The KV term grows with B too, and overtakes
# the weights at B = W / KV. The data-sheet figures used (dense bf16):
#
# - TPU v5e: 197 TFLOP/s, 819 GB/s HBM (Google Cloud, "TPU v5e" system architecture page);
# - NVIDIA H100 SXM: 989 TFLOP/s, 3.35 TB/s HBM3 (NVIDIA H100 Tensor Core GPU datasheet).
#
# Times are for the whole model on one chip's bandwidth and FLOP rate; Llama 3.1 8B in
# bf16 (16 GB of weights) does not fit one v5e's 16 GB, and split over n chips with tensor
# parallelism both terms divide by n (communication aside).
#
# One measured point, from `benchmarks/gpu.py` on an H100 80GB HBM3 (docs/performance.md,
# "GPU"): random weights in the Llama 3.1 8B shape, bf16, batch 1, a 128-token prompt,
# through `lj.generate`: 5.96 ms per step. Its cache held under 200 tokens, so it belongs
# beside the weights-only line, not the context-8192 curves.

# %%
HARDWARE = {
    "TPU v5e": dict(flops=PEAK_FLOPS["TPU v5e"], bandwidth=819e9),
    "H100 SXM": dict(flops=PEAK_FLOPS["NVIDIA H100"], bandwidth=3.35e12),
}
H100_MEASURED_MS = 5.96  # batch 1, short context (see above)


def step_time(c, batch, context, flops, bandwidth, bytes_per=2):
    """(memory time, compute time) of one decode step, in seconds."""
    weights = c.num_params() * bytes_per
    memory = (weights + batch * kv_bytes_per_token(c, bytes_per) * context) / bandwidth
    compute = batch * forward_flops_per_token(c, context) / flops
    return memory, compute


def critical_batch(c, context, flops, bandwidth, bytes_per=2):
    """B where the weight reads take as long as the FLOPs (the KV term left out)."""
    return c.num_params() * bytes_per / bandwidth / (forward_flops_per_token(c, context) / flops)


PRESET, CONTEXT = "llama3.1-8b", 8192
c8 = lj.PRESETS[PRESET]
variants = {
    f"K={c8.kv_heads} (GQA, as released)": c8,
    f"K=N={c8.n_heads}": c8.replace(n_kv_heads=None),
}
batch = 2.0 ** np.arange(0, 11)
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
for ax, (hw, spec) in zip(axes, HARDWARE.items(), strict=True):
    for (label, c), ls in zip(variants.items(), ("-", "--"), strict=True):
        mem, comp = step_time(c, batch, CONTEXT, **spec)
        ax.loglog(batch, np.maximum(mem, comp) * 1e3, ls, color="C0", label=f"step time, {label}")
        b_kv = c.num_params() * 2 / (kv_bytes_per_token(c) * CONTEXT)
        ax.plot([b_kv], [np.interp(b_kv, batch, np.maximum(mem, comp) * 1e3)], "o", color="C3")
    mem_w = step_time(c8, batch, 0, **spec)[0]  # weights only, no cache
    comp = step_time(c8, batch, CONTEXT, **spec)[1]
    ax.loglog(batch, mem_w * 1e3, ":", color="gray", label="weights only (no KV)")
    ax.loglog(batch, comp * 1e3, "-.", color="C2", label="compute (FLOPs / rate)")
    b_star = critical_batch(c8, CONTEXT, **spec)
    ax.axvline(b_star, color="C2", lw=0.8)
    ax.text(b_star * 1.05, ax.get_ylim()[0] * 2 if ax.get_ylim()[0] > 0 else 0.01, f"B* = {b_star:.0f}",
            color="C2", fontsize=8)  # fmt: skip
    if hw == "H100 SXM":
        ax.plot([1], [H100_MEASURED_MS], "x", color="k", ms=8, label="measured, short context")
        ax.legend(fontsize=7)
    ax.set(title=f"{PRESET} bf16, context {CONTEXT}, {hw}", xlabel="batch B")
axes[0].set_ylabel("ms per decode step")
axes[0].plot([], [], "o", color="C3", label="KV cache = weights")
axes[0].legend(fontsize=7)
plt.show()
weights_only = step_time(c8, 1.0, 0, **HARDWARE["H100 SXM"])[0] * 1e3
print(f"H100, batch 1: weights-only line {weights_only:.2f} ms, measured {H100_MEASURED_MS} ms.")
print("To see: the step time stays flat (weights) only until the red dot, where the cache "
      "overtakes the weights; after that the cache reads dominate long before the FLOPs do.")  # fmt: skip
for hw, spec in HARDWARE.items():
    for label, c in variants.items():
        mem, comp = step_time(c, np.array([1.0, 64.0]), CONTEXT, **spec)
        b_kv = c.num_params() * 2 / (kv_bytes_per_token(c) * CONTEXT)
        print(f"{hw:9s} {label:22s}: B=1 {mem[0] * 1e3:6.2f} ms, B=64 {max(mem[1], comp[1]) * 1e3:7.2f} ms "
              f"({64 / max(mem[1], comp[1]):6.0f} tokens/s); cache = weights at B = {b_kv:.1f}; "
              f"B* = {critical_batch(c, CONTEXT, **spec):.0f}")  # fmt: skip

# %% [markdown]
# **On this machine.** The same model with this machine's figures, measured here: the
# bandwidth as the time to sum a 256 MiB array, the FLOP rate as `llama_jax.perf.peak_flops`
# (the best of a few 1024 x 1024 matmuls on a CPU, the data sheet on an accelerator). The
# model is the one loaded above, in its stored dtype; the points are `lj.generate` decode
# steps at a few batch sizes, each the time of 64 extra tokens divided by 64 (prefill and
# compilation cancel out).

# %%
big = jnp.ones((64 * 2**20,), jnp.float32)
reduce = jax.jit(jnp.sum)
reduce(big).block_until_ready()
best = np.inf
for _ in range(5):
    t0 = time.perf_counter()
    reduce(big).block_until_ready()
    best = min(best, time.perf_counter() - t0)
here = dict(flops=peak_flops(), bandwidth=big.nbytes / best)
device = jax.devices()[0].device_kind
print(f"{device}: measured {here['bandwidth'] / 1e9:.1f} GB/s, {here['flops'] / 1e9:.0f} GFLOP/s")

CACHE_LEN, itemsize = 256, np.dtype(cfg.param_dtype).itemsize
prompt = tok.encode("The capital of France is", bos=False)
measured = {}
for b in (1, 4, 16):
    rows = [prompt] * b
    lj.generate(model, rows, 8, cache_len=CACHE_LEN, stop_ids=[])  # compile
    seconds = []
    for n in (8, 72):
        t0 = time.perf_counter()
        lj.generate(model, rows, n, cache_len=CACHE_LEN, stop_ids=[])
        seconds.append(time.perf_counter() - t0)
    measured[b] = (seconds[1] - seconds[0]) / 64

batch_here = 2.0 ** np.arange(0, 8)
mem, comp = step_time(cfg, batch_here, CACHE_LEN, **here, bytes_per=itemsize)
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.loglog(batch_here, mem * 1e3, "--", label="memory: (W + B x KV) / bandwidth")
ax.loglog(batch_here, comp * 1e3, "-.", label="compute: B x FLOPs / rate")
ax.loglog(
    batch_here, np.maximum(mem, comp) * 1e3, "-", color="k", lw=0.8, label="model: max of the two"
)
ax.loglog(
    list(measured),
    np.array(list(measured.values())) * 1e3,
    "r*",
    ms=12,
    label="lj.generate, measured",
)
ax.set(xlabel="batch B", ylabel="ms per decode step", ylim=(None, None),
       title=f"{cfg.name} ({cfg.param_dtype}) on {device}, cache {CACHE_LEN}")  # fmt: skip
ax.legend(fontsize=7)
plt.show()
print("To see: how far the measured steps sit above the model's lower bound.")
for b, s in measured.items():
    m, cpt = step_time(cfg, b, CACHE_LEN, **here, bytes_per=itemsize)
    print(
        f"B={b:3d}: measured {s * 1e3:6.1f} ms/step ({b / s:6.0f} tokens/s); "
        f"model {max(m, cpt) * 1e3:6.1f} ms ({s / max(m, cpt):.1f}x the bound)"
    )

# %% [markdown]
# ## 4. With and without the cache, honestly timed
#
# Without a cache, each new token re-runs the model over the whole sequence so far. JAX
# compiles one program per shape, so the buffer grows in steps of 16 tokens (padding at
# the end is harmless: the causal mask keeps real tokens from reading it), one
# compilation per 16 tokens; the loop runs twice and times the second pass, which
# measures the work itself. With a cache, a Python loop feeds one token per
# step into a fixed [B, K, S, H] cache (one compilation). `generate()` runs the same
# cached step inside one compiled `while_loop` on the device. All three decode greedily
# and must produce the same tokens.

# %%
N_NEW, BUCKET = 24, 16
start_ids = tok.encode("Llamas live in", bos=False)
# Split once into a static graph and an array state, as generate() does: calling an
# nnx.jit function with the model object would re-walk its 30 blocks on every call.
graphdef, state = nnx.split(model)
forward_last = jax.jit(
    lambda s, t, n: jnp.argmax(nnx.merge(graphdef, s)(t)[0, n - 1]).astype(jnp.int32)
)


def no_cache(n):
    seq, times = list(start_ids), []
    for _ in range(n):
        t0 = time.perf_counter()
        padded = np.zeros((1, -(-len(seq) // BUCKET) * BUCKET), np.int32)  # [1, S]
        padded[0, : len(seq)] = seq
        nxt = int(forward_last(state, jnp.asarray(padded), len(seq)))
        times.append(time.perf_counter() - t0)
        seq.append(nxt)
    return seq[len(start_ids) :], times


step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c))


def with_cache(n):
    c = lj.KVCache.create(cfg, batch=1, max_len=CACHE_LEN)
    logits, c = step(state, jnp.asarray([start_ids], jnp.int32), c)  # prefill
    out, times = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [1]
        out.append(int(nxt[0]))
        logits, c = step(state, nxt[:, None], c)  # one token in, one cache slot filled
        times.append(time.perf_counter() - t0)
    return out, times


t0 = time.perf_counter()
no_cache(N_NEW)  # first pass: compiles one program per length
first_pass = time.perf_counter() - t0
slow, slow_times = no_cache(N_NEW)
with_cache(2)  # compile the prefill and the decode step
fast, fast_times = with_cache(N_NEW)
package = lj.generate(model, [start_ids], N_NEW, cache_len=CACHE_LEN, stop_ids=[])[0]
assert slow == fast == package, (slow, fast, package)
print("greedy, identical three ways:", repr(tok.decode(fast)))

# Longer sequences, one forward each (compiled first): the per-step cost without a cache.
lengths = [64, 128, 256]
long_times = []
for T in lengths:
    x = jnp.asarray(np.resize(start_ids, (1, T)), jnp.int32)
    int(forward_last(state, x, T))
    runs = []
    for _ in range(3):  # the best of three: other processes on a shared machine add noise
        t0 = time.perf_counter()
        int(forward_last(state, x, T))
        runs.append(time.perf_counter() - t0)
    long_times.append(min(runs))
generate_step = measured[1]

seq_len = len(start_ids) + np.arange(N_NEW)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(
    seq_len,
    np.array(slow_times) * 1e3,
    "o-",
    ms=3,
    color="C0",
    label="no cache: buffer grows by 16",
)
ax.plot(lengths, np.array(long_times) * 1e3, "o--", color="C0", label="no cache: longer sequences")
ax.plot(seq_len, np.array(fast_times) * 1e3, "o-", ms=3, color="C1", label="KV cache, Python loop")
ax.axhline(generate_step * 1e3, color="k", ls=":", label="generate(): compiled loop")
ax.set(xlabel="tokens in the sequence", ylabel="ms per generated token", ylim=(0, None),
       title=f"{cfg.name}: time per step")  # fmt: skip
ax.legend(fontsize=8)
plt.show()
print(
    f"To see: without a cache a step costs more the longer the sequence "
    f"({slow_times[0] * 1e3:.0f} ms at {seq_len[0]} tokens, {long_times[-1] * 1e3:.0f} ms at "
    f"{lengths[-1]}), so n tokens cost ~n^2; with the cache it stays flat "
    f"({np.median(fast_times) * 1e3:.0f} ms), and generate() takes {generate_step * 1e3:.0f} ms."
)
print(
    f"The first pass without a cache, compiling {len(set(-(-seq_len // BUCKET)))} shapes, took {first_pass:.1f} s "
    f"against {sum(slow_times):.2f} s for the second."
)

# %% [markdown]
# What the compiled loop saves over the Python loop with the same cache: each Python step
# dispatches a program from the host, waits for its result (`int(...)` copies the token
# back to decide the next input) and hands the whole cache back and forth; inside
# `generate()` the next token never leaves the device, sampling runs on the device, and
# the cache is donated so XLA updates it in place (the Python loop's step returns a new
# cache each time). The gap is per-step overhead, so it is largest for small models,
# where the work per step is short. Measured here:

# %%
print(f"Python loop {np.median(fast_times) * 1e3:.1f} ms/step, generate() {generate_step * 1e3:.1f} "
      f"ms/step: {np.median(fast_times) / generate_step:.1f}x")  # fmt: skip

# %% [markdown]
# ## 5. Sampling strategies
#
# The model gives logits; a strategy turns them into one token:
# - **greedy**: the most likely token;
# - **temperature τ**: sample from softmax(logits / τ), sharper below 1, flatter above;
# - **top-k**: keep the k most likely tokens, renormalise;
# - **top-p (nucleus)**: keep the fewest most likely tokens whose probability reaches p.
#
# Written in NumPy, then checked against the package's `filter_logits` and `sample`.


# %%
def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def top_k_probs(logits, k):
    keep = logits >= np.sort(logits)[-k]
    return softmax(np.where(keep, logits, -np.inf))


def top_p_probs(logits, p):
    order = np.argsort(-logits)
    probs = softmax(logits)[order]
    n_keep = int(np.searchsorted(np.cumsum(probs) - probs, p, side="left"))  # mass before < p
    keep = np.zeros_like(logits, bool)
    keep[order[: max(n_keep, 1)]] = True
    return softmax(np.where(keep, logits, -np.inf))


filter_jit = jax.jit(filter_logits)  # one compilation for every k and p below
story = tok.encode("Once upon a time, there was a llama who", bos=False)
logits = np.asarray(model(jnp.asarray([story], jnp.int32))[0, -1], np.float64)  # [V]
as_jax = jnp.asarray(logits[None], jnp.float32)
for k in (1, 5, 40):
    kept = np.isfinite(np.asarray(filter_jit(as_jax, jnp.int32(k), jnp.float32(1.0))))[0]
    np.testing.assert_array_equal(kept, top_k_probs(logits, k) > 0)
for p in (0.5, 0.9):
    kept = np.isfinite(np.asarray(filter_jit(as_jax, jnp.int32(0), jnp.float32(p))))[0]
    np.testing.assert_array_equal(kept, top_p_probs(logits, p) > 0)
greedy = sample(as_jax, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1))
assert int(greedy[0]) == int(np.argmax(logits))

order = np.argsort(-logits)[:20]
strategies = {
    "temperature 0.5": softmax(logits / 0.5),
    "temperature 1": softmax(logits),
    "temperature 2": softmax(logits / 2),
    "top-k 5": top_k_probs(logits, 5),
    "top-p 0.9": top_p_probs(logits, 0.9),
}
fig, axes = plt.subplots(1, len(strategies), figsize=(15, 3.2), sharey=True)
for ax, (name, probs) in zip(axes, strategies.items(), strict=True):
    ax.bar(range(20), probs[order], color="C0")
    ax.bar([0], probs[order[0]], color="C3", label="greedy's pick")
    ax.set(title=f"{name}\n{int((probs > 0).sum())} tokens possible", xlabel="rank", ylim=(0, 1))
axes[0].set_ylabel("probability")
axes[0].legend(fontsize=8)
plt.show()
print(
    f"To see: the next token after {tok.decode(story)!r}; the top 20 of "
    f"{cfg.vocab_size}: temperature reshapes the bars, top-k/top-p cut the tail to zero."
)

# %% [markdown]
# The package's sampler draws from exactly these distributions: 2000 draws with top-k 5
# at temperature 1, against the renormalised probabilities.

# %%
# The logits are an argument, not a constant baked into the program (XLA would spend
# its compile time pre-sorting a constant 49152-entry vector).
draw = jax.jit(
    jax.vmap(
        lambda lg, key: sample(lg, key, jnp.float32(1), jnp.int32(5), jnp.float32(1))[0],
        in_axes=(None, 0),
    )
)
drawn = np.asarray(draw(as_jax, jax.random.split(jax.random.key(0), 2000)))
want = top_k_probs(logits, 5)
freq = np.bincount(drawn, minlength=cfg.vocab_size) / len(drawn)
assert set(np.unique(drawn)) <= set(np.flatnonzero(want))
np.testing.assert_allclose(freq, want, atol=0.04)
top5 = np.argsort(-want)[:5]
fig, ax = plt.subplots(figsize=(5.5, 3))
ax.bar(np.arange(5) - 0.2, want[top5], 0.4, label="top-k 5 probabilities")
ax.bar(np.arange(5) + 0.2, freq[top5], 0.4, label="2000 draws of sample()")
ax.set(xticks=range(5), xticklabels=[repr(tok.decode([int(i)])) for i in top5], ylim=(0, 1),
       title="Sampling matches the distribution")  # fmt: skip
ax.legend(fontsize=8)
plt.show()
print(f"To see: each pair of bars agrees to within sampling noise "
      f"(largest difference {np.abs(freq - want).max():.3f}).")  # fmt: skip

# %% [markdown]
# What the settings do to real text: the same prompt, 40 tokens, a few settings (two
# seeds for the random ones). Greedy is deterministic and tends to repeat itself;
# moderate temperature with top-p keeps the text fluent and varied; a high temperature
# without a cut-off wanders off into unlikely tokens.

# %%
settings = {
    "greedy": dict(temperature=0.0),
    "T=0.7, top-p 0.9": dict(temperature=0.7, top_p=0.9),
    "T=1.0": dict(temperature=1.0),
    "T=1.5": dict(temperature=1.5),
    "T=1.5, top-k 5": dict(temperature=1.5, top_k=5),
}
prompt_text = tok.decode(story)
for name, kw in settings.items():
    for seed in (0, 1) if kw["temperature"] else (0,):
        out = lj.generate_text(model, tok, prompt_text, max_new_tokens=40, seed=seed, **kw)
        print(f"[{name}, seed {seed}] {out!r}\n")

# %% [markdown]
# ## 6. int8 weights: rounding, and GPTQ
#
# Section 3 showed that decoding a few sequences is bound by reading the weights, so a
# weight stored in fewer bytes makes a faster step. `llama_jax.inference.int8` stores each
# projection (wq, wk, wv, wo, w1, w2, w3, and an untied `output`) as int8 values with one
# float32 scale per *output channel*: for a weight W [K, N] (K inputs, N outputs),
#
#     scale[n]     = max_k |W[k, n]| / 127
#     values[k, n] = round(W[k, n] / scale[n])        in [-127, 127]
#
# Every output channel has one scale, so the scale comes out of the sum over the inputs:
# x @ W ~= (x @ values) * scale, and the product reads the int8 values directly.
# Embeddings and norms stay as they are. Here it is in NumPy for layer 0's w2 [F, D]
# (output axis D), checked against the package's `int8.quantize_array` and the
# `Int8Weight` that `int8.quantize` puts into a copy of the model.

# %%
w = np.asarray(model.layers[0].feed_forward.w2[...], np.float32)  # [F, D]: F in, D out
scale = np.abs(w).max(axis=0) / 127  # [D]: one scale per output channel
values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)  # [F, D]

w2_path = ("layers", "feed_forward", "w2")
pkg_values, pkg_scale = (np.asarray(a) for a in int8.quantize_array(jnp.asarray(w), w2_path))
# XLA divides through a reciprocal, which can differ from NumPy's division in the last
# bit: the scales agree to float32 precision, and a value can differ by one step only
# where w / scale sits on a tie (an exact x.5) to within that precision.
np.testing.assert_allclose(scale, pkg_scale, rtol=1e-6)
differ = values != pkg_values
assert np.abs(values.astype(int) - pkg_values).max() <= 1
np.testing.assert_allclose(np.abs(w / scale)[differ] % 1, 0.5, atol=1e-4)

rounded_model = int8.quantize(nnx.clone(model))  # every projection rounded, in a copy
packed = rounded_model.layers[0].feed_forward.w2
assert isinstance(packed, int8.Int8Weight) and packed.values[...].dtype == jnp.int8
np.testing.assert_array_equal(np.asarray(packed.values[...]), pkg_values)
np.testing.assert_array_equal(np.asarray(packed.scale[...]), pkg_scale)
np.testing.assert_allclose(np.asarray(packed.dequantize()), pkg_values * pkg_scale, rtol=1e-6)
print(f"w2 {w.shape}: {differ.sum()} of {w.size:,} values differ by one step, each on a tie")

# Memory: the int8 value, plus the channel's 4-byte scale shared by its F inputs.
per_weight = 1 + 4 / w.shape[0]
print(
    f"bytes per weight: float32 4, bfloat16 2, int8 1 + 4/{w.shape[0]} = {per_weight:.4f}: "
    f"{4 / per_weight:.2f}x smaller than float32, {2 / per_weight:.2f}x than bfloat16"
)


def param_bytes(m):
    """Bytes of every parameter of a model, as stored."""
    return sum(a.nbytes for a in jax.tree.leaves(nnx.state(m, nnx.Param)))


projection_params = sum(getattr(o, n)[...].size for o, n, _ in int8.projections(model))
share = projection_params / cfg.num_params()
print(
    f"whole model: {param_bytes(model) / 1e6:.1f} MB as loaded ({cfg.param_dtype}), "
    f"{param_bytes(rounded_model) / 1e6:.1f} MB with int8 projections; the projections are "
    f"{share:.0%} of the parameters, the embedding and norms keep their dtype"
)

# The rounding error, as a fraction of the weight's norm, beside bfloat16's.
rounding_error = np.linalg.norm(w - values * scale) / np.linalg.norm(w)
w_bf16 = np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32))
bf16_error = np.linalg.norm(w - w_bf16) / np.linalg.norm(w)
print(
    f"||W - Q|| / ||W||: int8 {rounding_error:.2%}, bfloat16 {bf16_error:.2%} "
    f"({rounding_error / bf16_error:.1f}x)"
)
assert bf16_error < rounding_error < 0.03

# %% [markdown]
# **Why the output, not the weight, is what counts.** A layer computes X W for its
# inputs X [tokens, K]; int8 changes that to X Q, an error X (W - Q). Rounding makes each
# weight's own error as small as it can be, but the errors of one output channel add up
# over the K inputs, weighted by the activations: inputs that are large on real text, and
# inputs that move together, turn small weight errors into large output errors.
#
# **GPTQ** (Frantar et al., 2022; `llama_jax.inference.gptq`) minimises ||X W - X Q||
# instead, on activations X from some calibration text. It rounds the K input rows of W
# one at a time (the inputs with the largest mean square first) and moves each row's
# rounding error onto the rows not yet rounded, in proportion to how the inputs
# correlate: through the inverse of H = 2 X^T X / tokens, the Hessian of the output
# error. A later row then partly cancels what an earlier row's rounding did to the
# output. Same int8 grid, same scales as rounding; only the values differ, so a GPTQ
# weight is saved, loaded and run by the same code.
#
# On one weight, with real activations: layer 0's wq reads the normed embeddings, so its
# input is `model.layers[0].attention_norm` of the embedding rows, computed with the
# model's own modules. The calibration text and the held-out text are two disjoint sets
# of topics from Python's own documentation (`pydoc_data.topics`, in every CPython;
# `llama_jax.examples.python_docs`), as in `tests/test_gptq.py`. The errors below are relative: ||X (W - Q)|| / ||X W||.

# %%
ROW_LENGTH = min(256, cfg.max_seq_len)
calibration_text = "\n\n".join(examples.python_docs(examples.CALIBRATION_TOPICS))
held_out_text = "\n\n".join(examples.python_docs(examples.HELD_OUT_TOPICS))
calibration = gptq.calibration_rows(tok, calibration_text, rows=4, length=ROW_LENGTH)
held_out = gptq.calibration_rows(tok, held_out_text, rows=6, length=ROW_LENGTH)
print(f"calibration {calibration.shape}, held out {held_out.shape} (rows x tokens, BOS first)")


def wq_inputs(tokens):
    """Layer 0's wq inputs [tokens, D]: the attention norm of the embedding rows."""
    embedded = model.tok_embeddings[...][jnp.asarray(tokens)]  # [B, T, D]
    return np.asarray(model.layers[0].attention_norm(embedded), np.float32).reshape(-1, cfg.dim)


x_cal, x_held = wq_inputs(calibration), wq_inputs(held_out)
wq = np.asarray(model.layers[0].attention.wq[...], np.float32)  # [D, N, H]: outputs N, H
W = wq.reshape(cfg.dim, -1)
quantized = {
    "rounding": [
        np.asarray(a) for a in int8.quantize_array(jnp.asarray(wq), ("layers", "attention", "wq"))
    ],
    "GPTQ": gptq.gptq_weight(wq, x_cal, out_ndim=2),
}
np.testing.assert_allclose(quantized["GPTQ"][1], quantized["rounding"][1], rtol=1e-6)


def dequantized(v, s):
    return (v.astype(np.float32) * s).reshape(W.shape)


errors = {
    name: {
        "weight ||W - Q||": np.linalg.norm(W - dequantized(v, s)) / np.linalg.norm(W),
        "output, calibration": np.linalg.norm(x_cal @ (W - dequantized(v, s)))
        / np.linalg.norm(x_cal @ W),
        "output, held out": np.linalg.norm(x_held @ (W - dequantized(v, s)))
        / np.linalg.norm(x_held @ W),
    }
    for name, (v, s) in quantized.items()
}
kinds = list(errors["rounding"])
fig, ax = plt.subplots(figsize=(7, 3.2))
for i, name in enumerate(errors):
    ax.bar(
        np.arange(3) + (i - 0.5) * 0.38, [errors[name][k] * 100 for k in kinds], 0.38, label=name
    )
ax.set(
    xticks=range(3),
    xticklabels=kinds,
    ylabel="relative error (%)",
    title=f"{cfg.name}: layer 0 wq {list(wq.shape)} in int8",
)
ax.legend(fontsize=8)
plt.show()
for name, e in errors.items():
    print(f"{name:9s}", "  ".join(f"{k}: {v:.3%}" for k, v in e.items()))
# Rounding gives each weight its nearest step, so no other choice has a smaller weight
# error; GPTQ gives up some of it for a smaller error where it matters, at the output.
assert errors["GPTQ"]["weight ||W - Q||"] >= errors["rounding"]["weight ||W - Q||"] * (1 - 1e-4)
for k in kinds[1:]:
    assert errors["GPTQ"][k] < errors["rounding"][k], k
print(
    "To see: GPTQ's weights are further from W than rounding's, its outputs closer to X W, "
    "on the calibration text and on text it never saw."
)
if not CHECKPOINT:
    print(
        "(The random model's embeddings are random, so its wq inputs are nearly "
        "uncorrelated and GPTQ has less to work with than on a trained model.)"
    )

# %% [markdown]
# **The whole model.** `gptq.quantize(model, tokens)` does this for every projection in
# one forward pass over the calibration tokens: each projection is quantized when it is
# first called, from the inputs it receives, and passes on its *int8* product, so every
# later layer is calibrated on what it will read in the int8 model. Here with a small
# calibration set (4 rows of 256 tokens), on a copy of the model; then the top-1 token of
# every held-out position against the float model's, for rounding, GPTQ and, for scale,
# every parameter rounded to bfloat16 (computed in float32).

# %%
t0 = time.perf_counter()
gptq_model = gptq.quantize(nnx.clone(model), calibration, progress=False)
gptq_seconds = time.perf_counter() - t0
for (owner, name, _), (r_owner, _, _) in zip(
    int8.projections(gptq_model), int8.projections(rounded_model), strict=True
):
    packed, rounded = getattr(owner, name), getattr(r_owner, name)
    assert isinstance(packed, int8.Int8Weight)  # the same format as rounding, same scales
    np.testing.assert_array_equal(np.asarray(packed.scale[...]), np.asarray(rounded.scale[...]))

bf16_model = nnx.clone(model)
params = nnx.state(bf16_model, nnx.Param)
nnx.update(bf16_model, jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype), params))

reference = np.asarray(model(jnp.asarray(held_out))).argmax(-1)  # [B, T]
agreement = {
    name: (np.asarray(m(jnp.asarray(held_out))).argmax(-1) == reference).mean()
    for name, m in [
        ("int8, rounding", rounded_model),
        ("int8, GPTQ", gptq_model),
        ("bfloat16 weights", bf16_model),
    ]
}
fig, ax = plt.subplots(figsize=(6, 3))
bars = ax.bar(list(agreement), [a * 100 for a in agreement.values()], color=["C0", "C1", "C2"])
ax.bar_label(bars, fmt="%.1f%%")
low = min(agreement.values()) * 100
ax.set(
    ylim=(max(0, low - 5), 100),
    ylabel="top-1 agreement (%)",
    title=f"{cfg.name}: {reference.size} held-out tokens",
)
plt.show()
print(f"GPTQ on {calibration.size} calibration tokens took {gptq_seconds:.1f} s.")
for name, a in agreement.items():
    print(f"{name:17s}: {a:.2%} of {reference.size} held-out tokens agree with {cfg.param_dtype}")
if CHECKPOINT:
    assert agreement["int8, GPTQ"] >= agreement["int8, rounding"], agreement
    print(
        "To see: GPTQ's int8 agrees with the float model more often than rounding's, and "
        "bfloat16 more still."
    )
else:
    print(
        "The random model was trained on nothing: its activations carry no structure of "
        "text, and these agreement figures say nothing about a trained model."
    )

# %% [markdown]
# The figures in docs/performance.md ("int8") come from a larger calibration (8 rows of
# 512 tokens) and 9,384 held-out tokens: top-1 agreement with float32 98.5% for GPTQ,
# 96.9% for rounding (`tests/test_gptq.py` measures them). To do it once and keep the
# result, `llama-jax quantize SRC DST --calibration text.txt` runs GPTQ on a float
# checkpoint and saves an int8 one, which `lj.load(DST)` reads as it is (without
# `--calibration` it rounds, as `lj.load(SRC, quantize="int8")` does on every load).

# %% [markdown]
# The KV cache can be int8 too: `lj.generate(..., cache_dtype="int8")` keeps each cached
# key and value vector (H numbers for one token and KV head) as int8 values with one
# float32 scale, its absmax / 127: the same rounding as above, with one scale per vector
# instead of one per output channel. Running the held-out rows through such a cache in
# one prefill makes every attention read the rounded keys and values:

# %%
from llama_jax.inference.int8 import new_cache

rows, length = held_out.shape
through_cache = nnx.jit(lambda m, t, c: m(t, cache=c)[0])
int8_cache = new_cache(model, rows, -(-length // 128) * 128, "int8")  # slots: multiple of 128
via_int8_cache = np.asarray(through_cache(model, jnp.asarray(held_out), int8_cache)).argmax(-1)
one_slot = jax.eval_shape(lambda: new_cache(model, 1, 1, "int8"))
int8_per_token = sum(
    a.size * a.dtype.itemsize
    for f in ("k", "v", "k_scale", "v_scale")
    for a in getattr(one_slot, f)
)
assert int8_per_token == 2 * cfg.n_layers * cfg.kv_heads * (cfg.head_dim + 4)  # H int8 + a scale
print(f"int8 cache: {int8_per_token / 1024:.1f} KiB per token, float32 cache "
      f"{kv_bytes_per_token(cfg, 4) / 1024:.1f} KiB; top-1 agreement with the float model "
      f"through it: {(via_int8_cache == reference).mean():.2%} of {reference.size} tokens")  # fmt: skip

# %% [markdown]
# ## Exercises
#
# 1. How many bytes of KV cache does Llama 3.1 70B need for 32 sequences of 8192 tokens,
#    and how many H100s (80 GB) just for that cache?
# 2. At what context does one sequence's cache equal the weights for Llama 3.1 8B (bf16)?
# 3. With int8 projections (1 byte each, plus their scales; embedding and norms in bf16,
#    as in exercise 5) and a bf16 cache, what is the H100 step time for Llama 3.1 8B at
#    batch 1, context 8192? (Count every weight as read, as the roofline above does.)
# 4. What is the critical batch B* on an H100 for a context of 0 (weights only), and why
#    does it not depend on the model's size?
# 5. How many GB do Llama 3.1 8B's weights take with int8 projections (one float32 scale
#    per output channel) and the rest (embedding, norms) in bfloat16, against bfloat16
#    throughout? Check the count on the model loaded here first.
#
# **Answers.**

# %%
c70 = lj.PRESETS["llama3.1-70b"]
kv70 = kv_bytes_per_token(c70) * 8192 * 32
print(f"1. {kv70 / 1e9:.1f} GB: {int(np.ceil(kv70 / 80e9))} H100s for the cache alone.")
print(f"2. {c8.num_params() * 2 / kv_bytes_per_token(c8):,.0f} tokens.")


def int8_counts(c):
    """(int8 values, float32 scales) of a model's projections: per layer wq, wk, wv, wo,
    w1, w3, w2, one scale per output channel; plus an untied `output` [D, V]."""
    D, N, K, H, F, V = c.dim, c.n_heads, c.kv_heads, c.head_dim, c.ffn_hidden_dim, c.vocab_size
    values = c.n_layers * (2 * D * N * H + 2 * D * K * H + 3 * D * F)
    scales = c.n_layers * (N * H + 2 * K * H + D + 2 * F + D)
    if not c.tie_word_embeddings:
        values, scales = values + D * V, scales + V
    return values, scales


def int8_bytes(c, rest_bytes=2):
    """Bytes of a model with int8 projections and every other parameter in rest_bytes."""
    values, scales = int8_counts(c)
    return values + 4 * scales + rest_bytes * (c.num_params() - values)


h100 = HARDWARE["H100 SXM"]
t_int8 = (int8_bytes(c8) + kv_bytes_per_token(c8) * 8192) / h100["bandwidth"]
bf16 = step_time(c8, 1, 8192, **h100)[0]
print(
    f"3. {t_int8 * 1e3:.2f} ms against {bf16 * 1e3:.2f} ms in bf16 ({bf16 / t_int8:.2f}x faster)."
)
b0 = critical_batch(c8, 0, **h100)
print(
    f"4. B* = {b0:.0f}: W/bandwidth over 2P/rate = (2 bytes x rate) / (2 x bandwidth); "
    f"P cancels (up to the embedding, read but not multiplied): {h100['flops'] / h100['bandwidth']:.0f}."
)
assert int8_counts(cfg)[0] == projection_params
assert int8_bytes(cfg, np.dtype(cfg.param_dtype).itemsize) == param_bytes(rounded_model)
print(
    f"5. {int8_bytes(c8) / 1e9:.2f} GB against {c8.num_params() * 2 / 1e9:.2f} GB in bfloat16 "
    f"({c8.num_params() * 2 / int8_bytes(c8):.2f}x smaller; the embedding stays bfloat16)."
)

# %% [markdown]
# ## Where to go next
#
# - `llama_jax/inference/generate.py`: bucketed prompt lengths, left padding, the compiled
#   decode loop, stop ids; `llama_jax/inference/sampling.py`: the sampler as one jitted
#   function; `llama_jax/model/kv_cache.py`: the cache's layout.
# - `llama-jax generate --checkpoint CKPT --prompt "..." --temperature 0.7 --top-p 0.9`
#   and `llama-jax chat --checkpoint CKPT` on a converted checkpoint (docs/generation.md).
# - Notebook **03_sharding** splits weights and cache over devices; **05_finetuning**
#   teaches this model something new, and its result in `runs/notebooks/finetuned` opens
#   here with `LLAMA_JAX_CHECKPOINT=runs/notebooks/finetuned`.
