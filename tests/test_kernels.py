"""The opt-in attention kernels (llama_jax.kernels) against the reference `attend`.

The cuDNN kernel needs an NVIDIA GPU; its layout handling is tested on the CPU by sending
the same arrays through `jax.nn.dot_product_attention`'s XLA implementation (jax's code,
not ours). The TPU kernels (splash, ragged decode) run here in Pallas interpret mode:
the real kernel bodies, interpreted on the CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import kernels
from llama_jax.model.attention import attend


def qkv(B, T, S, N, K, H, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, K, S, H), dtype)
    v = jax.random.normal(kv, (B, K, S, H), dtype)
    return q, k, v


def padded_causal(B, T, S, start, lengths):
    """The mask Transformer builds: causal from slot `start`, left padding per row."""
    key_valid = np.arange(S)[None, :] >= (start + T - np.asarray(lengths))[:, None]  # [B, S]
    causal = np.arange(S)[None, :] <= start + np.arange(T)[:, None]  # [T, S]
    return jnp.asarray(causal[None] & key_valid[:, None, :])  # [B, T, S]


# --------------------------------------------------------------------------- cudnn layout


@pytest.mark.parametrize("N, K", [(4, 4), (4, 2), (6, 1)])
def test_cudnn_layout_through_jax_reference_matches_attend(N, K):
    q, k, v = qkv(2, 9, 9, N, K, 16)
    want = attend(q, k, v, None)
    got = kernels.dot_product_attention(q, k, v, None, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Padded rows over a cache: query t sits in slot 3 + t of 16 (T != S).
    q, k, v = qkv(2, 5, 16, N, K, 16, seed=1)
    mask = padded_causal(2, 5, 16, start=3, lengths=[8, 5])
    want = attend(q, k, v, mask)
    got = kernels.dot_product_attention(q, k, v, mask, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cudnn_refuses_float32_and_unknown_kernels_are_refused():
    q, k, v = qkv(1, 4, 4, 2, 1, 8)
    with pytest.raises(lj.LlamaError, match="bfloat16"):
        kernels.attention("cudnn", q, k, v, None)
    with pytest.raises(lj.LlamaError, match="splash"):
        kernels.attention("flash", q, k, v, None)
    with pytest.raises(lj.LlamaError, match="splash"):
        lj.Transformer(lj.PRESETS["tiny"], rngs=__import__("flax").nnx.Rngs(0), attention="x")


# --------------------------------------------------------------------------- splash


@pytest.mark.parametrize("T, N, K, H", [(128, 4, 2, 64), (20, 4, 4, 32), (140, 3, 1, 16)])
def test_splash_in_interpret_mode_matches_attend(T, N, K, H):
    # GQA, MHA and MQA; lengths below, at and above the 128-position block.
    q, k, v = qkv(2, T, T, N, K, H, seed=T)
    want = attend(q, k, v, None)
    got = kernels.splash_attention(q, k, v, None, interpret=True)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_splash_bfloat16_and_gradients():
    q, k, v = qkv(1, 64, 64, 4, 2, 32, seed=5)
    got = kernels.splash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), attend(q, k, v, None), atol=5e-2)
    # Training differentiates through the kernel (its own backward kernels).
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
    want = jax.grad(loss(lambda *a: attend(*a, None)), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(lambda *a: kernels.splash_attention(*a, None)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_splash_with_a_mask_the_kernel_cannot_take_is_the_reference():
    q, k, v = qkv(2, 5, 16, 4, 2, 16, seed=2)  # 16 slots: no block of the ragged kernel
    mask = padded_causal(2, 5, 16, start=3, lengths=[8, 5])
    got = kernels.attention("splash", q, k, v, mask)
    np.testing.assert_array_equal(got, attend(q, k, v, mask))
    q, k, v = qkv(1, 40, 128, 4, 2, 16, seed=2)  # 40 new tokens: a padded prefill
    mask = padded_causal(1, 40, 128, start=0, lengths=[30])
    np.testing.assert_array_equal(kernels.attention("splash", q, k, v, mask), attend(q, k, v, mask))


# --------------------------------------------------------------------------- ragged decode


@pytest.mark.parametrize(
    "B, T, S, N, K, H, start, lengths",
    [
        (2, 1, 256, 4, 2, 64, 150, [151, 20]),  # GQA; row 1 attends to block 1 only
        (3, 1, 128, 4, 4, 128, 5, [6, 3, 1]),  # MHA, one block, head dim of 128
        (2, 3, 384, 6, 2, 64, 300, [303, 3]),  # three new tokens (speculative verification)
        (1, 1, 1024, 2, 1, 32, 600, [601]),  # blocks of 512
    ],
)
def test_ragged_decode_in_interpret_mode_matches_attend(B, T, S, N, K, H, start, lengths):
    q, k, v = qkv(B, T, S, N, K, H, seed=3)
    mask = padded_causal(B, T, S, start, lengths)
    assert kernels.ragged_decode_fits(q, k)
    got = kernels.attention("splash", q, k, v, mask)  # the splash path's decoding kernel
    np.testing.assert_allclose(got, attend(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_ragged_decode_follows_the_mask_inside_the_range_and_skips_blocks_outside():
    B, T, S, N, K, H = 2, 2, 384, 4, 2, 64
    q, k, v = qkv(B, T, S, N, K, H, seed=4)
    mask = np.array(padded_causal(B, T, S, start=260, lengths=[262, 10]))
    mask[0, :, 40:170] = False  # a hole across block 0 and 1: slots no query may see
    mask[1, 1, 255] = False  # one query's own mask differs from its row's other query
    mask = jnp.asarray(mask)
    want = attend(q, k, v, mask)
    # Row 1 attends to slots 252..261 (blocks 1 and 2): poison its block 0. The
    # reference multiplies it by zero weights and gets NaN; the kernel never reads it.
    k = k.at[1, :, :128].set(jnp.nan)
    v = v.at[1, :, :128].set(jnp.nan)
    got = kernels.ragged_decode_attention(q, k, v, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A skipped block's index repeats its neighbour's, so the pipeline fetches nothing.
    first, last = jnp.array([0, 1]), jnp.array([2, 2])
    blocks = [[int(kernels._block_in_range(i, first, last, b)) for i in range(3)] for b in (0, 1)]
    assert blocks == [[0, 1, 2], [1, 1, 2]]


def test_ragged_decode_bfloat16_and_gradients():
    q, k, v = qkv(2, 1, 256, 4, 2, 64, seed=5)
    mask = padded_causal(2, 1, 256, start=200, lengths=[201, 90])
    b16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = kernels.ragged_decode_attention(*b16, mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        got.astype(jnp.float32), attend(*b16, mask).astype(jnp.float32), atol=2e-2
    )

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))

    got = jax.grad(loss(lambda *a: kernels.ragged_decode_attention(*a, mask)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda *a: attend(*a, mask)), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_model_with_splash_attention_matches_the_reference_model():
    cfg = lj.PRESETS["tiny"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    ref = lj.build_model(cfg, seed=1)
    fused = lj.build_model(cfg, seed=1, attention="splash")
    np.testing.assert_allclose(fused(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
    # Padded prefill (the reference path), then decoding through the ragged kernel.
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    want = list(lj.generate(ref, prompts, 8))
    assert list(lj.generate(fused, prompts, 8)) == want
    # Speculative verification: 5 new tokens per row against the cache, same kernel.
    draft = lj.draft_from_layers(ref, 1)
    assert list(lj.speculative_generate(fused, draft, prompts, 8, speculate_k=4)) == want
    cache = fused.init_cache(2, 128)
    _, cache = fused(tokens, cache=cache)
    step = jax.make_jaxpr(lambda t, c: fused(t, cache=c))(tokens[:, :1], cache)
    assert "pallas_call" in str(step)


def test_tpu_kernels_lower_for_a_tpu():
    """Both TPU kernels pass Pallas's TPU lowering (block shapes, scalar prefetch), exported
    from this CPU; only a TPU can compile and run the result."""
    q, k, v = qkv(2, 1, 1024, 32, 8, 128, dtype=jnp.bfloat16)
    mask = padded_causal(2, 1, 1024, start=700, lengths=[701, 30])
    ragged = jax.jit(lambda *a: kernels.ragged_decode_attention(*a, interpret=False))
    splash = jax.jit(lambda q, k, v: kernels.splash_attention(q, k, v, None, interpret=False))
    for fn, args in ((ragged, (q, k, v, mask)), (splash, qkv(1, 256, 256, 4, 2, 128))):
        exported = jax.export.export(fn, platforms=["tpu"])(*args)
        assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize(
    "kv_heads, mesh_name",
    [(2, "fsdp_tp"), (2, "tp"), (1, "fsdp_tp")],  # KV heads split; 2 on 8 devices; MQA
)
def test_splash_under_a_mesh_runs_per_shard_and_matches_one_device(kv_heads, mesh_name):
    from llama_jax import sharding as sh

    cfg = lj.LlamaConfig(
        dim=64, n_layers=2, n_heads=8, n_kv_heads=kv_heads, vocab_size=128, ffn_dim=128
    )
    prompts = [[3, 1, 4, 1, 5], [9, 2], [7], [5] * 9]
    want = lj.generate(lj.build_model(cfg, seed=1), prompts, 5)
    mesh = sh.make_mesh(mesh_name)
    fused = lj.build_model(cfg, seed=1, mesh=mesh, attention="splash")
    assert list(lj.generate(fused, prompts, 5)) == list(want)
    # Each device runs the kernel on its own rows and heads: no gathered custom call.
    tokens = jnp.ones((4, 1), jnp.int32)
    with jax.set_mesh(mesh):
        cache = fused.init_cache(4, 128)
        step = str(jax.make_jaxpr(lambda t, c: fused(t, cache=c))(tokens, cache))
    assert "shard_map" in step and "pallas_call" in step


def test_splash_training_gradients_under_a_mesh_match_one_device():
    from flax import nnx

    from llama_jax import sharding as sh

    cfg = lj.LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, ffn_dim=128)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 24)))

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(tokens))[..., 3])

    want = nnx.to_pure_dict(nnx.grad(loss)(lj.build_model(cfg, seed=1)))
    mesh = sh.make_mesh("fsdp_tp")
    fused = lj.build_model(cfg, seed=1, mesh=mesh, attention="splash")
    with jax.set_mesh(mesh):
        got = nnx.to_pure_dict(nnx.grad(loss)(fused))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
