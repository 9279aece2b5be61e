"""Prefill: one forward over a 1 x 128 prompt, `model(x)` as the README calls it.

Ours: `llama_jax.load(dir)` then `model(tokens)` (and, for comparison, the same call under
`flax.nnx.jit`). Peer: `LlamaForCausalLM(...)(x)` under `torch.inference_mode()`.
Both produce the float32 logits of every position.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import llama_jax as lj
from benchmarks.harness import Results, run_peer, time_calls


def run(res: Results, ckpt: str, hf: str, length: int, repeats: int) -> None:
    model = lj.load(ckpt)
    tokens = np.random.default_rng(1).integers(3, model.cfg.vocab_size, (1, length)).tolist()
    x = jnp.asarray(tokens, jnp.int32)
    ours = time_calls(lambda: model(x).block_until_ready(), repeats)
    peer = run_peer("prefill", hf_dir=hf, tokens=tokens, repeats=repeats)
    rate = lambda t: length / t["median"]  # noqa: E731
    res.add(
        f"prefill 1x{length}, model(x)",
        "tokens/s",
        rate(ours),
        rate(peer["seconds"]),
        peer_threads=peer["threads"],
    )
    jitted = nnx.jit(lambda m, x: m(x))
    ours_jit = time_calls(lambda: jitted(model, x).block_until_ready(), repeats)
    res.add(
        f"prefill 1x{length}, nnx.jit(model)", "tokens/s", rate(ours_jit), rate(peer["seconds"])
    )
