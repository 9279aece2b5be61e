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
# # The weights: what is inside a LLaMA checkpoint
#
# **What you will learn.** How to open a checkpoint and read its parameter tree; where the
# parameters of every LLaMA size live (embeddings, attention, MLP: where do 8B parameters
# go?); per-layer statistics and histograms of the matrices; the RMSNorm gains across
# depth; nearest neighbours in the embedding table; and the same tensors in Meta's and
# Hugging Face's layouts side by side, with the rotary permutation between them.
#
# **How to run it.**
# - *CPU laptop*: open this file in Jupyter with jupytext (see notebook 01) or run
#   `jupytext --to ipynb notebooks/02_weights.py`. Without a checkpoint it builds a small
#   random model, saves it as a llama-jax checkpoint and opens that; about a minute.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`.
# - *Colab TPU*: Runtime > Change runtime type > TPU, `!pip install -e <your clone>`.
#
# **Real weights.** Set `LLAMA_JAX_CHECKPOINT` (or `CHECKPOINT` below) to a llama-jax
# checkpoint, made from Meta or Hugging Face weights with
# `llama-jax convert ~/Llama-3.2-1B ~/ckpt/llama3.2-1b`, or the one
# `llama-jax quickstart` leaves a small trained one in `runs/quickstart/model`. A random model shows only the
# initialisation (N(0, 0.02) matrices, gains of one); trained weights show what training
# did to them, and every figure below is drawn for them the same way.

# %%
import json
import os
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import llama_jax as lj
from llama_jax import checkpoint
from llama_jax.checkpoint import layout
from llama_jax.cli.info import describe

# ▶ Point this at a llama-jax checkpoint directory; None builds and saves a tiny model.
CHECKPOINT = os.environ.get("LLAMA_JAX_CHECKPOINT") or None

workdir = Path(tempfile.mkdtemp(prefix="llama-jax-weights-"))
if CHECKPOINT is None:
    # Six layers rather than two, so that "across depth" has something to show.
    cfg = lj.PRESETS["tiny"].replace(n_layers=6, name="tiny-6-layers")
    CHECKPOINT = checkpoint.save(lj.build_model(cfg, seed=0), workdir / "tiny-ckpt")
print("checkpoint:", CHECKPOINT)

# %% [markdown]
# ## 1. Open the checkpoint
#
# A llama-jax checkpoint is a directory: the config in `llama_jax.json`, and one Orbax
# checkpoint per tensor group (the embedding, the final norm, the output projection, and
# one per block), so a converter can write, and a loader read, one block at a time.

# %%
root = Path(CHECKPOINT)
for path in sorted(root.rglob("*")):
    if path.is_file() and len(path.relative_to(root).parts) <= 3:
        print(f"{path.stat().st_size:>12,d}  {path.relative_to(root)}")
print(json.dumps(json.loads((root / "llama_jax.json").read_text())["config"], indent=1)[:600])

# %%
# float32 for the statistics below: 4 bytes per parameter, so 5 GB for a 1B model.
model = checkpoint.load(CHECKPOINT, dtype="float32")
cfg = model.cfg
params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
print(describe(cfg))

# %% [markdown]
# ## 2. The parameter tree
#
# Names are Meta's checkpoint keys; every block parameter is stacked with a leading [L]
# axis. treescope renders the tree interactively (click to expand); the table below has
# the same facts as text.

# %%
import treescope  # noqa: E402

treescope.display(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))

# %%
total = lj.count_params(model)
print(f"{'path':30s} {'shape':22s} {'dtype':9s} {'parameters':>14s} {'share':>7s}")
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(k.key for k in path)
    print(
        f"{name:30s} {str(leaf.shape):22s} {str(leaf.dtype):9s} {leaf.size:>14,d} {leaf.size / total:7.1%}"
    )
assert total == cfg.num_params()
print(f"{'total':63s} {total:>14,d}")

# %% [markdown]
# ## 3. Where the parameters live, for every preset
#
# From shapes alone (`abstract_model` allocates nothing), the share of each component.
# The MLP holds two thirds or more of every large model; embeddings matter only for small ones,
# especially with Llama 3's 128k-token vocabulary (and Llama 3.2 1B/3B share one matrix
# between input and output to save it).

# %%
COMPONENTS = {
    "embedding": lambda p: p[0] == "tok_embeddings",
    "attention": lambda p: p[:2] == ("layers", "attention"),
    "mlp": lambda p: p[:2] == ("layers", "feed_forward"),
    "norms": lambda p: p[-1] == "weight",
    "output": lambda p: p[0] == "output",
}


def component_counts(preset):
    state = nnx.to_pure_dict(nnx.state(lj.abstract_model(lj.PRESETS[preset]), nnx.Param))
    counts = dict.fromkeys(COMPONENTS, 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = tuple(k.key for k in path)
        (part,) = [c for c, match in COMPONENTS.items() if match(keys)]
        counts[part] += int(np.prod(leaf.shape))
    assert sum(counts.values()) == lj.PRESETS[preset].num_params()
    return counts


presets = [n for n in lj.PRESETS if n.startswith("llama")]
counts = {n: component_counts(n) for n in presets}

fig, ax = plt.subplots(figsize=(11, 4))
left = np.zeros(len(presets))
for part in COMPONENTS:
    share = np.array([counts[n][part] / sum(counts[n].values()) for n in presets])
    ax.barh(presets, share, left=left, label=part)
    left += share
for i, n in enumerate(presets):
    ax.text(1.01, i, f"{lj.PRESETS[n].num_params() / 1e9:.1f}B", va="center", fontsize=8)
ax.set(xlim=(0, 1.1), xlabel="share of parameters", title="Where the parameters live")
ax.invert_yaxis()
ax.legend(ncols=5, loc="lower center", bbox_to_anchor=(0.5, 1.06))
plt.show()
c8 = counts["llama3-8b"]
print("llama3-8b:", {k: f"{v / 1e9:.2f}B" for k, v in c8.items()})

# %% [markdown]
# ## 4. Per-layer statistics and histograms
#
# For each matrix of each block: its standard deviation and its largest magnitude. In a
# trained model both vary with depth and from matrix to matrix, and the largest weights
# can sit far above the standard deviation; in a random one they are flat.

# %%
MATRICES = [("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
            ("feed_forward", "w1"), ("feed_forward", "w3"), ("feed_forward", "w2")]  # fmt: skip
L = cfg.n_layers
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for group, name in MATRICES:
    w = np.asarray(params["layers"][group][name]).reshape(L, -1)
    ax1.plot(w.std(axis=1), "o-", label=name)
    ax2.plot(np.abs(w).max(axis=1), "o-", label=name)
ax1.set(xlabel="layer", ylabel="std", title="Standard deviation per layer")
ax2.set(xlabel="layer", ylabel="max |w|", title="Largest magnitude per layer")
ax1.legend(ncols=4, fontsize=8)
plt.show()

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for ax, (group, name) in zip(
    axes, [("attention", "wq"), ("attention", "wo"), ("feed_forward", "w2")], strict=True
):
    for layer in (0, L - 1):
        w = np.asarray(params["layers"][group][name][layer]).ravel()
        ax.hist(w, bins=100, histtype="step", density=True, label=f"layer {layer}")
    ax.set(yscale="log", title=f"{name}: histogram", xlabel="value")
    ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 5. RMSNorm gains across depth
#
# Each block has two gain vectors (before attention and before the MLP) and the model one
# more at the end. Rows are layers, columns are the D features.

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), gridspec_kw={"width_ratios": [3, 3, 2]})
for ax, name in zip(axes[:2], ["attention_norm", "ffn_norm"], strict=True):
    g = np.asarray(params["layers"][name]["weight"])  # [L, D]
    im = ax.imshow(g, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(title=f"{name} gain [L, D]", xlabel="feature", ylabel="layer")
    fig.colorbar(im, ax=ax)
for name in ["attention_norm", "ffn_norm"]:
    axes[2].plot(np.asarray(params["layers"][name]["weight"]).mean(axis=1), "o-", label=name)
axes[2].axhline(float(np.mean(params["norm"]["weight"])), color="k", ls=":", label="final norm")
axes[2].set(xlabel="layer", title="mean gain")
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Embedding neighbours
#
# Tokens with similar use end up with similar embedding rows. Nearest neighbours by cosine
# similarity, decoded with the checkpoint's tokenizer when it has one. For comparison, the
# histogram shows random D-dimensional vectors, whose cosines spread as N(0, 1/D);
# training moves a table away from that, by how much depends on the model.

# %%
E = np.asarray(params["tok_embeddings"])  # [V, D]
unit = E / np.linalg.norm(E, axis=1, keepdims=True)
tokenizer_file = root / "tokenizer.model"
if tokenizer_file.exists():
    from llama_jax.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_file)
    show = lambda i: repr(tok.decode([int(i)]))
else:
    show = lambda i: f"#{int(i)}"

probe = [int(i) for i in np.linspace(10, cfg.vocab_size - 10, 6)]
for i in probe:
    sims = unit @ unit[i]
    nearest = np.argsort(-sims)[1:6]
    print(f"{show(i):>12s}:", ", ".join(f"{show(j)} ({sims[j]:.2f})" for j in nearest))

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

# %% [markdown]
# ## 7. Meta's and Hugging Face's layouts side by side
#
# The same weights are stored three ways. Meta's `consolidated.*.pth` and HF's
# `model.safetensors` both keep PyTorch's `[out, in]` matrices, under different names;
# HF's wq and wk rows are also permuted within each head, to suit its half-split rotary
# code (notebook 01 shows why that gives the same model). This package keeps Meta's names,
# stores matrices input-first in the shape of their einsum, and stacks the L blocks.

# %%
rows = []
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(k.key for k in path)
    w = np.asarray(leaf[0]) if keys[0] == "layers" else np.asarray(leaf)
    meta_name, meta_w = layout.param_to_meta(keys, w, cfg, layer=0 if keys[0] == "layers" else None)
    hf_name, hf_w = layout.meta_to_hf_tensor(meta_name, meta_w, cfg)
    rows.append((meta_name, meta_w.shape, hf_name, hf_w.shape, "/".join(keys), leaf.shape))
print(f"{'Meta':32s} {'shape':13s} {'Hugging Face':47s} {'shape':13s} {'llama-jax':28s} shape")
for r in rows:
    print(f"{r[0]:32s} {str(r[1]):13s} {r[2]:47s} {str(r[3]):13s} {r[4]:28s} {r[5]}")

# %% [markdown]
# Round trip: our block-0 `wq` [D, N, H] becomes Meta's [N*H, D], then HF's permuted
# rows; undoing both gives back exactly the same array.

# %%
wq = np.asarray(params["layers"]["attention"]["wq"][0])  # [D, N, H]
name, wq_meta = layout.param_to_meta(("layers", "attention", "wq"), wq, cfg, layer=0)
hf_name, wq_hf = layout.meta_to_hf_tensor(name, wq_meta, cfg)
back_name, back = layout.hf_to_meta_tensor(hf_name, wq_hf, cfg)
path, layer, ours = layout.meta_to_param(back_name, back, cfg)
np.testing.assert_array_equal(ours, wq)
assert (name, hf_name, path, layer) == (
    "layers.0.attention.wq.weight",
    "model.layers.0.self_attn.q_proj.weight",
    ("layers", "attention", "wq"),
    0,
)

H = cfg.head_dim
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, (title, w) in zip(
    axes,
    [
        ("Meta wq, head 0: rows = interleaved pairs", wq_meta),
        ("HF q_proj, head 0: rows permuted", wq_hf),
    ],
    strict=True,
):
    ax.imshow(w[:H, :48], cmap="RdBu", aspect="auto")
    ax.set(title=title, xlabel="input feature (first 48)", ylabel="row (output feature)")
plt.show()

# %% [markdown]
# The files themselves: for the built model, `checkpoint.export` writes both formats, and
# the package's readers (which never unpickle code from a `.pth`) read them back. With
# `LLAMA_JAX_CHECKPOINT` set this step is skipped, since it would write a full copy.

# %%
if str(CHECKPOINT).startswith(str(workdir)):
    import warnings

    # tqdm's notebook progress bars need ipywidgets; these exports draw none anyway.
    warnings.filterwarnings("ignore", message="IProgress not found")
    from llama_jax.checkpoint.safetensors_io import read_safetensors
    from llama_jax.checkpoint.torch_zip import read_pth

    checkpoint.export(CHECKPOINT, workdir / "hf", to="hf", progress=False)
    checkpoint.export(CHECKPOINT, workdir / "meta", to="meta", progress=False)
    print(
        sorted(p.name for p in (workdir / "hf").iterdir()),
        sorted(p.name for p in (workdir / "meta").iterdir()),
    )
    hf_file = read_safetensors(workdir / "hf" / "model.safetensors")
    meta_file = read_pth(workdir / "meta" / "consolidated.00.pth")
    np.testing.assert_array_equal(hf_file["model.layers.0.self_attn.q_proj.weight"].read(), wq_hf)
    np.testing.assert_array_equal(meta_file["layers.0.attention.wq.weight"].read(), wq_meta)
    print(
        "files hold exactly the tensors shown above:",
        len(hf_file),
        "HF tensors,",
        len(meta_file),
        "Meta tensors",
    )

# %% [markdown]
# ## Where to go next
#
# - `llama_jax/checkpoint/layout.py` has every name and shape mapping and the permutation
#   formula; `llama-jax convert` and `llama-jax export` move real weights both ways.
# - Notebook **03_sharding** places these tensors on a mesh; **05_finetuning** changes
#   them, and its checkpoint can be opened here again.
# - Try this notebook on Llama 3.2 1B and on a Llama 2 model: compare the norm gains and
#   the embedding geometry.
