"""LoRA on a frozen int8 base: the Trainer, and `train --init INT8_CKPT --lora-rank R`.

The base's projections stay int8 values with float32 scales (llama_jax.inference.int8)
through training; only the adapters are trained, checkpointed and exported.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import cli, training
from llama_jax.errors import LlamaError
from llama_jax.inference import int8
from llama_jax.model import build_model
from llama_jax.sharding import make_mesh
from tests.test_lora import LCFG, TC, random_batch

QTC = dataclasses.replace(TC, base_quantization="int8")


def run_steps(tc, base, mesh=None, steps=4):
    """Train `steps` updates on one repeated batch; (trainer, adapters, frozen before, losses)."""
    t = training.Trainer(LCFG, tc, mesh)
    t.set_base(base)
    frozen_before = jax.device_get(t.frozen)
    p = t.init_params()
    o = t.init_opt_state(p)
    batch = t.put_batch(random_batch(2, 8, 16, seed=4))
    losses = []
    for s in range(steps):
        p, o, m = t.step(p, o, batch, s + 1)
        losses.append(float(m["loss"]))
    return t, jax.device_get(p), frozen_before, losses


def test_adapters_learn_on_a_frozen_int8_base():
    float_model = build_model(LCFG, seed=2)
    floats = nnx.to_pure_dict(nnx.state(float_model, nnx.Param))
    q = nnx.to_pure_dict(nnx.state(int8.quantize(float_model), nnx.Param))
    t, adapters, frozen_before, losses = run_steps(QTC, q)
    # The base is held as stored: int8 values, float32 scales, float norms and embedding.
    wq = t.frozen["layers"][0]["attention"]["wq"]["base"]
    assert wq["values"].dtype == jnp.int8 and wq["scale"].dtype == jnp.float32
    assert t.frozen["layers"][0]["feed_forward"]["w3"]["values"].dtype == jnp.int8
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(q), strict=True):
        np.testing.assert_array_equal(a, b)  # placed without a cast or a copy's rounding
    for a, b in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(t.frozen)), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # and never written by a step
    # Only adapters are trained (no gradient w.r.t. int8 values), and they learn.
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(adapters)]
    assert paths and all(p.endswith(("['lora_a']", "['lora_b']")) for p in paths)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(adapters))
    assert (np.diff(losses) < 0).all(), losses
    assert losses[-1] < losses[0] - 0.01, losses
    # The first step sees the base model: the int8 one is the float one up to rounding.
    _, _, _, float_losses = run_steps(TC, floats, steps=1)
    assert losses[0] != float_losses[0]
    assert losses[0] == pytest.approx(float_losses[0], rel=1e-2)
    # On a mesh: the same losses; the int8 values are split by the rules table.
    mt, _, _, mesh_losses = run_steps(QTC, q, make_mesh("fsdp"), steps=2)
    np.testing.assert_allclose(mesh_losses, losses[:2], rtol=1e-5)
    values = mt.frozen["layers"][0]["attention"]["wq"]["base"]["values"]
    assert values.dtype == jnp.int8 and values.sharding.spec[0] == "fsdp"


def test_base_of_the_wrong_precision_is_refused():
    model = build_model(LCFG, seed=2)
    floats = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    q = nnx.to_pure_dict(nnx.state(int8.quantize(model), nnx.Param))
    with pytest.raises(LlamaError, match="base weights are float but the run's base is int8"):
        training.Trainer(LCFG, QTC).set_base(floats)
    with pytest.raises(LlamaError, match="base weights are int8 but the run's base is float"):
        training.Trainer(LCFG, TC).set_base(q)
    with pytest.raises(LlamaError, match="int8 weights cannot be trained"):
        training.TrainConfig(base_quantization="int8")
    with pytest.raises(LlamaError, match="not a quantization method"):
        dataclasses.replace(QTC, base_quantization="int4")


def test_cli_lora_on_an_int8_checkpoint_trains_resumes_exports_and_merges(
    tmp_path, capsys, monkeypatch
):
    from llama_jax import checkpoint
    from llama_jax.cli import train as train_cli
    from llama_jax.cli.export_lora import load_run
    from tests.test_train import converted_checkpoint, stdlib_docs

    converted_checkpoint(tmp_path)
    ckpt, q = tmp_path / "ckpt", tmp_path / "q"
    assert cli.main(["quantize", str(ckpt), str(q)]) == 0
    (tmp_path / "text.txt").write_text("\n\n".join(stdlib_docs()[:3]))
    results = []
    real_train = train_cli.train
    monkeypatch.setattr(train_cli, "train", _recording(real_train, results))
    run = tmp_path / "run"
    argv = ["train", "--init", str(q), "--data", str(tmp_path / "text.txt"), "--out", str(run)]
    argv += ["--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--warmup", "0"]
    argv += ["--eval-batches", "1", "--no-progress", "--dtype", "float32", "--eval-fraction", "0"]
    argv += ["--lora-rank", "2", "--lora-targets", "wq,w1", "--save-every", "3"]
    assert cli.main([*argv, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "the base stays int8" in out and "--merge --base FLOAT_CKPT" in out
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "model").exists()
    # The trained model's base is the int8 checkpoint's, bit for bit; its B moved off 0.
    stored = nnx.to_pure_dict(nnx.state(checkpoint.load(q), nnx.Param))
    frozen = jax.device_get(results[0].trainer.frozen)
    wq = frozen["layers"][1]["attention"]["wq"]["base"]
    assert wq["values"].dtype == np.int8
    np.testing.assert_array_equal(wq["values"], stored["layers"][1]["attention"]["wq"]["values"])
    np.testing.assert_array_equal(wq["scale"], stored["layers"][1]["attention"]["wq"]["scale"])
    np.testing.assert_array_equal(
        frozen["layers"][0]["feed_forward"]["w2"]["values"],
        stored["layers"][0]["feed_forward"]["w2"]["values"],
    )
    adapters, _, tc, meta = load_run(run)
    assert tc.base_quantization == "int8" and meta["lora_base"] == str(q)
    b_leaves = [b for k, b in jax.tree_util.tree_leaves_with_path(adapters) if "lora_b" in str(k)]
    assert len(b_leaves) == 2 * 2 and all(np.abs(b).max() > 0 for b in b_leaves)
    # A second invocation with the same --out continues from step 3 on the int8 base.
    assert cli.main([*argv, "--steps", "5"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    assert (results[1].start_step, results[1].step) == (3, 5)
    # Resuming it on the float base would not continue the same run.
    float_argv = [str(ckpt) if a == str(q) else a for a in argv]
    assert cli.main([*float_argv, "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "base_quantization=int8" in err and err.count("\n") == 1
    # The peft adapter does not depend on the base's precision.
    assert cli.main(["export-lora", str(run), str(tmp_path / "a2")]) == 0
    one = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "a2" / "adapter_model.safetensors").read_bytes() == one
    # Merging needs float weights: refused into the int8 base, done into the float one.
    assert cli.main(["export-lora", str(run), str(tmp_path / "z"), "--merge"]) == 2
    assert "holds int8 weights; merging needs float ones" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    merge = ["export-lora", str(run), str(tmp_path / "merged"), "--merge", "--base", str(ckpt)]
    assert cli.main(merge) == 0
    merged, base = checkpoint.load(tmp_path / "merged"), checkpoint.load(ckpt)
    w_m, w_b = merged.layers[0].attention.wq[...], base.layers[0].attention.wq[...]
    assert w_m.dtype == w_b.dtype == jnp.float32
    assert float(jnp.abs(w_m - w_b).max()) > 0  # the adapter is in the weights
    np.testing.assert_array_equal(
        merged.layers[0].attention.wk[...], base.layers[0].attention.wk[...]
    )


def _recording(train, results):
    """`train`, with each TrainResult also appended to `results`."""

    def wrapped(*args, **kwargs):
        result = train(*args, **kwargs)
        results.append(result)
        return result

    return wrapped
