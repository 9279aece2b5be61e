"""Test set-up: eight simulated CPU devices, float32 matmuls at full precision."""

import os

# Must happen before jax is imported anywhere: the sharding tests need a mesh of 8.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The `llama-jax` command keeps compiled programs on disk; tests run it in-process and in
# subprocesses, and must neither write to the user's cache nor load programs from it.
os.environ["LLAMA_JAX_COMPILE_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
