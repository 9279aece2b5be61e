"""int8 weight-only quantization: each matrix as int8 values and one float scale per output channel.

A weight W is stored as `values = round(W / scale)` in int8 (clipped to [-127, 127]) with
`scale = max |W| / 127` taken over its input axes: one scale per output channel
(symmetric, per-channel absmax). The product then is

    einsum(spec, x, W) ~= einsum(spec, x, values.astype(dtype)) * scale

because every output channel shares one scale, which therefore comes out of the sum over
the input axes. The cast of `values` feeds the matmul directly, so XLA can fuse the
dequantisation into it where the backend allows, and the scales touch only the product,
not the weight. Weights take a quarter of float32's memory (half of bfloat16's), which
is what batch-1 decoding is bound by. Whether the cast is fused is the compiler's choice:
XLA's GPU backend fuses it into the product; its CPU backend writes the converted weight
out (and inside `generate`'s decode loop lifts those conversions out of the loop, which
would leave an int8 model decoding from float32 copies). So on the CPU, products of a
few rows go to a small kernel that reads the int8 values itself
(`llama_jax.inference.int8_cpu`, computed in float32); wider ones stay with XLA. On one
GPU, XLA computes a one-row product as a matrix-vector product far below the memory
bandwidth, so one-row products go to `llama_jax.inference.int8_gpu` (XLA's fused
product of the row padded to eight rows, or a Pallas kernel).

Opt-in, outside the model's reading path: `quantize(model)` replaces the projection
weights (wq, wk, wv, wo, w1, w2, w3 and an untied `output`) by `Int8Weight` modules,
which `llama_jax.model.layers.linear` calls in place of the plain product. Embeddings and
norms stay as they are. `llama_jax.load(path, quantize="int8")` quantizes each block as
it is read. `quantize` rounds each weight to its nearest step; `llama_jax.inference.gptq`
chooses the values from calibration activations instead (same format, closer outputs),
and `llama_jax.checkpoint.save` writes either kind as an int8 checkpoint.

The KV cache can be int8 too (`Int8KVCache`, `generate(..., cache_dtype="int8")`): each
cached key or value vector (one row, KV head and slot) as int8 values with one float32
scale, absmax / 127 over its head dim H. With H = 64 to 128 that is 1.03-1.06 bytes per
element: a quarter of a float32 cache, about half of a bfloat16 one.

Which axes are output channels follows the einsums (attention.py, layers.py,
transformer.py) and is written once, as logical axes, in
`llama_jax.sharding.rules.QUANTIZED_OUTPUT_AXES`: wq [D, N, H] -> N, H; wo [N, H, D] -> D;
w1, w3 [D, F] -> F; w2 [F, D] -> D; output [D, V] -> V.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from llama_jax import precision
from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError
from llama_jax.inference import int8_cpu, int8_gpu
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.layers import weight_order
from llama_jax.sharding.rules import PARAM_AXES, QUANTIZED_OUTPUT_AXES, logical_sharding

METHODS = ("int8",)


class Int8Weight(nnx.Module):
    """A weight matrix as int8 values with one float32 scale per output channel.

    Attributes:
      values: nnx.Param of int8, shaped like the weight it replaces (e.g. wq's [D, N, H]).
      scale: nnx.Param of float32, shaped like the weight's output axes (wq: [N, H]).
    """

    def __init__(self, values: jax.Array, scale: jax.Array):
        self.values = nnx.Param(values)
        self.scale = nnx.Param(scale)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this replaces."""
        return tuple(self.values.shape)

    def dequantize(self, dtype="float32") -> jax.Array:
        """The weight as floats: values * scale (for tests and inspection)."""
        # The scales cover the trailing (output) axes, so they broadcast as they are.
        return (self.values[...].astype(jnp.float32) * self.scale[...]).astype(dtype)

    def __call__(self, spec: str, x: jax.Array, dtype, out_dtype=None) -> jax.Array:
        """`jnp.einsum(spec, x, W)` from the int8 values: the product, then the scales.

        Args:
          spec: the einsum, e.g. "BTD,DNH->BTNH"; the weight's letters absent from x's
            are its output channels and must be its trailing axes.
          x: the activations.
          dtype: the dtype the product's inputs are cast to.
          out_dtype: the result's dtype; default `dtype`.
        Returns:
          The product, accumulated and scaled in float32, in `out_dtype or dtype`.
        """
        inputs, out = spec.split("->")
        x_letters, w_letters = inputs.split(",")
        out_letters = "".join(c for c in w_letters if c not in x_letters)
        if len(out_letters) != self.scale.ndim or not w_letters.endswith(out_letters):
            raise LlamaError(
                f"Int8Weight: einsum {spec!r} does not fit a weight {self.shape} whose "
                f"scales cover its last {self.scale.ndim} axes."
            )
        n_in = self.values.ndim - self.scale.ndim
        rows = math.prod(x.shape[: x.ndim - n_in])
        plain = x_letters.endswith(w_letters[:n_in]) and out == x_letters[:-n_in] + out_letters
        k, n = math.prod(self.values.shape[:n_in]), math.prod(self.scale.shape)
        kernel = None
        if plain and rows <= int8_cpu.MAX_ROWS and int8_cpu.wanted():
            kernel, x = int8_cpu.int8_matmul, x.astype(jnp.float32)
        elif plain and rows <= int8_gpu.MAX_ROWS and int8_gpu.wanted() and int8_gpu.fits(k, n):
            kernel, x = int8_gpu.int8_matmul, x.astype(dtype)
        if kernel is not None:
            # Decoding on one CPU or GPU: products of a few rows go their own way (above).
            y = kernel(
                x.reshape(rows, k), self.values[...].reshape(k, n), self.scale[...].reshape(n)
            )
            y = y.reshape(*x.shape[: x.ndim - n_in], *self.scale.shape)
            return y.astype(out_dtype or dtype)
        # Contracted in the weight's storage order (no transposed copy); accumulated in
        # float32, with the gradient product to x in `dtype` (precision.einsum).
        y = precision.einsum(
            weight_order(spec), x.astype(dtype), self.values[...].astype(dtype), jnp.float32
        )
        # Line the scale's axes up with the output's: same order, 1 for the other letters.
        order = "".join(c for c in out if c in out_letters)
        scale = jnp.einsum(f"{out_letters}->{order}", self.scale[...])
        shape = [self.scale.shape[out_letters.index(c)] if c in out_letters else 1 for c in out]
        return (y * scale.reshape(shape)).astype(out_dtype or dtype)


def _quantize_array(w: jax.Array, out_ndim: int) -> tuple[jax.Array, jax.Array]:
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - out_ndim)))
    # An all-zero channel keeps scale 1 (its values are 0 whatever the scale).
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return values, scale


@functools.lru_cache(maxsize=64)
def _quantizer(out_ndim: int, shardings: tuple | None):
    # One compiled quantizer per kind of weight and placement, not one per call.
    fn = functools.partial(_quantize_array, out_ndim=out_ndim)
    return jax.jit(fn) if shardings is None else jax.jit(fn, out_shardings=shardings)


def quantize_array(
    w: jax.Array, path: tuple[str, ...], shardings: tuple | None = None
) -> tuple[jax.Array, jax.Array]:
    """One weight's int8 values and per-output-channel float32 scales.

    Args:
      w: the float weight, e.g. a block's wq [D, N, H].
      path: its parameter path with the layer number left out, e.g.
        ("layers", "attention", "wq"): a key of QUANTIZED_OUTPUT_AXES.
      shardings: (values, scale) shardings for the results; default: when `w` lies on a
        mesh, those PARAM_AXES gives the paths (*path, "values") and (*path, "scale").
    Returns:
      (values int8 shaped like w, scale float32 shaped like w's output axes).
    """
    out_ndim = len(QUANTIZED_OUTPUT_AXES[path])
    if shardings is None and isinstance(getattr(w, "sharding", None), NamedSharding):
        mesh = w.sharding.mesh
        shardings = (
            logical_sharding(mesh, PARAM_AXES[(*path, "values")], w.shape),
            logical_sharding(mesh, PARAM_AXES[(*path, "scale")], w.shape[-out_ndim:]),
        )
    return _quantizer(out_ndim, None if shardings is None else tuple(shardings))(w)


def check_method(method) -> None:
    """Raise a LlamaError unless `method` is one of METHODS."""
    if method not in METHODS:
        raise LlamaError(
            f"quantize={method!r} is not a quantization method; use one of {list(METHODS)} "
            "(or None for the stored precision)."
        )


def projections(model) -> list[tuple[nnx.Module, str, tuple[str, ...]]]:
    """(module, attribute, path) of every weight `quantize` replaces, in model order."""
    found = []
    for path in QUANTIZED_OUTPUT_AXES:
        if path[0] == "layers":
            for block in model.layers:
                owner = getattr(block, path[1])
                if hasattr(owner, path[2]):
                    found.append((owner, path[2], path))
        elif hasattr(model, path[0]):  # `output` exists only when untied
            found.append((model, path[0], path))
    return found


def quantize(model, method: str = "int8"):
    """Quantize a model's projection weights in place, one array at a time.

    Each of wq, wk, wv, wo, w1, w2, w3 (every block) and `output` (when untied) becomes
    an `Int8Weight` on the same devices and mesh as the weight it replaces; the float
    weight is dropped as soon as its int8 form exists, so memory never holds more than
    the model plus one weight's int8 copy. Embeddings and norms stay in their dtype.
    Already quantized weights are left as they are.

    Args:
      model: a `Transformer` (changed in place).
      method: "int8".
    Returns:
      The model.
    """
    check_method(method)
    for owner, name, path in projections(model):
        w = getattr(owner, name)
        if isinstance(w, Int8Weight):
            continue
        setattr(owner, name, Int8Weight(*quantize_array(w[...], path)))
        del w
    return model


def quantize_block(block: dict, shardings: dict | None = None) -> dict:
    """A block's parameters as a pure dict with its projections in int8.

    Used by `llama_jax.load(..., quantize="int8")` on each block as it is read.

    Args:
      block: {"attention": {"wq": array, ...}, "feed_forward": {...}, ...}.
      shardings: the same tree for the *quantized* block ({"wq": {"values": sharding,
        "scale": sharding}, ...}), or None to leave placement to the inputs.
    Returns:
      The block with each projection replaced by {"values": int8, "scale": float32}.
    """
    out = {group: dict(leaves) for group, leaves in block.items()}
    for path in QUANTIZED_OUTPUT_AXES:
        if path[0] != "layers":
            continue
        group, name = path[1], path[2]
        placed = (shardings or {}).get(group, {}).get(name)
        if placed is not None:
            placed = (placed["values"], placed["scale"])
        values, scale = quantize_array(block[group][name], path, placed)
        out[group][name] = {"values": values, "scale": scale}
    return out


# ------------------------------------------------------------------------------ the KV cache

CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")


def check_cache_dtype(dtype) -> None:
    """Raise a LlamaError unless `dtype` is None (the model's dtype) or one of CACHE_DTYPES."""
    if dtype is not None and dtype not in CACHE_DTYPES:
        raise LlamaError(
            f"cache_dtype={dtype!r} is not a KV cache dtype; use one of {list(CACHE_DTYPES)} "
            "(or None for the model's compute dtype)."
        )


def _quantize_vectors(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] as int8 values [..., H] and float32 scales [...], absmax / 127 per vector."""
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)  # an all-zero vector stays 0
    values = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return values, scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8KVCache(KVCache):
    """A KVCache whose keys and values are int8, with one float32 scale per vector.

    `write` quantizes each new key and value vector (one row, KV head and slot: H
    numbers) by its own absmax; `read` hands attention `values * scale` in float32.
    Everything else (slots, `valid`, `index`, `advance`) is the float cache's.

    Attributes:
      k, v: L arrays [B, K, S, H] of int8 each.
      k_scale, v_scale: L arrays [B, K, S] of float32 each.
      valid, index: as in KVCache.
    """

    k_scale: tuple[jax.Array, ...]
    v_scale: tuple[jax.Array, ...]

    @classmethod
    def create(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype: str | None = None):
        """An empty int8 cache for `batch` rows of up to `max_len` tokens each.

        Args:
          cfg: the model's configuration.
          batch: B, the number of rows.
          max_len: S, the number of slots.
          dtype: None or "int8" (the values' dtype is int8 whatever the model's).
        """
        if dtype not in (None, "int8"):
            raise LlamaError(f"Int8KVCache holds int8; got dtype={dtype!r}.")
        # The float cache's slots and layout, in int8; one scale per [B, K, S] vector.
        base = KVCache.create(cfg, batch, max_len, "int8")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        scales = [jnp.ones(k.shape[:3], jnp.float32) for k in (*base.k, *base.v)]
        L = cfg.n_layers
        return cls(**fields, k_scale=tuple(scales[:L]), v_scale=tuple(scales[L:]))

    def write(self, layer: int, k: jax.Array, v: jax.Array, index: jax.Array) -> Int8KVCache:
        """Quantize one layer's new keys and values [B, T, K, H] into slots index...index+T-1."""
        (k, k_scale), (v, v_scale) = _quantize_vectors(k), _quantize_vectors(v)
        cache = super().write(layer, k, v, index)  # the int8 values, as the float cache
        scales = {}
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            arrays = list(getattr(self, name))
            new = scale.transpose(0, 2, 1)  # [B, T, K] -> [B, K, T]
            arrays[layer] = jax.lax.dynamic_update_slice(arrays[layer], new, (0, 0, index))
            scales[name] = tuple(arrays)
        return dataclasses.replace(cache, **scales)

    def read(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """One layer's keys and values [B, K, S, H] in float32: values * scale."""
        k = self.k[layer].astype(jnp.float32) * self.k_scale[layer][..., None]
        v = self.v[layer].astype(jnp.float32) * self.v_scale[layer][..., None]
        return k, v


def new_cache(model, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    """An empty cache for `model`: its own KVCache in `dtype` (default its compute
    dtype), or an Int8KVCache for dtype "int8"."""
    check_cache_dtype(dtype)
    if dtype == "int8":
        return Int8KVCache.create(model.cfg, batch, max_len)
    return model.init_cache(batch, max_len, dtype)
