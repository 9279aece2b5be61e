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
# # Generation: tokenizers, the KV cache and sampling
#
# **What you will learn.** How text becomes token ids (SentencePiece for Llama 1/2,
# tiktoken BPE for Llama 3); what the key/value cache holds and how much memory it takes
# per token for each model; why the prompt (prefill) and each new token (decode) cost so
# differently; what greedy, temperature, top-k and top-p sampling do to the distribution,
# written here and checked against `llama_jax.sampling`; and how much the cache saves.
#
# **How to run it.**
# - *CPU laptop*: open this file in Jupyter with jupytext (see notebook 01) or run
#   `jupytext --to ipynb notebooks/04_generation.py`. It trains a small SentencePiece
#   tokenizer on the package's own source text and builds a tiny random model; about a
#   minute. A random model produces random text: the mechanics are the same.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`; the timings change the most.
# - *Colab TPU*: Runtime > Change runtime type > TPU, `!pip install -e <your clone>`.
#
# **Real weights.** Set `LLAMA_JAX_CHECKPOINT` (or `CHECKPOINT` below) to a llama-jax
# checkpoint that holds its `tokenizer.model` (`llama-jax convert` copies it), e.g. one
# converted from Llama 3.2 1B; the model then writes real text. (Or the one
# `llama-jax quickstart` leaves a small trained one in `runs/quickstart/model`.)

# %%
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from llama_jax.attention import KVCache

import llama_jax as lj
from llama_jax.inference.generate import generate
from llama_jax.inference.sampling import filter_logits, sample
from llama_jax.model import set_params
from llama_jax.tokenizer import Tokenizer, llama3_special_tokens, train_sentencepiece

# ▶ Point this at a llama-jax checkpoint (with tokenizer.model); None builds a tiny model.
CHECKPOINT = os.environ.get("LLAMA_JAX_CHECKPOINT") or None
workdir = Path(tempfile.mkdtemp(prefix="llama-jax-generation-"))

# %% [markdown]
# ## 1. Tokenizers
#
# Llama 1 and 2 use a 32k-piece SentencePiece BPE model; Llama 3 a 128k-token tiktoken
# BPE with 256 special tokens (`<|begin_of_text|>`, `<|eot_id|>`, ...). Both sit behind
# one interface, `Tokenizer.load(path)`, which tells them apart by the file's contents.
# Without a checkpoint we train a SentencePiece model with Llama 2's settings (byte
# fallback, split digits) on the package's own source code.

# %%
if CHECKPOINT:
    from llama_jax import checkpoint

    tok = Tokenizer.load(CHECKPOINT)  # the checkpoint directory's tokenizer.model
    model = checkpoint.load(CHECKPOINT)
    cfg = model.cfg
else:
    sources = sorted(Path(lj.__file__).parent.rglob("*.py"))
    tok = train_sentencepiece(sources, workdir / "tokenizer.model", vocab_size=512)
print(
    type(tok).__name__,
    "kind:",
    tok.kind,
    "vocab:",
    tok.vocab_size,
    "bos/eos:",
    tok.bos_id,
    tok.eos_id,
    "stop ids:",
    sorted(tok.stop_ids)[:4],
)

text = "The KV cache holds 2 * L * K * H numbers per token."
ids = tok.encode(text)  # BOS first, exactly once
piece = tok.sp.id_to_piece if tok.kind == "sentencepiece" else lambda i: tok.decode([i])
pieces = [piece(i) for i in ids[1:]]  # SentencePiece writes a leading space as "▁"
print(len(text), "characters ->", len(ids), "ids:", ids)
print("pieces:", pieces)
assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == text

# %% [markdown]
# Chat models were fine-tuned on one fixed template per family, and BOS must appear
# exactly once (trap 6 of the design notes). The tokenizer writes its family's template:
# Llama 2's `[INST]` / `<<SYS>>` markers for SentencePiece, Llama 3's header tokens
# (`<|start_header_id|>user<|end_header_id|>`, ... `<|eot_id|>`) for tiktoken, whose 256
# special tokens take the ids after the 128 000 ordinary ones.

# %%
dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a llama."}]
print(tok.format_dialog(dialog))
chat_ids = tok.encode_dialog(dialog)
assert chat_ids.count(tok.bos_id) == 1
specials = llama3_special_tokens()
print(len(specials), "Llama 3 special tokens:", specials[:2], "...", specials[-1])

# %% [markdown]
# Byte fallback means no text is ever unknown: a character the pieces do not cover is
# spelled as its UTF-8 bytes, each its own id. How many characters one token covers
# depends on how close the text is to what the tokenizer was trained on:

# %%
assert tok.decode(tok.encode("naïve ☃", bos=False)) == "naïve ☃"
texts = {
    "model.py docstring": lj.model.__doc__,
    "English prose": "Half of this project's users come to learn. The best teaching material builds each piece in front of the reader, checks it, and shows pictures.",
    "digits": "3.14159265358979323846264338327950288419716939937510",
    "non-Latin": "Модель читает текст по кусочкам. 模型一次读取一段文本。",
}
ratio = {k: len(v) / len(tok.encode(v, bos=False)) for k, v in texts.items()}
fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(ratio), list(ratio.values()))
ax.set(xlabel="characters per token", title=f"{tok.kind}, {tok.vocab_size} ids")
ax.invert_yaxis()
plt.show()

# %% [markdown]
# ## 2. The model
#
# Without a checkpoint: the `tiny` preset resized to the tokenizer's vocabulary, with
# matrices drawn at standard deviation 1/sqrt(fan-in) so that its next-token distributions
# are not flat (notebook 01 explains the choice).

# %%
if not CHECKPOINT:
    cfg = lj.PRESETS["tiny"].replace(vocab_size=tok.vocab_size, name="tiny-sp512")
    model = lj.build_model(cfg, seed=0)
    rng = np.random.default_rng(0)

    # Inputs summed into each output: D for the projections from the residual stream,
    # N*H into wo, F into w2; embedding rows are looked up, not summed (unit variance).
    D, F, NH = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads * cfg.head_dim
    fan_ins = dict(tok_embeddings=1, wq=D, wk=D, wv=D, wo=NH, w1=D, w3=D, w2=F, output=D)

    def redraw(path, w):
        name = path[-1].key
        if name == "weight":
            return w
        fan_in = fan_ins[name]
        return rng.normal(size=w.shape).astype(np.float32) * fan_in**-0.5

    set_params(
        model,
        jax.tree_util.tree_map_with_path(redraw, nnx.to_pure_dict(nnx.state(model, nnx.Param))),
    )
print(cfg.name, f"L={cfg.n_layers} D={cfg.dim} N={cfg.n_heads} K={cfg.kv_heads} V={cfg.vocab_size}")

# %% [markdown]
# ## 3. The KV cache
#
# A decoder only ever looks back, so the keys and values of past tokens never change.
# Keeping them means each new token computes only its own: the cache holds, per token,
# one key and one value of H numbers for each of the K KV heads in each of the L layers,
# `2 * L * K * H` numbers. `KVCache.create` allocates it at a fixed size S (static shapes:
# one compiled decode step for every position).

# %%
cache = KVCache.create(cfg, batch=2, max_len=64)
print("k:", cache.k.shape, cache.k.dtype, "valid:", cache.valid.shape, "index:", int(cache.index))
per_token = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * cache.k.dtype.itemsize
assert cache.k.nbytes + cache.v.nbytes == per_token * 2 * 64

names = [
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "llama3.1-70b",
    "llama3.1-405b",
    "llama3.2-1b",
    "llama3.2-3b",
]
kib, full_gib = [], []
for name in names:
    c = lj.PRESETS[name]
    shapes = jax.eval_shape(lambda c=c: KVCache.create(c, batch=1, max_len=1024, dtype="bfloat16"))
    nbytes = (shapes.k.size + shapes.v.size) * 2  # bfloat16: shapes only, nothing allocated
    assert nbytes == 2 * c.n_layers * c.kv_heads * c.head_dim * 2 * 1024
    kib.append(nbytes / 1024 / 1024)
    full_gib.append(nbytes / 1024 * c.max_seq_len / 2**30)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
ax1.bar(names, kib)
ax1.set(ylabel="KiB per token (bf16)", title="KV cache per token")
ax2.bar(names, full_gib, color="C1")
ax2.set(ylabel="GiB", yscale="log", title="KV cache for one full context (batch 1)")
for ax in (ax1, ax2):
    ax.tick_params(axis="x", rotation=30)
plt.show()
for n, k, g in zip(names, kib, full_gib, strict=True):
    print(f"{n:14s} {k:6.0f} KiB/token   {g:7.2f} GiB at {lj.PRESETS[n].max_seq_len} tokens")

# %% [markdown]
# ## 4. Prefill and decode
#
# *Prefill* runs the whole prompt through the model at once: T tokens per weight read, so
# it is limited by arithmetic. *Decode* produces one token per sequence per step: every
# weight (and the whole cache) is read to do 2 FLOPs per weight per sequence, so it is
# limited by memory bandwidth unless the batch is large. The ratio FLOPs / bytes read is
# the arithmetic intensity; an H100 SXM (about 990 TFLOP/s bf16, 3.35 TB/s per its spec
# sheet) needs about 300 FLOPs per byte to be busy.

# %%
c = lj.PRESETS["llama3-8b"]
P = c.num_params()
tokens_per_step = np.array([1, 4, 16, 64, 256, 1024, 4096])
intensity = 2 * P * tokens_per_step / (2 * P)  # bf16 weights read once per step
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(tokens_per_step, intensity, "o-", label="FLOPs per byte of weights")
ax.axhline(990e12 / 3.35e12, color="k", ls=":", label="H100 ridge (~295)")
ax.axvspan(1, 64, alpha=0.1, color="C1", label="decode (tokens = batch)")
ax.axvspan(256, 4096, alpha=0.1, color="C2", label="prefill (tokens = prompt)")
ax.set(
    xlabel="tokens processed per weight read",
    ylabel="FLOPs / byte",
    title="Llama 3 8B: why decode is memory-bound",
)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The same on this machine: one call with the whole prompt against one decode step at a
# time. The model is tiny, so the per-call overhead dominates here; the shape of the
# result (prefill cost per token far below decode) is what carries over.

# %%
T = 64
prompt = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, size=(1, T)), jnp.int32)
step = nnx.jit(lambda m, t, c: m(t, cache=c))  # compiles once per shape of t: [1, T] and [1, 1]
empty = KVCache.create(cfg, batch=1, max_len=2 * T)
jax.block_until_ready(step(model, prompt, empty))  # compile the prefill
jax.block_until_ready(step(model, prompt[:, :1], empty))  # compile the decode step

t0 = time.perf_counter()
jax.block_until_ready(step(model, prompt, empty))
prefill_s = time.perf_counter() - t0
t0 = time.perf_counter()
cache = empty
for t in range(T):
    logits, cache = step(model, prompt[:, t : t + 1], cache)
jax.block_until_ready(logits)
decode_s = time.perf_counter() - t0
full = step(model, prompt, empty)[0]
np.testing.assert_allclose(logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)  # same model
print(f"{T} tokens: prefill {prefill_s * 1e3:.1f} ms in one call ({prefill_s / T * 1e6:.0f} us/token), "
      f"decode {decode_s * 1e3:.1f} ms in {T} calls ({decode_s / T * 1e6:.0f} us/token)")  # fmt: skip

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
ids = tok.encode("def generate(model, prompt")
logits = np.asarray(model(jnp.asarray([ids], jnp.int32))[0, -1], np.float64)  # [V]
for k in (1, 5, 40):
    theirs = np.isfinite(
        np.asarray(
            filter_jit(jnp.asarray(logits[None], jnp.float32), jnp.int32(k), jnp.float32(1.0))
        )
    )[0]
    np.testing.assert_array_equal(theirs, top_k_probs(logits, k) > 0)
for p in (0.5, 0.9):
    theirs = np.isfinite(
        np.asarray(filter_jit(jnp.asarray(logits[None], jnp.float32), jnp.int32(0), jnp.float32(p)))
    )[0]
    np.testing.assert_array_equal(theirs, top_p_probs(logits, p) > 0)
greedy = sample(
    jnp.asarray(logits[None], jnp.float32),
    jax.random.key(0),
    jnp.float32(0),
    jnp.int32(0),
    jnp.float32(1),
)
assert int(greedy[0]) == int(np.argmax(logits))

order = np.argsort(-logits)[:30]
strategies = {
    "temperature 0.5": softmax(logits / 0.5),
    "temperature 1": softmax(logits),
    "temperature 2": softmax(logits / 2),
    "top-k 5": top_k_probs(logits, 5),
    "top-p 0.9": top_p_probs(logits, 0.9),
}
fig, axes = plt.subplots(1, len(strategies), figsize=(15, 3), sharey=True)
for ax, (name, probs) in zip(axes, strategies.items(), strict=True):
    ax.bar(range(30), probs[order], color="C0")
    ax.bar([0], probs[order[0]], color="C3", label="greedy's pick")
    ax.set(title=f"{name}\n{int((probs > 0).sum())} tokens possible", xlabel="rank")
axes[0].set_ylabel("probability")
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# The package's sampler draws from exactly these distributions: 4000 draws with
# top-k 5 at temperature 1, against the renormalised probabilities.

# %%
draw = jax.jit(
    jax.vmap(
        lambda key: sample(
            jnp.asarray(logits[None], jnp.float32),
            key,
            jnp.float32(1),
            jnp.int32(5),
            jnp.float32(1),
        )[0]
    )
)
drawn = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))
want = top_k_probs(logits, 5)
freq = np.bincount(drawn, minlength=cfg.vocab_size) / len(drawn)
assert set(np.unique(drawn)) <= set(np.flatnonzero(want))
np.testing.assert_allclose(freq, want, atol=0.03)
top5 = np.argsort(-want)[:5]
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(np.arange(5) - 0.2, want[top5], 0.4, label="top-k 5 probabilities")
ax.bar(np.arange(5) + 0.2, freq[top5], 0.4, label="4000 draws of sample()")
ax.set(
    xticks=range(5),
    xticklabels=[repr(tok.decode([int(i)])) for i in top5],
    title="Sampling matches the distribution",
)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 6. With and without the cache
#
# Without a cache, each new token re-runs the model over the whole sequence so far
# (written here with one fixed-length buffer, so it compiles once). With it, each step
# feeds only the newest token. Both loops below step from Python and decode greedily; they
# must produce the same tokens as the package's `generate`, which runs the whole decode
# loop compiled on the device.

# %%
N = 160
prompt_ids = tok.encode("def generate(model, prompt")
S = len(prompt_ids) + N


@nnx.jit
def next_token_no_cache(model, buffer, length):
    logits = model(buffer)  # [1, S, V]: every position, every step
    return jnp.argmax(logits[0, length - 1]).astype(jnp.int32)


def generate_no_cache(n):
    buffer = jnp.zeros((1, S), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids))
    out, times, t0 = [], [], time.perf_counter()
    for i in range(n):
        length = len(prompt_ids) + i
        tok_id = next_token_no_cache(model, buffer, length)
        buffer = buffer.at[0, length].set(tok_id)
        out.append(int(tok_id))
        times.append(time.perf_counter() - t0)
    return out, times


def generate_with_cache(n):
    cache = KVCache.create(cfg, batch=1, max_len=S)
    t0 = time.perf_counter()
    logits, cache = step(model, jnp.asarray([prompt_ids], jnp.int32), cache)  # prefill
    out, times = [], []
    for _ in range(n):
        tok_id = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [1]
        out.append(int(tok_id[0]))
        times.append(time.perf_counter() - t0)
        logits, cache = step(model, tok_id[:, None], cache)  # decode one token
    return out, times


for warm_up in (generate_no_cache, generate_with_cache):
    warm_up(2)  # compile
generate(model, [prompt_ids], N)  # compile
slow, slow_times = generate_no_cache(N)
fast, fast_times = generate_with_cache(N)
t0 = time.perf_counter()
package = generate(model, [prompt_ids], N)[0]
package_s = time.perf_counter() - t0
assert slow == fast == package, (slow, fast, package)
print("greedy, identical three ways:", repr(tok.decode(fast)[:80]))

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, N + 1), np.array(slow_times) * 1e3, label="no cache: whole sequence each step")
ax.plot(np.arange(1, N + 1), np.array(fast_times) * 1e3, label="KV cache: one token each step")
ax.plot([N], [package_s * 1e3], "k*", ms=10, label="generate(): compiled loop")
ax.set(xlabel="tokens generated", ylabel="ms since start", title=f"{cfg.name}: cumulative time")
ax.legend(fontsize=8)
plt.show()
print(
    f"{N} tokens: no cache {slow_times[-1] * 1e3:.0f} ms, cache {fast_times[-1] * 1e3:.0f} ms, generate() {package_s * 1e3:.0f} ms"
)

# %% [markdown]
# On a model this small, fixed per-step overhead hides much of the difference. The work
# without a cache grows with the square of the length (each step re-projects and attends
# over every earlier token), with the cache only linearly; on a real model at a few
# thousand tokens that is the difference between seconds and minutes.
#
# ## Where to go next
#
# - `llama_jax/generate.py`: bucketed prompt lengths, left padding, the compiled decode
#   loop, stop ids; `llama_jax/sampling.py`: the sampler as one jitted function.
# - `llama-jax generate --checkpoint CKPT --prompt "..." --temperature 0.7 --top-p 0.9`
#   and `llama-jax chat --checkpoint CKPT` on a converted checkpoint (docs/generation.md).
# - Notebook **03_sharding** splits the weights over devices (the cache follows
#   `sharding.CACHE_AXES`); **05_finetuning** teaches a model something worth generating.
