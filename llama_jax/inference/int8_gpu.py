"""An int8 x bfloat16 product for a single GPU that reads the int8 weight at full speed.

XLA's GPU backend fuses `values.astype(bfloat16)` into its matrix product, so an int8
model never holds a converted weight, but the fused product of one or a few rows reads
the int8 weight at under half the rate a bfloat16 product reads its weight. Decoding at
batch 1 is bound by exactly that read. This module is a Pallas (Triton) kernel for

    y[M, N] = (x[M, K] @ values[K, N]) * scale[N]

for products of at most `MAX_ROWS` rows, with the int8 values converted in registers and
accumulated in float32. Each program reads one [K / splits, block_n] tile of the weight
(`block_n` output channels, one slice of the input axis) in `block_k`-row steps; the
`splits` partial sums go to a small float32 array that XLA adds up and scales. Splitting
the input axis gives the GPU enough programs to keep every multiprocessor reading even
for narrow weights (wk, wv), while keeping the sum deterministic (no atomics).

`Int8Weight` calls it only when JAX runs on exactly one GPU: under a mesh XLA would
gather a sharded weight onto every device to feed a custom call. Elsewhere, and for
shapes the kernel's power-of-two tiles do not divide, products stay with XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama_jax.inference import int8_cpu

MAX_ROWS = 8  # products with more rows go to XLA


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the kernel cuts a [K, N] weight, and how it multiplies.

    `dot_rows`: products of more rows than this use the tensor cores (`pl.dot` on rows
    padded to 16); fewer use float32 multiply-adds into a [block_k, block_n] accumulator
    per row, summed once at the end.
    """

    block_n: int = 32  # output channels per program (a power of two)
    block_k: int = 128  # input rows converted and accumulated per loop step
    programs: int = 1  # split K until about this many programs run (1: never split)
    num_warps: int = 4
    num_stages: int | None = None  # Triton's software pipelining depth (None: its default)
    min_steps: int = 1  # a split of K keeps at least this many block_k steps
    dot_rows: int = 2


TILES = Tiles()


def plan(k: int, n: int, tiles: Tiles | None = None) -> tuple[int, int, int] | None:
    """(block_n, block_k, splits) for a [K, N] weight, or None if the tiles do not fit.

    `splits` is the smallest power of two that brings (N / block_n) * splits up to
    `tiles.programs`, as long as every split keeps a whole number of at least
    `tiles.min_steps` steps of `block_k` rows.
    """
    tiles = tiles or TILES
    block_n = min(tiles.block_n, n)
    if n % block_n or block_n & (block_n - 1) or k % tiles.block_k:
        return None
    splits = 1
    step = tiles.block_k * tiles.min_steps
    while (n // block_n) * splits < tiles.programs and k % (2 * splits * step) == 0:
        splits *= 2
    return block_n, tiles.block_k, splits


def wanted() -> bool:
    """Whether products should use the kernel: JAX runs on exactly one GPU."""
    return jax.default_backend() == "gpu" and jax.device_count() == 1


def _body(x_ref, w_ref, s_ref, o_ref, *, block_k: int, dot: bool):
    """One program: o[0, :, tile] = (x[:, slice] @ values[slice, tile]) * scale[tile]."""
    rows, block_n = x_ref.shape[0], w_ref.shape[1]
    steps = w_ref.shape[0] // block_k

    def at(i):
        return pl.ds(pl.multiple_of(i * block_k, block_k), block_k)

    if dot:  # tensor cores: [rows, block_k] x [block_k, block_n] per step

        def step(i, acc):
            w = w_ref[at(i), :].astype(x_ref.dtype)
            return acc + jnp.dot(x_ref[:, at(i)], w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((rows, block_n), jnp.float32))
        o_ref[0, :, :] = acc * s_ref[...][None, :]
        return

    def step(i, acc):  # multiply-adds; the sum over the input rows waits for the end
        w = w_ref[at(i), :].astype(jnp.float32)  # converted in registers
        return tuple(
            a + x_ref[m, at(i)].astype(jnp.float32)[:, None] * w for m, a in enumerate(acc)
        )

    zero = jnp.zeros((block_k, block_n), jnp.float32)
    acc = jax.lax.fori_loop(0, steps, step, (zero,) * rows)
    for m in range(rows):
        o_ref[0, m, :] = jnp.sum(acc[m], axis=0) * s_ref[...]


def scaled_products(
    x,
    values,
    scale,
    *,
    block_n: int,
    block_k: int,
    splits: int,
    dot: bool,
    num_warps: int = 4,
    num_stages: int | None = None,
    interpret: bool = False,
):
    """[splits, M, N] float32: (x @ values) * scale, one slab per slice of K."""
    (m, k), n = x.shape, values.shape[1]
    part = k // splits
    return pl.pallas_call(
        functools.partial(_body, block_k=block_k, dot=dot),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        grid=(n // block_n, splits),
        in_specs=[
            pl.BlockSpec((m, part), lambda j, s: (0, s)),
            pl.BlockSpec((part, block_n), lambda j, s: (s, j)),
            pl.BlockSpec((block_n,), lambda j, s: (j,)),
        ],
        out_specs=pl.BlockSpec((1, m, block_n), lambda j, s: (s, 0, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="llama_jax_int8_matmul",
    )(x, values, scale)


def _kernel(x, values, scale, *, tiles: Tiles | None = None, interpret: bool = False):
    tiles = tiles or TILES
    m, k = x.shape
    block_n, block_k, splits = plan(k, values.shape[1], tiles)
    dot = m > tiles.dot_rows and x.dtype != jnp.float32
    rows = 16 if dot else 1 << (m - 1).bit_length()  # tiles are powers of two: pad rows
    xp = jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x
    parts = scaled_products(
        xp,
        values,
        scale,
        block_n=block_n,
        block_k=block_k,
        splits=splits,
        dot=dot,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )
    y = parts[0] if splits == 1 else parts.sum(axis=0)
    return y[:m] if rows != m else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, interpret: bool = False):
    """(x @ values) * scale in float32 through the kernel; XLA's product off the GPU.

    Args:
      x: [M, K] rows (bfloat16 or float32), M <= MAX_ROWS.
      values: [K, N] int8 weight whose shape `plan` accepts.
      scale: [N] float32 per-output-channel scales.
      interpret: run the kernel in Pallas's interpreter (tests on the CPU).
    Returns:
      [M, N] float32. Differentiable in x and scale (the int8 values get no gradient).
    """
    if interpret:
        return _kernel(x, values, scale, interpret=True)
    return jax.lax.platform_dependent(x, values, scale, cuda=_kernel, default=int8_cpu._reference)


def _fwd(x, values, scale, interpret):
    return int8_matmul(x, values, scale, interpret), (x, values, scale)


def _bwd(interpret, res, g):
    return int8_cpu._bwd(res, g)


int8_matmul.defvjp(_fwd, _bwd)
