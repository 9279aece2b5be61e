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
# # Fine-tuning: a short run, a live loss curve, checkpoints and resuming
#
# **What you will learn.** How llama-jax trains: the next-token loss (written here and
# checked against `llama_jax.train`), the AdamW schedule, a run whose loss curve draws
# itself while it trains, checkpoints written every few steps, and what happens when a run
# is interrupted: started again on the same directory, it resumes from the last
# checkpoint and repeats exactly the same losses. At the end the trained model writes
# text and is saved as a checkpoint the other notebooks can open.
#
# **How to run it.**
# - *CPU laptop*: open this file in Jupyter with jupytext (see notebook 01) or run
#   `jupytext --to ipynb notebooks/05_finetuning.py`. It trains a tiny model on the
#   package's own source code for 120 steps; one to two minutes.
# - *GPU*: the same after `pip install -U "jax[cuda13]"`; raise `STEPS` and the model size.
# - *Colab TPU*: Runtime > Change runtime type > TPU, `!pip install -e <your clone>`.
#
# **Real weights.** Set `LLAMA_JAX_CHECKPOINT` (or `CHECKPOINT` below) to a llama-jax
# checkpoint with its `tokenizer.model` to fine-tune it instead of a random tiny model
# (a 1B model needs an accelerator with about 20 GB for float32 weights, gradients and
# Adam state); `llama-jax quickstart` leaves a small trained one in `runs/quickstart/model`.

# %%
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import display

import llama_jax as lj
from llama_jax import checkpoint
from llama_jax.inference.generate import generate_text
from llama_jax.tokenizer import Tokenizer, train_sentencepiece
from llama_jax.training import TrainConfig, learning_rate_schedule, loss_sums, train
from llama_jax.training.data import pack_documents, split_documents

# ▶ Point this at a llama-jax checkpoint to fine-tune it; None trains a tiny random model.
CHECKPOINT = os.environ.get("LLAMA_JAX_CHECKPOINT") or None
STEPS = 120
workdir = Path(tempfile.mkdtemp(prefix="llama-jax-finetune-"))

# %% [markdown]
# ## 1. Data
#
# The corpus is this package's own Python source: documents are files, a few are held
# out for evaluation, and the rest are tokenised and packed end to end (BOS ... EOS BOS
# ...) into rows of `seq_len + 1` tokens: inputs are a row's first `seq_len` tokens,
# targets the same row shifted by one.

# %%
docs = [p.read_text() for p in sorted(Path(lj.__file__).parent.rglob("*.py"))]
train_docs, eval_docs = split_documents(docs, eval_fraction=0.15, seed=0)
if CHECKPOINT:
    tok = Tokenizer.load(CHECKPOINT)
    tokenizer_file = Path(CHECKPOINT) / "tokenizer.model"
else:
    tokenizer_file = workdir / "tokenizer.model"
    (workdir / "corpus.txt").write_text("\n".join(train_docs))
    tok = train_sentencepiece(workdir / "corpus.txt", tokenizer_file, vocab_size=512)

SEQ_LEN = 64
train_data = pack_documents(train_docs, tok, SEQ_LEN)
eval_data = pack_documents(eval_docs, tok, SEQ_LEN)
print(
    f"{len(train_docs)} training files -> {len(train_data)} rows; {len(eval_docs)} held out -> {len(eval_data)} rows of {SEQ_LEN + 1} tokens"
)
print(repr(tok.decode(train_data.tokens[0][:40].tolist())))

# %% [markdown]
# ## 2. The model and the loss
#
# The loss is the mean cross-entropy of each target under the model's next-token
# distribution, each target weighted (fine-tuning on chats gives the prompt weight 0).
# `llama_jax.training.loss_sums` returns the weighted sum and the weight total, so that
# micro-batches combine exactly; the same, written out:

# %%
if CHECKPOINT:
    base = checkpoint.load(CHECKPOINT, dtype="float32")
    cfg = base.cfg
    init_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
else:
    cfg = lj.PRESETS["tiny"].replace(
        vocab_size=tok.vocab_size, max_seq_len=SEQ_LEN * 2, name="tiny-source-code"
    )
    base, init_params = lj.build_model(cfg, seed=0), None


def loss(model, tokens, targets, weights):
    logits = model(tokens)  # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(nll * weights) / jnp.sum(weights)


rows = train_data.tokens[:4]
batch = {
    "tokens": jnp.asarray(rows[:, :-1]),
    "targets": jnp.asarray(rows[:, 1:]),
    "weights": jnp.asarray(train_data.weights[:4]),
}
total, count = loss_sums(base, batch)
ours = loss(base, batch["tokens"], batch["targets"], batch["weights"])
np.testing.assert_allclose(ours, total / count, rtol=1e-5)
print(
    f"loss of the untrained model: {float(ours):.3f} (uniform guessing over {cfg.vocab_size} ids: ln V = {np.log(cfg.vocab_size):.3f})"
)

# %% [markdown]
# ## 3. The optimizer schedule
#
# AdamW (β2 = 0.95 as in LLaMA, weight decay on matrices but not on norm gains), gradients
# clipped to global norm 1, and a learning rate that warms up linearly and then decays
# along a cosine to a tenth of its peak.

# %%
tc = TrainConfig(
    steps=STEPS, batch_size=8, seq_len=SEQ_LEN, learning_rate=3e-3, warmup_steps=10,
    compute_dtype="float32", save_every=20, keep=2, eval_every=40, eval_batches=2,
    log_every=5, seed=0,
)  # fmt: skip
schedule = learning_rate_schedule(tc)
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.plot([float(schedule(s)) for s in range(STEPS)])
ax.set(xlabel="step", ylabel="learning rate", title="Warmup, then cosine decay")
plt.show()

# %% [markdown]
# ## 4. Train, with a live loss curve, and get interrupted
#
# `train` writes an Orbax checkpoint every `save_every` steps (keeping the last `keep`)
# and calls `on_step` every `log_every` steps; the callback below redraws the curve in
# place. To show resuming, it also stops the run at step 70, as a crash or a pre-empted
# machine would: the last checkpoint then is step 60.

# %%
out = workdir / "run"
history = []  # (step, loss, which run)


class Interrupted(Exception):
    pass


fig, ax = plt.subplots(figsize=(6, 3.2))
plt.close(fig)  # shown through the display handle below, updated in place
handle = display(fig, display_id=True)


def redraw():
    ax.clear()
    for run, color in (("first run", "C0"), ("resumed", "C1")):
        pts = [(s, v) for s, v, r in history if r == run]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, color=color, label=run)
    ax.set(xlabel="step", ylabel="training loss", xlim=(0, STEPS), title="Live loss curve")
    ax.legend()
    if handle is not None:
        handle.update(fig)


def live(run, stop_at=None):
    def on_step(step, metrics):
        history.append((step, metrics["loss"], run))
        redraw()
        if step == stop_at:
            raise Interrupted(f"stopped at step {step}")

    return on_step


try:
    train(
        cfg,
        tc,
        train_data,
        out,
        eval_data,
        init_params=init_params,
        on_step=live("first run", stop_at=70),
        progress=False,
    )
except Interrupted as e:
    print("interrupted:", e)
print(
    "checkpoints on disk:",
    sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()),
)

# %% [markdown]
# ## 5. Resume
#
# The same call on the same directory finds the latest checkpoint (step 60) and
# continues from there. The data order is a function of (seed, step) and LLaMA trains
# without dropout, so steps 61 to 70 are computed again with the same losses (in the
# live curve above, the resumed run's points at 65 and 70 cover the first run's).

# %%
first_losses = {s: v for s, v, r in history if r == "first run"}
result = train(
    cfg,
    tc,
    train_data,
    out,
    eval_data,
    init_params=init_params,
    on_step=live("resumed"),
    progress=False,
)
print("resumed from step", result.start_step, "and finished at step", result.step)
assert result.start_step == 60 and result.step == STEPS
for step in (65, 70):
    print(f"step {step}: first run {first_losses[step]:.6f}, resumed {result.losses[step]:.6f}")
    np.testing.assert_allclose(result.losses[step], first_losses[step], rtol=1e-6)

# %% [markdown]
# The whole run: training loss of both calls, and the held-out loss measured every
# `eval_every` steps. The held-out loss must have fallen well below its starting value.

# %%
evals = {}
for line in (out / "metrics.jsonl").read_text().splitlines():
    entry = json.loads(line)
    if "eval_loss" in entry:
        evals[entry["step"]] = entry["eval_loss"]
steps_first = sorted(first_losses)
steps_resumed = sorted(result.losses)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(
    steps_first,
    [first_losses[s] for s in steps_first],
    "o-",
    ms=3,
    label="training loss, first run",
)
ax.plot(
    steps_resumed,
    [result.losses[s] for s in steps_resumed],
    "o-",
    ms=3,
    label="training loss, resumed from 60",
)
ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "ks--", label="held-out loss")
ax.axvline(70, color="gray", ls=":")
ax.text(71, ax.get_ylim()[1] * 0.95, "interrupted", fontsize=8, va="top")
ax.set(
    xlabel="step",
    ylabel="cross-entropy (nats)",
    title=f"{cfg.name}: {STEPS} steps of {tc.batch_size} x {SEQ_LEN} tokens",
)
ax.legend(fontsize=8)
plt.show()
print("held-out loss:", {s: round(v, 3) for s, v in sorted(evals.items())})
assert evals[STEPS] < evals[0] - 1.0, evals

# %% [markdown]
# ## 6. Use and save the result
#
# `result.trainer.model(result.params)` is an ordinary `Transformer`. It writes text in the
# style of its corpus, and `checkpoint.save` stores it (with its tokenizer) so that
# notebooks 02 and 04 can open it through `LLAMA_JAX_CHECKPOINT`.

# %%
model = result.trainer.model(result.params)
print(generate_text(model, tok, "def ", max_new_tokens=60, temperature=0.7, top_p=0.9, seed=0))
saved = checkpoint.save(model, workdir / "finetuned", tokenizer=str(tokenizer_file))
reloaded = checkpoint.load(saved)
np.testing.assert_array_equal(reloaded.tok_embeddings[...], model.tok_embeddings[...])
print("saved to", saved)

# %% [markdown]
# ## Where to go next
#
# - `llama_jax/train.py`: micro-batches, the sharded train step, checkpoint metadata that
#   refuses to resume a different run; `llama_jax/data.py`: packing and chat fine-tuning
#   rows whose prompts weigh 0.
# - `llama-jax train --init CKPT --task sft --data chats.jsonl --out runs/sft` fine-tunes a
#   converted model from the command line, with `--mesh` to shard it (notebook 03).
# - Open the saved checkpoint in notebook **02_weights** to see what training changed.
