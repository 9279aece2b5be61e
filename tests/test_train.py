"""Training: loss, optimizer, accumulation, SFT masking, sharding, resume, bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import cli, training
from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError
from llama_jax.sharding import make_mesh
from llama_jax.training import data
from tests.test_data import TOK

ROOT = Path(__file__).resolve().parents[1]
# Byte-level vocabulary (259 ids) padded to a multiple of 8 so the tensor axis splits it.
CFG = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=264,
    ffn_dim=128,
    max_seq_len=128,
    name="test-train",
)


def stdlib_docs(package: str = "json") -> list[str]:
    """A real corpus every machine has: the source of a standard-library package."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    return data.read_documents(sorted(root.glob("*.py")))


def converted_checkpoint(tmp_path):
    """A tiny HF model with a SentencePiece tokenizer, converted to TMP/ckpt: (cfg, hf model).

    The checkpoint a user fine-tunes: `llama-jax convert` of a transformers directory
    holding tokenizer.model (TMP/tok.model, trained on the stdlib; TMP/hf the source).
    """
    import shutil

    from llama_jax import checkpoint
    from llama_jax.tokenizer import train_sentencepiece
    from tests.hf_oracle import make_hf_model

    train_sentencepiece(iter(stdlib_docs()[:4]), tmp_path / "tok.model", vocab_size=400)
    cfg = LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, ffn_dim=96, max_seq_len=128
    )
    hf = make_hf_model(cfg, seed=3, std=0.02)
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(tmp_path / "tok.model", tmp_path / "hf" / "tokenizer.model")
    checkpoint.convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    return cfg, hf


def random_batch(M, b, T, seed=0, weights=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, (M, b, T + 1)).astype(np.int32)
    w = np.ones((M, b, T), np.float32) if weights is None else weights
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:], "weights": w}


def test_schedule_warms_up_then_decays_to_the_floor():
    tc = training.TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = training.learning_rate_schedule(tc)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # cosine midpoint
    assert float(lr(100)) == pytest.approx(1e-4)


def test_weight_decay_skips_norm_gains_only():
    trainer = training.Trainer(CFG, training.TrainConfig(seq_len=16))
    mask = training.decay_mask(trainer.abstract_params)
    flat = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert not flat["norm/weight"] and not flat["layers/0/attention_norm/weight"]
    assert not flat["layers/1/ffn_norm/weight"]
    assert flat["tok_embeddings"] and flat["output"] and flat["layers/0/attention/wq"]
    assert flat["layers/1/feed_forward/w2"]
    # And AdamW honours it: with zero gradients only decayed weights move.
    tc = training.TrainConfig(seq_len=16, learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    tx = training.make_optimizer(tc)
    params = trainer.init_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["norm"]["weight"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"][0]["attention"]["wq"]).max()) > 0.0


def test_gradient_accumulation_matches_one_large_batch():
    cfg = CFG.replace(dtype="float32")
    trainer = training.Trainer(cfg, training.TrainConfig(seq_len=16, compute_dtype="float32"))
    params = trainer.init_params()
    # Uneven loss weights (as in SFT) so micro-batches hold different numbers of targets.
    w = (np.random.default_rng(1).random((4, 2, 16)) < 0.6).astype(np.float32)
    small = random_batch(4, 2, 16, weights=w)
    big = {k: v.reshape(1, 8, 16) for k, v in small.items()}
    step = jax.jit(training.step.loss_and_grads, static_argnums=0)
    loss_k, grads_k = step(trainer.graphdef, params, small)
    loss_1, grads_1 = step(trainer.graphdef, params, big)
    np.testing.assert_allclose(loss_k, loss_1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_sft_prompt_tokens_give_no_gradient(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text(
        "\n".join(
            json.dumps({"prompt": f"q{i}? " * (i + 1), "response": f"a{i}"}) for i in range(4)
        )
    )
    ds = data.tokenize_sft(data.read_sft_examples(f), TOK, seq_len=48)
    cfg = CFG.replace(dtype="float32")
    trainer = training.Trainer(cfg, training.TrainConfig(seq_len=48, compute_dtype="float32"))
    params = trainer.init_params()
    batch = ds.batch(0, 4, seed=0)
    grad = jax.jit(training.step.loss_and_grads, static_argnums=0)
    loss, g = grad(trainer.graphdef, params, batch)
    # Replace every target the prompt (or padding) predicts: nothing changes, bit for bit.
    prompt = batch["weights"] == 0
    assert prompt.sum() > batch["weights"].sum()  # most targets are prompt here
    altered = dict(batch, targets=np.where(prompt, (batch["targets"] + 7) % 259, batch["targets"]))
    loss2, g2 = grad(trainer.graphdef, params, altered)
    assert float(loss) == float(loss2)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)
    # Whereas changing one response target does change the gradient.
    r, t = np.argwhere(~prompt[0])[0]
    targets = batch["targets"].copy()
    targets[0, r, t] = (targets[0, r, t] + 1) % 259
    _, g3 = grad(trainer.graphdef, params, dict(batch, targets=targets))
    pairs = zip(jax.tree.leaves(g), jax.tree.leaves(g3), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)


def two_steps(mesh, attention="xla"):
    """Weights and losses after two updates of a float32 model, on `mesh` or one device."""
    # eps above most |g| keeps Adam's update smooth in g: with a tiny eps the first update
    # is lr * sign(g), and a near-zero g's sign depends on the order of a sharded sum.
    tc = training.TrainConfig(
        seq_len=16,
        batch_size=16,
        micro_batches=2,
        compute_dtype="float32",
        warmup_steps=0,
        learning_rate=1e-2,
        eps=1e-4,
        attention=attention,
    )
    t = training.Trainer(CFG.replace(dtype="float32"), tc, mesh)
    p = t.init_params()
    o = t.init_opt_state(p)
    losses = []
    for seed in range(2):
        p, o, m = t.step(p, o, t.put_batch(random_batch(2, 8, 16, seed=seed)))
        losses += [float(m["loss"]), float(m["grad_norm"])]
    return p, losses


@pytest.fixture(scope="module")
def single_device_steps():
    return jax.device_get(two_steps(None))


@pytest.mark.parametrize("mesh_spec", ["fsdp", "tp", "data=2,fsdp=2,tensor=2", "jax.make_mesh"])
def test_sharded_train_step_matches_single_device(mesh_spec, single_device_steps):
    if mesh_spec == "jax.make_mesh":  # a plain mesh with JAX's default (Explicit) axes
        mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    else:
        mesh = make_mesh(mesh_spec)
    p, losses = two_steps(mesh)
    results = {"mesh": (jax.device_get(p), losses), "single": single_device_steps}
    if mesh_spec == "fsdp":  # the weights really are split
        assert len(p["layers"][0]["feed_forward"]["w1"].sharding.device_set) == 8
    np.testing.assert_allclose(results["mesh"][1], results["single"][1], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(results["mesh"][0]), jax.tree.leaves(results["single"][0]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_training_with_the_tpu_kernels_matches_the_reference(single_device_steps):
    # attention="splash" (interpreted on the CPU), per shard under fsdp x tensor.
    p, losses = two_steps(make_mesh("data=2,fsdp=2,tensor=2"), attention="splash")
    np.testing.assert_allclose(losses, single_device_steps[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(single_device_steps[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    with pytest.raises(LlamaError, match="attention 'flash' is not one of"):
        training.TrainConfig(attention="flash")


def test_loss_falls_on_a_real_corpus_in_mixed_precision(tmp_path):
    train_docs, eval_docs = data.split_documents(stdlib_docs(), 0.25)
    tc = training.TrainConfig(
        steps=40,
        batch_size=8,
        seq_len=64,
        learning_rate=3e-3,
        warmup_steps=5,
        eval_every=0,
        save_every=0,
        log_every=10,
        eval_batches=2,
    )
    result = training.train(
        CFG,
        tc,
        data.pack_documents(train_docs, TOK, 64),
        tmp_path,
        data.pack_documents(eval_docs, TOK, 64),
        progress=False,
        log=lambda _: None,
    )
    before, after = result.eval_losses[0], result.eval_losses[40]
    assert before > 5.0  # about ln(264): the untrained model guesses uniformly
    assert after < before - 1.5, (before, after)
    assert result.losses[40] < result.losses[10]
    assert jax.tree.leaves(result.params)[0].dtype == jnp.float32  # float32 master weights
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x]
    assert [x["step"] for x in logged] == [10, 20, 30, 40]
    assert all(x["tokens_per_s"] > 0 and 0 < x["mfu"] < 1 and x["lr"] > 0 for x in logged)
    assert (tmp_path / "checkpoints" / "40").is_dir()


# Resuming ------------------------------------------------------------------------------

WORKER_PRELUDE = r"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from llama_jax import training
from llama_jax.training import data
from tests.test_train import CFG, stdlib_docs
from tests.test_data import TOK

out, mode = Path(sys.argv[1]), sys.argv[2]
docs = stdlib_docs()
ds = data.pack_documents(docs[1:], TOK, 32)


def hook_for(kill_at, saved, term_at=None):
    # mode "kill": pre-emption between checkpoints: once step `saved`'s save has landed,
    # die at once (SIGKILL) at step `kill_at`; mode "term": SIGTERM at step `term_at`.
    def hook(step, metrics):
        if mode == "kill" and step == kill_at:
            deadline = time.time() + 120
            while not (out / "checkpoints" / str(saved)).is_dir() and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "term" and step == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook
"""

WORKER = r"""
tc = training.TrainConfig(steps=10, batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=2,
                       save_every=4, keep=2, log_every=1, eval_every=5, eval_batches=1)
held = data.pack_documents(docs[:1], TOK, 32)
hook = hook_for(kill_at=6, saved=4, term_at=7)
r = training.train(CFG, tc, ds, out, held, on_step=hook, progress=False)
print("RESULT", r.start_step, r.step, r.preempted)
"""


def run_worker(tmp_path, out, mode, body=WORKER):
    """Run WORKER_PRELUDE + `body` in a fresh Python process: `python worker.py OUT MODE`."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_PRELUDE.format(root=str(ROOT)) + body)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(script), str(out), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def final_metrics(path):
    """{(step, kind): value}, the last value logged for each step (re-done steps overwrite)."""
    out = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        for kind in ("loss", "grad_norm", "eval_loss"):
            if kind in entry:
                out[entry["step"], kind] = entry[kind]
    return out


def test_killed_and_preempted_runs_resume_to_bitwise_identical_losses(tmp_path):
    ref = run_worker(tmp_path, tmp_path / "ref", "none")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "RESULT 0 10 False" in ref.stdout

    killed = run_worker(tmp_path, tmp_path / "run", "kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "RESULT" not in killed.stdout
    # Resume; this time a SIGTERM at step 7 saves and stops cleanly.
    term = run_worker(tmp_path, tmp_path / "run", "term")
    assert term.returncode == 0, term.stderr[-3000:]
    assert "resumed from step 4" in term.stdout and "RESULT 4 7 True" in term.stdout
    assert (tmp_path / "run" / "checkpoints" / "7").is_dir()
    last = run_worker(tmp_path, tmp_path / "run", "none")
    assert last.returncode == 0, last.stderr[-3000:]
    assert "resumed from step 7" in last.stdout and "RESULT 7 10 False" in last.stdout

    want = final_metrics(tmp_path / "ref" / "metrics.jsonl")
    got = final_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(want) == 10 * 2 + 3  # loss and grad norm per step; eval at 0, 5, 10
    assert got == want  # exact float equality: bitwise the same run
    # The killed run had logged steps 5 and 6 before dying; they were redone identically.
    raw = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert raw.count('"step": 6, "loss"') == 2


# Bad input ------------------------------------------------------------------------------


def small_run(tmp_path, cfg=CFG, mesh=None, **kw):
    tc = training.TrainConfig(
        **{
            **dict(steps=2, batch_size=2, seq_len=16, save_every=1, log_every=1, eval_batches=1),
            **kw,
        }
    )
    ds = data.pack_documents(stdlib_docs()[:3], TOK, tc.seq_len)
    return training.train(cfg, tc, ds, tmp_path, progress=False, log=lambda _: None, mesh=mesh)


def test_a_run_saved_on_one_mesh_resumes_on_another(tmp_path):
    small_run(tmp_path, mesh=make_mesh("fsdp"), batch_size=8)
    result = small_run(tmp_path, mesh=make_mesh("tp"), batch_size=8, steps=3)
    assert (result.start_step, result.step) == (2, 3)
    w1 = result.params["layers"][0]["feed_forward"]["w1"]
    assert (
        w1.sharding.spec == result.trainer.param_shardings["layers"][0]["feed_forward"]["w1"].spec
    )
    assert "tensor" in str(w1.sharding.spec) and "fsdp" not in str(w1.sharding.spec)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def test_resuming_with_another_config_or_data_is_refused_and_changes_nothing(tmp_path):
    small_run(tmp_path)
    before = tree_digest(tmp_path / "checkpoints")
    with pytest.raises(LlamaError, match=r"different model config .*'dim': \(64, 128\)"):
        small_run(tmp_path, cfg=CFG.replace(dim=128), steps=4)
    with pytest.raises(LlamaError, match="batch_size=2, this run asks for 4"):
        small_run(tmp_path, steps=4, batch_size=4)
    with pytest.raises(LlamaError, match="longer than the model's context"):
        small_run(tmp_path, steps=4, seq_len=256)
    assert tree_digest(tmp_path / "checkpoints") == before


def test_mesh_that_cannot_split_the_batch_is_refused():
    tc = training.TrainConfig(seq_len=16, batch_size=4)
    with pytest.raises(LlamaError, match="4 rows do not divide over .* = 8 devices"):
        training.Trainer(CFG, tc, make_mesh("fsdp"))


def test_cli_reports_bad_data_paths_and_empty_corpora(tmp_path, capsys):
    from llama_jax.tokenizer import train_sentencepiece

    tok = tmp_path / "tok.model"
    train_sentencepiece(iter(stdlib_docs()[:4]), tok, vocab_size=400)
    base = ["train", "--out", str(tmp_path / "run"), "--tokenizer", str(tok), "--no-progress"]
    assert cli.main([*base, "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt' does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert cli.main([*base, "--data", str(tmp_path / "empty.txt")]) == 2
    assert "holds no text" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("print('hi')\n")
    assert cli.main([*base, "--data", str(tmp_path / "short.txt"), "--eval-fraction", "0"]) == 2
    assert "fewer than one training row" in capsys.readouterr().err
    big = ["--data", str(tmp_path / "short.txt"), "--seq-len", "4096"]
    assert cli.main([*base, *big]) == 2
    assert "longer than the model's context max_seq_len=256" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fine_tuning_starts_from_a_converted_checkpoint(tmp_path):
    """HF weights -> `llama-jax convert` -> `llama-jax train --init --task sft` -> model/."""
    from llama_jax import checkpoint
    from tests.hf_oracle import hf_params

    cfg, hf = converted_checkpoint(tmp_path)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(12)
    ]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    # A learning rate of 1e-9 moves no weight by more than ~2e-9: the saved model must be
    # the converted one, which proves where fine-tuning started.
    argv = [
        "train",
        "--init",
        str(tmp_path / "ckpt"),
        "--task",
        "sft",
        "--data",
        str(tmp_path / "sft.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "1e-9",
        "--warmup",
        "0",
        "--eval-batches",
        "1",
        "--no-progress",
        "--dtype",
        "float32",
    ]
    assert cli.main(argv) == 0
    tuned = checkpoint.load(tmp_path / "run" / "model")
    assert tuned.cfg.replace(name="x", dtype="float32") == cfg.replace(name="x")
    want = hf_params(hf, cfg)
    got = jax.device_get(nnx_params(tuned))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=0)
    saved_tok = (tmp_path / "run" / "model" / "tokenizer.model").read_bytes()
    assert saved_tok == (tmp_path / "tok.model").read_bytes()


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("damage", ["zeroed", "emptied", "truncated"])
def test_resume_falls_back_to_the_newest_intact_step(tmp_path, damage):
    # A damaged newest step (killed mid-write, a full disk, deleted files) is set aside,
    # untouched, and the run resumes from the step before it, saying so.
    small_run(tmp_path, steps=3, keep=3)
    newest = tmp_path / "checkpoints" / "3"
    files = [p for p in newest.rglob("*") if p.is_file()]
    assert files
    for f in files:
        if damage == "zeroed":
            f.write_bytes(bytes(f.stat().st_size))
        elif damage == "emptied":
            f.unlink()
        else:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = tree_digest(newest)
    said = []
    tc = training.TrainConfig(
        steps=4, batch_size=2, seq_len=16, save_every=1, log_every=1, eval_batches=1, keep=3
    )
    ds = data.pack_documents(stdlib_docs()[:3], TOK, tc.seq_len)
    result = training.train(CFG, tc, ds, tmp_path, progress=False, log=said.append)
    assert (result.start_step, result.step) == (2, 4)
    warning = next(m for m in said if m.startswith("warning: checkpoint step 3"))
    assert "moved it to" in warning and "previous step" in warning
    assert tree_digest(tmp_path / "damaged" / "3") == before  # kept as it was
    assert (
        sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1]
        == 4
    )
