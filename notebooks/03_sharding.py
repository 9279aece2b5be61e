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
# # Sharding LLaMA over many devices
#
# **What you will learn.** How llama-jax splits one model over a mesh of devices: the
# three mesh axes (`data`, `fsdp`, `tensor`), the one rules table that maps the model's
# logical axis names onto them, what each layout does to every parameter (pictures of which
# device holds which block), how many bytes each device holds for every preset, which
# collectives (all-gather, all-reduce, all-to-all) a forward pass and a training step need,
# how many bytes each moves and how long that takes on a TPU v5e slice or an H100 node,
# when fsdp turns communication-bound, how `jax.jit` took over from `pjit`, and what changes
# on a multi-host TPU pod. Exercises with worked answers close the notebook.
#
# **How to run it.** No accelerator needed: the first cell asks XLA for 8 simulated CPU
# devices, so the meshes below are real meshes on one machine.
# - *Colab*: the "Open in Colab" link at the top of `03_sharding.ipynb`; its first code
#   cell installs the package. On a CPU runtime the 8 devices are simulated.
# - *CPU laptop*: `jupyter lab notebooks/03_sharding.ipynb` in a clone (see notebook 01
#   for the install); about a minute.
# - *GPU*: with 8 GPUs the notebook uses them; with fewer it falls back to 8 CPU devices.
# - *Colab TPU*: a TPU runtime with 8 cores (v2-8) is used directly; with fewer devices
#   the notebook falls back to 8 CPU devices, as on a laptop.
#
# To shard a real model instead of the tiny one, set `LLAMA_JAX_CHECKPOINT` (or
# `CHECKPOINT` below) to a llama-jax checkpoint directory (`llama-jax convert` makes one
# from Meta, Hugging Face or GGUF weights); it is read straight onto the mesh, each device
# reading only its own slice.

# %%
import os

# Must run before JAX starts: the CPU backend then offers 8 devices. (Restart the kernel
# if JAX was already imported.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import re

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import llama_jax as lj
from llama_jax import perf
from llama_jax import sharding as sh

jax.config.update("jax_default_matmul_precision", "highest")

devices = jax.devices() if len(jax.devices()) >= 8 else jax.devices("cpu")
devices = devices[:8]
assert len(devices) == 8, "JAX started before XLA_FLAGS was set: restart the kernel"
print(devices)

# ▶ Point this at a checkpoint directory to shard a real model; None builds a tiny one.
CHECKPOINT = os.environ.get("LLAMA_JAX_CHECKPOINT") or None

# %% [markdown]
# ## 1. Meshes
#
# A mesh arranges the devices in a named grid. llama-jax always uses three axes:
#
# | axis | splits the batch | splits the weights | in the scaling book's notation |
# |---|---|---|---|
# | `data` | yes | no (every device has a full copy) | `In[B_data, D] · W[D, F]` |
# | `fsdp` | yes | along `embed`; gathered just before use | `In[B_fsdp, D] · W[D_fsdp, F]` |
# | `tensor` | no | heads, MLP width, vocabulary | `In[B, D] · W[D, F_tensor]` |
#
# `sh.make_mesh` takes sizes ("data=2,fsdp=2,tensor=2", one -1 for "the rest") or a preset
# name: `dp`, `fsdp`, `tp`, `fsdp_tp`.

# %%
mesh = sh.make_mesh("data=2,fsdp=2,tensor=2", devices=devices)
print(sh.describe_mesh(mesh))
print(mesh.devices)  # device ids, indexed [data, fsdp, tensor]

fig, axes = plt.subplots(1, 2, figsize=(7, 3.4), layout="constrained")
for d, ax in enumerate(axes):
    grid = np.vectorize(lambda dev: dev.id)(mesh.devices[d])
    ax.imshow(grid, cmap="tab10", vmin=0, vmax=9)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"device {v}", ha="center", va="center", color="w")
    ax.set(title=f"data = {d}", xticks=[0, 1], yticks=[0, 1], xlabel="tensor", ylabel="fsdp")
fig.suptitle("A 2 x 2 x 2 mesh: each device has one coordinate per axis")
plt.show()

# %% [markdown]
# *What to see:* the 8 devices as a 2 x 2 x 2 grid; a device's place in it (its data,
# fsdp and tensor coordinates) decides which slice of each array it holds.
#
# ## 2. The rules table
#
# The model code never names a mesh axis. Parameters carry logical axis names
# (`sh.PARAM_AXES`); activations name theirs where they cross a block boundary
# (`sh.constrain`). One table, `sh.RULES`, maps logical names to mesh axes. A mesh axis
# is skipped where it does not divide the dimension, so that dimension stays whole.

# %%
print(f"{'logical axis':14s} -> mesh axes")
for name, target in sh.RULES.items():
    print(f"{name:14s} -> {target}")

# %% [markdown]
# The model we shard: without a checkpoint, a tiny model with 8 query heads (so a tensor
# axis of 8 can split them) and 2 KV heads.

# %%
if CHECKPOINT:
    from llama_jax import checkpoint

    cfg = checkpoint.load_config(CHECKPOINT)
else:
    cfg = lj.LlamaConfig(
        name="tiny-8-heads",
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=256,
        ffn_dim=128,
        max_seq_len=256,
    )
abstract = nnx.state(lj.abstract_model(cfg), nnx.Param)  # shapes only, no memory
shapes = nnx.to_pure_dict(abstract)

MESHES = {name: sh.make_mesh(name, devices=devices) for name in ["dp", "fsdp", "tp", "fsdp_tp"]}
MESHES["2x2x2"] = mesh


def leaf_of(path):
    """The shape of a parameter by its PARAM_AXES path; for blocks, block 0's."""
    if path[0] == "layers":
        return shapes["layers"][0][path[1]][path[2]]
    return shapes[path[0]] if len(path) == 1 else shapes[path[0]][path[1]]


def short(spec, ndim):
    """P(None, 'fsdp', ('data', 'fsdp')) -> '. fsdp data+fsdp', one entry per dimension."""
    entries = (*spec, *(None,) * (ndim - len(spec)))
    return " ".join("." if e is None else e if isinstance(e, str) else "+".join(e) for e in entries)


print("How each dimension is split ('.': not split), per mesh:")
print(f"{'parameter':29s} {'logical axes':37s}", " ".join(f"{m:16s}" for m in MESHES))
for path, axes in sh.PARAM_AXES.items():
    if path == ("output",) and cfg.tie_word_embeddings:
        continue
    if {"values", "scale", "base", "lora_a", "lora_b"} & set(path):
        continue  # the leaves of int8 weights and LoRA adapters, not of this model
    leaf = leaf_of(path)
    specs = [short(sh.logical_to_spec(axes, leaf.shape, m), leaf.ndim) for m in MESHES.values()]
    print(f"{'/'.join(path):29s} {' '.join(axes):37s}", " ".join(f"{x:16s}" for x in specs))

# %% [markdown]
# Note `wk` and `wv` under `tp`: 2 KV heads cannot be split 8 ways, so that rule is
# skipped and every device holds both KV heads, computing the keys and values its query
# heads need (under `fsdp_tp`, tensor = 2, they are split). `sh.validate` refuses layouts
# that cannot work at all, with a message naming the model, the field and the axis. For
# example SmolLM2-135M (9 query heads, 3 KV heads) cannot be split 8 ways by heads:

# %%
smollm2_shape = lj.LlamaConfig(
    name="SmolLM2-135M",
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    vocab_size=49152,
    ffn_dim=1536,
    rope_theta=1e5,
    tie_word_embeddings=True,
    max_seq_len=8192,
)
try:
    sh.validate(smollm2_shape, sh.make_mesh("tp", devices=devices))
    raise AssertionError("a 9-head model on tensor=8 must be refused")
except lj.LlamaError as e:
    print("LlamaError:", e)
    assert "n_heads=9" in str(e) and "tensor=8" in str(e)
sh.validate(smollm2_shape, sh.make_mesh("fsdp", devices=devices))  # dim 576 splits 8 ways
print("SmolLM2-135M on fsdp=8: fine (576 = 8 x 72)")

# %% [markdown]
# ## 3. What each layout does to every parameter
#
# `sh.shard_model` moves a model's parameters onto their shardings (`build_model(cfg,
# mesh=...)` and `checkpoint.load(path, mesh=...)` create them there directly).
# `jax.debug.visualize_array_sharding` prints which device holds which block of a 2-D array:

# %%
if CHECKPOINT:
    model = checkpoint.load(CHECKPOINT, mesh=mesh)
else:
    model = lj.build_model(cfg, seed=0, mesh=mesh)
emb = model.tok_embeddings[...]
print(
    "tok_embeddings",
    emb.shape,
    emb.sharding.spec,
    "one shard:",
    emb.addressable_shards[0].data.shape,
)
jax.debug.visualize_array_sharding(emb)

# %% [markdown]
# The same as a figure, for four layouts and four matrices (block 0's). Each colour is a
# device; a block shared by several devices lists them all. The picture is computed from
# each array's `NamedSharding`, the object JAX itself uses.

# %%
LAYOUTS = ["dp", "fsdp", "tp", "data=2,fsdp=2,tensor=2"]
H, N = cfg.head_dim, cfg.n_heads
VIEWS = {  # 2-D view of a parameter: title -> (path, logical axes of that view)
    "tok_embeddings [V, D]": (("tok_embeddings",), ("vocab", "embed")),
    "wq [D, N*H]": (("layers", "attention", "wq"), ("embed", "heads")),
    "w1 [D, F]": (("layers", "feed_forward", "w1"), ("embed", "mlp")),
    "w2 [F, D]": (("layers", "feed_forward", "w2"), ("mlp", "embed")),
}


def view_shape(path):
    s = leaf_of(path).shape
    return (s[0], s[1] * s[2]) if len(s) == 3 else s  # wq [D, N, H] -> [D, N*H]


def plot_sharding(ax, shape, sharding, title):
    """Draw which devices hold each block of a 2-D array."""
    owners = {}
    for dev, idx in sharding.devices_indices_map(shape).items():
        rows, cols = idx[0].indices(shape[0])[:2], idx[1].indices(shape[1])[:2]
        owners.setdefault((rows, cols), []).append(dev.id)
    cmap = plt.get_cmap("tab10")
    for ((r0, r1), (c0, c1)), ids in owners.items():
        ax.add_patch(
            plt.Rectangle(
                (c0, r0), c1 - c0, r1 - r0, facecolor=cmap(ids[0] % 10), edgecolor="k", alpha=0.8
            )
        )
        label = ",".join(map(str, ids)) if len(ids) < 8 else "all"
        ax.text((c0 + c1) / 2, (r0 + r1) / 2, label, ha="center", va="center", fontsize=7)
    ax.set(xlim=(0, shape[1]), ylim=(shape[0], 0), xticks=[], yticks=[], title=title)


fig, axes = plt.subplots(
    len(LAYOUTS), len(VIEWS), figsize=(12, 2.4 * len(LAYOUTS)), layout="constrained"
)
for r, layout in enumerate(LAYOUTS):
    m = sh.make_mesh(layout, devices=devices)
    for c, (title, (path, axes2d)) in enumerate(VIEWS.items()):
        shape = view_shape(path)
        sharding = NamedSharding(m, sh.logical_to_spec(axes2d, shape, m))
        plot_sharding(axes[r, c], shape, sharding, title if r == 0 else "")
    axes[r, 0].set_ylabel(layout, fontsize=10)
fig.suptitle("Which device holds which block (rows: layouts; numbers: device ids)")
plt.show()

# %% [markdown]
# *What to see:* `dp` keeps every matrix whole on all 8 devices; `fsdp` cuts every matrix
# along D (the rows of wq and w1, the columns of w2) into 8; `tp` cuts along heads, MLP
# width and vocabulary instead; the 2 x 2 x 2 mesh combines both cuts, and each block is
# held by the 2 devices that differ only in their `data` coordinate.
#
# Check that the picture is what JAX did: on the `tp` layout, device 0's shard of block
# 0's `w1` is exactly the first 1/8 of its columns, and the shards put together give back
# the whole matrix.

# %%
tp = sh.make_mesh("tp", devices=devices)
w1 = np.asarray(model.layers[0].feed_forward.w1[...])  # [D, F], block 0
w1_axes = sh.PARAM_AXES[("layers", "feed_forward", "w1")]
w1_tp = jax.device_put(w1, NamedSharding(tp, sh.logical_to_spec(w1_axes, w1.shape, tp)))
F = cfg.ffn_hidden_dim
shard0 = next(s for s in w1_tp.addressable_shards if s.device == tp.devices.flat[0])
np.testing.assert_array_equal(shard0.data, w1[:, : F // 8])
np.testing.assert_array_equal(np.asarray(w1_tp), w1)
print("w1", w1.shape, "->", w1_tp.sharding.spec, "each device holds", shard0.data.shape)

# %% [markdown]
# ## 4. Bytes per chip, for every preset
#
# Only shapes are needed: `abstract_model` gives them without allocating, and
# `sh.abstract_mesh` plans a mesh of chips this machine does not have;
# `sh.bytes_per_device` adds up each parameter's shard. Below, an `fsdp_tp` layout
# (tensor = 8 inside a host, fsdp over the rest) from 8 to 1024 chips. Serving needs the
# bfloat16 weights (2 bytes per parameter); training with Adam keeps float32 weights,
# gradients and two moments (16 bytes per parameter), before any activations. All sizes
# are in GiB (2^30 bytes). As a budget we take 60 GiB per chip: an 80 GB H100 holds
# 80e9 bytes = 74.5 GiB, and activations and XLA's workspace need the rest.

# %%
PRESETS = ["llama3.2-1b", "llama3-8b", "llama3.1-70b", "llama3.1-405b"]
CHIPS = [8, 16, 32, 64, 128, 256, 512, 1024]
BUDGET_GIB = 60
assert round(80e9 / 2**30, 1) == 74.5  # the text's 74.5 GiB


def abstract_params(c, layers):
    return nnx.state(lj.abstract_model(c.replace(n_layers=layers)), nnx.Param)


def per_chip_and_total(name, mesh_):
    """(parameters one chip holds on mesh_, all parameters) of a preset, float32.

    Every block has the same shapes, so a model of 1 and one of 2 blocks give both numbers
    for any L exactly, without building 126 abstract blocks for Llama 3.1 405B.
    """
    c = lj.PRESETS[name]
    one, two = abstract_params(c, 1), abstract_params(c, 2)
    on_chip = [sh.bytes_per_device(st, sh.param_shardings(st, mesh_)) // 4 for st in (one, two)]
    total = [lj.count_params(lj.abstract_model(c.replace(n_layers=k))) for k in (1, 2)]
    extend = lambda pair: pair[0] + (c.n_layers - 1) * (pair[1] - pair[0])
    return extend(on_chip), extend(total)


def params_per_chip(name, chips):
    """Parameters one chip holds under tensor=8, fsdp=chips/8."""
    return per_chip_and_total(name, sh.abstract_mesh("fsdp=-1,tensor=8", chips))[0]


per_chip = {name: np.array([params_per_chip(name, n) for n in CHIPS]) for name in PRESETS}
# The planned count equals what the NamedShardings on this notebook's 8 devices give, and
# the extrapolation from 1 and 2 blocks equals the whole model (Llama 3 8B, 32 blocks):
for name in PRESETS:
    real, _ = per_chip_and_total(name, sh.make_mesh("tp", devices=devices))
    assert real == per_chip[name][0], name
st8 = nnx.state(lj.abstract_model(lj.PRESETS["llama3-8b"]), nnx.Param)
full = sh.bytes_per_device(st8, sh.param_shardings(st8, sh.abstract_mesh("fsdp=-1,tensor=8", 64)))
assert full // 4 == params_per_chip("llama3-8b", 64)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, layout="constrained")
for i, name in enumerate(PRESETS):
    ax1.loglog(CHIPS, per_chip[name] * 2 / 2**30, "o-", color=f"C{i}", label=name)
    ax2.loglog(CHIPS, per_chip[name] * 16 / 2**30, "s-", color=f"C{i}", label=name)
for ax, what in ((ax1, "Serving: bf16 weights"), (ax2, "Training: Adam state, 16 bytes/param")):
    ax.axhline(BUDGET_GIB, color="k", ls=":", lw=1, label=f"{BUDGET_GIB} GiB budget per chip")
    ax.set(xlabel="chips (tensor = 8, fsdp = chips / 8)", title=what, xticks=CHIPS)
    ax.set_xticklabels(CHIPS)
    ax.legend(fontsize=8)
ax1.set_ylabel("GiB per chip (log scale)")
fig.suptitle("Parameter memory per chip under fsdp x tensor parallelism")
plt.show()
first_fit = {}  # name: (chips to serve, chips to train) within the budget
for name in PRESETS:
    fits = [c for c, n in zip(CHIPS, per_chip[name], strict=True) if n * 16 < BUDGET_GIB * 2**30]
    first_fit[name] = (
        min(c for c, n in zip(CHIPS, per_chip[name], strict=True) if n * 2 < BUDGET_GIB * 2**30),
        fits[0] if fits else None,
    )
    print(
        f"{name:14s} serving on 8 chips: {per_chip[name][0] * 2 / 2**30:6.1f} GiB/chip; "
        f"Adam state under {BUDGET_GIB} GiB/chip from {fits[0] if fits else '>1024'} chips"
    )

assert first_fit["llama3.1-405b"] == (16, 128)  # the caption's numbers

# %% [markdown]
# *What to see:* every line halves when the chips double (fsdp cuts each weight once
# more), so a model's lines are straight and parallel; read off where each crosses the
# dotted 60 GiB budget: serving Llama 3.1 405B needs 16 chips, training it with Adam 128.
#
# ## 5. The collectives a step needs
#
# With the parameters and the batch placed, `jax.jit` compiles one program per device and
# XLA's partitioner inserts the communication. Counting the collectives in the compiled
# program shows what each layout costs: `dp` needs none in the forward pass, `fsdp`
# all-gathers each weight before using it, `tp` all-reduces partial sums after the
# row-split matmuls (`wo`, `w2`). Whatever the layout, the logits are the same.

# %%
COLLECTIVES = ["all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"]
# One collective in optimised HLO: "%name = <shape or (tuple of shapes)> all-gather(...".
HLO_OP = re.compile(r"= (\S+|\(.*?\)) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
DTYPE_BYTES = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "u32": 4, "pred": 1}


def collectives(compiled):
    """{op: (how many, bytes of their results)} in a compiled program."""
    found = {op: [0, 0] for op in COLLECTIVES}
    for shape, op in HLO_OP.findall(compiled.as_text()):
        found[op][0] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
            found[op][1] += DTYPE_BYTES[dtype] * int(
                np.prod([int(d) for d in dims.split(",") if d])
            )
    return found


base = lj.build_model(cfg, seed=0) if not CHECKPOINT else checkpoint.load(CHECKPOINT)
graphdef, _ = nnx.split(base)
tokens = np.asarray(jax.random.randint(jax.random.key(0), (8, 32), 0, cfg.vocab_size))
want = np.asarray(base(jnp.asarray(tokens)))


def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def loss(state, tokens):  # next-token cross-entropy: what a training step differentiates
    logits = nnx.merge(graphdef, state)(tokens)[:, :-1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


counts = {}
for layout in ["dp", "fsdp", "tp"]:
    m = sh.make_mesh(layout, devices=devices)
    try:
        sh.validate(cfg, m)
    except lj.LlamaError as e:  # a checkpoint whose heads do not divide over 8 devices
        print(f"skipping {layout}: {e}")
        continue
    state = jax.device_put(nnx.state(base), sh.param_shardings(nnx.state(base), m))
    batch = sh.shard_batch(tokens, m)
    with sh.use_mesh(m):
        fwd = jax.jit(forward).lower(state, batch).compile()
        np.testing.assert_allclose(np.asarray(fwd(state, batch)), want, rtol=1e-4, atol=1e-5)
        counts[layout, "forward"] = collectives(fwd)
        grad = jax.jit(jax.grad(loss)).lower(state, batch).compile()
        counts[layout, "gradient"] = collectives(grad)
print("sharded logits == unsharded logits on every layout")

fig, ax = plt.subplots(figsize=(10, 3.8), layout="constrained")
keys = list(counts)
bottom = np.zeros(len(keys))
for op in COLLECTIVES:
    vals = np.array([counts[k][op][0] for k in keys])
    if vals.any():
        ax.bar(range(len(keys)), vals, bottom=bottom, label=op)
        bottom += vals
ax.set(xticks=range(len(keys)), ylabel="collectives in the compiled program")
ax.set_title(f"Collectives per program, {cfg.name} ({cfg.n_layers} layers, 8 devices)")
ax.set_xticklabels([f"{a}\n{b}" for a, b in keys])
ax.legend()
plt.show()
for k, v in counts.items():
    print(
        f"{k[0]:5s} {k[1]:9s}",
        {op: f"{n} ops, {b / 1024:.0f} KiB" for op, (n, b) in v.items() if n},
    )

# %% [markdown]
# *What to see:* `dp` communicates only in the gradient program (one all-reduce of all
# gradients, which XLA fuses into a single op); `fsdp` has an all-gather per weight per
# layer (the gradient program keeps the gathered weights for the backward); `tp` has an
# all-reduce per layer after `wo` and after `w2`, and twice as many with the backward. The blocks run in a Python loop, so each layer's collectives appear once per layer.
#
# **Bytes, checked.** Under fsdp the forward pass gathers every weight once, all but one:
# the embedding table, which is never gathered (next paragraph). So the all-gathers'
# results add up to the parameters minus the embedding, plus the token ids:

# %%
n_params = lj.count_params(base)
emb_params = cfg.vocab_size * cfg.dim
gathered = counts["fsdp", "forward"]["all-gather"][1]
expected = 4 * (n_params - emb_params) + 4 * tokens.size  # float32 weights, int32 ids
print(
    f"fsdp forward all-gathers: {gathered:,} bytes; weights without the embedding "
    f"+ token ids: {expected:,} bytes"
)
assert abs(gathered - expected) <= 0.05 * expected
tp_reduced = counts["tp", "forward"]["all-reduce"]
print(
    f"tp forward: {tp_reduced[0]} all-reduces of [B, T, D] = "
    f"{tp_reduced[1] // tp_reduced[0]:,} bytes each (2 per layer + 1 after the embedding)"
)
assert (
    tp_reduced[0] == 2 * cfg.n_layers + 1
    and tp_reduced[1] == tp_reduced[0] * 4 * tokens.size * cfg.dim
)

# %% [markdown]
# **The all-to-all under fsdp.** The embedding table is [V, D] with D split over fsdp, and
# the token ids are [B, T] with B split over fsdp. Rather than gather the table (V x D,
# the largest matrix of a small model), XLA gathers the ids (a few KiB) and each device
# looks up *every* token but only its own D/8 features: the result is [B, T, D] split
# along D. The next layer wants it split along B. Turning a split along one axis into a
# split along another is what an all-to-all does: each device sends 7/8 of its piece,
# one slice to each other device, [B/8, T, D/8] apiece, and keeps 1/8. It moves about
# B x T x D x 7/8 numbers per step in total, tiny next to the weights. The same
# exchange runs backwards for the embedding's gradient.
#
# The gradient program under fsdp sums each gradient over the devices. An fsdp device
# needs only its own slice of that sum, a **reduce-scatter**; on CPU, XLA emits an
# all-reduce and keeps a slice (GPU and TPU compilers turn the pair into one
# reduce-scatter). The gathered weights are kept from the forward pass for the backward
# here; with rematerialisation (`remat=` in training) they are gathered again.
#
# ## 6. What the communication costs
#
# A ring collective over n devices moves, through each device's links (the scaling book,
# "sharded matrices", derives these):
#
# | collective | input per device | bytes each device sends | time |
# |---|---|---|---|
# | all-gather | a 1/n shard of A | A x (n-1)/n | A (n-1)/n / W |
# | reduce-scatter | a full partial sum A | A x (n-1)/n | A (n-1)/n / W |
# | all-reduce | a full partial sum A | 2 A x (n-1)/n | 2 A (n-1)/n / W |
# | all-to-all | A split one way | A x (n-1)/n / 2 on a bidirectional ring, less on a torus | |
#
# where W is the bandwidth of the links a device sends over at once. Two machines:
#
# - **TPU v5e** (Google Cloud's v5e page): 197 TFLOP/s bf16 per chip; ICI links of
#   4.5e10 bytes/s each way (the scaling book's TPU table). A ring along one axis of the
#   2D torus sends to both neighbours at once: W = 9e10 bytes/s.
# - **H100 SXM** (NVIDIA's H100 data sheet): 989 TFLOP/s dense bf16; NVLink 4 at 900 GB/s
#   per GPU counting both directions, so W = 4.5e11 bytes/s each way through the NVSwitch,
#   inside one 8-GPU node only (between nodes, InfiniBand is about 10x slower), so the
#   H100 case below is fsdp over the 8 GPUs of one node; the v5e case, a 256-chip pod.
#
# **fsdp, per training step**, for a model of P parameters with weights and gradients
# moved in bf16 (2 bytes): all-gather the weights in the forward (2P (n-1)/n bytes), again
# in the backward when they were not kept (the same), and reduce-scatter the gradients
# (the same): about 6P bytes per chip per step, whatever the batch. The compute is 6P
# FLOPs per token (plus attention), so a chip that processes b tokens per step computes
# for 6 P b / C seconds and communicates for 6 P (n-1)/n / W: **fsdp is
# communication-bound below b = C / W tokens per chip** (the size of the model cancels):
# 197e12 / 9e10 = 2189 on v5e, 989e12 / 4.5e11 = 2198 on H100; counting attention's
# FLOPs and the (n-1)/n, about 2000 tokens per chip on the v5e pod and 1800 on the H100
# node.
#
# **Tensor parallelism over t chips, per layer**: all-reduce the [tokens, D] activations
# after `wo` and after `w2` in the forward, and the same two in the backward: 4 all-reduces
# of 2 bytes x tokens x D. Both this and the compute grow with the tokens, so the batch
# does not help: t-way tensor parallelism is communication-bound when
# 16 L D (t - 1) / W > 6 P / C, that is, for a model not wide enough for its t.

# %%
# name: (bf16 FLOP/s per chip, W in bytes/s, fsdp size); sources in the text above. fsdp
# spans a whole 256-chip v5e pod over ICI, but only one 8-GPU node over NVLink.
HARDWARE = {
    "TPU v5e pod (ICI)": (perf.PEAK_FLOPS["TPU v5e"], 2 * 4.5e10, 256),
    "H100 SXM node (NVLink 4)": (perf.PEAK_FLOPS["NVIDIA H100"], 900e9 / 2, 8),
}
SEQ = 4096
MODEL, TENSOR = "llama3-8b", 8
c8 = lj.PRESETS[MODEL]
P = sum(int(a.size) for a in jax.tree.leaves(st8))  # st8: section 4
flops_per_token = perf.model_flops_per_token(c8, SEQ)  # 6 P + attention, training
fsdp_bytes = lambda n: 3 * 2 * P * (n - 1) / n  # two all-gathers + one reduce-scatter, bf16
tp_bytes_per_token = 4 * c8.n_layers * 2 * (TENSOR - 1) / TENSOR * 2 * c8.dim * TENSOR

print(
    f"{MODEL}: P = {P / 1e9:.2f}e9 parameters, {flops_per_token / 1e9:.1f} GFLOP per token "
    f"(training, sequences of {SEQ})"
)
print(f"tensor={TENSOR}: {tp_bytes_per_token / 2**20:.2f} MiB sent per chip per token of its own")
critical = {}
for hw, (C, W, n) in HARDWARE.items():
    t_comm = fsdp_bytes(n) / W
    critical[hw] = t_comm * C / flops_per_token  # tokens per chip where compute = comm
    ratio = (tp_bytes_per_token / W) / (flops_per_token / C)
    print(
        f"{hw:25s} fsdp={n}: {fsdp_bytes(n) / 2**30:.1f} GiB sent per chip per step, taking {t_comm * 1e3:5.0f} ms per step; compute "
        f"catches up at {critical[hw]:5.0f} tokens per chip; tensor={TENSOR}: "
        f"communication / compute = {ratio:.2f}"
    )
v5e, h100 = critical.values()
assert 1900 < v5e < 2100 and 1700 < h100 < 1900  # "about 2000 ... and 1800" in the text
assert [round(C / W) for C, W, _ in HARDWARE.values()] == [2189, 2198]  # the text's C / W

b = np.logspace(7, 16, 200, base=2)  # tokens per chip per step
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, layout="constrained")
for ax, (hw, (C, W, n)) in zip(axes, HARDWARE.items(), strict=True):
    ax.loglog(
        b, b * flops_per_token / C * 1e3, color="C0", label="compute (6P + attention per token)"
    )
    ax.loglog(
        b,
        np.full_like(b, fsdp_bytes(n) / W * 1e3),
        color="C3",
        ls="--",
        label=f"fsdp={n}: 2 all-gathers + reduce-scatter",
    )
    ax.loglog(
        b,
        b * tp_bytes_per_token / W * 1e3,
        color="C2",
        ls="-.",
        label=f"tensor={TENSOR}: 4 all-reduces per layer",
    )
    ax.axvline(critical[hw], color="k", ls=":", lw=1)
    ax.text(critical[hw] * 1.1, 1.5, f"{critical[hw]:.0f} tokens/chip", fontsize=8)
    ax.set(xlabel="tokens per chip per step (log scale)", title=hw, ylim=(1, 1e5))
    ax.legend(fontsize=8, loc="upper left")
axes[0].set_ylabel("milliseconds per step (log scale)")
fig.suptitle(f"{MODEL} training step: compute against communication, per chip")
plt.show()

# %% [markdown]
# *What to see:* the fsdp line is flat (it moves the weights whatever the batch), the
# compute line rises with the batch, and they cross at the dotted line: to the left of it
# a step waits on the network. The tensor-parallel line runs parallel to the compute line,
# just below it: tensor = 8 is close to its limit for an 8B model (D = 4096) on either
# machine, which is why tensor parallelism stays inside a node, 8-way at most.
#
# ## 7. `pjit` is `jax.jit`
#
# `pjit` was JAX's sharded jit; `jax.experimental.pjit.pjit` is now deprecated in favour
# of `jax.jit`, which takes the same `in_shardings` and `out_shardings`. Either the
# arguments already carry their shardings, as above, or `jax.jit` is told them:

# %%
m = sh.make_mesh("fsdp", devices=devices)
state = jax.tree.map(np.asarray, nnx.state(base))  # host (numpy) copies
state_shardings = sh.param_shardings(state, m)
batch_sharding = sh.batch_sharding(m, tokens.shape)
out_sharding = sh.logical_sharding(
    m, ("batch", "length", "act_vocab"), (*tokens.shape, cfg.vocab_size)
)
with sh.use_mesh(m):
    step = jax.jit(
        forward, in_shardings=(state_shardings, batch_sharding), out_shardings=out_sharding
    )
    logits = step(state, tokens)  # host arrays in: jit places them by in_shardings
print(logits.sharding)
np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-5)

# %% [markdown]
# ## 8. On a multi-host TPU pod
#
# A TPU v5p-64 slice is 32 chips on 8 hosts, 4 chips per host; JAX sees 32 devices.
# What changes from this notebook:
#
# - **Every host runs the same program.** Start it on all hosts at once and call
#   `sh.initialize_distributed()` (`jax.distributed.initialize`) before anything else;
#   then `jax.devices()` lists all 32 devices, `jax.local_devices()` this host's 4.
# - **The mesh spans hosts.** Keep `tensor` on the fastest links (NVLink inside a GPU
#   node, the ICI of a TPU slice) and `fsdp`/`data` across them; between slices, which
#   talk over the slower data-centre network (DCN), use `data`.
# - **Each host feeds its own rows.** `sh.shard_batch(local_rows, mesh)` builds one global
#   batch from every host's part (`jax.make_array_from_process_local_data`).
# - **Only process 0 prints and writes single-writer files** (`sh.print0`,
#   `sh.is_main_process()`); Orbax checkpoints are written by every host together.
# - **Restoring onto another mesh** needs the target shardings up front:
#   `checkpoint.load(path, mesh=new_mesh)` reads each device's slice directly.
#
# On this machine there is one process:

# %%
print(
    "process",
    jax.process_index(),
    "of",
    jax.process_count(),
    "| local devices:",
    len(jax.local_devices()),
    "| global:",
    jax.device_count(),
)
rows = sh.shard_batch(tokens, sh.make_mesh("fsdp", devices=devices))
print(
    "global batch",
    rows.shape,
    "sharded",
    rows.sharding.spec,
    "- each device holds",
    rows.addressable_shards[0].data.shape,
)

# %% [markdown]
# ## Exercises
#
# 1. **Which layout serves Llama 3 8B on 8 TPU v5e chips of 16 GB HBM each?** Compute
#    the bf16 weights per chip under `tp` (tensor = 8) and under `dp`. Mind the units.
# 2. **fsdp on v5e.** Training Llama 3 8B with fsdp over 256 v5e chips and sequences of
#    4096 tokens: how many sequences per chip per step keep it compute-bound?
# 3. **The all-to-all's size.** For a batch of 8 x 32 tokens of the tiny model (D = 64)
#    on fsdp = 8, how many float32 bytes does each device send in the embedding's
#    all-to-all? Compare with one all-gather of `w1`.
# 4. **Tensor parallelism for 405B.** Redo the tensor = 8 communication/compute ratio for
#    Llama 3.1 405B (D = 16384) on H100s. Could it use tensor = 16 across two nodes over
#    InfiniBand at 50 GB/s per GPU?
#
# ## Answers

# %%
# 1. Weights per chip in bf16 (st8: Llama 3 8B's abstract parameters, from section 4).
for spec in ("tp", "dp"):
    planned = sh.abstract_mesh(spec, 8)
    gib = sh.bytes_per_device(st8, sh.param_shardings(st8, planned)) / 2 / 2**30  # f32 -> bf16
    hbm_gib = 16e9 / 2**30  # 16 GB = 14.9 GiB
    print(
        f"1. llama3-8b {spec}: {gib:.1f} GiB of bf16 weights per chip "
        f"({'fits' if gib < hbm_gib else 'does not fit'} in 16 GB = {hbm_gib:.1f} GiB)"
    )

# 2. Compute-bound from C / W tokens per chip (times (n-1)/n and the attention share).
tokens_needed = critical["TPU v5e pod (ICI)"]
print(
    f"2. {tokens_needed:.0f} tokens per chip = {tokens_needed / SEQ:.2f} sequences of {SEQ}: "
    "one sequence per chip per step is already compute-bound"
)

# 3. Each device holds [B, T, D/8] and sends 7 of its 8 batch slices: [B/8, T, D/8] each.
B_, T_ = tokens.shape
a2a_sent = 4 * B_ * T_ * (cfg.dim // 8) * 7 / 8
w1_gather = 4 * cfg.dim * cfg.ffn_hidden_dim * 7 / 8
print(
    f"3. all-to-all: {a2a_sent:,.0f} bytes sent per device; all-gather of w1: "
    f"{w1_gather:,.0f} bytes received per device"
)

# 4. Ratio of tensor-parallel communication to compute, per token.
c405 = lj.PRESETS["llama3.1-405b"]
C_h100 = HARDWARE["H100 SXM node (NVLink 4)"][0]
for t, W in ((8, 450e9), (16, 50e9)):
    comm = 4 * c405.n_layers * 2 * (t - 1) / t * 2 * c405.dim * t / W
    compute = perf.model_flops_per_token(c405, SEQ) / C_h100
    print(
        f"4. llama3.1-405b tensor={t:2d} at W = {W / 1e9:.0f} GB/s: "
        f"communication / compute = {comm / compute:.2f}"
    )

# %% [markdown]
# Answer 4 in words: at tensor = 8 over NVLink the ratio is well below 1 (a 16384-wide
# model has plenty of work per byte), but at tensor = 16 over InfiniBand it is far above 1:
# tensor parallelism stays inside the node, and the nodes share the model by fsdp.
#
# ## Where to go next
#
# - `llama_jax/sharding/`: the rules table (`rules.py`), meshes (`mesh.py`), placement and
#   the multi-host start-up.
# - `llama-jax generate --mesh fsdp_tp ...` and `llama-jax train --mesh ...` take the same
#   mesh specs as `make_mesh`.
# - Notebook **04_generation** explains the KV cache, which shards by `sh.CACHE_AXES`
#   (batch over `data`/`fsdp`, KV heads over `tensor`); **05_finetuning** runs a
#   training step whose collectives you have just counted.
# - The JAX scaling book (jax-ml.github.io/scaling-book) derives the cost of each
#   collective and how to choose a layout for a given chip count.
