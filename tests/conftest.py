"""Test set-up: eight simulated CPU devices, float32 matmuls at full precision."""

import os

# Must happen before jax is imported anywhere: the sharding tests need a mesh of 8.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
