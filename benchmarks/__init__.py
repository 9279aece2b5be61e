"""Benchmarks of llama-jax against transformers/PyTorch, each through the library's own API.

    python -m benchmarks                      # every CPU figure, ~6-9 min on 2 cores
    python -m benchmarks --quick              # tiny shapes, seconds: checks the code
    python benchmarks/gpu.py --out DIR        # one NVIDIA GPU: MFU, decode vs HBM roofline

harness      timing, the machine record, the peer runner, results (stdlib only)
peer_torch   the PyTorch/transformers side, always run in its own process (never imports JAX)
weights      the shared random checkpoint (llama-jax and Hugging Face copies of it)
roofline     the machine's measured memory bandwidth and float32 matmul rate
prefill      one forward of 1 x 128 tokens (`Transformer.__call__`)
decode       decode tokens/s at batch 1, 8, 32, bfloat16 and int8 (`llama_jax.generate`)
train        one optimizer update (`training.Trainer.step`)
convert      checkpoint conversion throughput and peak RSS (`checkpoint.convert`)
run          runs them all, writes docs/benchmark_cpu.json and the plot
"""
