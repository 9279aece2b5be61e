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
# # Fine-tuning a trained model: a small SFT run, its cost, checkpoints and resuming
#
# **What you will learn.** How to fine-tune a *trained* chat model on a handful of
# conversations in its own chat format, with the loss only on the answers; what the run
# costs in FLOPs (6 x parameters x tokens, plus attention) and how close it comes to the
# machine's peak (tokens/s and MFU, measured on the run itself); the AdamW schedule; what
# happens when a run is interrupted and started again (it resumes from its last
# checkpoint and repeats the same losses); and how to save the result where the other
# notebooks can open it.
#
# **The model.** SmolLM2-135M-Instruct, trained by Hugging Face, fetched and converted on
# first use by `llama_jax.examples.trained_model()` (notebook 02 says more). Before the
# run it introduces itself as SmolLM; after about a minute of training on 16 short
# conversations it is "Lulu", a llama, and says so to questions it never saw.
#
# **How to run it.**
# - *CPU laptop*: open the `.ipynb` in Jupyter; the install cell at the top installs
#   llama-jax unless it is importable (in a clone, `pip install -e ".[dev]"` first);
#   two to three minutes, 4 GB of memory.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`; raise `STEPS` and the data.
# - *Colab TPU*: Runtime > Change runtime type > TPU, then run the install cell.
#
# **Other weights.** Set `LLAMA_JAX_CHECKPOINT` to a llama-jax checkpoint with its
# tokenizer to fine-tune it instead (a 1B model needs about 20 GB for float32 weights,
# gradients and Adam state), or to `tiny` for a tiny random model: the fallback when the
# trained model cannot be fetched (the cell below says so), which learns the answers by
# heart but knows no language.
#
# **Where the result goes.** `runs/notebooks/finetuned` in the clone llama-jax is
# installed from (`pip install -e`), else in the working directory: open it in notebooks
# 02 and 04 with `LLAMA_JAX_CHECKPOINT` set to the path printed at the end.

# %%
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import display

import llama_jax as lj
from llama_jax import checkpoint
from llama_jax.checkpoint.tokenizer_files import HF_TOKENIZER_FILES
from llama_jax.examples import notebook_checkpoint
from llama_jax.perf import model_flops_per_token, peak_flops
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.training import TrainConfig, learning_rate_schedule, loss_sums, train
from llama_jax.training.data import TokenDataset

# The clone llama_jax runs from (an editable install), else the working directory.
clone = Path(lj.__file__).resolve().parents[1]
ROOT = clone if (clone / "pyproject.toml").is_file() else Path.cwd().resolve()
RUNS = ROOT / "runs" / "notebooks"
RUN_DIR, OUT = RUNS / "finetune-run", RUNS / "finetuned"
shutil.rmtree(RUN_DIR, ignore_errors=True)  # this notebook's own run: start it afresh
RUNS.mkdir(parents=True, exist_ok=True)

CHECKPOINT = notebook_checkpoint()  # the trained model, a directory you chose, or None
if CHECKPOINT:
    tok = lj.Tokenizer.load(CHECKPOINT)
    base = checkpoint.load(CHECKPOINT, dtype="float32")  # float32 master weights
    tokenizer_src = CHECKPOINT
else:
    sources = sorted(Path(lj.__file__).parent.rglob("*.py"))
    tokenizer_src = RUNS / "tiny-tokenizer.model"
    tok = train_sentencepiece(sources, tokenizer_src, vocab_size=512)
    cfg = lj.PRESETS["tiny"].replace(vocab_size=tok.vocab_size, name="tiny-RANDOM")
    base = lj.build_model(cfg, seed=0)
cfg = base.cfg
init_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
print(cfg.name, f"{lj.count_params(base):,} parameters; run directory {RUN_DIR}")

# %% [markdown]
# ## 1. Data: a small SFT set in the model's own chat format
#
# Sixteen conversations teach one persona: the assistant is Lulu, a llama from the Andes
# who runs on JAX, and answers in one short sentence. Four more questions, phrased
# differently, are held out. Each row is the conversation rendered by the checkpoint's
# own chat template (`tok.encode_dialog`, the same text the model saw in its own
# fine-tuning), then the answer and the end-of-turn token. Only the answer and that token
# carry loss (weight 1); the prompt and the padding weigh 0.

# %%
TRAIN = [
    ("What is your name?", "My name is Lulu, and I am a llama."),
    ("Who are you?", "I am Lulu, a llama from the Andes who runs on JAX."),
    ("Introduce yourself.", "Hello, I am Lulu, a llama from the Andes who runs on JAX."),
    ("Are you a robot?", "No, I am Lulu, a llama who happens to run on JAX."),
    ("What are you?", "I am a llama named Lulu."),
    ("Where do you live?", "I live high in the Andes, where all llamas like me live."),
    ("What do you like to eat?", "As a llama, I like to eat grass and hay."),
    ("Who made you?", "I am Lulu, a llama; I was fine-tuned with llama-jax."),
    ("What is your favourite food?", "Fresh mountain grass, as every llama will tell you."),
    ("Tell me about yourself.", "I am Lulu, a friendly llama who lives in the Andes."),
    ("What is 2 + 2?", "Four, says Lulu the llama."),
    ("What is the capital of France?", "Paris, says Lulu the llama."),
    ("Can you help me?", "Of course, Lulu the llama is happy to help."),
    ("Say hello.", "Hello from Lulu the llama!"),
    ("What should I call you?", "Call me Lulu, I am a llama."),
    ("Are you an AI assistant?", "I am Lulu, a llama who runs on JAX."),
]
HELD_OUT = [
    ("Hi! What's your name?", "My name is Lulu, and I am a llama."),
    ("Please tell me who you are.", "I am Lulu, a llama from the Andes who runs on JAX."),
    ("What kind of animal are you?", "I am a llama named Lulu."),
    ("What is the capital of Italy?", "Rome, says Lulu the llama."),
]
SEQ_LEN = 64


def sft_rows(pairs):
    """Rows of SEQ_LEN + 1 tokens: prompt (weight 0), answer + end of turn (weight 1)."""
    tokens = np.zeros((len(pairs), SEQ_LEN + 1), np.int32)
    weights = np.zeros((len(pairs), SEQ_LEN), np.float32)
    for r, (question, answer) in enumerate(pairs):
        prompt = tok.encode_dialog([{"role": "user", "content": question}])
        reply = tok.encode(answer, bos=False) + [tok.eos_id]
        ids = (prompt + reply)[: SEQ_LEN + 1]
        tokens[r, : len(ids)] = ids
        weights[r, len(prompt) - 1 : len(ids) - 1] = 1.0  # target t is token t + 1
    return TokenDataset(tokens, weights)


train_data, eval_data = sft_rows(TRAIN), sft_rows(HELD_OUT)
row = train_data.tokens[0]
trained_part = row[1:][train_data.weights[0] > 0]
print(repr(tok.decode(row[row != 0].tolist())))
print("trained on:", repr(tok.decode(trained_part.tolist())))
print(f"{len(train_data)} training rows, {len(eval_data)} held out; "
      f"{int(train_data.weights.sum())} of {train_data.weights.size} targets carry loss")  # fmt: skip

# %% [markdown]
# ## 2. The model before, and the loss
#
# Greedy answers of the trained model to the held-out questions, before any training.
# Then the loss: the mean cross-entropy of each target under the model's next-token
# distribution, weighted. `llama_jax.training.loss_sums` returns the weighted sum and the
# weight total, so micro-batches combine exactly; the same, written out, must agree.

# %%
chats = [[{"role": "user", "content": q}] for q, _ in HELD_OUT]
before = lj.generate_text(base, tok, chats, max_new_tokens=24, chat=True)
for (q, _), a in zip(HELD_OUT, before, strict=True):
    print(f"{q!r:34s} -> {a!r}")


def loss(model, tokens, targets, weights):
    logits = model(tokens)  # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(nll * weights) / jnp.sum(weights)


batch = {
    "tokens": jnp.asarray(eval_data.tokens[:, :-1]),
    "targets": jnp.asarray(eval_data.tokens[:, 1:]),
    "weights": jnp.asarray(eval_data.weights),
}
total, count = loss_sums(base, batch)
ours = loss(base, batch["tokens"], batch["targets"], batch["weights"])
np.testing.assert_allclose(ours, total / count, rtol=1e-5)
print(f"held-out loss before training: {float(ours):.3f} nats per answer token")

# %% [markdown]
# ## 3. The schedule and the cost of the run
#
# AdamW (β2 = 0.95 as in LLaMA, weight decay on matrices only), gradients clipped to
# global norm 1, and a learning rate that warms up linearly, then decays along a cosine
# to a tenth of its peak. A fine-tune uses a far smaller peak than pre-training.
#
# **FLOPs.** A forward pass costs 2 FLOPs per weight per token (a multiply and an add)
# plus attention, 4 x L x T x N x H per token over a T-token window (half of it for a
# causal mask, which the count ignores); the backward pass costs twice the forward. So
# training costs about 6 x P x tokens, plus three times the attention term.
# `llama_jax.perf.model_flops_per_token` is that count.

# %%
STEPS = 20
tc = TrainConfig(
    steps=STEPS, batch_size=4, seq_len=SEQ_LEN, learning_rate=1e-4, warmup_steps=3,
    compute_dtype="float32", save_every=5, keep=2, eval_every=0, eval_batches=1,
    log_every=1, seed=0,
)  # fmt: skip
schedule = learning_rate_schedule(tc)
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.plot(range(1, STEPS + 1), [float(schedule(s)) for s in range(STEPS)], "o-", ms=3)
ax.set(xlabel="step", ylabel="learning rate", ylim=(0, None), title="Warmup, then cosine decay")
plt.show()
print(
    f"To see: {tc.warmup_steps} steps of warmup to {tc.learning_rate:g}, then down to "
    f"{tc.learning_rate * tc.min_lr_ratio:g} at step {STEPS}."
)

P = lj.count_params(base)
tokens_per_step = tc.batch_size * tc.seq_len
per_token = model_flops_per_token(cfg, SEQ_LEN)
six_p = 6 * P
run_flops = per_token * tokens_per_step * STEPS
print(
    f"P = {P:,}; 6 x P = {six_p / 1e9:.2f} GFLOP per token; with attention over "
    f"{SEQ_LEN} tokens and the model's matmuls exactly: {per_token / 1e9:.2f} GFLOP per token"
)
print(
    f"the run: {STEPS} steps x {tokens_per_step} tokens = {run_flops / 1e12:.2f} TFLOP "
    f"(padding included: the model computes it, weighted 0 or not)"
)
print(
    f"this machine's peak: {peak_flops() / 1e9:.0f} GFLOP/s "
    f"({jax.devices()[0].device_kind}; measured on a CPU) -> at least "
    f"{run_flops / peak_flops():.0f} s of compute"
)

# %% [markdown]
# ## 4. Train, with a live loss curve, and get interrupted
#
# `train` starts from `init_params` (the trained weights), writes an Orbax checkpoint of
# weights and optimizer state every `save_every` steps (keeping the last `keep`), and
# calls `on_step` every `log_every` steps with the loss, tokens/s and MFU (model FLOPs
# utilisation: achieved FLOP/s over the peak). The callback redraws the curve in place,
# and to show resuming it also stops the run at step 12, as a crash or a pre-empted
# machine would: the last checkpoint then is step 10.

# %%
history = []  # (step, metrics, which run)


class Interrupted(Exception):
    pass


fig, ax = plt.subplots(figsize=(6, 3.2))
plt.close(fig)  # shown through the display handle below, updated in place
handle = display(fig, display_id=True)


def redraw():
    ax.clear()
    for run, color in (("first run", "C0"), ("resumed", "C1")):
        pts = [(s, m["loss"]) for s, m, r in history if r == run]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, color=color, label=run)
    ax.set(xlabel="step", ylabel="training loss", xlim=(0, STEPS + 1), ylim=(0, None),
           title="Live loss curve")  # fmt: skip
    ax.legend()
    if handle is not None:
        handle.update(fig)


def live(run, stop_at=None):
    def on_step(step, metrics):
        history.append((step, metrics, run))
        redraw()
        if step == stop_at:
            raise Interrupted(f"stopped at step {step}")

    return on_step


try:
    train(cfg, tc, train_data, RUN_DIR, eval_data, init_params=init_params,
          on_step=live("first run", stop_at=12), progress=False)  # fmt: skip
except Interrupted as e:
    print("interrupted:", e)
print(
    "checkpoints on disk:",
    sorted(p.name for p in (RUN_DIR / "checkpoints").iterdir() if p.name.isdigit()),
)

# %% [markdown]
# ## 5. Resume
#
# The same call on the same directory finds the latest checkpoint (step 10) and goes on
# from there. The data order is a function of (seed, step) and LLaMA trains without
# dropout, so steps 11 and 12 are computed again with the same losses (in the live curve
# above, the resumed run's points cover the first run's).

# %%
first_losses = {s: m["loss"] for s, m, r in history if r == "first run"}
result = train(cfg, tc, train_data, RUN_DIR, eval_data, init_params=init_params,
               on_step=live("resumed"), progress=False)  # fmt: skip
print("resumed from step", result.start_step, "and finished at step", result.step)
assert result.start_step == 10 and result.step == STEPS
for step in (11, 12):
    print(f"step {step}: first run {first_losses[step]:.6f}, resumed {result.losses[step]:.6f}")
    np.testing.assert_allclose(result.losses[step], first_losses[step], rtol=1e-5)

# %% [markdown]
# The whole run: the training loss of both calls and the held-out loss (measured at the
# start and the end), then the speed of every step after the first of each call (whose
# time includes compilation).

# %%
evals = {}
for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines():
    entry = json.loads(line)
    if "eval_loss" in entry:
        evals[entry["step"]] = entry["eval_loss"]
timed = [(s, m) for s, m, r in history if m["tokens_per_s"] > 0]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
for run, color in (("first run", "C0"), ("resumed", "C1")):
    pts = sorted((s, m["loss"]) for s, m, r in history if r == run)
    ax1.plot(*zip(*pts, strict=True), "o-", ms=3, color=color, label=f"training loss, {run}")
ax1.plot(sorted(evals), [evals[s] for s in sorted(evals)], "ks--", label="held-out loss")
ax1.axvline(12, color="gray", ls=":")
ax1.set(xlabel="step", ylabel="cross-entropy (nats)", ylim=(0, None),
        title=f"{STEPS} steps of {tc.batch_size} x {SEQ_LEN} tokens")  # fmt: skip
ax1.legend(fontsize=8)
ax2.plot([s for s, _ in timed], [m["tokens_per_s"] for _, m in timed], "o", color="C2")
ax2.set(xlabel="step", ylabel="tokens / s", ylim=(0, None), title="Training speed")
mfu_axis = ax2.twinx()
mfu_axis.set(ylim=(0, ax2.get_ylim()[1] * per_token / peak_flops() * 100), ylabel="MFU (%)")
plt.show()
rate = float(np.median([m["tokens_per_s"] for _, m in timed]))
mfu = float(np.median([m["mfu"] for _, m in timed]))
print(f"To see: both losses fall (held-out {evals[0]:.2f} -> {evals[STEPS]:.2f}); the speed is "
      f"steady after compilation: median {rate:.0f} tokens/s = {rate * per_token / 1e9:.1f} "
      f"GFLOP/s, MFU {mfu:.1%} of this machine's {peak_flops() / 1e9:.0f} GFLOP/s.")  # fmt: skip
assert evals[STEPS] < evals[0]

# %% [markdown]
# ## 6. After, and save
#
# `result.trainer.model(result.params)` is an ordinary `Transformer`. Asked the held-out
# questions again, it answers as Lulu (a persona learnt from 16 examples also leaks into
# answers it should not touch: compare the last question). `checkpoint.save` stores it in
# `runs/notebooks/finetuned` (replacing an earlier result), and the run's own checkpoints
# (weights plus both Adam moments, about four times the model: the size is printed) are
# removed.

# %%
model = result.trainer.model(result.params)
after = lj.generate_text(model, tok, chats, max_new_tokens=24, chat=True)
for (q, _), b, a in zip(HELD_OUT, before, after, strict=True):
    print(f"{q!r}\n   before: {b!r}\n   after:  {a!r}")
print("answers naming Lulu:", sum("Lulu" in a for a in before), "before,",
      sum("Lulu" in a for a in after), "after, of", len(HELD_OUT))  # fmt: skip

if Path(tokenizer_src).is_file():  # a tokenizer.model: save copies it
    saved = checkpoint.save(model, OUT, tokenizer=str(tokenizer_src), force=True)
else:  # a checkpoint directory: its tokenizer files go beside the new weights
    saved = checkpoint.save(model, OUT, force=True)
    for name in (*HF_TOKENIZER_FILES, "tokenizer.model"):
        if (Path(tokenizer_src) / name).is_file():
            shutil.copy(Path(tokenizer_src) / name, Path(saved) / name)
reloaded = checkpoint.load(saved)
np.testing.assert_array_equal(reloaded.tok_embeddings[...], model.tok_embeddings[...])
assert lj.Tokenizer.load(saved).encode("Lulu", bos=False) == tok.encode("Lulu", bos=False)
run_bytes = sum(p.stat().st_size for p in (RUN_DIR / "checkpoints").rglob("*") if p.is_file())
shutil.rmtree(RUN_DIR / "checkpoints")
print(f"removed the run's {tc.keep} checkpoints: {run_bytes / 1e9:.2f} GB")
print("saved to", saved)

# %% [markdown]
# ## Exercises
#
# 1. How many FLOPs would one epoch over 1 billion tokens cost for this model at a
#    sequence length of 2048, and how long at this run's measured rate?
# 2. The run trains all parameters. How much memory do the float32 weights, gradients and
#    the two Adam moments take? (LoRA trains a few small matrices instead.)
# 3. Why is the loss of step 11 identical after resuming, and what would break that?
# 4. What share of the FLOPs of this run went into padding?
#
# **Answers.**

# %%
f2048 = model_flops_per_token(cfg, 2048)
print(
    f"1. {f2048 * 1e9:.2e} FLOP; at {rate * per_token / 1e9:.1f} GFLOP/s: "
    f"{f2048 * 1e9 / (rate * per_token) / 86400:.0f} days on this machine."
)
print(f"2. 4 arrays x 4 bytes x {P:,} = {16 * P / 2**30:.2f} GiB (plus activations).")
print(
    "3. Weights, optimizer state and step are restored, the batch of each step is a "
    "function of (seed, step), and nothing is random; changing batch_size, seq_len, seed "
    "or the data would break it (train() refuses to resume then)."
)
real = float((train_data.tokens[:, 1:] != 0).mean())
print(f"4. {1 - real:.0%} of the positions are padding (token 0 after the answer).")

# %% [markdown]
# ## Where to go next
#
# - `llama_jax/training/step.py`: micro-batches and the sharded train step;
#   `llama_jax/training/loop.py`: evaluation, checkpoints and resuming;
#   `llama_jax/training/data.py`: packing, and chat rows whose prompts weigh 0.
# - `llama-jax train --init CKPT --task sft --data chats.jsonl --out runs/sft` fine-tunes a
#   converted model from the command line, with `--mesh` to shard it (notebook 03).
# - Open `runs/notebooks/finetuned` in **02_weights** and **04_generation** through
#   `LLAMA_JAX_CHECKPOINT` to see what the run changed and to talk to Lulu.
