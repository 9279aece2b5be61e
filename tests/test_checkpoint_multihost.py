"""`checkpoint.save` and `load` on two processes (4 CPU devices each, one mesh of 8).

Both processes load a checkpoint onto the global mesh, save it with `save` (one
directory, written by both, renamed by process 0), and load it again onto another mesh;
this process then checks the result bit for bit and the logits.
"""

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import llama_jax as lj
from llama_jax.checkpoint import save
from tests.multihost_launch import run_processes

ROOT = Path(__file__).resolve().parent.parent
CFG = lj.LlamaConfig(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, ffn_dim=128, max_seq_len=64
)


def run_two(argv_of, timeout: float = 150.0) -> list[str]:
    """Two processes with 4 CPU devices each (see multihost_launch)."""
    return run_processes(argv_of, 2, 4, timeout)


def params_of(model) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat[0]}


def test_save_and_load_across_two_processes(tmp_path):
    model = lj.build_model(CFG, seed=7)
    save(model, tmp_path / "in")
    worker = str(ROOT / "tests" / "checkpoint_multihost_worker.py")
    out = str(tmp_path / "out")
    logs = run_two(
        lambda i, port: [sys.executable, worker, str(i), "2", str(port), str(tmp_path / "in"), out]
    )
    assert "saved and reloaded across 2 processes" in logs[0], logs
    assert sorted(os.listdir(tmp_path)) == ["in", "out", "out.logits.npy"]  # no temp dirs
    again = lj.load(out)
    want, got = params_of(model), params_of(again)
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % CFG.vocab_size
    ref = np.asarray(model(jnp.asarray(tokens)))
    logits = np.load(out + ".logits.npy")
    assert np.max(np.abs(logits - ref)) / np.max(np.abs(ref)) < 1e-5
