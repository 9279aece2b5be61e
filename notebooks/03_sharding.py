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
# collectives (all-gather, all-reduce, ...) a forward pass and a training step need, how
# `jax.jit` took over from `pjit`, and what changes on a multi-host TPU pod.
#
# **How to run it.** No accelerator needed: the first cell asks XLA for 8 simulated CPU
# devices, so the meshes below are real meshes on one machine.
# - *CPU laptop*: open this file in Jupyter with jupytext (see notebook 01) or run
#   `jupytext --to ipynb notebooks/03_sharding.py`; about a minute.
# - *GPU*: with 8 GPUs the notebook uses them; with fewer it falls back to 8 CPU devices.
# - *Colab TPU*: a TPU runtime with 8 cores (v2-8) is used directly; with fewer devices
#   the notebook falls back to 8 CPU devices, as on a laptop.
#
# To shard a real model instead of the tiny one, set `LLAMA_JAX_CHECKPOINT` (or
# `CHECKPOINT` below) to a llama-jax checkpoint directory (`llama-jax convert` makes one;
# `llama-jax quickstart` leaves a small trained one in `runs/quickstart/model`);
# it is read straight onto the mesh, each device reading only its own slice.

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

fig, axes = plt.subplots(1, 2, figsize=(6, 2.6))
for d, ax in enumerate(axes):
    grid = np.vectorize(lambda dev: dev.id)(mesh.devices[d])
    ax.imshow(grid, cmap="tab10", vmin=0, vmax=9)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"device {v}", ha="center", va="center", color="w")
    ax.set(title=f"data = {d}", xticks=[0, 1], yticks=[0, 1], xlabel="tensor", ylabel="fsdp")
fig.suptitle("A 2 x 2 x 2 mesh: each device has one coordinate per axis")
plt.show()

# %% [markdown]
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
    cfg = lj.LlamaConfig(name="tiny-8-heads", dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                         vocab_size=256, ffn_dim=128, max_seq_len=256)  # fmt: skip
abstract = nnx.state(lj.abstract_model(cfg), nnx.Param)  # shapes only, no memory
shapes = nnx.to_pure_dict(abstract)

MESHES = {name: sh.make_mesh(name, devices=devices) for name in ["dp", "fsdp", "tp", "fsdp_tp"]}
MESHES["2x2x2"] = mesh


def short(spec, ndim):
    """P(None, 'fsdp', ('data', 'fsdp')) -> '. fsdp data+fsdp', one entry per dimension."""
    entries = (*spec, *(None,) * (ndim - len(spec)))
    return " ".join("." if e is None else e if isinstance(e, str) else "+".join(e) for e in entries)


print("How each dimension is split ('.': not split), per mesh:")
print(f"{'parameter':29s} {'logical axes':37s}", " ".join(f"{m:16s}" for m in MESHES))
for path, axes in sh.PARAM_AXES.items():
    if path == ("output",) and cfg.tie_word_embeddings:
        continue
    leaf = shapes
    for key in path:
        leaf = leaf[key]
    specs = [short(sh.logical_to_spec(axes, leaf.shape, m), leaf.ndim) for m in MESHES.values()]
    print(f"{'/'.join(path):29s} {' '.join(axes):37s}", " ".join(f"{x:16s}" for x in specs))

# %% [markdown]
# Note `wk` and `wv` under `tp`: 2 KV heads cannot be split 8 ways, so that rule is
# skipped and every device holds both KV heads, computing the keys and values its query
# heads need (under `fsdp_tp`, tensor = 2, they are split). `sh.validate` refuses layouts
# that cannot work at all, such as query heads not divisible by `tensor`, with a message
# naming the field and the axis.

# %%
try:
    sh.validate(cfg.replace(n_heads=4, n_kv_heads=2), sh.make_mesh("tp", devices=devices))
except lj.LlamaError as e:
    print("LlamaError:", e)

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
# The same as a figure, for four layouts and four matrices (block 0's slice of the stacked
# weights). Each colour is a device; a block shared by several devices lists them all.
# The picture is computed from each array's `NamedSharding`, the object JAX itself uses.

# %%
LAYOUTS = ["dp", "fsdp", "tp", "data=2,fsdp=2,tensor=2"]
H, N = cfg.head_dim, cfg.n_heads
VIEWS = {  # 2-D view of a parameter: (title, path, 2-D shape, logical axes of that view)
    "tok_embeddings [V, D]": (("tok_embeddings",), ("vocab", "embed")),
    "wq [D, N*H]": (("layers", "attention", "wq"), ("embed", "heads")),
    "w1 [D, F]": (("layers", "feed_forward", "w1"), ("embed", "mlp")),
    "w2 [F, D]": (("layers", "feed_forward", "w2"), ("mlp", "embed")),
}


def view_shape(path):
    leaf = shapes
    for key in path:
        leaf = leaf[key]
    s = leaf.shape[1:] if path[0] == "layers" else leaf.shape  # one block
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


fig, axes = plt.subplots(len(LAYOUTS), len(VIEWS), figsize=(12, 2.4 * len(LAYOUTS)))
for r, layout in enumerate(LAYOUTS):
    m = sh.make_mesh(layout, devices=devices)
    for c, (title, (path, axes2d)) in enumerate(VIEWS.items()):
        shape = view_shape(path)
        plot_sharding(
            axes[r, c],
            shape,
            NamedSharding(m, sh.logical_to_spec(axes2d, shape, m)),
            title if r == 0 else "",
        )
    axes[r, 0].set_ylabel(layout, fontsize=10)
fig.suptitle("Which device holds which block (rows: layouts; numbers: device ids)")
plt.tight_layout()
plt.show()

# %% [markdown]
# Check that the picture is what JAX did: on the `tp` layout, device 0's shard of block
# 0's `w1` is exactly the first 1/8 of its columns, and the shards put together give back
# the whole matrix.

# %%
tp = sh.make_mesh("tp", devices=devices)
w1 = np.asarray(model.layers.feed_forward.w1[...])  # [L, D, F], all blocks
w1_tp = jax.device_put(
    w1,
    NamedSharding(
        tp, sh.logical_to_spec(sh.PARAM_AXES[("layers", "feed_forward", "w1")], w1.shape, tp)
    ),
)
F = cfg.ffn_hidden_dim
shard0 = next(s for s in w1_tp.addressable_shards if s.device == tp.devices.flat[0])
np.testing.assert_array_equal(shard0.data, w1[:, :, : F // 8])
np.testing.assert_array_equal(np.asarray(w1_tp), w1)
print("w1", w1.shape, "->", w1_tp.sharding.spec, "each device holds", shard0.data.shape)

# %% [markdown]
# ## 4. Bytes per device, for every preset
#
# Only shapes are needed: `abstract_model` gives them without allocating, and a
# PartitionSpec says how many ways each dimension is cut. Below, an `fsdp_tp` layout
# (tensor = 8 inside a host, fsdp over the rest) from 8 to 1024 chips. Serving needs the
# bfloat16 weights (2 bytes per parameter); training with Adam keeps float32 weights,
# gradients and two moments (16 bytes per parameter), before any activations.

# %%
PRESETS = ["llama3.2-1b", "llama3-8b", "llama2-70b", "llama3.1-70b", "llama3.1-405b"]
CHIPS = [8, 16, 32, 64, 128, 256, 512, 1024]


class MeshShape:  # logical_to_spec only needs the axis sizes, not real devices
    def __init__(self, **shape):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def elements_per_device(state, mesh_shape):
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        spec = sh.logical_to_spec(sh.PARAM_AXES[names], leaf.shape, mesh_shape)
        size = 1
        for dim, axes in zip(leaf.shape, (*spec, *(None,) * (leaf.ndim - len(spec))), strict=True):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            size *= dim // int(np.prod([mesh_shape.shape[a] for a in axes]))
        total += size
    return total


per_chip = {}
for name in PRESETS:
    state = nnx.to_pure_dict(nnx.state(lj.abstract_model(lj.PRESETS[name]), nnx.Param))
    per_chip[name] = [elements_per_device(state, MeshShape(fsdp=n // 8, tensor=8)) for n in CHIPS]
    # The same count from the NamedShardings JAX uses, on this notebook's 8 devices:
    real = sh.param_shardings(state, sh.make_mesh("tp", devices=devices))
    counted = sum(
        int(np.prod(s.shard_shape(a.shape)))
        for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(real), strict=True)
    )
    assert counted == per_chip[name][0], (name, counted, per_chip[name][0])

fig, ax = plt.subplots(figsize=(8, 4))
for i, name in enumerate(PRESETS):
    n = np.array(per_chip[name])
    ax.loglog(CHIPS, n * 2 / 2**30, "o-", color=f"C{i}", label=f"{name} (bf16 weights)")
    ax.loglog(CHIPS, n * 16 / 2**30, "--", color=f"C{i}", alpha=0.6)
ax.axhline(80, color="k", ls=":", lw=1)
ax.text(CHIPS[0], 95, "80 GB of HBM", fontsize=8)
ax.set(
    xlabel="chips (tensor = 8, fsdp = chips / 8)",
    ylabel="GiB per chip",
    title="Weights (solid) and Adam training state (dashed) per chip",
)
ax.legend(fontsize=7)
plt.show()
for name in PRESETS:
    need = next(
        (c for c, n in zip(CHIPS, per_chip[name], strict=True) if n * 16 < 60 * 2**30), None
    )
    print(
        f"{name:14s} serving on 8 chips: {per_chip[name][0] * 2 / 2**30:6.1f} GiB/chip; training state < 60 GiB/chip from {need} chips"
    )

# %% [markdown]
# ## 5. The collectives a step needs
#
# With the parameters and the batch placed, `jax.jit` compiles one program per device and
# XLA's partitioner inserts the communication. Counting the collectives in the compiled
# program shows what each layout costs: `dp` needs none in the forward pass, `fsdp`
# all-gathers each weight before using it, `tp` all-reduces partial sums after the
# row-split matmuls (`wo`, `w2`). Whatever the layout, the logits are the same.

# %%
COLLECTIVES = ["all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"]


def count_collectives(compiled):
    text = compiled.as_text()
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", text)) for op in COLLECTIVES}


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
        counts[layout, "forward"] = count_collectives(fwd)
        if layout in ("dp", "fsdp"):
            counts[layout, "gradient"] = count_collectives(
                jax.jit(jax.grad(loss)).lower(state, batch).compile()
            )
print("sharded logits == unsharded logits on every layout")

fig, ax = plt.subplots(figsize=(10, 3.5))
keys = list(counts)
bottom = np.zeros(len(keys))
for op in COLLECTIVES:
    vals = np.array([counts[k][op] for k in keys])
    ax.bar(range(len(keys)), vals, bottom=bottom, label=op)
    bottom += vals
ax.set(
    xticks=range(len(keys)),
    ylabel="collectives in the compiled program",
    title=f"What {cfg.name} needs per step ({cfg.n_layers} layers; scanned, so one body)",
)
ax.set_xticklabels([f"{a}\n{b}" for a, b in keys])
ax.legend()
plt.show()
for k, v in counts.items():
    print(f"{k[0]:8s} {k[1]:8s}", {op: n for op, n in v.items() if n})

# %% [markdown]
# The gradient of a data-parallel step sums every device's gradients: all-reduce. Under
# `fsdp` each device needs only its own slice of that sum, a reduce-scatter; in the CPU
# program above it appears as an all-reduce after which each device keeps its slice, a
# pair that accelerator compilers can fuse into one reduce-scatter. The layer stack is a `jax.lax.scan`, so a collective inside the
# block appears once in the program and runs once per layer.
#
# ## 6. `pjit` is `jax.jit`
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
# ## 7. On a multi-host TPU pod
#
# A TPU v5p-64 slice is 32 chips on 8 hosts, 4 chips per host; JAX sees 32 devices.
# What changes from this notebook:
#
# - **Every host runs the same program.** Start it on all hosts at once and call
#   `sh.initialize_distributed()` (`jax.distributed.initialize`) before anything else;
#   then `jax.devices()` lists all 32 devices, `jax.local_devices()` this host's 4.
# - **The mesh spans hosts.** Keep `tensor` on the fastest links (inside a host on GPUs,
#   the chip-to-chip ICI of a TPU slice) and `fsdp`/`data` across them; between slices,
#   which talk over the slower data-centre network (DCN), use `data`.
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
# ## Where to go next
#
# - `llama_jax/sharding.py`: the rules table, `make_mesh`, `validate`, `shard_model`.
# - `llama-jax generate --mesh fsdp_tp ...` and `llama-jax train --mesh ...` take the same
#   mesh specs as `make_mesh`.
# - Notebook **04_generation** explains the KV cache, which shards by `sh.CACHE_AXES`
#   (batch over `data`/`fsdp`, KV heads over `tensor`); **05_finetuning** runs a
#   training step whose collectives you have just counted.
# - The JAX scaling book (jax-ml.github.io/scaling-book) explains the cost of each
#   collective and how to choose a layout for a given chip count.
