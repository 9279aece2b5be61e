"""One process of the multi-process sharding test (tests/test_sharding_multihost.py).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Every process runs this same program, as on a multi-host pod: it joins the others
through `jax.distributed` (gloo collectives over loopback), places the model's weights
sharded over all processes' devices (each process copying only its own shards), feeds
only its own rows of the batch, runs the sharded forward, saves the sharded parameters
with Orbax, restores them onto a different mesh and runs the forward again. Process 0
writes the gathered logits to OUT_DIR.
The device count per process comes from XLA_FLAGS, set by the caller.
"""

import sys
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")


def with_params(model, params):
    """Fill an (abstract) model with a nested dict of arrays."""
    from flax import nnx

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def main(process_id: int, num_processes: int, port: int, out: Path) -> None:
    from llama_jax import sharding as sh

    sh.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)

    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.experimental import multihost_utils

    from llama_jax.model import abstract_model
    from tests.test_sharding_multihost import CFG, MESH, RESTORE_MESH, batch, host_weights

    assert jax.process_count() == num_processes
    mesh = sh.make_mesh(MESH)
    # Every process holds the same host copy (as if memory-mapped from a checkpoint
    # file) and places only its own shards.
    weights = host_weights()
    params = jax.tree.map(sh.put_global, weights, sh.param_shardings(weights, mesh))
    assert not params["output"].is_fully_addressable
    model = with_params(abstract_model(CFG), params)
    tokens, mask = batch()
    rows = len(tokens) // num_processes
    mine = slice(process_id * rows, (process_id + 1) * rows)  # this host's rows only
    g_tokens, g_mask = sh.shard_batch(tokens[mine], mesh), sh.shard_batch(mask[mine], mesh)
    assert not g_tokens.is_fully_addressable and g_tokens.shape == tokens.shape

    logits = sh.jit_forward(model, mesh)(g_tokens, g_mask)
    full = multihost_utils.process_allgather(logits, tiled=True)
    sh.print0(f"forward on {sh.describe_mesh(mesh)}: logits {full.shape}")

    # Orbax writes each shard from the process that holds it; restoring onto another
    # mesh needs an abstract target carrying the new shardings.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "ckpt", params)
    checkpointer.wait_until_finished()

    mesh2 = sh.make_mesh(RESTORE_MESH)
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(CFG), nnx.Param))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sh.param_shardings(abstract, mesh2),
    )
    restored = checkpointer.restore(out / "ckpt", target)
    wq = restored["layers"][0]["attention"]["wq"]
    assert wq.sharding.mesh.shape == mesh2.shape, wq.sharding
    model2 = with_params(abstract_model(CFG), restored)
    logits2 = sh.jit_forward(model2, mesh2)(
        sh.shard_batch(tokens[mine], mesh2), sh.shard_batch(mask[mine], mesh2)
    )
    full2 = multihost_utils.process_allgather(logits2, tiled=True)
    if sh.is_main_process():
        np.save(out / "logits.npy", np.asarray(full))
        np.save(out / "logits_restored.npy", np.asarray(full2))
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
