"""Products whose result is wider than their inputs, with gradients in the inputs' dtype.

A bfloat16 model computes its logits as float32: `jnp.einsum(..., preferred_element_type=
float32)` on bfloat16 inputs. Left to autodiff, the two products that carry the logits'
gradient back (to the last hidden state and to the output weight) would multiply that
float32 gradient by an upcast float32 copy of the other input: float32 matmuls, at a
fraction of the bfloat16 rate (on an H100 they held training at 44% MFU instead of 50%,
docs/performance.md). `einsum` casts the gradient to the inputs' dtype first, so those
products run in bfloat16 like every other product's gradient products. `Int8Weight`
(inference/int8.py) computes its products the same way: accumulated in float32 before
the scales, their gradient to the activations (LoRA on an int8 base) in bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def einsum(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for x and w of one dtype, its result in `out_dtype`.

    Args:
      spec: the einsum.
      x, w: the operands, already in the dtype the product is computed in.
      out_dtype: the result's dtype (accumulated in it); default the operands' dtype.
    Returns:
      The product; its gradients are products in the operands' dtype.
    """
    if out_dtype is None or jnp.dtype(out_dtype) == x.dtype:
        return jnp.einsum(spec, x, w)
    return _wide(spec, x, w, jnp.dtype(out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _wide(spec, x, w, out_dtype):
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def _wide_fwd(spec, x, w, out_dtype):
    return _wide(spec, x, w, out_dtype), (x, w)


def _wide_bwd(spec, out_dtype, inputs, g):
    return jax.vjp(lambda x, w: jnp.einsum(spec, x, w), *inputs)[1](g.astype(inputs[0].dtype))


_wide.defvjp(_wide_fwd, _wide_bwd)
