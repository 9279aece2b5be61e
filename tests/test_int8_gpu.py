"""One-row int8 products on a single GPU (llama_jax.inference.int8_gpu), checked without a GPU.

Its arithmetic runs in Pallas's interpreter against float64 products; its Triton
lowering is exercised by exporting jitted functions for the "cuda" platform, which
lowers every Pallas call to the Triton custom call a GPU would run; and `Int8Weight`'s
choice (the kernel, or XLA's eight-row product) is read from an exported decode step.
Speed is measured on a GPU by benchmarks/gpu_int8.py, not here.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_jax as lj
from llama_jax.inference import int8, int8_cpu, int8_gpu
from llama_jax.inference.int8_gpu import Tiles

TRITON = "__gpu$xla.gpu.triton"
CUDA_OK = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]


def reference(x, values, scale):
    """(x @ values) * scale in float64."""
    return np.asarray(x, np.float64) @ np.asarray(values, np.float64) * np.asarray(scale)


def random_product(rng, k, n, dtype=jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((1, k)), dtype)
    values = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
    return x, values, scale


def triton_calls(exported) -> list[tuple[int, int]]:
    """(grid_x, grid_y) of every Triton kernel launch in an exported module."""
    text = exported.mlir_module()
    pattern = r"custom_call @__gpu\$xla\.gpu\.triton\(.*?grid_x = (\d+).*?grid_y = (\d+)"
    calls = re.findall(pattern, text)
    return [(int(x), int(y)) for x, y in calls]


@settings(max_examples=12, deadline=None)
@given(
    k_steps=st.integers(1, 6),
    n_blocks=st.integers(1, 4),
    block_n=st.sampled_from([16, 32, 64]),
    block_k=st.sampled_from([32, 64, 128]),
    programs=st.sampled_from([1, 8, 64]),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float32]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_float64_product(k_steps, n_blocks, block_n, block_k, programs, dtype, seed):
    tiles = Tiles(block_n=block_n, block_k=block_k, programs=programs)
    k, n = k_steps * block_k, n_blocks * block_n
    x, values, scale = random_product(np.random.default_rng(seed), k, n, dtype)
    y = int8_gpu._kernel(x, values, scale, tiles=tiles, interpret=True)
    assert y.shape == (1, n) and y.dtype == jnp.float32
    ref = reference(x, values, scale)
    assert np.linalg.norm(np.asarray(y) - ref) <= 1e-5 * np.linalg.norm(ref)


def test_plan_splits_k_until_the_programs_are_reached():
    tiles = Tiles(block_n=64, block_k=128, programs=132)
    assert int8_gpu.plan(2048, 8192, tiles) == (64, 128, 2)  # 128 programs x 2 >= 132
    assert int8_gpu.plan(2048, 512, tiles) == (64, 128, 16)  # 8 x 16: K allows no more
    assert int8_gpu.plan(3072, 1024, tiles) == (64, 128, 8)  # 3072 = 8 x 3 x 128
    assert int8_gpu.plan(4096, 128256, tiles) == (64, 128, 1)
    # min_steps keeps every split at least that many block_k steps long
    assert int8_gpu.plan(2048, 512, dataclasses.replace(tiles, min_steps=4)) == (64, 128, 4)
    # tiles that do not divide the weight: no plan (the product stays with XLA)
    assert int8_gpu.plan(2048, 100, tiles) is None
    assert int8_gpu.plan(200, 512, tiles) is None
    # wide tiles narrow to the largest power of two dividing N
    assert int8_gpu.plan(4096, 128256, Tiles(block_n=512, block_k=32)) == (256, 32, 1)
    assert int8_gpu.plan(2048, 96, Tiles(block_n=512, block_k=32))[0] == 32


def test_gradients_equal_the_xla_product_gradients():
    x, values, scale = random_product(np.random.default_rng(1), 256, 128, jnp.float32)
    g = jnp.asarray(np.random.default_rng(2).standard_normal((1, 128)), jnp.float32)

    def loss(f):
        return lambda x, s: jnp.sum(f(x, values, s) * g)

    ours = jax.grad(loss(lambda x, v, s: int8_gpu.int8_matmul(x, v, s, True)), (0, 1))(x, scale)
    xla = jax.grad(loss(int8_cpu._reference), (0, 1))(x, scale)
    for a, b in zip(ours, xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_off_cuda_the_product_is_xlas():
    """Lowered for any platform but CUDA (here the CPU), int8_matmul is XLA's product."""
    x, values, scale = random_product(np.random.default_rng(3), 256, 128, jnp.float32)
    y = jax.jit(int8_gpu.int8_matmul)(x, values, scale)
    exported = jax.export.export(jax.jit(int8_gpu.int8_matmul), platforms=["cpu"])(x, values, scale)
    assert triton_calls(exported) == []
    ref = reference(x, values, scale)
    assert np.linalg.norm(np.asarray(y) - ref) <= 1e-5 * np.linalg.norm(ref)


@pytest.mark.parametrize(
    "k, n", [(2048, 2048), (2048, 512), (8192, 2048), (3072, 8192), (4096, 14336), (4096, 128256)]
)
def test_lowers_to_one_triton_kernel_for_model_shapes(monkeypatch, k, n):
    """The shapes of llama3.2-1b, 3.2-3b and 3.1-8b projections lower for a GPU."""
    monkeypatch.setattr(int8_gpu, "ONE_ROW", "kernel")
    args = (
        jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((k, n), jnp.int8),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    exported = jax.export.export(
        jax.jit(int8_gpu.int8_matmul), platforms=["cuda"], disabled_checks=CUDA_OK
    )(*args)
    block_n, _, splits = int8_gpu.plan(k, n)
    assert triton_calls(exported) == [(n // block_n, splits)]
    assert exported.out_avals[0].shape == (1, n)


@pytest.fixture(autouse=True)
def fresh_traces():
    """ONE_ROW is read when a function is traced: no test reuses another's traces."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def eight_row_dots(exported) -> int:
    """How many dot_generals in an exported module multiply an 8-row left operand."""
    return len(re.findall(r"stablehlo\.dot_general[^\n]*: \(tensor<8x", exported.mlir_module()))


def test_by_default_a_one_row_product_is_xlas_eight_row_product():
    """ONE_ROW "xla8": no kernel; the row goes to XLA padded to eight rows, same result."""
    assert int8_gpu.ONE_ROW == "xla8"
    x, values, scale = random_product(np.random.default_rng(4), 2048, 512)
    exported = jax.export.export(
        jax.jit(int8_gpu.int8_matmul), platforms=["cuda"], disabled_checks=CUDA_OK
    )(x, values, scale)
    assert triton_calls(exported) == [] and eight_row_dots(exported) == 1
    assert exported.out_avals[0].shape == (1, 512)
    y = int8_gpu._one_row(x, values, scale)  # the CUDA branch, run here on the CPU
    ref = reference(x, values, scale)
    assert y.shape == (1, 512)
    assert np.linalg.norm(np.asarray(y) - ref) <= 1e-5 * np.linalg.norm(ref)


CFG = lj.LlamaConfig(
    dim=256,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=512,
    ffn_dim=512,
    max_seq_len=64,
    tie_word_embeddings=False,
    dtype="bfloat16",
    param_dtype="bfloat16",
)


@pytest.mark.parametrize("one_row", ["kernel", "xla8"])
@pytest.mark.parametrize("batch, expected", [(1, 7 * 2 + 1), (2, 0)])
def test_a_one_gpu_decode_step_sends_every_projection_one_way(
    monkeypatch, one_row, batch, expected
):
    """On one GPU, every projection of a batch-1 step (and the untied output) is the
    kernel, or an eight-row product; at batch 2 none is."""
    monkeypatch.setattr(int8_gpu, "ONE_ROW", one_row)
    monkeypatch.setattr(int8_gpu, "wanted", lambda: True)
    monkeypatch.setattr(int8_cpu, "wanted", lambda: False)
    model = int8.quantize(lj.build_model(CFG, seed=0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    exported = jax.export.export(forward, platforms=["cuda"], disabled_checks=CUDA_OK)(
        state, tokens
    )
    kernels, padded = len(triton_calls(exported)), eight_row_dots(exported)
    assert (kernels, padded) == ((expected, 0) if one_row == "kernel" else (0, expected))


def test_on_one_gpu_the_kernel_gives_the_xla_products(monkeypatch):
    """The model's forward with the kernel (interpreted) equals it with XLA's products."""
    model = int8.quantize(lj.build_model(CFG, seed=0))
    tokens = jnp.asarray([[5]], jnp.int32)
    monkeypatch.setattr(int8_cpu, "wanted", lambda: False)
    xla = np.asarray(model(tokens), np.float32)
    monkeypatch.setattr(int8_gpu, "wanted", lambda: True)
    kernel = int8_gpu.int8_matmul
    monkeypatch.setattr(int8_gpu, "int8_matmul", lambda x, v, s: kernel(x, v, s, True))
    ours = np.asarray(model(tokens), np.float32)
    np.testing.assert_allclose(ours, xla, rtol=2e-2, atol=2e-2)
