"""`llama-jax info`: what a preset is made of, without allocating it.

llama-jax info llama3.1-8b          # shapes, parameter counts, memory, KV cache size
llama-jax info tiny --forward       # also build it with random weights and run it
llama-jax info tiny --forward --mesh fsdp_tp   # ... sharded over all devices
llama-jax info llama3.1-405b --mesh fsdp=-1,tensor=8 --devices 256   # plan a pod
"""

from __future__ import annotations

import argparse
import time

from llama_jax.config import get_preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", default="tiny", help="preset name (default: tiny)")
    p.add_argument("--forward", action="store_true", help="run a forward pass on random weights")
    p.add_argument("--list", action="store_true", help="list every preset and exit")
    from llama_jax.cli.common import add_mesh_argument

    add_mesh_argument(p)
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="plan --mesh for N devices that need not be present: weights per device",
    )


def describe(cfg) -> str:
    """A few lines on the architecture and where its parameters live."""
    D, F, V, L = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.n_layers
    N, K, H = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    attn = L * (2 * D * N * H + 2 * D * K * H)
    mlp = L * 3 * D * F
    emb = V * D * (1 if cfg.tie_word_embeddings else 2)
    total = cfg.num_params()
    kv_bytes = 2 * L * K * H * 2  # bf16 keys and values per token
    scaling = "none" if cfg.rope_scaling is None else f"llama3 x{cfg.rope_scaling.factor:g}"
    lines = [
        f"{cfg.name}: {total / 1e9:.3f}B parameters ({total:,})",
        f"  D={D} L={L} N={N} K={K} (G={N // K}) H={H} F={F} V={V}",
        f"  rope theta={cfg.rope_theta:g} scaling={scaling}; context {cfg.max_seq_len}; "
        f"tied embeddings: {cfg.tie_word_embeddings}",
        f"  attention {attn / total:6.1%}  mlp {mlp / total:6.1%}  embeddings {emb / total:6.1%}",
        f"  weights: {total * 2 / 2**30:.2f} GiB in bf16, {total * 4 / 2**30:.2f} GiB in f32",
        f"  KV cache: {kv_bytes / 2**10:.0f} KiB per token in bf16 "
        f"({kv_bytes * cfg.max_seq_len / 2**30:.2f} GiB for one full context)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from llama_jax.config import PRESETS

    if args.list:
        for name, cfg in PRESETS.items():
            print(f"{name:16s} {cfg.num_params() / 1e9:9.3f}B")
        return 0
    from llama_jax.sharding import print0

    cfg = get_preset(args.preset)
    print0(describe(cfg))
    mesh = None
    if args.devices is not None and (args.mesh is None or args.forward or args.devices < 1):
        from llama_jax.errors import LlamaError

        raise LlamaError(
            "--devices N plans a --mesh for N (>= 1) devices; it needs --mesh "
            "and cannot run --forward (the devices are not there)."
        )
    if args.mesh is not None:
        from flax import nnx

        from llama_jax import sharding
        from llama_jax.model import abstract_model

        if args.devices is None:
            mesh = sharding.make_mesh(args.mesh)
        else:
            mesh = sharding.abstract_mesh(args.mesh, args.devices)
        sharding.validate(cfg, mesh)
        params = nnx.state(abstract_model(cfg), nnx.Param)
        held = sharding.bytes_per_device(params, sharding.param_shardings(params, mesh))
        size = f"{held / 2**30:.2f} GiB" if held >= 2**30 else f"{held / 2**20:.2f} MiB"
        print0(f"  {sharding.describe_mesh(mesh)}: {size} of {cfg.param_dtype} weights per device")
    if args.forward:
        import jax
        import numpy as np

        from llama_jax.model import build_model
        from llama_jax.sharding import jit_forward

        model = build_model(cfg, mesh=mesh)
        rows = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        tokens = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16) % cfg.vocab_size
        forward = jit_forward(model, mesh)
        t0 = time.perf_counter()
        logits = jax.block_until_ready(forward(tokens))
        print0(
            f"  forward on random weights: logits {logits.shape} {logits.dtype}, "
            f"compiled and ran in {time.perf_counter() - t0:.2f}s"
        )
    return 0
