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
# the embedding, RMSNorm, the rotary position embedding (Meta's interleaved pairs, Hugging
# Face's half-split form and why checkpoints get permuted, Llama 3.1's long-context
# scaling), grouped-query attention and why it shrinks the KV cache, the SwiGLU MLP, the
# block and the stack of blocks. Each piece is written here in a few lines of JAX and then
# checked equal to the package's own (`llama_jax.layers`, `llama_jax.attention`,
# `llama_jax.model`), so if the package changes, this notebook fails instead of drifting.
#
# **How to run it.**
# - *CPU laptop*: in a clone, `pip install -e . jupyterlab jupytext treescope`, then
#   `jupyter lab` and open this file with Open With > Jupytext Notebook (every notebook
#   here is a `.py` script), or make an `.ipynb` with
#   `jupytext --to ipynb notebooks/01_architecture.py`. It builds a tiny random model and
#   runs in under a minute.
# - *GPU*: the same after `pip install -U "jax[cuda13]"` (or `cuda12`); nothing else changes.
# - *Colab TPU*: Runtime > Change runtime type > TPU, then `!pip install -e <your clone>`
#   and open the `.ipynb`. JAX picks the TPU up by itself.
#
# To check the pieces against a real model instead, set the environment variable
# `LLAMA_JAX_CHECKPOINT` (or `CHECKPOINT` below) to a llama-jax checkpoint directory
# (`llama-jax convert` makes one from Meta or Hugging Face weights, and
# `llama-jax quickstart` leaves a small trained one in `runs/quickstart/model`;
# a 1B model needs about 5 GB of memory in float32).
#
# Dimension letters, as in the package: B batch, T sequence, D model width, F MLP width,
# N query heads, K key/value heads, G = N/K, H head dim, V vocabulary, L layers.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from llama_jax.attention import Attention
from llama_jax.layers import FeedForward, RMSNorm, apply_rope, rope_frequencies

import llama_jax as lj
from llama_jax.checkpoint.layout import meta_to_hf_qk
from llama_jax.model import set_params

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
# every attention map flat, so here the matrices are drawn with standard deviation
# 1/sqrt(fan-in) instead, which gives the softmax something to do.


# %%
def load_model(path):
    """(config, model) from a llama-jax checkpoint (`llama-jax convert` makes one)."""
    from llama_jax import checkpoint

    model = checkpoint.load(path, dtype="float32")
    return model.cfg, model


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
        fan_in = fan_ins[name]
        return rng.normal(size=w.shape).astype(np.float32) * fan_in**-0.5

    return cfg, set_params(model, jax.tree_util.tree_map_with_path(redraw, params))


cfg, model = load_model(CHECKPOINT) if CHECKPOINT else tiny_model()
params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
D, L, N, K, H = cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_dim
print(cfg.name, f"D={D} L={L} N={N} K={K} H={H} F={cfg.ffn_hidden_dim} V={cfg.vocab_size}")
print(jax.tree.map(lambda a: a.shape, params))

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


gain = params["layers"]["attention_norm"]["weight"][0]  # layer 0's gain [D]
norm = RMSNorm(D, cfg.norm_eps)
norm.weight[...] = gain
np.testing.assert_allclose(rms_norm(h0, gain, cfg.norm_eps), norm(h0), rtol=1e-6, atol=1e-6)

x = jax.random.normal(jax.random.key(2), (1000, D)) * jnp.linspace(0.1, 5, 1000)[:, None]
fig, ax = plt.subplots(figsize=(5, 3))
ax.scatter(jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(rms_norm(x, 1.0, 1e-5), axis=-1), s=3)
ax.set(
    xlabel="|x|",
    ylabel="|rms_norm(x)|",
    title=f"RMSNorm puts every vector at norm sqrt(D)={D**0.5:.0f}",
)
plt.show()

# %% [markdown]
# ## 3. Rotary position embedding (RoPE)
#
# Attention compares a query q (at position m) with a key k (at position n) by their dot
# product. RoPE splits each head's H features into H/2 pairs, treats pair i as a complex
# number and turns it by the angle `position * inv_freq[i]`, with
# `inv_freq[i] = theta ** (-2i / H)`. Turning q by m and k by n makes their dot product
# depend only on m - n: attention sees relative positions, and nothing is added to h.
#
# The pairs turn at very different speeds: pair 0 once every 2*pi = 6.3 tokens, the last
# once every 2*pi * theta^((H-2)/H) tokens (about 54 000 for theta = 10 000 and H = 128).
# Llama 1 and 2 use theta = 10 000, Llama 3 500 000.


# %%
def inv_freq_of(head_dim, theta):
    return 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)  # [H/2]


np.testing.assert_allclose(
    inv_freq_of(H, cfg.rope_theta), rope_frequencies(H, cfg.rope_theta, None), rtol=1e-6
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for theta in (1e4, 5e5):
    ax1.semilogy(2 * np.pi / inv_freq_of(128, theta), ".-", label=f"theta={theta:g}")
ax1.set(xlabel="pair i (H=128)", ylabel="wavelength (tokens)", title="One wavelength per pair")
ax1.legend()
pos = np.arange(64)
for radius, i in zip((1.0, 1.3, 1.6), (0, 8, 16), strict=True):
    angle = pos * inv_freq_of(128, 1e4)[i]  # theta = 10 000, H = 128
    dots = ax2.scatter(radius * np.cos(angle), radius * np.sin(angle), c=pos, cmap="viridis", s=12)
    ax2.text(radius * np.cos(angle[-1]), radius * np.sin(angle[-1]) + 0.08, f"pair {i}", fontsize=8)
fig.colorbar(dots, ax=ax2, label="position")
ax2.set(aspect="equal", title="Pairs 0, 8, 16 turned at positions 0..63", xticks=[], yticks=[])
plt.show()

# %% [markdown]
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

# The point of it: the score depends on the distance m - n only.
qv, kv = jax.random.normal(jax.random.key(4), (2, 1, 1, 1, H))


def score(m, n):
    qm = rope_interleaved(qv, jnp.array([[m]]), inv_freq)
    kn = rope_interleaved(kv, jnp.array([[n]]), inv_freq)
    return float(jnp.sum(qm * kn))


print("score(10, 7) =", round(score(10, 7), 5), " score(110, 107) =", round(score(110, 107), 5))
assert abs(score(10, 7) - score(110, 107)) < 1e-4

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
wq_meta = np.asarray(params["layers"]["attention"]["wq"][0]).transpose(1, 2, 0).reshape(N * H, D)
wq_hf = meta_to_hf_qk(wq_meta, N)
np.testing.assert_array_equal(wq_hf.reshape(N, H, D), wq_meta.reshape(N, H, D)[:, perm])

fig, ax = plt.subplots(figsize=(9, 1.8))
ax.imshow(perm[None], cmap="viridis", aspect="auto")
for j, p in enumerate(perm):
    ax.text(j, 0, p, ha="center", va="center", fontsize=7, color="w")
ax.set(
    yticks=[], xlabel="HF row within a head", title="Which Meta row each HF row holds (one head)"
)
plt.show()

# %% [markdown]
# ### Llama 3.1's scaling of the long wavelengths
#
# Llama 3 was trained on 8192-token sequences. To reach 128k tokens, Llama 3.1 divides
# the slow pairs' frequencies (wavelength > 8192 tokens) by `factor` = 8, so positions up
# to 64k turn them no further than 8k did in training; fast pairs (wavelength < 8192 / 4)
# keep theirs, because they encode local order that must not change; the band between is
# blended smoothly. Llama 3.2 1B/3B use factor 32. Meta's `apply_scaling`, rewritten:


# %%
def scaled_inv_freq(inv_freq, factor=8.0, low=1.0, high=4.0, old_context=8192):
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    return np.where(
        wavelen < old_context / high, inv_freq,
        np.where(wavelen > old_context / low, inv_freq / factor,
                 (1 - smooth) * inv_freq / factor + smooth * inv_freq))  # fmt: skip


llama31 = lj.PRESETS["llama3.1-8b"]
base = inv_freq_of(llama31.head_dim, llama31.rope_theta)
ours = rope_frequencies(llama31.head_dim, llama31.rope_theta, llama31.rope_scaling)
np.testing.assert_allclose(scaled_inv_freq(base), ours, rtol=1e-6)

fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.semilogy(2 * np.pi / base, ".-", label="Llama 3 (theta 500k)")
ax.semilogy(2 * np.pi / ours, ".-", label="Llama 3.1 (scaled, factor 8)")
for y, txt in ((8192 / 4, "8192/4: unchanged below"), (8192, "8192: divided by 8 above")):
    ax.axhline(y, color="gray", ls=":")
    ax.text(1, y * 1.3, txt, fontsize=8)
ax.set(
    xlabel="pair i (H=128)",
    ylabel="wavelength (tokens)",
    title="Llama 3.1 stretches only the slow pairs",
)
ax.legend()
plt.show()

# %% [markdown]
# ## 4. Grouped-query attention
#
# Queries have N heads, keys and values only K (K = N in Llama 1 and in Llama 2 7B and
# 13B; K = 8 in Llama 2 70B and every Llama 3). Each KV head serves G = N/K query heads. Meta's code
# repeats each KV head G times and then does ordinary multi-head attention; the package
# instead groups the queries as [B, T, K, G, H] and never copies keys. Written Meta's way:


# %%
@jax.jit
def attention(x, w, positions, inv_freq):
    """x [B, T, D] -> ([B, T, D], attention probabilities [B, N, T, T])."""
    q = jnp.einsum("BTD,DNH->BTNH", x, w["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", x, w["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", x, w["wv"])
    q, k = rope_interleaved(q, positions, inv_freq), rope_interleaved(k, positions, inv_freq)
    G = q.shape[2] // k.shape[2]
    k, v = (
        jnp.repeat(k, G, axis=2),
        jnp.repeat(v, G, axis=2),
    )  # [B, T, N, H]: head n uses KV head n // G
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])
    T = x.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))  # token t sees tokens 0..t
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    return jnp.einsum("BTNH,NHD->BTD", out, w["wo"]), probs


layer0 = jax.tree.map(lambda a: a[0], params["layers"])  # one block's weights
x = rms_norm(h0, layer0["attention_norm"]["weight"], cfg.norm_eps)
ours, probs = attention(x, layer0["attention"], positions, inv_freq)

theirs_module = Attention(cfg, rngs=nnx.Rngs(0))
for name in ("wq", "wk", "wv", "wo"):
    getattr(theirs_module, name)[...] = layer0["attention"][name]
T = tokens.shape[1]
mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (2, T, T))
theirs, _ = theirs_module(x, positions, inv_freq, mask)
np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)

shown = min(N, 6)  # a real model has 32 heads or more; the first few make the point
fig, axes = plt.subplots(1, shown, figsize=(3 * shown, 3))
for n, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(probs[0, n], cmap="magma")
    ax.set(
        title=f"head {n} (KV head {n // (N // K)})",
        xlabel="key position",
        ylabel="query position" if n == 0 else None,
    )
fig.suptitle("Layer 0 attention probabilities, one sequence (upper triangle: causal mask)")
plt.show()

# %% [markdown]
# **Why GQA.** While generating, the model keeps every past token's keys and values
# (the KV cache): 2 * L * K * H numbers per token. With K = 8 instead of N = 64, Llama 2
# 70B's cache is 8 times smaller, which is what lets long contexts and large batches fit.

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
kib = lambda c, heads: 2 * c.n_layers * heads * c.head_dim * 2 / 2**10  # bfloat16 bytes / 1024
fig, ax = plt.subplots(figsize=(8, 3.5))
xs = np.arange(len(names))
ax.bar(
    xs - 0.2,
    [kib(lj.PRESETS[n], lj.PRESETS[n].n_heads) for n in names],
    0.4,
    label="if K = N (MHA)",
)
ax.bar(xs + 0.2, [kib(lj.PRESETS[n], lj.PRESETS[n].kv_heads) for n in names], 0.4, label="actual K")
ax.set(
    xticks=xs,
    ylabel="KV cache, KiB per token (bf16)",
    title="Grouped-query attention shrinks the cache",
)
ax.set_xticklabels(names, rotation=20)
ax.legend()
plt.show()
print({n: f"{kib(lj.PRESETS[n], lj.PRESETS[n].kv_heads):.0f} KiB/token" for n in names})

# %% [markdown]
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
    getattr(ffn, name)[...] = layer0["feed_forward"][name]
np.testing.assert_allclose(swiglu(h0, layer0["feed_forward"]), ffn(h0), rtol=1e-4, atol=1e-6)
assert (
    lj.PRESETS["llama2-7b"].ffn_hidden_dim == 11008
    and lj.PRESETS["llama3-8b"].ffn_hidden_dim == 14336
)

z = np.linspace(-5, 3, 200)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(z, np.maximum(z, 0), label="ReLU")
ax.plot(z, np.asarray(jax.nn.silu(z)), label="SiLU = z * sigmoid(z)")
ax.set(xlabel="z", title="The gate's nonlinearity")
ax.legend()
plt.show()

# %% [markdown]
# ## 6. The block and the stack
#
# A block is pre-norm and residual: `h = x + attention(norm(x))`, then
# `out = h + mlp(norm(h))`. The model is the embedding, L blocks, a final RMSNorm and the
# output projection to V logits (`output` [D, V], or the embedding matrix transposed when
# Llama 3.2 ties them). The package stores the L blocks stacked on a leading axis and runs
# them with `jax.lax.scan`; a Python loop does the same thing.


# %%
def block(x, w, positions, inv_freq):
    attn, _ = attention(
        rms_norm(x, w["attention_norm"]["weight"], cfg.norm_eps),
        w["attention"],
        positions,
        inv_freq,
    )
    h = x + attn
    return h + swiglu(rms_norm(h, w["ffn_norm"]["weight"], cfg.norm_eps), w["feed_forward"])


def layer_weights(i):
    return jax.tree.map(lambda a: a[i], params["layers"])  # block i of the [L, ...] stacks


@jax.jit
def transformer(tokens):
    h = params["tok_embeddings"][tokens]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    residual_rms = [jnp.sqrt(jnp.mean(h**2))]
    for i in range(L):
        h = block(h, layer_weights(i), positions, inv_freq)
        residual_rms.append(jnp.sqrt(jnp.mean(h**2)))
    h = rms_norm(h, params["norm"]["weight"], cfg.norm_eps)
    out = params["tok_embeddings"].T if cfg.tie_word_embeddings else params["output"]
    return h @ out, residual_rms


logits, residual_rms = transformer(tokens)
np.testing.assert_allclose(logits, model(tokens), rtol=1e-4, atol=1e-4)
print("our transformer == llama_jax.Transformer: logits", logits.shape)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.3))
ax1.plot(residual_rms, "o-")
ax1.set_xticks(range(L + 1))
ax1.set(
    xlabel="after block (0 = embeddings)",
    ylabel="RMS of h",
    title="The residual stream grows block by block",
)
probs_next = jax.nn.softmax(logits[0, -1])
ax2.bar(np.arange(cfg.vocab_size), probs_next, width=1.0)
ax2.set(xlabel="token id", ylabel="p", title="Next-token distribution at the last position")
plt.show()

# %% [markdown]
# ## Where to go next
#
# - `llama_jax/model.py` is the same model in about 300 lines, with the shapes in comments.
# - Notebook **02_weights** opens a checkpoint and looks at what training put in these
#   matrices; **03_sharding** spreads them over 8 devices; **04_generation** adds the KV
#   cache and sampling; **05_finetuning** trains them.
# - Meta's reference, `llama/model.py` in meta-llama/llama3, reads side by side with this.
