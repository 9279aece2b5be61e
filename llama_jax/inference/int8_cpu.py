"""An int8 x float32 product for XLA's CPU backend that reads the int8 weight itself.

XLA's CPU backend does not fuse a dtype conversion into its matrix products: it writes
each converted weight out first, and inside `generate`'s decode loop its loop-invariant
code motion lifts those conversions out of the loop. An int8 model would then decode
from float32 copies of its weights, made at the start of every call: float32's memory
and float32's speed. This module builds one small C++ kernel (`int8_matmul.cc`, beside
this file) with the machine's C++ compiler on first use and registers it with XLA as an
FFI custom call:

    y[M, N] = (x[M, K] @ values[K, N]) * scale[N]

with the int8 values converted in registers. `Int8Weight` calls it for products of at
most `MAX_ROWS` rows on the CPU (decode at small batch sizes, where reading the weight is
the whole cost); wider products (prefill, training, large batches) stay with XLA, whose
threaded matrix products are faster there. The kernel shares a product's column tiles
over XLA's intra-op thread pool (see the comment at the top of `int8_matmul.cc`).

The library is built once into `$LLAMA_JAX_CACHE/kernels` (default
~/.cache/llama-jax/kernels), named by a hash of the source, the compiler command and the
CPU's model and flags, written to a temporary name and renamed into place so concurrent
processes never load half a file. Without a C++ compiler (`$CXX`, else `c++`), or if the
build fails, `available()` is False, a warning says why once, and every product uses
XLA's path: same results, float32 copies.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("int8_matmul.cc")
TARGET = "llama_jax_int8_matmul"
MAX_ROWS = 4  # products with more rows go to XLA


def _cpu_signature() -> str:
    """The CPU's model and feature flags: the build uses -march=native."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build(cache: Path) -> Path:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH; set CXX)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        SOURCE.read_bytes()
        + " ".join([compiler, *flags, jax.__version__]).encode()
        + _cpu_signature().encode()
    ).hexdigest()[:16]
    lib = cache / f"int8_matmul-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".int8_matmul-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [compiler, *flags, f"-I{include}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def wanted() -> bool:
    """Whether products should use the kernel: JAX runs on the CPU and the kernel built."""
    return jax.default_backend() == "cpu" and available()


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA (tried once per process)."""
    cache = Path(os.environ.get("LLAMA_JAX_CACHE") or "~/.cache/llama-jax").expanduser()
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cache / "kernels")))
        jax.ffi.register_ffi_target(
            TARGET, jax.ffi.pycapsule(lib.LlamaJaxInt8Matmul), platform="cpu"
        )
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"llama_jax: the CPU int8 kernel is not available ({e}); int8 products use "
            "XLA's path, which decodes from float32 copies of the weights.",
            stacklevel=2,
        )
        return False
    return True


def _kernel(x, values, scale):
    out = jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, values, scale)


def _reference(x, values, scale):
    return jnp.dot(x, values.astype(jnp.float32), preferred_element_type=jnp.float32) * scale


@jax.custom_vjp
def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """(x @ values) * scale in float32: the kernel on the CPU, XLA's product elsewhere.

    Args:
      x: [M, K] float32 rows.
      values: [K, N] int8 weight.
      scale: [N] float32 per-output-channel scales.
    Returns:
      [M, N] float32. Differentiable in x and scale (the int8 values get no gradient).
    """
    cpu = _kernel if wanted() else _reference  # built and registered on first use
    return jax.lax.platform_dependent(x, values, scale, cpu=cpu, default=_reference)


def _fwd(x, values, scale):
    return int8_matmul(x, values, scale), (x, values, scale)


def _bwd(res, g):
    x, values, scale = res
    w = values.astype(jnp.float32)
    dx = jnp.dot(g * scale, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dscale = jnp.sum(g * jnp.dot(x, w, preferred_element_type=jnp.float32), axis=0)
    return dx, np.zeros(values.shape, jax.dtypes.float0), dscale.astype(scale.dtype)


int8_matmul.defvjp(_fwd, _bwd)
