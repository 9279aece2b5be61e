"""Fused attention kernels, opt-in by name: `Transformer(cfg, attention="cudnn")`.

The model's own attention (`llama_jax.model.attention.attend`) is the reference: plain
einsums and a softmax that run on every backend. A fused kernel computes the same
function without materialising the [T, S] scores, which is what lets long training
sequences fit in memory. Each kernel takes the reference's arguments and layouts.

    cudnn   cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
            bfloat16/float16; plain causal or masked)
    splash  The TPU path, two Pallas kernels. Without a mask (training, unpadded
            prefill): splash attention (jax.experimental.pallas.ops.tpu), causal.
            Decoding from a KV cache (a mask, at most RAGGED_MAX_QUERIES new tokens):
            `ragged_decode_attention` below, which reads only the cache blocks that
            hold attended slots. Other masked calls (padded prefill) go to the
            reference. Off TPUs both kernels run in Pallas interpret mode: correct,
            slow, for tests. Under a mesh each device runs them on its own rows and
            heads (`per_shard`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from llama_jax.errors import LlamaError

NAMES = ("cudnn", "splash")

# splash attention works on blocks of 128 query and key positions (the TPU's lane width);
# sequences are padded up to a multiple of it.
SPLASH_BLOCK = 128
LANES = 128

# The ragged decode kernel reads the cache in blocks of one of these sizes (the largest
# that divides the cache's slots); it serves calls of at most RAGGED_MAX_QUERIES new
# tokens per row: decoding (1) and speculative verification (the drafts plus one).
RAGGED_BLOCKS = (512, 256, 128)
RAGGED_MAX_QUERIES = 16


def attention(name: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None):
    """Attention by kernel `name`, with `attend`'s arguments.

    Args:
      name: the kernel ("cudnn" or "splash").
      q: [B, T, N, H] queries; k, v: [B, K, S, H] keys and values.
      mask: [B, T, S] bool (True = may attend), or None for plain causal attention.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if name == "cudnn":
        return cudnn_attention(q, k, v, mask)
    if name == "splash":
        return per_shard(splash_attention, q, k, v, mask)
    raise LlamaError(f"attention kernel {name!r} is not one of: {', '.join(NAMES)}.")


def per_shard(fn, q, k, v, mask):
    """`fn(q, k, v, mask)` on each device's rows and heads when a mesh is in context.

    A Pallas TPU kernel is one custom call that XLA cannot split: under a mesh its
    inputs would be gathered whole onto every device. Attention is independent per row
    and per KV head, so `jax.shard_map` runs the kernel on the rows and heads each device
    holds (as the rules table lays them out: batch over data and fsdp, heads over
    tensor), with no communication. With fewer KV heads than the tensor axis (Llama 3's
    8 on 16 devices) the KV heads are held whole (the rules replicate them) and each
    device takes the one KV head its query heads use.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, mask)
    from jax.sharding import PartitionSpec as P

    from llama_jax.sharding.rules import logical_to_spec

    def spec(axes, shape):
        got = tuple(logical_to_spec(axes, shape, mesh))
        return got + (None,) * (len(shape) - len(got))

    rows, _, heads, _ = spec(("batch", None, "act_heads", None), q.shape)
    _, kv_heads, _, _ = spec(("batch", "act_kv_heads", None, None), k.shape)
    K = k.shape[1]
    axes = (heads,) if isinstance(heads, str) else (heads or ())
    n = math.prod(mesh.shape[a] for a in axes)  # devices the query heads are split over
    one_kv_head = heads is not None and kv_heads is None
    if one_kv_head and n % K:  # validate() refuses such meshes; keep the heads whole
        heads, one_kv_head = None, False

    def call(q, k, v, *mask):
        if one_kv_head:  # the KV head this device's query heads use
            kv = jax.lax.axis_index(heads) * K // n
            k, v = (jax.lax.dynamic_slice_in_dim(x, kv, 1, axis=1) for x in (k, v))
        return fn(q, k, v, *mask) if mask else fn(q, k, v, None)

    q_spec, kv_spec = P(rows, None, heads, None), P(rows, kv_heads, None, None)
    specs = (q_spec, kv_spec, kv_spec) + (() if mask is None else (P(rows, None, None),))
    args = (q, k, v) + (() if mask is None else (mask,))
    return jax.shard_map(call, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def cudnn_attention(q, k, v, mask):
    """cuDNN's fused attention; GQA natively (K KV heads serve N query heads)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise LlamaError(
            f"the cudnn attention kernel runs in bfloat16 or float16; this model computes in "
            f"{q.dtype}. Use a bfloat16 config (dtype='bfloat16') or attention='xla'."
        )
    return dot_product_attention(q, k, v, mask, implementation="cudnn")


def dot_product_attention(q, k, v, mask, implementation: str):
    """`jax.nn.dot_product_attention` on `attend`'s layouts.

    Args:
      q: [B, T, N, H]; k, v: [B, K, S, H]; mask: [B, T, S] bool or None (causal).
      implementation: "cudnn" (the fused kernel) or "xla" (jax's own reference, which
        lets the layout handling be tested on any backend).
    Returns:
      [B, T, N, H].
    """
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, H]
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], implementation=implementation
    )  # mask [B, 1, T, S]: the same for every head


def splash_attention(q, k, v, mask, *, interpret: bool | None = None):
    """Pallas splash attention (causal); masked or cached attention falls back to `attend`.

    GQA: the kernel's multi-head form takes N query heads over K KV heads and gives
    query head n the KV head n // (N / K), the grouping `attend` uses.

    Args:
      q: [B, T, N, H]; k, v: [B, K, S, H]; mask: [B, T, S] bool or None (causal, S = T).
      interpret: run the kernel in Pallas interpret mode; default: unless on a TPU.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if mask is not None:
        # Splash's masks are static per head, not per row: decoding goes to the ragged
        # kernel, padded prefill to the reference.
        if ragged_decode_fits(q, k):
            return ragged_decode_attention(q, k, v, mask, interpret=interpret)
        from llama_jax.model.attention import attend

        return attend(q, k, v, mask)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    B, T, N, H = q.shape
    padded = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK
    kernel = _splash_kernel(N, padded, interpret)
    # Keys past T are padding; causality already hides them from every real query.
    pad = ((0, 0), (0, 0), (0, padded - T), (0, 0))
    q = jnp.pad((q * H**-0.5).astype(q.dtype).transpose(0, 2, 1, 3), pad)  # [B, N, T', H]
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)  # [B, K, T', H]
    out = jax.vmap(kernel)(q, k, v)  # [B, N, T', H]; the kernel has no batch axis
    return out[:, :, :T].transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, N, H]


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * heads)
    # The kernel keeps its mask tables as arrays: make them constants, not values of
    # whichever jit first asked for this kernel.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


# --------------------------------------------------------------------------- ragged decode


def ragged_decode_fits(q: jax.Array, k: jax.Array) -> bool:
    """Whether `ragged_decode_attention` takes these shapes (else the reference does)."""
    T, H, S = q.shape[1], q.shape[3], k.shape[2]
    blocks_fit = any(S % b == 0 for b in RAGGED_BLOCKS)
    return T <= RAGGED_MAX_QUERIES and blocks_fit and (H < LANES or H % LANES == 0)


def ragged_decode_attention(q, k, v, mask, *, interpret: bool | None = None):
    """`attend` over a KV cache that reads only the blocks of slots the mask attends to.

    A static cache has S slots but a row attends to the slots between its first prompt
    token and the newest one; the rest are left padding or not written yet. The
    reference reads all S slots at every step. This Pallas kernel (TPU) walks the cache
    in blocks per (row, KV head): a block outside the row's attended range is neither
    computed nor fetched (its block index is that of the nearest attended block, the
    same as the step beside it, so the pipeline issues no copy). Inside the range the
    mask is applied slot by slot, so any mask gives the reference's result (holes
    included), with an online softmax in float32.

    The caches of `jax.experimental.pallas.ops.tpu`'s paged and ragged-paged attention
    are [KV heads, pages, ...] or keys and values interleaved: using them would copy
    this model's [B, K, S, H] cache at every step, so the kernel reads it where it lies.

    Gradients (unusual here: this is a decoding kernel) are the reference's.

    Args:
      q: [B, T, N, H] queries, T <= RAGGED_MAX_QUERIES; k, v: [B, K, S, H], S a
        multiple of one of RAGGED_BLOCKS; H below 128 or a multiple of it.
      mask: [B, T, S] bool, True = may attend.
      interpret: run in Pallas interpret mode; default: unless on a TPU.
    Returns:
      [B, T, N, H] in q's dtype. A row that may attend to nothing gets zeros (the
      reference gives it uniform weights; either way such a row is padding).
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    return _ragged(q, k, v, mask, interpret)


def _ragged_forward(q, k, v, mask, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    R = G * T  # query rows per KV head: row g * T + t is query head k * G + g at token t
    block = next(b for b in RAGGED_BLOCKS if S % b == 0)
    qr = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, R, H)
    keep = jnp.broadcast_to(mask[:, None], (B, G, T, S)).reshape(B, R, S).astype(jnp.float32)
    # Each row's first and last block holding an attended slot (first > last: none).
    attended = mask.any(axis=1)  # [B, S]
    slot = jnp.arange(S, dtype=jnp.int32)
    first = (jnp.min(jnp.where(attended, slot, S), axis=1) // block).astype(jnp.int32)
    last = (jnp.max(jnp.where(attended, slot, 0), axis=1) // block).astype(jnp.int32)

    sq = pl.squeezed
    rows = pl.BlockSpec((sq, sq, R, H), lambda b, h, i, f, l: (b, h, 0, 0))  # q and the output
    slots = pl.BlockSpec(  # keys and values
        (sq, sq, block, H), lambda b, h, i, f, l: (b, h, _block_in_range(i, f, l, b), 0)
    )
    keep_block = pl.BlockSpec(
        (sq, R, block), lambda b, h, i, f, l: (b, 0, _block_in_range(i, f, l, b))
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, K, S // block),
        in_specs=[rows, slots, slots, keep_block],
        out_specs=rows,
        scratch_shapes=[
            pltpu.VMEM((R, LANES), jnp.float32),  # running max, repeated over the lanes
            pltpu.VMEM((R, LANES), jnp.float32),  # running softmax denominator
            pltpu.VMEM((R, H), jnp.float32),  # running output
        ],
    )
    out = pl.pallas_call(
        _ragged_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, K, R, H), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(first, last, qr, k, v, keep)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _block_in_range(i, first, last, b):
    """Block i of row b, or the nearest of its attended blocks first[b] .. last[b]."""
    return jnp.minimum(jnp.maximum(i, first[b]), last[b])


def _ragged_kernel(
    first_ref, last_ref, q_ref, k_ref, v_ref, keep_ref, o_ref, m_ref, l_ref, acc_ref
):
    """One (row, KV head, block of slots) step of the online softmax over the cache."""
    from jax.experimental import pallas as pl

    b, i = pl.program_id(0), pl.program_id(2)
    H, block = q_ref.shape[-1], k_ref.shape[0]

    @pl.when(i == 0)
    def _start():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((i >= first_ref[b]) & (i <= last_ref[b]))
    def _block():
        nt = (((1,), (1,)), ((), ()))  # q [R, H] x k [block, H] -> [R, block]
        s = jax.lax.dot_general(q_ref[...], k_ref[...], nt, preferred_element_type=jnp.float32)
        s = jnp.where(keep_ref[...] > 0, s * H**-0.5, jnp.finfo(jnp.float32).min)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [R, LANES]
        p = jnp.exp(s - jnp.tile(m_next, (1, block // LANES)))
        alpha = jnp.exp(m_prev - m_next)  # rescales what earlier blocks summed
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1)[:, None]
        m_ref[...] = m_next
        pv = jax.lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_ref[...] = _to_width(alpha, H) * acc_ref[...] + pv

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        l = l_ref[...]
        inv = _to_width(jnp.where(l == 0.0, 1.0, 1.0 / l), H)
        o_ref[...] = (acc_ref[...] * inv).astype(o_ref.dtype)


def _to_width(x, width: int):
    """[R, LANES] (every lane equal) as [R, width]."""
    return x[:, :width] if width < LANES else jnp.tile(x, (1, width // LANES))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ragged(q, k, v, mask, interpret):
    return _ragged_forward(q, k, v, mask, interpret)


def _ragged_fwd(q, k, v, mask, interpret):
    return _ragged_forward(q, k, v, mask, interpret), (q, k, v, mask)


def _ragged_bwd(interpret, res, g):
    from llama_jax.model.attention import attend

    q, k, v, mask = res
    _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    return (*vjp(g), None)


_ragged.defvjp(_ragged_fwd, _ragged_bwd)
