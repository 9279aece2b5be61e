"""One process of the multi-host checkpoint test (tests/test_checkpoint_multihost.py).

    python tests/checkpoint_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CKPT OUT

Every process runs this same program, as on a pod: it joins the others through
`jax.distributed`, loads CKPT onto a mesh spanning all processes' devices (each process
reading only its own shards), saves the sharded model to OUT with `checkpoint.save`,
and loads OUT again onto a differently shaped mesh. The device count per process comes
from XLA_FLAGS, set by the caller.
"""

import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")


def main(process_id: int, num_processes: int, port: int, ckpt: str, out: str) -> None:
    from llama_jax import sharding

    sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)

    import numpy as np

    import llama_jax as lj
    from llama_jax.checkpoint import save

    assert jax.process_count() == num_processes and len(jax.devices()) == 8
    mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"))
    model = lj.load(ckpt, mesh=mesh)
    wq = model.layers[0].attention.wq[...]
    assert not wq.is_fully_addressable  # really spread over both processes
    save(model, out)
    again = lj.load(out, mesh=jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor")))
    w1 = again.layers[0].feed_forward.w1[...]
    assert w1.sharding.spec[1] == "tensor" and not w1.is_fully_addressable
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % model.cfg.vocab_size
    from jax.experimental import multihost_utils

    logits = multihost_utils.process_allgather(again(tokens), tiled=True)
    if jax.process_index() == 0:
        np.save(out + ".logits.npy", np.asarray(logits))
        print("saved and reloaded across", jax.process_count(), "processes")


if __name__ == "__main__":
    pid, n, port = map(int, sys.argv[1:4])
    main(pid, n, port, sys.argv[4], sys.argv[5])
