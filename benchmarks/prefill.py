"""Prefill: one forward over a 1 x 128 prompt, `model(x)` as the README calls it.

Ours: `llama_jax.load(dir)` then `model(tokens)`, which runs compiled (model/compiled.py).
For comparison, two other ways to call the same model: op by op
(`Transformer.__call__(model, x)`, each operation dispatched on its own), and under
Flax's `nnx.jit` with its defaults, which hands every parameter back out of the program.
Peer: `LlamaForCausalLM(...)(x)` under `torch.inference_mode()`. All produce the float32
logits of every position.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import llama_jax as lj
from benchmarks.harness import Results, run_peer, time_calls
from llama_jax.model import Transformer


def run(res: Results, ckpt: str, hf: str, length: int, repeats: int) -> None:
    model = lj.load(ckpt)
    tokens = np.random.default_rng(1).integers(3, model.cfg.vocab_size, (1, length)).tolist()
    x = jnp.asarray(tokens, jnp.int32)
    # The first call at a new length: compilation included (one program, or one per
    # operation op by op; a length neither way has seen yet, the next one for op by op).
    first = time_calls(lambda: model(x).block_until_ready(), 1, warmup=0)["min"]
    y = jnp.asarray(tokens[0] + tokens[0][:1], jnp.int32)[None]  # [1, length + 1]
    eager_call = lambda: Transformer.__call__(model, y).block_until_ready()  # noqa: E731
    first_eager = time_calls(eager_call, 1, warmup=0)["min"]
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
    eager = time_calls(lambda: Transformer.__call__(model, x).block_until_ready(), repeats)
    res.add(f"prefill 1x{length}, op by op", "tokens/s", rate(eager), rate(peer["seconds"]))
    res.add(f"prefill 1x{length}, first call, model(x)", "s", first, lower_is_better=True)
    res.add(f"prefill 1x{length + 1}, first call, op by op", "s", first_eager, lower_is_better=True)
    jitted = nnx.jit(lambda m, x: m(x))
    ours_jit = time_calls(lambda: jitted(model, x).block_until_ready(), repeats)
    res.add(
        f"prefill 1x{length}, nnx.jit(model)", "tokens/s", rate(ours_jit), rate(peer["seconds"])
    )
