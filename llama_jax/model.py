"""The LLaMA transformer in Flax NNX, written to be read beside Meta's llama/model.py.

Dimension letters, used in every einsum and shape comment of the package:

    B batch          T query length      S key length (cache slots when decoding)
    D model width    F MLP width         V vocabulary
    N query heads    K key/value heads   G = N / K query heads per KV head
    H head dim       L layers

Parameter names are Meta's checkpoint keys (tok_embeddings, layers.attention.wq, ...,
norm, output). Matrices are stored input-first, shaped for their einsum: wq is [D, N, H]
where Meta's `wq.weight` is [N * H, D]. The L blocks are stored stacked, every block
parameter with a leading [L] axis, and run with `jax.lax.scan`, so compile time does not
grow with depth. `unstack_layers` gives the inference layout: separate blocks, and on the
CPU bfloat16 matrices stored output-first (the modules' `transposed` flag).

Numerics: parameters are stored in `cfg.param_dtype`, matmuls run in `cfg.dtype` with
float32 accumulation, and RMSNorm, rotary embedding, softmax and the logits are computed
in float32 (on the CPU a bfloat16 model also attends in float32: `attention_dtype`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import sharding
from llama_jax.attention import Attention, KVCache
from llama_jax.config import LlamaConfig
from llama_jax.layers import (
    INIT_STD,
    FeedForward,
    RMSNorm,
    dense,
    dtype_of,
    inference_layout,
    rope_frequencies,
)
from llama_jax.sharding import constrain

# Rematerialisation policies for the layer scan, by name (training trades compute for
# activation memory; inference uses "none").
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """One pre-norm transformer block: x + attention(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs=rngs)
        self.feed_forward = FeedForward(cfg, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype)

    def __call__(self, x, positions, inv_freq, mask, kv=None):
        """x: [B, T, D] -> ([B, T, D], updated cache or None); see Attention for the rest."""
        attn, kv = self.attention(self.attention_norm(x), positions, inv_freq, mask, kv)
        h = x + attn
        out = h + self.feed_forward(self.ffn_norm(h))
        return constrain(out, ("batch", "length", "act_embed")), kv


class Transformer(nnx.Module):
    """A LLaMA model: token embedding, L blocks, a final RMSNorm and the output projection.

    Call it on int32 token ids [B, T] to get float32 logits [B, T, V]:

        model = Transformer(PRESETS["tiny"], rngs=nnx.Rngs(0))
        logits = model(jnp.array([[1, 2, 3]]))      # [1, 3, 256]
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            from llama_jax.errors import LlamaError

            raise LlamaError(f"remat={remat!r} is not one of {sorted(REMAT_POLICIES)}.")
        self.cfg = cfg
        self.remat = remat
        pdt = dtype_of(cfg.param_dtype)
        init = nnx.initializers.normal(INIT_STD)
        self.tok_embeddings = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.dim), pdt))

        # L blocks created at once with a leading [L] axis on every parameter.
        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.layers = make_blocks(rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.output = nnx.Param(init(rngs.params(), (cfg.dim, cfg.vocab_size), pdt))
        # True when `output` is stored [V, D] (the inference layout of unstack_layers).
        self.transposed = False

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
        """An empty KVCache in the form that suits this model's layers.

        Stacked [L, B, K, S, H] arrays for the layer scan; per-layer arrays when the blocks
        are separate (after `unstack_layers`). Either form works with either model, the
        other one at the price of extra copies on every call.

        Args:
          batch: B, the number of rows.
          max_len: S, the number of slots (prompt plus generated tokens).
          dtype: the cache's dtype; default as `KVCache.create`.
        """
        per_layer = isinstance(self.layers, nnx.List)
        return KVCache.create(self.cfg, batch, max_len, dtype, per_layer=per_layer)

    def output_matrix(self) -> jax.Array:
        """[D, V]: the output projection, or the token embedding transposed when tied."""
        if self.cfg.tie_word_embeddings:
            return self.tok_embeddings[...].T
        return self.output[...].T if self.transposed else self.output[...]

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ):
        """Run the model (on one device, or sharded over the mesh its parameters live on).

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] rotary positions; default 0 .. T-1 (or, with a cache, the
            slots index .. index + T - 1). Left-padded rows pass their own positions.
          attention_mask: [B, T] bool, False for padding tokens, which no token attends
            to. Default: all True.
          cache: a KVCache to extend by these T tokens (prefill or decode).
        Returns:
          logits [B, T, V] float32; with a cache, (logits, updated cache).
        """
        mesh = sharding.explicit_mesh((self.tok_embeddings[...], tokens))
        if mesh is None:
            return self._forward(tokens, positions, attention_mask, cache)
        # A mesh with Explicit axes: run the body with the axes Auto (see
        # sharding.auto_axes_call for why), outputs sharded by their logical axes.
        graphdef, state = nnx.split(self)

        def body(state, tokens, positions, attention_mask, cache):
            return nnx.merge(graphdef, state)._forward(tokens, positions, attention_mask, cache)

        logits = sharding.logical_sharding(
            mesh, ("batch", "length", "act_vocab"), (*tokens.shape, self.cfg.vocab_size)
        )
        out = logits if cache is None else (logits, sharding.cache_shardings(cache, mesh))
        return sharding.auto_axes_call(
            body, (state, tokens, positions, attention_mask, cache), mesh, out
        )

    def _forward(self, tokens, positions, attention_mask, cache):
        cfg = self.cfg
        B, T = tokens.shape
        dt = dtype_of(cfg.dtype)
        # No cache and no padding: plain causal attention, which fused attention kernels
        # (see attention.attention_implementation) run without a mask array.
        plain_causal = cache is None and attention_mask is None
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), bool)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        inv_freq = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

        # Causal mask over key slots: query t sits in slot start + t and sees slots up to
        # it that hold real tokens. Without a cache the keys are the T tokens themselves.
        if cache is None:
            key_valid = attention_mask  # [B, S = T]
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, start))
        S = key_valid.shape[1]
        query_slot = start + jnp.arange(T)[:, None]  # [T, 1]
        causal = jnp.arange(S)[None, :] <= query_slot  # [T, S]
        mask = causal[None] & key_valid[:, None, :]  # [B, T, S]
        if plain_causal:
            mask = None  # attend() builds the same [T, S] triangle where it needs one

        h = jnp.take(self.tok_embeddings[...], tokens, axis=0).astype(dt)  # [B, T, D]
        h = constrain(h, ("batch", "length", "act_embed"))

        caches = (None, None) if cache is None else (cache.k, cache.v)
        if isinstance(self.layers, nnx.List):  # separate blocks: see unstack_layers
            k_cache, v_cache = caches
            if cache is not None and cache.per_layer:
                k_cache, v_cache = list(k_cache), list(v_cache)
            for layer, block in enumerate(self.layers):
                if cache is None:
                    h, _ = block(h, positions, inv_freq, mask)
                elif cache.per_layer:  # each layer's own arrays, read and written in place
                    kv = (k_cache[layer], v_cache[layer], None, start)
                    h, (k_cache[layer], v_cache[layer]) = block(h, positions, inv_freq, mask, kv)
                else:
                    kv = (k_cache, v_cache, jnp.asarray(layer, jnp.int32), start)
                    h, (k_cache, v_cache) = block(h, positions, inv_freq, mask, kv)
            if cache is not None and cache.per_layer:
                k_cache, v_cache = tuple(k_cache), tuple(v_cache)
            return self._finish(h, cache, k_cache, v_cache, key_valid, start, T)

        if cache is not None and cache.per_layer:
            # The scan carries one stacked cache: stack here, split again at the end (two
            # extra copies of the cache per call; init_cache gives this model a stack).
            caches = (jnp.stack(cache.k), jnp.stack(cache.v))
        graphdef, layer_state = nnx.split(self.layers)

        def body(carry, xs):
            h, k_cache, v_cache = carry
            state, layer = xs
            block = nnx.merge(graphdef, state)
            kv = None if cache is None else (k_cache, v_cache, layer, start)
            h, kv = block(h, positions, inv_freq, mask, kv)
            if kv is not None:
                k_cache, v_cache = kv
            return (h, k_cache, v_cache), None

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        (h, k_cache, v_cache), _ = jax.lax.scan(body, (h, *caches), (layer_state, layer_ids))
        if cache is not None and cache.per_layer:
            k_cache, v_cache = tuple(k_cache), tuple(v_cache)  # iterating splits the stack
        return self._finish(h, cache, k_cache, v_cache, key_valid, start, T)

    def _finish(self, h, cache, k_cache, v_cache, key_valid, start, T):
        """Final norm and output projection; the updated cache when there is one."""
        h = self.norm(h)
        B, _, D = h.shape
        dt = dtype_of(self.cfg.dtype)
        h2 = h.reshape(B * T, D)
        if self.transposed:  # [V, D]: the output matrix, or the tied embedding as it is
            w = self.tok_embeddings if self.cfg.tie_word_embeddings else self.output
            logits = dense(h2, w[...].astype(dt), jnp.float32, transposed=True)
        else:
            logits = dense(h2, self.output_matrix().astype(dt), jnp.float32)
        logits = logits.reshape(B, T, -1)  # [B, T, V]
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        if cache is None:
            return logits
        new_cache = KVCache(k=k_cache, v=v_cache, valid=key_valid, index=start + T)
        return logits, new_cache


def build_model(cfg: LlamaConfig, seed: int = 0, *, mesh=None, remat: str = "none") -> Transformer:
    """A model with random weights (N(0, 0.02) matrices, unit norm gains).

    Args:
      cfg: the configuration.
      seed: the random seed; the weights are the same with or without a mesh.
      mesh: a jax Mesh with axes ("data", "fsdp", "tensor") (Auto or Explicit), a spec
        for sharding.make_mesh ("fsdp", "data=2,tensor=-1"), or None for one device.
        With a mesh, every parameter is created directly in its sharded form by a
        jitted initialiser: no device or host ever holds the whole model.
      remat: rematerialisation policy of the layer scan (REMAT_POLICIES).
    Returns:
      The Transformer.
    """
    mesh = sharding.make_mesh(mesh)
    create = lambda: Transformer(cfg, rngs=nnx.Rngs(seed), remat=remat)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    # One jitted initialiser rather than one small eager program per parameter.
    if mesh is None:
        state = jax.jit(lambda: nnx.split(create())[1])()
    else:
        sharding.validate(cfg, mesh)
        shardings = sharding.param_shardings(abstract_state, mesh)
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: LlamaConfig) -> Transformer:
    """The model's structure with `jax.ShapeDtypeStruct` leaves: no memory allocated.

    Use it to count parameters or plan shardings of models too big for this machine.
    """
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def unstack_layers(model: Transformer) -> Transformer:
    """The same model laid out for inference: L separate blocks, each with its own arrays.

    A layer scan slices each layer's weights out of the stacked [L, ...] arrays on every
    call, and XLA copies the slices (on CPU the copies cost more than the matrix-vector
    products of a decode step); separate arrays are read in place. With bfloat16
    parameters on the CPU the matrices are also stored output-first ([out, in], as Meta's
    and PyTorch's checkpoints hold them; `layers.inference_layout`), which XLA's bfloat16
    kernels read 15-20% faster. The price is compile time growing with depth, and
    parameter paths that carry a layer number (`layers/3/attention/wq`), so checkpoints,
    `set_params` and the sharding table keep working on the stacked model. Outputs are
    the same as the stacked model's (up to float32 summation order).

    Args:
      model: a Transformer with stacked layers (as built or loaded).
    Returns:
      A new Transformer sharing every array but the per-layer ones (and a transposed
      output matrix), which are copied once (drop `model` to free the stacked copies).
    """
    if isinstance(model.layers, nnx.List):
        return model
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)  # shares the arrays
    block_def, block_state = nnx.split(model.layers)
    new.layers = nnx.List(
        [
            nnx.merge(block_def, jax.tree.map(lambda x, i=i: x[i], block_state))
            for i in range(model.cfg.n_layers)
        ]
    )
    return use_inference_layout(new)


def use_inference_layout(model: Transformer) -> Transformer:
    """Store a model with separate blocks in the inference layout for its dtype, in place.

    Today that means bfloat16 matrices output-first on the CPU (`layers.inference_layout`);
    otherwise the model is left as it is. Called by `unstack_layers` and by
    `llama_jax.load(..., layers="separate")`.
    """
    if model.transposed or not inference_layout(model.cfg.param_dtype):
        return model
    for block in model.layers:
        block.attention.transpose_weights()
        block.feed_forward.transpose_weights()
    if not model.cfg.tie_word_embeddings:
        model.output = nnx.Param(model.output[...].T)
    model.transposed = True
    return model


def count_params(model: nnx.Module) -> int:
    """Total number of parameter elements of a real or abstract model."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def set_params(model: Transformer, params: dict) -> Transformer:
    """Replace the model's weights with a nested dict of arrays (e.g. from the converters).

    Shapes must match exactly; arrays are cast to the model's `param_dtype`.
    """
    from llama_jax.errors import LlamaError

    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    flat_new = dict(_flatten(params))
    flat_cur = dict(_flatten(current))
    if set(flat_new) != set(flat_cur):
        missing = sorted("/".join(k) for k in set(flat_cur) - set(flat_new))
        extra = sorted("/".join(k) for k in set(flat_new) - set(flat_cur))
        raise LlamaError(
            f"Parameters do not match the model: missing {missing}, unexpected {extra}."
        )
    pdt = dtype_of(model.cfg.param_dtype)
    for key, value in flat_new.items():
        if tuple(value.shape) != tuple(flat_cur[key].shape):
            raise LlamaError(
                f"Parameter {'/'.join(key)} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(flat_cur[key].shape)}."
            )
    cast = jax.tree.map(lambda a: jnp.asarray(a, dtype=pdt), params)
    nnx.replace_by_pure_dict(state, cast)
    nnx.update(model, state)
    return model


def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value
