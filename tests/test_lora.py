"""LoRA: parameter count, identity at init, merge, peft parity, adapter-only training, resume."""

import dataclasses
import json
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import cli, training
from llama_jax.config import PRESETS
from llama_jax.errors import LlamaError
from llama_jax.model import Transformer, build_model
from llama_jax.sharding import make_mesh
from llama_jax.training import lora
from llama_jax.training.step import loss_and_grads
from tests.test_train import CFG, random_batch

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# One block keeps compilation short; 8 heads, F and V divisible by 8 for every mesh.
LCFG = CFG.replace(n_layers=1, dim=32, ffn_dim=64, dtype="float32", name="test-lora")


def randomize_adapters(model, seed=1, std=0.05):
    """Give A and B random values, so that the update is not zero."""
    state = nnx.state(model, lora.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, new))
    return model


@pytest.mark.parametrize(
    "preset,targets,rank",
    [("llama3-8b", ("wq", "wv"), 8), ("llama2-70b", ALL, 16), ("llama3.2-1b", ("wo", "w2"), 4)],
)
def test_trainable_parameter_count_equals_the_formula(preset, targets, rank):
    cfg = PRESETS[preset]
    D, F, L = cfg.dim, cfg.ffn_hidden_dim, cfg.n_layers
    NH, KH = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    per = {
        "wq": D + NH,
        "wk": D + KH,
        "wv": D + KH,
        "wo": NH + D,
        "w1": D + F,
        "w3": D + F,
        "w2": F + D,
    }
    want = L * rank * sum(per[t] for t in targets)
    assert lora.count_lora_params(cfg, targets, rank) == want
    # What the Trainer differentiates and the optimizer tracks, without allocating.
    tc = training.TrainConfig(lora_rank=rank, lora_targets=targets)
    trainer = training.Trainer(cfg, tc)
    counted = sum(x.size for x in jax.tree.leaves(trainer.abstract_params))
    assert counted == want
    opt_arrays = [x for x in jax.tree.leaves(trainer.abstract_opt_state) if x.size > 1]
    assert sum(x.size for x in opt_arrays) == 2 * want  # Adam's two moments, adapters only
    frozen = sum(x.size for x in jax.tree.leaves(trainer.abstract_frozen))
    assert frozen == cfg.num_params()
    if preset == "llama3-8b":
        assert want == 3_407_872  # the figure peft prints for Llama-3-8B, r=8, q_proj+v_proj


def test_adapted_model_equals_base_at_init_and_merge_equals_adapted():
    cfg = PRESETS["tiny"].replace(name="t")
    model = build_model(cfg, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    base = model(tokens)
    lora.apply_lora(model, ALL, rank=4, alpha=8, dropout=0.1)
    np.testing.assert_array_equal(model(tokens), base)  # B = 0: exactly the base
    randomize_adapters(model)
    adapted = model(tokens)
    assert float(jnp.max(jnp.abs(adapted - base))) > 0.1  # the adapters do change it
    lora.set_dropout_key(model, jax.random.key(0))  # training: adapter inputs dropped
    dropped = model(tokens)
    assert float(jnp.max(jnp.abs(dropped - adapted))) > 1e-3
    lora.set_dropout_key(model, None)  # inference: deterministic
    np.testing.assert_array_equal(model(tokens), adapted)
    merged = lora.merge(model)
    assert not list(lora.lora_modules(merged)) and isinstance(merged, Transformer)
    np.testing.assert_allclose(merged(tokens), adapted, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model(tokens), adapted)  # merge left the input as it was
    # base + delta, by hand, for one weight
    mod = model.layers[1].attention.wo
    a, b = np.asarray(mod.lora_a[...]), np.asarray(mod.lora_b[...])
    want = np.asarray(mod.base[...]) + 2.0 * np.einsum("nhr,rd->nhd", a, b)
    np.testing.assert_allclose(merged.layers[1].attention.wo[...], want, rtol=1e-6, atol=1e-7)


def test_bad_settings_are_refused():
    model = build_model(LCFG)
    with pytest.raises(LlamaError, match="each must be one of"):
        lora.apply_lora(model, ("wq", "output"))
    with pytest.raises(LlamaError, match="rank must be a positive integer"):
        training.TrainConfig(lora_rank=-2)
    with pytest.raises(LlamaError, match="dropout must be in"):
        training.TrainConfig(lora_rank=2, lora_dropout=1.0)
    lora.apply_lora(model, "wq,wv")
    with pytest.raises(LlamaError, match="already has LoRA adapters"):
        lora.apply_lora(model)


def test_peft_loads_our_adapter_and_gives_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    import torch

    from tests.hf_oracle import hf_logits, hf_params, make_hf_model

    cfg = CFG.replace(vocab_size=128, ffn_dim=96, max_seq_len=64, name="peft-test")
    hf = make_hf_model(cfg, seed=5)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    from llama_jax.model import set_params

    set_params(model, hf_params(hf, cfg))
    lora.apply_lora(model, ALL, rank=4, alpha=12)
    randomize_adapters(model, std=0.2)
    out = lora.export_peft(model, tmp_path / "adapter", base_model="base")
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12.0
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10))
    base_logits = hf_logits(hf, tokens)
    tuned = peft.PeftModel.from_pretrained(hf, out).eval()
    names = {n for n, _ in tuned.named_parameters() if "lora_" in n}
    assert len(names) == 2 * 7 * cfg.n_layers  # every adapter was matched by name
    want = hf_logits(tuned, tokens)
    got = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(want - base_logits).max() > 0.1  # the adapter matters
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel
    # The adapter merged into the weights (peft's merge_and_unload) gives our merged model.
    merged_hf = tuned.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged_hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(lora.merge(model)(jnp.asarray(tokens)))
    assert np.linalg.norm(ours - merged_logits) / np.linalg.norm(merged_logits) < 1e-5


# Training ------------------------------------------------------------------------------


def lora_steps(mesh, tc, steps=2, base_dtype="float32"):
    t = training.Trainer(LCFG.replace(param_dtype=base_dtype), tc, mesh)
    p = t.init_params()
    o = t.init_opt_state(p)
    frozen_before = jax.device_get(t.frozen)
    start = jax.device_get(p)
    losses = []
    for s in range(steps):
        p, o, m = t.step(p, o, t.put_batch(random_batch(2, 8, 16, seed=s)), s + 1)
        losses.append(float(m["loss"]))
    return t, start, jax.device_get(p), frozen_before, losses


TC = training.TrainConfig(
    seq_len=16,
    batch_size=16,
    micro_batches=2,
    compute_dtype="float32",
    warmup_steps=0,
    learning_rate=1e-2,
    eps=1e-4,
    lora_rank=4,
    lora_targets=("wq", "wk", "wo", "w1", "w2"),
)


@pytest.fixture(scope="module")
def single_device_lora():
    return lora_steps(None, TC)


@pytest.mark.parametrize("mesh_spec", [None, "fsdp", "data=2,fsdp=2,tensor=2"])
def test_train_step_changes_only_the_adapters(mesh_spec, single_device_lora):
    if mesh_spec is None:
        t, start, end, frozen_before, losses = single_device_lora
    else:
        t, start, end, frozen_before, losses = lora_steps(make_mesh(mesh_spec), TC)
        np.testing.assert_allclose(losses, single_device_lora[4], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(single_device_lora[2]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    # The trained tree is the adapters and nothing else; every one of them moved.
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(end)]
    assert paths and all(p.endswith(("['lora_a']", "['lora_b']")) for p in paths)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(end), strict=True):
        assert np.abs(a - b).max() > 0
    # The base is bitwise what it was.
    for a, b in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(t.frozen)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    if mesh_spec == "fsdp":  # adapters and base are split by the rules table
        wq = t.frozen["layers"][0]["attention"]["wq"]["base"]
        assert len(wq.sharding.device_set) == 8 and wq.sharding.spec[0] == "fsdp"


def test_accumulation_remat_and_sft_masking_with_lora(single_device_lora):
    # One batch of 16 rows with remat == two micro-batches of 8 without (the fixture).
    one = dataclasses.replace(TC, micro_batches=1, remat="full")
    t, _, p1, _, l1 = lora_steps(None, one)
    np.testing.assert_allclose(l1, single_device_lora[4], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(single_device_lora[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Targets of weight 0 (an SFT prompt, padding) give the adapters no gradient.
    params = jax.tree.map(lambda a: a + 0.01, p1)  # B != 0: A gets gradients
    batch = random_batch(1, 4, 16)
    batch["weights"][:, :, :-3] = 0.0
    other = dict(batch, targets=(batch["targets"] + 11) % CFG.vocab_size)
    other["targets"][:, :, -3:] = batch["targets"][:, :, -3:]
    grads = jax.jit(lambda p, b: loss_and_grads(t.graphdef, p, b, t.frozen)[1])
    g1, g2 = grads(params, batch), grads(params, other)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(a, c)
    assert min(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 0


def test_bfloat16_base():
    t, start, end, frozen_before, losses = lora_steps(None, TC, base_dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(t.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(end)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(losses).all()
    # At init the adapted bf16 model is the bf16 base, exactly.
    cfg = LCFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    model = build_model(cfg)
    tokens = jnp.arange(10)[None] % cfg.vocab_size
    base = model(tokens)
    lora.apply_lora(model, ALL, rank=2)
    np.testing.assert_array_equal(model(tokens), base)
    merged = lora.merge(randomize_adapters(model))
    assert merged.layers[0].feed_forward.w1[...].dtype == jnp.bfloat16


def test_int8_base():
    int8 = pytest.importorskip("llama_jax.inference.int8")
    from llama_jax import sharding

    model = int8.quantize(build_model(LCFG, seed=2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, LCFG.vocab_size, (2, 9)))
    # Op by op, so that both calls run the same products (compiled, each is one program
    # of its own, and XLA may round the int8 products differently in the two).
    quantized = Transformer.__call__(model, tokens)
    lora.apply_lora(model, ALL, rank=2)
    assert isinstance(model.layers[0].attention.wq.base, int8.Int8Weight)
    np.testing.assert_array_equal(Transformer.__call__(model, tokens), quantized)
    # Gradients reach the adapters through the int8 product; the int8 base is not an input.
    graphdef, adapters, rest = nnx.split(model, lora.LoRAParam, ...)
    grads = jax.grad(lambda a: jnp.mean(nnx.merge(graphdef, a, rest)(tokens) ** 2))(adapters)
    b_grads = [g for k, g in jax.tree_util.tree_leaves_with_path(grads) if "lora_b" in str(k)]
    assert len(b_grads) == 7 and all(float(jnp.abs(g).max()) > 0 for g in b_grads)
    randomize_adapters(model)
    merged = lora.merge(model)  # the int8 weight dequantized, plus the update
    assert merged.layers[0].attention.wq[...].dtype == jnp.float32
    np.testing.assert_allclose(merged(tokens), model(tokens), rtol=1e-4, atol=1e-4)
    # The rules table places int8 values, scales and adapters on a mesh.
    shard = sharding.param_shardings(nnx.state(model), make_mesh("fsdp"))
    wq = shard["layers"][0]["attention"]["wq"]
    assert wq["base"]["values"].spec[0] == "fsdp" and wq["lora_a"].spec[0] == "fsdp"


# Resume after kill -9 -------------------------------------------------------------------

WORKER = r"""
from llama_jax.model import build_model
from flax import nnx

tc = training.TrainConfig(steps=8, batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=2,
                          save_every=3, keep=2, log_every=1, eval_every=0, eval_batches=1,
                          lora_rank=4, lora_targets=("wq", "wv", "w2"), lora_dropout=0.1)
base = nnx.to_pure_dict(nnx.state(build_model(CFG, seed=7), nnx.Param))
hook = hook_for(kill_at=5, saved=3)
r = training.train(CFG, tc, ds, out, init_params=base, on_step=hook, progress=False)
print("RESULT", r.start_step, r.step)
"""


def test_killed_lora_run_resumes_with_identical_losses(tmp_path):
    from tests.test_train import final_metrics, run_worker

    ref = run_worker(tmp_path, tmp_path / "ref", "none", WORKER)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_worker(tmp_path, tmp_path / "run", "kill", WORKER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_worker(tmp_path, tmp_path / "run", "none", WORKER)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout and "RESULT 3 8" in resumed.stdout
    want = final_metrics(tmp_path / "ref" / "metrics.jsonl")
    got = final_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(want) == 8 * 2 and got == want  # bitwise the same losses and grad norms
    # The checkpoint holds the adapters only: far smaller than the model.
    ckpt = tmp_path / "run" / "checkpoints" / "8"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert size < CFG.num_params() * 4 / 2, size


# CLI -------------------------------------------------------------------------------------


def test_cli_trains_exports_for_peft_and_merges(tmp_path, capsys):
    from llama_jax import checkpoint
    from tests.test_train import converted_checkpoint, stdlib_docs

    converted_checkpoint(tmp_path)
    (tmp_path / "text.txt").write_text("\n\n".join(stdlib_docs()[:3]))
    run = tmp_path / "run"
    argv = [
        "train",
        "--init",
        str(tmp_path / "ckpt"),
        "--data",
        str(tmp_path / "text.txt"),
        "--out",
        str(run),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--warmup",
        "0",
        "--eval-batches",
        "1",
        "--no-progress",
        "--dtype",
        "float32",
        "--lora-rank",
        "2",
        "--lora-targets",
        "wq,w1",
        "--eval-fraction",
        "0",
    ]
    assert cli.main(argv) == 0
    assert "LoRA: " in capsys.readouterr().out
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "model").exists()
    assert cli.main(["export-lora", str(run), str(tmp_path / "a2")]) == 0
    one = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "a2" / "adapter_model.safetensors").read_bytes() == one
    assert cli.main(["export-lora", str(run), str(tmp_path / "merged"), "--merge"]) == 0
    merged = checkpoint.load(tmp_path / "merged")
    base = checkpoint.load(tmp_path / "ckpt")
    w_m, w_b = merged.layers[0].attention.wq[...], base.layers[0].attention.wq[...]
    assert float(jnp.abs(w_m - w_b).max()) > 0  # the adapter is in the weights
    np.testing.assert_array_equal(
        merged.layers[0].attention.wk[...], base.layers[0].attention.wk[...]
    )
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    # Bad input: one line, exit 2, nothing written.
    assert (
        cli.main(
            [
                "train",
                *argv[3:5],
                "--out",
                str(tmp_path / "x"),
                "--lora-rank",
                "2",
                "--tokenizer",
                str(tmp_path / "tok.model"),
            ]
        )
        == 2
    )
    assert "--lora-rank trains adapters on a frozen model" in capsys.readouterr().err
    assert cli.main(["export-lora", str(tmp_path / "nope"), str(tmp_path / "y")]) == 2
    assert "no training checkpoint" in capsys.readouterr().err
    # Merging into an int8 form of the base is refused: the merge needs its float weights.
    assert cli.main(["quantize", str(tmp_path / "ckpt"), str(tmp_path / "q")]) == 0
    capsys.readouterr()
    z = ["export-lora", str(run), str(tmp_path / "z"), "--merge", "--base", str(tmp_path / "q")]
    assert cli.main(z) == 2
    assert "holds int8 weights; merging needs float ones" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))
