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
# # LLaMA from the ground up: the architecture, piece by piece
#
# **What you will learn.** How a LLaMA model turns token ids into next-token logits:
# the embedding, RMSNorm, the rotary position embedding (why only the distance between two
# tokens reaches attention, Meta's interleaved pairs against Hugging Face's half-split form,
# Llama 3.1's long-context scaling), grouped-query attention written as a grouped einsum
# beside the plain `repeat` and the cache memory it saves, the SwiGLU MLP, the block and the
# stack of blocks. Each piece is written here in a few lines of JAX and then checked equal
# to the package's own (`llama_jax.model.layers`, `llama_jax.model.attention`,
# `llama_jax.model.transformer`), so if the package changes, this notebook fails instead of
# drifting. Exercises with worked answers close the notebook.
#
# **How to run it.**
# - *Colab*: the "Open in Colab" link at the top of `01_architecture.ipynb`; its first
#   code cell installs the package. CPU, GPU and TPU runtimes all work; JAX picks the
#   accelerator up by itself.
# - *CPU laptop*: in a clone, `pip install -e ".[dev]" jupyterlab` (or just the install
#   command of the first cell), then `jupyter lab notebooks/01_architecture.ipynb`. The
#   `.py` beside it is the same notebook as a jupytext script. It builds a tiny random
#   model and runs in well under a minute.
# - *GPU*: the same after `pip install -U "jax[cuda12]"`; nothing else changes.
# - *TPU*: the same on a TPU VM after `pip install -U "jax[tpu]"`.
#
# To check the pieces against a real model instead, set the environment variable
# `LLAMA_JAX_CHECKPOINT` (or `CHECKPOINT` below) to a llama-jax checkpoint directory
# (`llama-jax convert` makes one from Meta, Hugging Face or GGUF weights;
# `llama_jax.examples.trained_model()` fetches and converts SmolLM2-135M-Instruct).
#
# Dimension letters, as in the package: B batch, T query length, S key length, D model
# width, F MLP width, N query heads, K key/value heads, G = N/K, H head dim, V vocabulary,
# L layers.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import llama_jax as lj
from llama_jax.checkpoint.layout import meta_to_hf_qk
from llama_jax.model import set_params
from llama_jax.model.attention import Attention, attend
from llama_jax.model.layers import FeedForward, RMSNorm, apply_rope, rope_frequencies

# float32 matmuls at full precision, so "equal" below means equal to rounding.
jax.config.update("jax_default_matmul_precision", "highest")

# ▶ Point this at a checkpoint directory to use real weights; None builds a tiny model.
CHECKPOINT = os.environ.get("LLAMA_JAX_CHECKPOINT") or None
print("JAX", jax.__version__, "on", jax.devices())


# %% [markdown]
# ## The model we take apart
#
# Without a checkpoint we use the `tiny` preset (D=64, 2 layers, 4 query heads sharing 2
# KV heads). `build_model` draws matrices from N(0, 0.02) (Hugging Face's
# `initializer_range`, sized for models thousands wide); in a model only 64 wide that makes
# every attention score nearly zero, so the checks below would compare near-uniform
# attention. Here the matrices are drawn with standard deviation 1/sqrt(fan-in) instead.
# The weights are random: this notebook checks the *computation*; notebook 02 looks at
# what training puts into the weights.


# %%
def tiny_model(seed=0):
    cfg = lj.PRESETS["tiny"]
    model = lj.build_model(cfg, seed=seed)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)

    # Inputs summed into each output: D for the projections from the residual stream,
    # N*H into wo, F into w2; embedding rows are looked up, not summed (unit variance).
    D, F, NH = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads * cfg.head_dim
    fan_ins = dict(tok_embeddings=1, wq=D, wk=D, wv=D, wo=NH, w1=D, w3=D, w2=F, output=D)

    def redraw(path, w):
        name = path[-1].key
        if name == "weight":  # RMSNorm gains start at one
            return w
        return rng.normal(size=w.shape).astype(np.float32) * fan_ins[name] ** -0.5

    return set_params(model, jax.tree_util.tree_map_with_path(redraw, params))


model = lj.load(CHECKPOINT, dtype="float32") if CHECKPOINT else tiny_model()
cfg = model.cfg
params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
D, L, N, K, H = cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_dim
G = N // K
print(cfg.name, f"D={D} L={L} N={N} K={K} G={G} H={H} F={cfg.ffn_hidden_dim} V={cfg.vocab_size}")
print("block 0:", jax.tree.map(lambda a: a.shape, params["layers"][0]))

# %% [markdown]
# ## 1. Tokens to embeddings
#
# A token id is a row index into `tok_embeddings` [V, D]. The whole model then works on
# the "residual stream" h [B, T, D], one D-vector per token.

# %%
tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)  # [B, T]
emb = params["tok_embeddings"]  # [V, D]
h0 = emb[tokens]  # [B, T, D]
np.testing.assert_array_equal(h0, jnp.take(model.tok_embeddings[...], tokens, axis=0))
print("tokens", tokens.shape, "-> embeddings", h0.shape)

# %% [markdown]
# ## 2. RMSNorm
#
# Each block normalises its input before using it: divide by the root mean square of the
# D features and multiply by a learned gain. Unlike LayerNorm there is no mean subtraction
# and no bias. It runs in float32 even when the model is bfloat16. (`@jax.jit` compiles each
# function here into one XLA program instead of running it op by op.)


# %%
@jax.jit
def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + eps)
    return (x32 / rms * weight).astype(x.dtype)


gain = params["layers"][0]["attention_norm"]["weight"]  # block 0's gain [D]
norm = RMSNorm(D, cfg.norm_eps)
norm.weight[...] = gain
np.testing.assert_allclose(rms_norm(h0, gain, cfg.norm_eps), norm(h0), rtol=1e-6, atol=1e-6)

# Vectors whose RMS spans seven decades, from far below sqrt(eps) to 10.
scales = np.logspace(-5, 1, 400)
x = jax.random.normal(jax.random.key(2), (400, D)) * scales[:, None]
rms = lambda a: np.sqrt(np.mean(np.square(a), axis=-1))
fig, ax = plt.subplots(figsize=(6.5, 3.4))
ax.semilogx(rms(x), rms(x), color="gray", ls="--", label="input RMS (y = x)")
ax.semilogx(rms(x), rms(rms_norm(x, 1.0, cfg.norm_eps)), ".", ms=3, label="RMS after rms_norm")
ax.axvline(cfg.norm_eps**0.5, color="k", ls=":", lw=1)
ax.text(cfg.norm_eps**0.5 * 1.3, 1.25, f"sqrt(eps) = {cfg.norm_eps**0.5:.4f}", fontsize=8)
ax.set(
    xlabel="RMS of the input vector (log scale)",
    ylabel="RMS",
    ylim=(0, 1.5),
    title=f"RMSNorm brings every vector to RMS 1 (D = {D}, eps = {cfg.norm_eps:g})",
)
ax.legend(loc="upper left", fontsize=8)
plt.show()

# %% [markdown]
# *What to see:* whatever the input's size, from 0.001 to 10, the output's RMS is 1 (a flat
# line on an axis that starts at 0); only vectors smaller than sqrt(eps) are left short,
# which is all eps is for (no division by zero). The gain then rescales each feature.
#
# ## 3. Rotary position embedding (RoPE)
#
# Attention compares a query q (at position m) with a key k (at position n) by their dot
# product. RoPE splits each head's H features into H/2 pairs, treats pair i as a complex
# number and turns it by the angle `position * inv_freq[i]`, with
# `inv_freq[i] = theta ** (-2i / H)`. Turning q by m and k by n multiplies their product
# by a turn of m - n: the score depends on the distance between the tokens, not on where
# they are, and nothing is added to h. The heatmap below checks exactly that with the
# package's `apply_rope`.


# %%
def inv_freq_of(head_dim, theta):
    return 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)  # [H/2]


np.testing.assert_allclose(
    inv_freq_of(H, cfg.rope_theta), rope_frequencies(H, cfg.rope_theta, None), rtol=1e-6
)

# One query vector and one key vector (the same vector: a key that matches the query),
# placed at every position 0..127, head dim 128 and theta 10 000 as in Llama 2.
P, H_demo = 128, 128
vec = jax.random.normal(jax.random.key(4), (H_demo,))
placed = jnp.broadcast_to(vec, (1, P, 1, H_demo))  # [B=1, T=P, N=1, H]
turned = apply_rope(placed, jnp.arange(P)[None], jnp.asarray(inv_freq_of(H_demo, 1e4)))[0, :, 0]
scores = np.asarray(turned @ turned.T) / H_demo**0.5  # [m, n]: q at m . k at n

# Only m - n matters: every diagonal is constant.
m_idx, n_idx = np.indices(scores.shape)
by_distance = np.array([scores[m_idx - n_idx == d].mean() for d in range(-P + 1, P)])
np.testing.assert_allclose(scores, by_distance[m_idx - n_idx + P - 1], rtol=1e-4, atol=1e-4)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
lim = np.abs(scores).max()
im = ax1.imshow(scores, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
fig.colorbar(im, ax=ax1, label="score q·k / sqrt(H)")
ax1.set(xlabel="key position n", ylabel="query position m", title="Score of q at m, k at n")
ax2.plot(np.arange(P), by_distance[P - 1 :], color="C3")
ax2.axhline(0, color="gray", lw=0.5)
ax2.set(
    xlabel="distance m - n (tokens)",
    ylabel="score",
    ylim=(-lim, lim),
    title="The same score as a function of m - n alone",
)
plt.show()

# %% [markdown]
# *What to see:* the left map is constant along every diagonal (m - n fixed), so the whole
# map is the single curve on the right; the checks above assert it to 1e-4. For a key that
# matches the query, the score is largest at distance 0 and shrinks, with ripples, as the
# tokens move apart.
#
# The pairs turn at very different speeds: pair 0 once every 2*pi = 6.3 tokens, the last
# once every 2*pi * theta^((H-2)/H) tokens (about 54 000 for theta = 10 000 and H = 128).
# Llama 1 and 2 use theta = 10 000, Llama 3 500 000.

# %%
wavelengths = {theta: 2 * np.pi / inv_freq_of(128, theta) for theta in (1e4, 5e5)}
print(
    f"theta=1e4, H=128: pair 0 every {wavelengths[1e4][0]:.1f} tokens, "
    f"pair 63 every {wavelengths[1e4][-1]:,.0f}"
)
assert round(wavelengths[1e4][0], 1) == 6.3 and round(wavelengths[1e4][-1], -3) == 54_000

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
for theta, wl in wavelengths.items():
    ax1.semilogy(wl, ".-", label=f"theta = {theta:,.0f}")
ax1.set(xlabel="pair i (H = 128)", ylabel="wavelength (tokens, log scale)")
ax1.set_title("Each pair has its own wavelength")
ax1.legend()
pos = np.arange(64)
circle = np.linspace(0, 2 * np.pi, 200)
for radius, i, color in zip((1.0, 2.0, 3.0), (0, 16, 32), ("C0", "C1", "C2"), strict=True):
    angle = pos * inv_freq_of(128, 1e4)[i]
    rate = inv_freq_of(128, 1e4)[i]
    turns = 63 * rate / (2 * np.pi)
    ax2.plot(
        radius * np.cos(circle),
        radius * np.sin(circle),
        color=color,
        lw=1.5,
        label=f"pair {i} (radius {radius:.0f}): {rate:.2f} rad/token, {turns:.1f} turns",
    )
    dots = ax2.scatter(
        radius * np.cos(angle), radius * np.sin(angle), c=pos, s=14, vmin=0, vmax=63, zorder=3
    )
fig.colorbar(dots, ax=ax2, label="position (0..63)")
ax2.set(aspect="equal", xlim=(-3.5, 3.5), ylim=(-3.5, 5.2), xticks=[], yticks=[])
ax2.set_title("Pairs 0, 16, 32 turned at positions 0..63 (start: right)")
ax2.legend(loc="upper center", fontsize=8, frameon=False)
plt.show()

# %% [markdown]
# *What to see:* on the left the wavelengths span 6 tokens to tens of thousands (a larger
# theta stretches the slow end); on the right pair 0 has wound round its circle about ten
# times in 64 tokens, pair 16 about once, pair 32 only a tenth of a turn, so fast pairs
# tell near neighbours apart and slow pairs tell distant ones apart.
#
# ### Meta's interleaved pairs
#
# Meta's `llama/model.py` pairs adjacent features (x[2i], x[2i+1]) and rotates them as
# complex numbers. Written the same way here, it must match the package's `apply_rope`.


# %%
@jax.jit
def rope_interleaved(x, positions, inv_freq):
    """x [B, T, N, H]; pair i = (x[2i], x[2i+1]) as a complex number."""
    xc = x[..., 0::2] + 1j * x[..., 1::2]  # [B, T, N, H/2]
    turn = jnp.exp(1j * positions[:, :, None, None] * inv_freq)  # [B, T, 1, H/2]
    out = xc * turn
    return jnp.stack([out.real, out.imag], axis=-1).reshape(x.shape)


inv_freq = jnp.asarray(rope_frequencies(H, cfg.rope_theta, cfg.rope_scaling))
q = jax.random.normal(jax.random.key(3), (2, 24, N, H))
positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
np.testing.assert_allclose(
    rope_interleaved(q, positions, inv_freq), apply_rope(q, positions, inv_freq), atol=1e-5
)
print("rope_interleaved == llama_jax apply_rope")

# %% [markdown]
# ### Hugging Face's half-split form, and why checkpoints get permuted
#
# Hugging Face's LLaMA code pairs feature i with feature i + H/2 instead ("rotate_half").
# Both forms do the same rotations on different pairings of features. Reorder each head's
# features, interleaved to half-split, and the two agree:
# `rope_half(x[perm]) == rope_interleaved(x)[perm]`. Since q·k is unchanged when q and k
# are reordered the same way, a model stays the same model if the rows of wq and wk
# (the outputs that feed RoPE) are reordered within every head. That is exactly what HF's
# conversion script did to Meta's weights, and what `llama_jax.checkpoint.layout` undoes
# (`hf_to_meta_qk`). Load HF weights without undoing it and every head attends to the
# wrong relative positions: fluent-looking gibberish.


# %%
@jax.jit
def rope_half(x, positions, inv_freq):
    """HF's form: pair i = (x[i], x[i + H/2])."""
    angles = positions[:, :, None, None] * jnp.concatenate([inv_freq, inv_freq])  # [B, T, 1, H]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotate_half = jnp.concatenate([-x2, x1], axis=-1)
    return x * jnp.cos(angles) + rotate_half * jnp.sin(angles)


perm = np.concatenate([np.arange(0, H, 2), np.arange(1, H, 2)])  # interleaved -> half-split
np.testing.assert_allclose(
    rope_half(q[..., perm], positions, inv_freq),
    rope_interleaved(q, positions, inv_freq)[..., perm],
    atol=1e-5,
)

# The same permutation, as layout.py applies it to Meta's wq [N*H, D] rows:
wq_meta = np.asarray(params["layers"][0]["attention"]["wq"]).transpose(1, 2, 0).reshape(N * H, D)
wq_hf = meta_to_hf_qk(wq_meta, N)
np.testing.assert_array_equal(wq_hf.reshape(N, H, D), wq_meta.reshape(N, H, D)[:, perm])

fig, ax = plt.subplots(figsize=(9, 1.9), layout="constrained")
ax.imshow(perm[None], cmap="viridis", aspect="auto")
for j, p in enumerate(perm):
    ax.text(j, 0, p, ha="center", va="center", fontsize=7, color="w")
ax.set(
    yticks=[], xlabel="HF row within a head", title=f"Which Meta row each HF row holds (H = {H})"
)
plt.show()

# %% [markdown]
# *What to see:* HF's first half of each head holds Meta's even rows (0, 2, 4, ...), its
# second half the odd rows: one fixed reordering per head, undone on conversion.
#
# ### Llama 3.1's scaling of the long wavelengths
#
# Llama 3 was trained on 8192-token sequences; Llama 3.1 reads up to 131 072 (128k =
# 16 x 8192). Its rope scaling divides the frequencies of the slow pairs (wavelength above
# 8192 tokens) by `factor` = 8, so that at position 8 x 8192 = 65 536 (64k) a slow pair has
# turned exactly as far as it had at 8192 in training: the scaling alone covers 64k. The
# last factor 2, up to 128k, was learned: Meta continued pre-training on ever longer
# sequences, in stages up to 128k ("The Llama 3 Herd of Models", 2024, long-context
# pre-training). Fast pairs (wavelength below 8192 / 4 = 2048) keep their frequencies:
# they encode local order, which must not change; the band between is blended smoothly.
# Llama 3.2 1B/3B use factor 32. Meta's `apply_scaling`, rewritten:


# %%
def scaled_inv_freq(inv_freq, factor=8.0, low=1.0, high=4.0, old_context=8192):
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    slow_or_blended = np.where(wavelen > old_context / low, inv_freq / factor, blended)
    return np.where(wavelen < old_context / high, inv_freq, slow_or_blended)


llama31 = lj.PRESETS["llama3.1-8b"]
scaling = llama31.rope_scaling
base = inv_freq_of(llama31.head_dim, llama31.rope_theta)
ours = rope_frequencies(llama31.head_dim, llama31.rope_theta, scaling)
np.testing.assert_allclose(scaled_inv_freq(base), ours, rtol=1e-6)

# The numbers of the text, from the preset:
assert (llama31.max_seq_len, scaling.original_max_seq_len, scaling.factor) == (131072, 8192, 8)
covered = scaling.factor * scaling.original_max_seq_len
print(
    f"context {llama31.max_seq_len:,} = {llama31.max_seq_len // 8192} x 8192; "
    f"scaling covers {covered:,.0f} = {covered / llama31.max_seq_len:.0%} of it"
)
# The slowest pair's angle at 131072 with scaling, against its angle at 8192 without:
print(
    f"slowest pair: angle at 128k (scaled) / angle at 8k (unscaled) = "
    f"{llama31.max_seq_len * ours[-1] / (8192 * base[-1]):.1f}"
)

fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
ax.semilogy(2 * np.pi / base, ".-", label="Llama 3 (theta 500 000)")
ax.semilogy(2 * np.pi / ours, ".-", label="Llama 3.1 (scaled, factor 8)")
for y, txt in ((8192 / 4, "2048 = 8192/4: unchanged below"), (8192, "8192: divided by 8 above")):
    ax.axhline(y, color="gray", ls=":")
    ax.text(1, y * 1.3, txt, fontsize=8)
ax.set(xlabel="pair i (H = 128)", ylabel="wavelength (tokens, log scale)")
ax.set_title("Llama 3.1 stretches only the slow pairs")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# *What to see:* the two curves coincide for the fast pairs (wavelength under 2048), the
# slow pairs' wavelengths are 8 times longer (a constant gap on the log axis), and the
# pairs between move smoothly from one to the other.
#
# ## 4. Grouped-query attention
#
# Queries have N heads, keys and values only K (K = N in Llama 1 and in Llama 2 7B and
# 13B; K = 8 in Llama 2 70B and every Llama 3). Each KV head serves G = N/K query heads.
# Two ways to compute it:
#
# - **repeat** (Meta's code): copy each KV head G times, `jnp.repeat(k, G, axis=2)`, to
#   [B, S, N, H], then ordinary multi-head attention. The copies cost memory and bandwidth.
# - **grouped** (the package's `attend`): reshape the queries to [B, T, K, G, H] and let
#   the einsum pair query group g of KV head k with that one KV head:
#   `einsum("BTKGH,BSKH->BKGTS", q, k)`. Nothing is copied.
#
# Head n of the repeat form uses KV head n // G; the reshape puts query head n at
# (k, g) = (n // G, n % G): the same pairing. Both, written out and checked equal:


# %%
def causal_softmax(scores):
    T, S = scores.shape[-2:]
    return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, S), bool)), scores, -jnp.inf), axis=-1)


@jax.jit
def attention_repeat(q, k, v):
    """q [B, T, N, H]; k, v [B, S, K, H] -> [B, T, N, H], copying each KV head G times."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # [B, S, N, H]: copies
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("BNTS,BSNH->BTNH", causal_softmax(scores), v)


@jax.jit
def attention_grouped(q, k, v):
    """The same without copies: queries grouped as [B, T, K, G, H]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]: query head n -> (n // G, n % G)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k) / np.sqrt(H)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", causal_softmax(scores), v)
    return out.reshape(B, T, N, H)


qs = jax.random.normal(jax.random.key(5), (2, 24, N, H))  # [B, T, N, H]
ks, vs = jax.random.normal(jax.random.key(6), (2, 2, 24, K, H))  # [B, S, K, H] each
by_repeat, grouped = attention_repeat(qs, ks, vs), attention_grouped(qs, ks, vs)
np.testing.assert_allclose(by_repeat, grouped, rtol=1e-5, atol=1e-5)
# The package's attend takes keys and values as [B, K, S, H] (the cache's layout):
package = attend(qs, ks.transpose(0, 2, 1, 3), vs.transpose(0, 2, 1, 3), None)
np.testing.assert_allclose(package, grouped, rtol=1e-5, atol=1e-5)
print(f"repeat == grouped == llama_jax attend  (N={N} query heads, K={K} KV heads, G={G})")

# %% [markdown]
# The whole attention layer: projections, RoPE, grouped attention, output projection,
# checked against the package's `Attention` module with block 0's weights.


# %%
@jax.jit
def attention(x, w, positions, inv_freq):
    """x [B, T, D] -> [B, T, D]."""
    q = jnp.einsum("BTD,DNH->BTNH", x, w["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", x, w["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", x, w["wv"])
    q, k = rope_interleaved(q, positions, inv_freq), rope_interleaved(k, positions, inv_freq)
    return jnp.einsum("BTNH,NHD->BTD", attention_grouped(q, k, v), w["wo"])


block0 = params["layers"][0]
x = rms_norm(h0, block0["attention_norm"]["weight"], cfg.norm_eps)
theirs_module = Attention(cfg, rngs=nnx.Rngs(0))
for name in ("wq", "wk", "wv", "wo"):
    getattr(theirs_module, name)[...] = block0["attention"][name]
theirs, _ = theirs_module(x, positions, inv_freq, None)  # mask None: plain causal attention
np.testing.assert_allclose(
    attention(x, block0["attention"], positions, inv_freq), theirs, rtol=1e-4, atol=1e-5
)
print("our attention layer == llama_jax Attention")

# %% [markdown]
# **What GQA saves.** While generating, the model keeps every past token's keys and
# values (the KV cache): 2 x L x K x H numbers per token. Llama 3 8B (L = 32, K = 8,
# H = 128) in bfloat16 keeps 128 KiB per token, 1 GiB for one 8192-token sequence; with
# K = N = 32 it would be 4 GiB. And the repeat form would still build the G-fold copy,
# [B, S, N, H], at every step: the memory GQA saves in the cache, spent again in
# bandwidth. The cell below computes these numbers for every release.

# %%
names = [
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "llama3.1-70b",
    "llama3.1-405b",
    "llama3.2-1b",
]
CONTEXT = 8192


def kv_bytes_per_token(c, heads, bytes_per_number=2):  # bfloat16
    return 2 * c.n_layers * heads * c.head_dim * bytes_per_number


mha = np.array([kv_bytes_per_token(lj.PRESETS[n], lj.PRESETS[n].n_heads) for n in names])
gqa = np.array([kv_bytes_per_token(lj.PRESETS[n], lj.PRESETS[n].kv_heads) for n in names])
print(
    f"{'model':14s} {'N':>4s} {'K':>3s} {'KiB/token':>10s} "
    f"{'GiB at 8192, K':>15s} {'GiB at 8192 if K=N':>19s}"
)
for name, a, b in zip(names, mha, gqa, strict=True):
    c = lj.PRESETS[name]
    print(
        f"{name:14s} {c.n_heads:4d} {c.kv_heads:3d} {b / 2**10:10.0f} "
        f"{b * CONTEXT / 2**30:15.2f} {a * CONTEXT / 2**30:19.2f}"
    )
l3 = lj.PRESETS["llama3-8b"]
assert kv_bytes_per_token(l3, l3.kv_heads) == 128 * 2**10  # the text's 128 KiB per token
assert kv_bytes_per_token(l3, l3.kv_heads) * CONTEXT == 2**30  # 1 GiB per 8192 tokens
assert kv_bytes_per_token(l3, l3.n_heads) * CONTEXT == 4 * 2**30  # 4 GiB if K = N
assert round(mha[names.index("llama3.1-405b")] * CONTEXT / 2**30) == 63  # the caption's 63 GiB

fig, ax = plt.subplots(figsize=(9, 3.8), layout="constrained")
xs = np.arange(len(names))
ax.bar(xs - 0.2, mha * CONTEXT / 2**30, 0.4, label="if K = N (multi-head)", color="C7")
ax.bar(xs + 0.2, gqa * CONTEXT / 2**30, 0.4, label="actual K (grouped)", color="C0")
for xpos, a, b in zip(xs, mha, gqa, strict=True):
    ax.text(
        xpos + 0.2,
        b * CONTEXT / 2**30,
        f"{a / b:.0f}x smaller" if a > b else "same",
        ha="center",
        va="bottom",
        fontsize=7,
    )
ax.set(xticks=xs, ylabel="GiB per 8192-token sequence (bf16)")
ax.set_title("KV cache of one 8192-token sequence, with and without grouped KV heads")
ax.set_xticklabels(names, rotation=20)
ax.legend()
plt.show()

# %% [markdown]
# *What to see:* Llama 2 7B and 13B (K = N) save nothing; every model with K = 8 keeps
# N/8 times less, 8x for the 70B models and 16x for 405B, whose cache would otherwise be
# 63 GiB per sequence.
#
# ## 5. SwiGLU
#
# The MLP has three matrices: a gate `w1` and an up projection `w3` to width F, multiplied
# after passing the gate through SiLU (x * sigmoid(x)), and a down projection `w2` back to
# D. Three matrices instead of two, so Meta takes F = 2/3 * 4D, scaled by
# `ffn_dim_multiplier` in the later models and rounded up to a multiple of `multiple_of`:
# 11008 for Llama 2 7B (multiple 256), 14336 for Llama 3 8B (x 1.3, multiple 1024).


# %%
@jax.jit
def swiglu(x, w):
    return (jax.nn.silu(x @ w["w1"]) * (x @ w["w3"])) @ w["w2"]


ffn = FeedForward(cfg, rngs=nnx.Rngs(0))
for name in ("w1", "w2", "w3"):
    getattr(ffn, name)[...] = block0["feed_forward"][name]
np.testing.assert_allclose(swiglu(h0, block0["feed_forward"]), ffn(h0), rtol=1e-4, atol=1e-6)
assert lj.PRESETS["llama2-7b"].ffn_hidden_dim == 11008
assert lj.PRESETS["llama3-8b"].ffn_hidden_dim == 14336

z = np.linspace(-5, 3, 200)
fig, ax = plt.subplots(figsize=(5.5, 3.2), layout="constrained")
ax.plot(z, np.maximum(z, 0), label="ReLU")
ax.plot(z, np.asarray(jax.nn.silu(z)), label="SiLU = z * sigmoid(z)")
ax.axhline(0, color="gray", lw=0.5)
assert np.isclose(jax.nn.silu(z).min(), -0.28, atol=0.005)  # the caption's minimum
ax.set(xlabel="z", ylim=(-1, 3), title="The gate's nonlinearity")
ax.legend()
plt.show()

# %% [markdown]
# *What to see:* SiLU follows ReLU for large |z| but is smooth at 0 and dips slightly below
# zero (minimum about -0.28 near z = -1.28), so small negative gates still pass a
# gradient.
#
# ## 6. The block and the stack
#
# A block is pre-norm and residual: `h = x + attention(norm(x))`, then
# `out = h + mlp(norm(h))`. The model is the embedding, L blocks, a final RMSNorm and the
# output projection to V logits (`output` [D, V], or the embedding matrix transposed when
# Llama 3.2 ties them). The package keeps the L blocks as separate modules
# (`model.layers[i]`) and runs them in a Python loop, as Meta's code does.


# %%
def block(x, w, positions, inv_freq):
    h = x + attention(
        rms_norm(x, w["attention_norm"]["weight"], cfg.norm_eps),
        w["attention"],
        positions,
        inv_freq,
    )
    return h + swiglu(rms_norm(h, w["ffn_norm"]["weight"], cfg.norm_eps), w["feed_forward"])


@jax.jit
def transformer(tokens):
    h = params["tok_embeddings"][tokens]  # [B, T, D]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for i in range(L):
        h = block(h, params["layers"][i], positions, inv_freq)
    h = rms_norm(h, params["norm"]["weight"], cfg.norm_eps)
    out = params["tok_embeddings"].T if cfg.tie_word_embeddings else params["output"]
    return h @ out  # [B, T, V]


logits = transformer(tokens)
np.testing.assert_allclose(logits, model(tokens), rtol=1e-4, atol=1e-4)
print("our transformer == llama_jax Transformer: logits", logits.shape)

# %% [markdown]
# ## Exercises
#
# 1. **Norm preserved.** Show in code that RoPE never changes a vector's length:
#    |apply_rope(x)| = |x| for every position. Why does that follow from the rotation?
# 2. **Scale-free norm.** RMSNorm(c x) = RMSNorm(x) for any c > 0 (as long as c x is well
#    above sqrt(eps)). Check it, and say what it means for the residual stream growing
#    from block to block.
# 3. **Where the parameters are.** For Llama 2 7B, count one block's attention parameters
#    (4 D^2 when K = N) and MLP parameters (3 D F), and the MLP's share of the block. Is
#    it the same for Llama 3 8B, where K = 8?
# 4. **Multi-query.** Llama 3 8B with K = 1 (one KV head, MQA): how large would the cache
#    be for a batch of 16 sequences of 8192 tokens, against the real K = 8 and against
#    K = N?
# 5. **Long context.** How many GiB does the KV cache of one 131 072-token sequence take
#    for Llama 3.1 8B, 70B and 405B in bfloat16?
#
# ## Answers

# %%
# 1. A rotation of each pair keeps each pair's length, so the whole vector's length stays.
xr = jax.random.normal(jax.random.key(7), (1, 50, 1, 128))
turned = apply_rope(xr, jnp.arange(50)[None] * 997, jnp.asarray(inv_freq_of(128, 5e5)))
np.testing.assert_allclose(
    jnp.linalg.norm(turned, axis=-1), jnp.linalg.norm(xr, axis=-1), rtol=1e-5
)
print("1. |rope(x)| == |x| at 50 positions up to", 49 * 997)

# 2. Scale-free: every block sees its input at unit RMS, however large the residual
#    stream has grown; the blocks' outputs add to h without being normalised.
for c in (0.25, 1.0, 1e3):
    np.testing.assert_allclose(
        rms_norm(c * h0, gain, cfg.norm_eps), rms_norm(h0, gain, cfg.norm_eps), rtol=1e-3, atol=1e-3
    )
print("2. rms_norm(c x) == rms_norm(x) for c = 0.25, 1, 1000")

# 3. Parameters of one block, from the shapes of the abstract model (no memory used).
for name in ("llama2-7b", "llama3-8b"):
    c = lj.PRESETS[name]
    blk = nnx.to_pure_dict(nnx.state(lj.abstract_model(c), nnx.Param))["layers"][0]
    n_attn = sum(a.size for a in jax.tree.leaves(blk["attention"]))
    n_mlp = sum(a.size for a in jax.tree.leaves(blk["feed_forward"]))
    formula = 2 * c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.kv_heads * c.head_dim
    assert n_attn == formula and n_mlp == 3 * c.dim * c.ffn_hidden_dim
    print(
        f"3. {name}: attention {n_attn / 1e6:.1f}M, MLP {n_mlp / 1e6:.1f}M, "
        f"MLP share of the block {n_mlp / (n_attn + n_mlp):.0%}"
    )

# 4. and 5.: bytes = 2 (k and v) x L x K x H x 2 (bf16) per token.
for heads in (1, l3.kv_heads, l3.n_heads):
    gib = kv_bytes_per_token(l3, heads) * 16 * 8192 / 2**30
    print(f"4. llama3-8b, K = {heads:2d}: {gib:5.1f} GiB for 16 x 8192 tokens")
for name in ("llama3.1-8b", "llama3.1-70b", "llama3.1-405b"):
    c = lj.PRESETS[name]
    gib = kv_bytes_per_token(c, c.kv_heads) * c.max_seq_len / 2**30
    print(f"5. {name}: {gib:.0f} GiB for one {c.max_seq_len:,}-token sequence")

# %% [markdown]
# ## Where to go next
#
# - `llama_jax/model/` is the same model in four short files (layers, attention, kv_cache,
#   transformer), with the shapes in comments.
# - Notebook **02_weights** opens a trained checkpoint and looks at what training put in
#   these matrices; **03_sharding** spreads them over 8 devices; **04_generation** adds the
#   KV cache and sampling; **05_finetuning** trains them.
# - Meta's reference, `llama/model.py` in meta-llama/llama3, reads side by side with this.
