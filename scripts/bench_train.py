"""Training throughput: llama-jax's train step against PyTorch, same model, same run.

    .venv/bin/python scripts/bench_train.py                        # bench-134m, CPU defaults
    .venv/bin/python scripts/bench_train.py --batch-size 8 --seq-len 1024 --dtype bfloat16

Both sides train the same architecture (`--preset`, ~134M parameters by default) on the
same random token batches with AdamW (betas 0.9/0.95, weight decay 0.1) and global-norm
clipping at 1.0:

    llama-jax   training.Trainer: one jitted step (forward, backward, clip, AdamW), params
                and optimizer state donated, float32 master weights, matmuls in --dtype
    PyTorch     transformers' LlamaForCausalLM + torch.optim.AdamW (fused where the
                build has it), clip_grad_norm_, same dtype policy via autocast

PyTorch runs in a child process with glibc's default malloc (the huge pages that
`scripts/run.sh` enables for XLA slow it down), after llama-jax's steps.

It prints tokens/s, seconds per step and MFU for each and the ratio. MFU counts the
model's training FLOPs (3 x forward, `LlamaConfig.flops_per_token`) against the device
peak from `perf.peak_flops` (data-sheet numbers for accelerators; on CPU a measured
float32 matmul peak, so CPU MFU is relative to what this machine's BLAS achieves).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from llama_jax import perf, training
from llama_jax.config import get_preset


def batches(cfg, batch_size: int, seq_len: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """n random [B, T + 1] int32 token arrays (the same for both frameworks)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
            for _ in range(n)]  # fmt: skip


def jax_step_times(cfg, tc: training.TrainConfig, data: list[np.ndarray], warmup: int):
    """Seconds of each timed llama-jax train step (after `warmup` untimed ones)."""
    trainer = training.Trainer(cfg, tc)
    params = trainer.init_params()
    opt_state = trainer.init_opt_state(params)
    times = []
    for i, tokens in enumerate(data):
        batch = trainer.put_batch({
            "tokens": tokens[None, :, :-1], "targets": tokens[None, :, 1:],
            "weights": np.ones((1, *tokens[:, 1:].shape), np.float32),
        })  # fmt: skip
        t0 = time.perf_counter()
        params, opt_state, metrics = trainer.step(params, opt_state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, float(metrics["loss"])


def torch_step_times(cfg, tc: training.TrainConfig, data: list[np.ndarray], warmup: int):
    """Seconds of each timed PyTorch train step (transformers' LlamaForCausalLM + AdamW)."""
    import torch
    import transformers

    from llama_jax.checkpoint.configs import config_to_hf

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.learning_rate, betas=(tc.b1, tc.b2), eps=tc.eps,
    )  # fmt: skip
    amp = tc.compute_dtype == "bfloat16"
    times = []
    for i, tokens in enumerate(data):
        t = torch.from_numpy(tokens.astype(np.int64))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(t[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, float(loss.detach())


def peer_environment() -> dict:
    """This process's environment without the huge-page malloc setting of scripts/run.sh.

    Huge pages speed up XLA (it allocates its temporaries afresh on every call) but slowed
    PyTorch's train step (164-173 vs 190-204 tokens/s), so the peer runs without them.
    """
    env = dict(os.environ)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and "hugetlb" not in t]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def torch_in_child(
    preset: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    dtype: str = "float32",
    threads: int | None = None,
) -> tuple[float, float]:
    """(median seconds per step, last loss) of PyTorch's train step (`torch_step_times`),
    timed in a child process with glibc's default malloc (`peer_environment`), apart from
    this process's XLA."""
    cmd = [sys.executable, __file__, "--torch-only", "--preset", preset,
           "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--steps", str(steps),
           "--warmup", str(warmup), "--dtype", dtype]  # fmt: skip
    if threads is not None:
        cmd += ["--torch-threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=peer_environment())
    if out.returncode != 0:
        raise RuntimeError(f"PyTorch train-step child failed:\n{out.stderr[-2000:]}")
    peer = json.loads(out.stdout.strip().splitlines()[-1])
    return peer["seconds"], peer["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-134m")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-only", action="store_true",
                   help="time PyTorch alone, print its median as JSON")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch's thread count (default: its own)")  # fmt: skip
    args = p.parse_args()

    cfg = get_preset(args.preset)
    tc = training.TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len,
                           compute_dtype=args.dtype, learning_rate=1e-4)  # fmt: skip
    data = batches(cfg, args.batch_size, args.seq_len, args.warmup + args.steps)
    if args.torch_only:
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        times, loss = torch_step_times(cfg, tc, data, args.warmup)
        print(json.dumps({"seconds": statistics.median(times), "loss": loss}))
        return
    tokens = args.batch_size * args.seq_len
    flops = perf.model_flops_per_token(training.training_config(cfg, tc), args.seq_len) * tokens
    peak = perf.peak_flops()
    dev = jax.devices()[0]
    print(f"{cfg.name}: {cfg.num_params() / 1e6:.0f}M parameters; batch {args.batch_size} x "
          f"{args.seq_len} tokens; matmuls in {args.dtype}; {args.steps} timed steps after "
          f"{args.warmup} warm-up")  # fmt: skip
    print(f"device: {dev.device_kind} ({dev.platform}), {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; peak {peak / 1e9:.0f} GFLOP/s "
          f"({'data sheet' if dev.platform != 'cpu' else 'measured f32 matmul'}); "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    rows = {}
    times, loss = jax_step_times(cfg, tc, data, args.warmup)
    rows["llama-jax"] = (statistics.median(times), loss)
    if not args.skip_torch:
        import torch

        peer = torch_in_child(args.preset, args.batch_size, args.seq_len, args.steps,
                              args.warmup, args.dtype)  # fmt: skip
        rows[f"PyTorch {torch.__version__}"] = peer

    print(f"{'':22s} {'s/step':>8s} {'tokens/s':>10s} {'MFU':>7s} {'loss':>7s}")
    for name, (sec, loss) in rows.items():
        print(f"{name:22s} {sec:8.2f} {tokens / sec:10.0f} {flops / sec / peak:7.1%} {loss:7.3f}")
    if len(rows) == 2:
        (a, _), (b, _) = rows.values()
        print(f"llama-jax / PyTorch tokens/s: {b / a:.2f}x")


if __name__ == "__main__":
    main()
