"""The peer: transformers' LlamaForCausalLM and PyTorch, timed in a process of their own.

Run by `harness.run_peer` as `python -m benchmarks.peer_torch TASK 'JSON ARGS'`; prints one
JSON line. This module must never import JAX (or llama_jax, which imports it): XLA's
thread pools in the same process slow PyTorch's OpenMP threads. PyTorch gets one
thread per core, its best setting on this kind of machine.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import transformers

from benchmarks.harness import peak_rss_mb, time_calls

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model(hf_dir: str, dtype: str = "float32"):
    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=DTYPES[dtype], attn_implementation="sdpa"
    )
    return model.eval()


def roofline(size: int = 2048, stream_mib: int = 256, repeats: int = 5) -> dict:
    """float32 matmul FLOP/s (size^3) and matrix-vector bytes/s (a stream_mib MiB matrix)."""
    a = torch.randn(size, size)
    mm = time_calls(lambda: torch.mm(a, a), repeats)
    n = int((stream_mib * 2**20 / 4) ** 0.5)
    w, x = torch.randn(n, n), torch.randn(1, n)
    mv = time_calls(lambda: torch.mm(x, w), repeats)
    return {"matmul_flops": 2 * size**3 / mm["min"], "stream_bytes": 4 * n * n / mv["min"]}


def prefill(hf_dir: str, tokens: list[list[int]], repeats: int) -> dict:
    """One forward over `tokens` [B, T] (logits of every position, as `model(x)` gives)."""
    model = _model(hf_dir)
    x = torch.tensor(tokens)
    with torch.inference_mode():
        t = time_calls(lambda: model(x).logits, repeats)
    return {"seconds": t}


def decode(
    hf_dir: str, prompts: list[list[int]], new_tokens: int, repeats: int, dtype: str = "float32"
) -> dict:
    """`model.generate` (greedy, default cache) of 1 and of `new_tokens` tokens per row."""
    model = _model(hf_dir, dtype)
    x = torch.tensor(prompts)
    mask = torch.ones_like(x)

    def gen(n):
        return model.generate(
            x,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.inference_mode():
        one = time_calls(lambda: gen(1), repeats)
        many = time_calls(lambda: gen(new_tokens), repeats)
        out = gen(new_tokens)[0, x.shape[1] :].tolist()
    return {"one": one, "many": many, "tokens_row0": out}


def train(hf_dir: str, tokens: list[list[int]], repeats: int) -> dict:
    """One AdamW update (betas 0.9/0.95, weight decay 0.1, clipping at 1.0), float32."""
    model = _model(hf_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.tensor(tokens)

    def step():
        loss = torch.nn.functional.cross_entropy(
            model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return {"seconds": time_calls(step, repeats)}


def load(hf_dir: str) -> dict:
    """`from_pretrained` of a safetensors directory into memory (the conversion's peer)."""
    t0 = time.perf_counter()
    model = _model(hf_dir)
    seconds = time.perf_counter() - t0
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "bytes": nbytes}


TASKS = {"roofline": roofline, "prefill": prefill, "decode": decode, "train": train, "load": load}


def main() -> None:
    task, args = sys.argv[1], json.loads(sys.argv[2])
    assert "jax" not in sys.modules, "the peer must run without JAX in its process"
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    result = TASKS[task](**args)
    assert "jax" not in sys.modules, "the peer must run without JAX in its process"
    result.update(
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peak_rss_mb=peak_rss_mb(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
