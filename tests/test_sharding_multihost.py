"""Two processes on loopback, 4 CPU devices each, one mesh of 8: a multi-host run in small.

tests/multihost_worker.py is the program each process runs; this file starts both,
and compares what they computed with the single-process, single-device model.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import llama_jax as lj
from llama_jax import sharding
from tests import multihost_launch

CFG = lj.LlamaConfig(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, ffn_dim=128, max_seq_len=64
)
SEED = 5
MESH = "fsdp=-1,tensor=2"  # 4 x 2 over both processes' devices
RESTORE_MESH = "data=2,fsdp=1,tensor=4"  # a different layout for the restore
PROCESSES, DEVICES_EACH = 2, 4
ROOT = Path(__file__).resolve().parent.parent


def batch():
    """The global batch [8, 12] and its left-padding mask; each process takes its rows."""
    tokens = np.random.default_rng(11).integers(0, CFG.vocab_size, (8, 12), dtype=np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[2, :4] = False
    mask[6, :2] = False
    return tokens, mask


def host_weights() -> dict:
    """The model's weights as numpy arrays, the same in every process."""
    rng = np.random.default_rng(SEED)
    abstract = nnx.to_pure_dict(nnx.state(lj.abstract_model(CFG)))
    return jax.tree.map(lambda a: 0.05 * rng.standard_normal(a.shape, np.float32), abstract)


def run_processes(argv_of, timeout: float = 150.0) -> list[str]:
    """Run PROCESSES copies of a program with DEVICES_EACH devices each (see multihost_launch)."""
    return multihost_launch.run_processes(argv_of, PROCESSES, DEVICES_EACH, timeout)


def test_two_processes_match_one(tmp_path):
    worker = str(ROOT / "tests" / "multihost_worker.py")
    logs = run_processes(
        lambda i, port: [sys.executable, worker, str(i), str(PROCESSES), str(port), str(tmp_path)]
    )
    # Only process 0 prints.
    assert "forward on mesh data=1 fsdp=4 tensor=2 (8 devices, 2 processes" in logs[0], logs
    assert "forward on" not in logs[1], logs

    tokens, mask = batch()
    model = lj.abstract_model(CFG)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, host_weights()))
    nnx.update(model, state)
    want = np.asarray(sharding.jit_forward(model)(tokens, mask))
    for name in ("logits.npy", "logits_restored.npy"):
        got = np.load(tmp_path / name)
        assert got.shape == want.shape
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert err < 1e-5, (name, err)


def test_cli_launch_on_two_processes():
    # The documented launch path for GPU/CPU hosts: the same command on every host, with
    # the coordinator and process flags; the mesh spans both processes' devices, and
    # only process 0 prints. (The sharded forward across processes is the test above.)
    def argv(i, port):
        return [
            sys.executable,
            "-m",
            "llama_jax.cli",
            "info",
            "tiny",
            "--mesh",
            "fsdp=-1,tensor=2",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(PROCESSES),
            "--process-id",
            str(i),
        ]

    logs = run_processes(argv)
    assert "mesh data=1 fsdp=4 tensor=2 (8 devices, 2 processes" in logs[0], logs
    assert "tiny:" not in logs[1] and "mesh" not in logs[1], logs
