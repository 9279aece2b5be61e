"""One optimizer update: `training.Trainer.step` against PyTorch's AdamW on the same model.

Both sides: float32, batch 4 x 128 tokens, forward, backward, global-norm clipping at 1.0,
AdamW (betas 0.9/0.95, weight decay 0.1). MFU: model FLOPs (3 x the forward's) per second
over the machine's measured float32 matmul rate.
"""

from __future__ import annotations

import numpy as np

import llama_jax as lj
from benchmarks.harness import Results, run_peer, time_calls
from llama_jax.perf import model_flops_per_token
from llama_jax.training import TrainConfig, Trainer


def run(res: Results, preset: str, hf: str, batch: int, seq: int, repeats: int, roof: dict):
    cfg = lj.get_preset(preset)
    rows = np.random.default_rng(3).integers(3, cfg.vocab_size, (batch, seq + 1))
    tc = TrainConfig(
        batch_size=batch, seq_len=seq, compute_dtype="float32", steps=100, warmup_steps=10
    )
    trainer = Trainer(cfg, tc)
    state = [trainer.init_params(), None]
    state[1] = trainer.init_opt_state(state[0])
    data = trainer.put_batch(
        {
            "tokens": rows[None, :, :-1].astype(np.int32),
            "targets": rows[None, :, 1:].astype(np.int32),
            "weights": np.ones((1, batch, seq), np.float32),
        }
    )

    def step():
        state[0], state[1], metrics = trainer.step(state[0], state[1], data)
        metrics["loss"].block_until_ready()

    ours = time_calls(step, repeats)
    peer = run_peer("train", hf_dir=hf, tokens=rows.tolist(), repeats=repeats)
    tokens = batch * seq
    rate = lambda t: tokens / t["median"]  # noqa: E731
    flops = model_flops_per_token(cfg, seq)
    res.add(f"train step {batch}x{seq}, float32", "tokens/s", rate(ours), rate(peer["seconds"]))
    res.add(
        "train MFU (% of measured matmul)",
        "%",
        100 * rate(ours) * flops / roof["matmul_flops"],
        100 * rate(peer["seconds"]) * flops / roof["matmul_flops"],
    )
