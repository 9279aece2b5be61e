"""int8 x bfloat16 products of one row on a single GPU: batch-1 decoding.

XLA's GPU backend fuses `values.astype(bfloat16)` into its matrix product, so an int8
model never holds a converted weight. But XLA treats a product of one row as a
matrix-vector product: with a small weight (under 10M elements: wq, wk, wv, wo of
llama3.2-1b, wk and wv of 8B) it computes it as a multiply and a reduction, with the
larger ones as a GEMM. Both read the weight far below the memory bandwidth. Measured on
an H100 (docs/performance.md), a decode step's products with the row padded to eight
rows of zeros take 22-51% less time (1B and 8B, bfloat16 and int8 weights).

So a one-row int8 product on one GPU runs in one of two ways, `ONE_ROW`:

- "xla8" (the default): XLA's fused int8 product of the row padded to eight rows; the
  seven extra rows cost arithmetic, which a memory-bound product has to spare.
- "kernel": a Pallas (Triton) kernel for

      y[1, N] = (x[1, K] @ values[K, N]) * scale[N]

  with the int8 values converted in registers and multiplied and added in float32. Each
  program reads one [K / splits, block_n] tile of the weight (`block_n` output
  channels, one slice of the input axis) in steps of `block_k` rows, into a
  [block_k, block_n] accumulator that is summed once at the end. The `splits` slices
  of the input axis give the GPU enough programs to keep every multiprocessor reading,
  even for the narrow wk and wv; their partial sums go to a small float32 array that
  XLA adds up, so the result does not depend on the order programs finish in (no
  atomics). The tiles (`TILES`) were chosen on an H100 by `benchmarks/gpu_int8.py`.
  It beats XLA's one-row product but not its eight-row one; the benchmarks time both.

`Int8Weight` calls `int8_matmul` for one-row products when JAX runs on exactly one GPU
(where both ways were measured; under a mesh, the kernel's custom call would make XLA
gather a sharded weight onto every device) and, for the kernel, the tiles divide the
weight. Products of more rows stay with XLA as they are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama_jax.inference import int8_cpu

MAX_ROWS = 1  # products of more rows go to XLA
ONE_ROW = "xla8"  # or "kernel" (module docstring); read when traced: jax.clear_caches()


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the kernel cuts a [K, N] weight into programs."""

    block_n: int = 512  # output channels per program (a power of two)
    block_k: int = 32  # input rows converted and accumulated per loop step
    programs: int = 132  # split K until about this many programs run (1: never split)
    num_warps: int = 8
    num_stages: int | None = None  # Triton's software pipelining depth (None: its default)
    min_steps: int = 1  # a split of K keeps at least this many block_k steps


TILES = Tiles()


def plan(k: int, n: int, tiles: Tiles | None = None) -> tuple[int, int, int] | None:
    """(block_n, block_k, splits) for a [K, N] weight, or None if the tiles do not fit.

    `block_n` is the largest power of two up to `tiles.block_n` that divides N (at least
    16: Llama 3's vocabulary of 128,256 = 501 x 256 takes 256 where 512 is asked for).
    `splits` is the smallest power of two that brings (N / block_n) * splits up to
    `tiles.programs`, as long as every split keeps a whole number of at least
    `tiles.min_steps` steps of `block_k` rows.
    """
    tiles = tiles or TILES
    block_n = 1 << (min(tiles.block_n, n).bit_length() - 1)  # a power of two <= both
    while n % block_n:
        block_n //= 2
    if block_n < 16 or k % tiles.block_k:
        return None
    splits = 1
    step = tiles.block_k * tiles.min_steps
    while (n // block_n) * splits < tiles.programs and k % (2 * splits * step) == 0:
        splits *= 2
    return block_n, tiles.block_k, splits


def fits(k: int, n: int) -> bool:
    """Whether a [K, N] weight's one-row products can go to `int8_matmul`."""
    return ONE_ROW == "xla8" or plan(k, n) is not None


def wanted() -> bool:
    """Whether one-row products go to `int8_matmul`: JAX runs on exactly one GPU."""
    return jax.default_backend() == "gpu" and jax.device_count() == 1


def _body(x_ref, w_ref, s_ref, o_ref, *, block_k: int):
    """One program: o[0, tile] = (x[0, slice] @ values[slice, tile]) * scale[tile]."""
    block_n = w_ref.shape[1]

    def step(i, acc):
        at = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        w = w_ref[at, :].astype(jnp.float32)  # converted in registers
        return acc + x_ref[0, at].astype(jnp.float32)[:, None] * w  # summed over K at the end

    zero = jnp.zeros((block_k, block_n), jnp.float32)
    acc = jax.lax.fori_loop(0, w_ref.shape[0] // block_k, step, zero)
    o_ref[0, :] = jnp.sum(acc, axis=0) * s_ref[...]


def scaled_products(x, values, scale, *, tiles: Tiles | None = None, interpret: bool = False):
    """[splits, N] float32: (x @ values) * scale for x [1, K], one row per slice of K."""
    tiles = tiles or TILES
    (_, k), n = x.shape, values.shape[1]
    block_n, block_k, splits = plan(k, n, tiles)
    part = k // splits
    return pl.pallas_call(
        functools.partial(_body, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        grid=(n // block_n, splits),
        in_specs=[
            pl.BlockSpec((1, part), lambda j, s: (0, s)),
            pl.BlockSpec((part, block_n), lambda j, s: (s, j)),
            pl.BlockSpec((block_n,), lambda j, s: (j,)),
        ],
        out_specs=pl.BlockSpec((1, block_n), lambda j, s: (s, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=interpret,
        name="llama_jax_int8_matmul",
    )(x, values, scale)


def _kernel(x, values, scale, *, tiles: Tiles | None = None, interpret: bool = False):
    parts = scaled_products(x, values, scale, tiles=tiles, interpret=interpret)
    return parts.sum(axis=0, keepdims=True)  # [1, N]; one split is a reshape


def _one_row(x, values, scale):
    """int8_matmul on CUDA: the ONE_ROW way."""
    if ONE_ROW == "xla8":
        return _xla(jnp.pad(x, ((0, 8 - x.shape[0]), (0, 0))), values, scale)[: x.shape[0]]
    return _kernel(x, values, scale)


def _xla(x, values, scale):
    """XLA's product, as `Int8Weight` computes it without a kernel (other GPU platforms)."""
    y = jnp.dot(x, values.astype(x.dtype), preferred_element_type=jnp.float32)
    return y * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, interpret: bool = False):
    """(x @ values) * scale in float32: on CUDA the `ONE_ROW` way, elsewhere XLA's product.

    Args:
      x: [1, K] (bfloat16 or float32).
      values: [K, N] int8 weight (for the kernel, one whose shape `plan` accepts).
      scale: [N] float32 per-output-channel scales.
      interpret: run the kernel in Pallas's interpreter (tests on the CPU).
    Returns:
      [1, N] float32. Differentiable in x and scale (the int8 values get no gradient).
    """
    if interpret:
        return _kernel(x, values, scale, interpret=True)
    return jax.lax.platform_dependent(x, values, scale, cuda=_one_row, default=_xla)


def _fwd(x, values, scale, interpret):
    return int8_matmul(x, values, scale, interpret), (x, values, scale)


def _bwd(interpret, res, g):
    return int8_cpu._bwd(res, g)


int8_matmul.defvjp(_fwd, _bwd)
