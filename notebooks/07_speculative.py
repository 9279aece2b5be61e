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
# # Speculative decoding: guess cheaply, verify in one forward
#
# **What you will learn.** Why decoding one token at a time is bound by memory
# bandwidth (bytes read per token against FLOPs); how a draft model proposes k tokens
# and the target checks them all in one forward over its static KV cache; how the
# acceptance rate depends on k and on the draft's size, measured; the speed-up,
# measured, and when there is none; and, empirically, that rejection sampling leaves
# the target's distribution unchanged (`llama_jax.inference.speculative`).
#
# **How to run it.**
# - *CPU laptop*: run the install cell below (in a clone it does nothing), then the
#   notebook top to bottom; tiny random models, a couple of minutes.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`; the speed-up section is the
#   one that changes, since a GPU is far more memory-bound than a laptop CPU.
# - *Colab TPU*: Runtime > Change runtime type > TPU; set `LLAMA_JAX_SRC` to your clone
#   (a path or a `git+https://...` URL) before the install cell.
#
# **Real weights.** Set `LLAMA_JAX_CHECKPOINT` (or `CHECKPOINT` below) to a llama-jax
# checkpoint; the acceptance and speed sections then use it, with drafts made of its
# own first layers. Without one, a tiny random model whose later layers are scaled
# down stands in (section 1 says why): its numbers illustrate, they do not predict.

# %%
# Install (once). In a clone with the package importable this does nothing; elsewhere
# (e.g. Colab) it installs llama-jax from LLAMA_JAX_SRC, a path or a git URL.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("llama_jax") is None:
    src = os.environ.get("LLAMA_JAX_SRC")
    if not src:
        raise RuntimeError("Set LLAMA_JAX_SRC to a llama-jax clone (path or git+https URL).")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", src, "matplotlib"])

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import llama_jax as lj
from llama_jax.inference.speculative import draft_from_layers, speculative_generate

# ▶ Point this at a llama-jax checkpoint; None builds a tiny random model.
CHECKPOINT = os.environ.get("LLAMA_JAX_CHECKPOINT") or None

# %% [markdown]
# ## 1. Decoding is memory bound
#
# One decode step multiplies every weight matrix by a single vector per row: about
# 2 FLOPs per parameter per row, while every parameter is read from memory once. At
# batch B the intensity is about 2B / (bytes per parameter) FLOPs per byte. An H100
# does about 1000 TFLOP/s (bfloat16) against 3.35 TB/s, i.e. ~300 FLOPs per byte: any
# batch below a few hundred rows waits for memory. Feeding k + 1 tokens instead of one
# reads the same bytes, so it costs about the same time.

# %%
rows = []
for name in ["llama3.2-1b", "llama3.1-8b", "llama3.1-70b"]:
    n = lj.count_params(lj.abstract_model(lj.get_preset(name)))
    rows.append((name, n, 2 * n, 2 * n))  # bytes (bf16), FLOPs per token
    print(
        f"{name:14s} {n / 1e9:6.2f} B params: {2 * n / 1e9:7.1f} GB read and "
        f"{2 * n / 1e9:7.1f} GFLOP per token -> 1 FLOP per byte"
    )
ridge = {
    "H100 (bf16)": 989e12 / 3.35e12,
    "TPU v5e (bf16)": 197e12 / 0.82e12,
    "laptop CPU": 1e12 / 50e9,
}
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(
    list(ridge), list(ridge.values()), color="tab:gray", label="FLOPs per byte to be compute-bound"
)
ax.axhline(1, color="tab:red", label="decode at batch 1: ~1 FLOP per byte (bf16)")
ax.set_yscale("log")
ax.set_ylabel("FLOPs / byte")
ax.legend(fontsize=8)
plt.show()
print("Figure 1: decode sits two orders of magnitude below what keeps the arithmetic busy.")

# %% [markdown]
# Measured on this machine: the time of one cached forward of T tokens, for T = 1 .. 8.

# %%
if CHECKPOINT:
    target = lj.load(CHECKPOINT)
else:
    cfg = lj.LlamaConfig(
        dim=256,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=4096,
        ffn_dim=768,
        max_seq_len=512,
        dtype="float32",
        param_dtype="float32",
        name="tiny-8-layers",
    )
    target = lj.build_model(cfg, seed=0)
    # A random model's layers all matter equally and its next token is noise, so no
    # shallow draft could guess it. Make each block change the residual stream less than
    # the one before (as the late layers of a trained model often refine rather than
    # decide) and sharpen the output: the first layers then predict much of the output.
    for layer, block in enumerate(target.layers):
        block.attention.wo[...] = block.attention.wo[...] * 8.0 * 0.6**layer
        block.feed_forward.w2[...] = block.feed_forward.w2[...] * 8.0 * 0.6**layer
    target.output[...] = target.output[...] * 4.0
cfg = target.cfg


@jax.jit
def forward(tokens, cache):
    return target(tokens, None, None, cache)


times = {}
for T in (1, 2, 4, 8):
    cache = target.init_cache(1, 64)
    tokens = jnp.ones((1, T), jnp.int32)
    jax.block_until_ready(forward(tokens, cache))
    start = time.perf_counter()
    for _ in range(10):
        jax.block_until_ready(forward(tokens, cache))
    times[T] = (time.perf_counter() - start) / 10 * 1e3
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(list(times), list(times.values()), "o-")
ax.set_xlabel("tokens fed in one forward (T)")
ax.set_ylabel("ms per forward")
ax.set_ylim(0, None)
plt.show()
print(
    f"Figure 2: {cfg.name}: cost of one forward vs tokens fed; "
    f"T=8 costs {times[8] / times[1]:.1f}x T=1 here."
)

# %% [markdown]
# ## 2. Draft, verify, keep the agreeing prefix
#
# A round: the draft (here the target's own first layers, sharing its arrays) proposes
# d1 .. dk one at a time; the target runs once over [x0, d1, .., dk] and gives its
# argmax after each. Greedy keeps d1 .. da while they equal the target's argmax, then
# appends the target's own token: 1 to k + 1 tokens per target forward, and always
# exactly the target's greedy tokens.

# %%
rng = np.random.default_rng(0)
prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (5, 12)]
if CHECKPOINT:
    tok = lj.Tokenizer.load(CHECKPOINT)
    prompts = [tok.encode(p, bos=True) for p in ["The capital of France is", "def add(a, b):"]]
draft = draft_from_layers(target, cfg.n_layers // 2)
plain = lj.generate(target, prompts, 24)
spec = speculative_generate(target, draft, prompts, 24, speculate_k=3)
assert list(spec) == list(plain)
print(
    f"identical to plain greedy; acceptance rate {spec.acceptance_rate:.2f}, "
    f"{spec.rounds} target forwards after the prefill for 23 more tokens per row"
)

# %% [markdown]
# ## 3. Acceptance rate vs k and draft size
#
# Greedy acceptance needs no decoding loop to measure: run each draft once over the
# target's greedy text and replay the rounds (the tests check that this replay equals
# the rate `speculative_generate` reports). With per-token agreement α, a round keeps
# on average (1 - α^(k+1)) / (1 - α) tokens.


# %%
def replayed_rate(draft, prompt, row, k):
    seq = prompt + row
    best = np.asarray(draft(jnp.asarray([seq]))[0]).argmax(-1)
    kept = proposed = 0
    i = len(prompt)
    while i < len(seq) - 1:
        a = 0
        while a < k and i + a + 1 < len(seq) and best[i + a] == seq[i + a + 1]:
            a += 1
        kept, proposed, i = kept + a, proposed + k, i + a + 1
    return kept / proposed


long = lj.generate(target, prompts[:1], 96)[0]
sizes = sorted({1, cfg.n_layers // 4, cfg.n_layers // 2, 3 * cfg.n_layers // 4} - {0})
ks = [1, 2, 3, 4, 6, 8]
fig, ax = plt.subplots(figsize=(5, 3))
for n in sizes:
    d = draft_from_layers(target, n)
    ax.plot(ks, [replayed_rate(d, prompts[0], long, k) for k in ks], "o-", label=f"{n} layers")
ax.set_xlabel("k (guesses per round)")
ax.set_ylabel("acceptance rate")
ax.set_ylim(0, 1)
ax.legend(fontsize=8)
plt.show()
print(
    f"Figure 3: {cfg.name} ({cfg.n_layers} layers): acceptance vs k for drafts of its first layers."
)

# %% [markdown]
# ## 4. The speed-up, measured
#
# A round costs k draft forwards plus one target forward and yields 1 + (kept guesses)
# tokens. A draft of n of L layers still reads the embedding and output matrices, so it
# is not n / L of the cost; with low acceptance, speculation is slower than plain
# decoding. On SmolLM2-135M on a 2-core CPU it was slower at every k and draft size (see
# docs/generation.md); it pays where a draft agrees often and costs little.


# %%
def tokens_per_second(fn):
    fn()  # compile
    start = time.perf_counter()
    n = sum(len(r) for r in fn())
    return n / (time.perf_counter() - start)


base = tokens_per_second(lambda: lj.generate(target, prompts, 48))
speeds = {}
for k in (1, 3):
    run = lambda k=k: speculative_generate(target, draft, prompts, 48, speculate_k=k)
    speeds[k] = tokens_per_second(run)
fig, ax = plt.subplots(figsize=(5, 3))
labels = ["plain"] + [f"speculative k={k}" for k in speeds]
ax.bar(labels, [base, *speeds.values()], color=["tab:gray"] + ["tab:blue"] * len(speeds))
ax.set_ylabel("tokens / s")
plt.show()
print(
    f"Figure 4: {cfg.name}, draft of {draft.cfg.n_layers} layers, batch {len(prompts)}: "
    f"speed-up {', '.join(f'k={k}: {s / base:.2f}x' for k, s in speeds.items())}."
)

# %% [markdown]
# ## 5. Sampling is unchanged
#
# Keep draft token x with probability min(1, p(x)/q(x)); at the first rejection draw
# from norm(max(0, p - q)). Then P(token = x) = q(x) min(1, p/q) + (1 - Σ min(p, q))
# · max(0, p - q)(x) / Σ max(0, p - q) = min(p, q)(x) + max(0, p - q)(x) = p(x), because
# Σ max(0, p - q) = 1 - Σ min(p, q). Below: a vocabulary of 8, 4000 rows, the second
# new token (the first one the draft proposes) from speculative decoding, from plain
# decoding, and from the draft alone, against the target's exact law by enumeration.

# %%
small = lj.LlamaConfig(
    dim=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    vocab_size=8,
    ffn_dim=64,
    max_seq_len=64,
    dtype="float32",
    param_dtype="float32",
)
tgt, noise = lj.build_model(small, seed=3), lj.build_model(small, seed=4)
tgt.output[...] = tgt.output[...] * 5.0
drf = lj.build_model(small, seed=3)
drf.output[...] = tgt.output[...] + 3.0 * noise.output[...]
prompt, N = [1, 2, 3], 4000
probs = lambda m, seqs: np.asarray(jax.nn.softmax(m(jnp.asarray(seqs))[:, -1]), np.float64)
p1 = probs(tgt, [prompt])[0]
exact = p1 @ probs(tgt, [prompt + [t] for t in range(8)])  # P(second token)
s = speculative_generate(tgt, drf, [prompt] * N, 2, temperature=1.0, speculate_k=1, seed=5)
pl = lj.generate(tgt, [prompt] * N, 2, temperature=1.0, seed=5)
first = [r[:1] for r in s]
uncorrected = lj.generate(drf, [prompt + f for f in first], 1, temperature=1.0, seed=5)
hist = lambda rows: np.bincount(rows, minlength=8) / len(rows)
fig, ax = plt.subplots(figsize=(6, 3))
x = np.arange(8)
ax.bar(x - 0.3, hist([r[1] for r in s]), 0.2, label="speculative")
ax.bar(x - 0.1, hist([r[1] for r in pl]), 0.2, label="plain")
ax.bar(x + 0.1, hist([r[0] for r in uncorrected]), 0.2, label="draft, no correction")
ax.plot(x, exact, "k_", markersize=20, mew=2, label="exact (target)")
ax.set_xlabel("second new token")
ax.set_ylabel("frequency")
ax.legend(fontsize=8)
plt.show()
tv = lambda h: 0.5 * np.abs(h - exact).sum()
print(
    f"Figure 5: second-token frequencies; total variation to the exact law: speculative "
    f"{tv(hist([r[1] for r in s])):.3f}, plain {tv(hist([r[1] for r in pl])):.3f}, "
    f"uncorrected draft {tv(hist([r[0] for r in uncorrected])):.3f} "
    f"(acceptance {s.acceptance_rate:.2f})."
)

# %% [markdown]
# ## Exercises
#
# 1. *Expected tokens per round.* With independent per-guess acceptance α and k
#    guesses, show that a round yields (1 - α^(k+1)) / (1 - α) tokens.
#    **Answer.** The round yields a + 1 tokens where P(a ≥ j) = α^j for j ≤ k; so
#    E[a + 1] = Σ_{j=0..k} α^j = (1 - α^(k+1)) / (1 - α). At α = 0.8, k = 4: 3.36.
# 2. *When does it pay?* A draft forward costs c target forwards. Give the speed-up.
#    **Answer.** Time per round ≈ k c + 1 (the verify forward costs about one forward,
#    section 1), so speed-up = (1 - α^(k+1)) / ((1 - α)(k c + 1)). A first-15-layers
#    draft of SmolLM2-135M has c ≈ 0.6 (the 28M-parameter embedding is read by both):
#    even α = 0.5, k = 2 gives 1.75 / 2.2 < 1.
# 3. *Why the greedy case is exact.* Show that with temperature 0 the rule keeps a
#    guess iff it is the target's argmax. **Answer.** Greedy p and q are one-hot; q puts
#    1 on the guess x, so min(1, p(x)/q(x)) = p(x), 1 if x is the target's argmax and 0
#    otherwise; max(0, p - q) is then the one-hot of the argmax.
# 4. *The holes.* In a batch, why does the cache index advance by max over rows of
#    (kept + 1) rather than each row's own count, and what does it cost? **Answer.**
#    One index keeps every shape static and the write a single slice; rows that kept
#    fewer mark the slots in between invalid (like left padding), so attention skips
#    them and per-row positions keep rotary right. The cost is slots: a row may spend up
#    to k + 1 slots per token, so the default cache is larger for batches.
#
# ## Where to go next
#
# `llama_jax/inference/speculative.py` holds the whole algorithm;
# `tests/test_speculative.py` holds the checks above as tests. docs/generation.md
# records the measurements on SmolLM2-135M. Try a trained smaller model of the same
# family as draft (`llama-jax generate --draft DIR --speculate 4`).
