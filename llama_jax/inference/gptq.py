"""GPTQ: int8 weights whose rounding errors are corrected on calibration text.

`int8.quantize` rounds every weight to its nearest int8 step on its own. GPTQ (Frantar,
Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022) rounds a weight's input rows one at a time and moves each
row's rounding error onto the rows not yet rounded, so that the layer's *output* on real
activations changes as little as possible. For a weight W [K, N] (K inputs, N output
channels) whose inputs on the calibration tokens are X [rows, K], it minimises
||X W - X Q||^2 row by row, using the inverse of H = 2 X^T X / rows:

    for each input row i (largest diag(H) first):
        Q[i] = round(W[i] / scale) * scale
        e    = (W[i] - Q[i]) / Hinv[i, i]
        W[j] -= Hinv[i, j] * e       for every row j not yet rounded

with Hinv the upper Cholesky factor of H^-1 (H damped by `damp` times its mean diagonal),
processed in blocks of 128 rows so that most of the update is one matrix product.

The result has exactly the format of `int8.quantize`: int8 values and one float32 scale
(absmax / 127) per output channel, so it is saved, loaded and run by the same code and
kernels; only the values differ.

The whole model is quantized in one forward pass over the calibration tokens. Each
projection is stood in for by a `_Calibrating` module (the model's `linear` calls it as it
calls an `Int8Weight`): on its call it quantizes its weight from the activations it was
given, then passes on the product with the *quantized* weight, so every later layer is
calibrated on the inputs it will see in the int8 model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from llama_jax.errors import LlamaError
from llama_jax.inference import int8
from llama_jax.model.transformer import Transformer
from llama_jax.sharding.rules import QUANTIZED_OUTPUT_AXES

BLOCK = 128  # input rows rounded before their error is passed on in one product
MIN_TOKENS = 16  # less calibration text than this is refused


def gptq_weight(
    w: np.ndarray, x: np.ndarray, out_ndim: int, damp: float = 0.01, scale=None
) -> tuple[np.ndarray, np.ndarray]:
    """One weight quantized by GPTQ from its inputs on the calibration tokens.

    Args:
      w: the float weight, input axes first, e.g. wq [D, N, H] or w2 [F, D].
      x: its inputs [..., *input axes] (the activations the weight multiplies).
      out_ndim: how many trailing axes of `w` are output channels (wq: 2).
      damp: added to H's diagonal, as a fraction of its mean, before inverting.
      scale: the per-output-channel scales (shaped like w's output axes); default
        absmax / 127 over the input axes. `quantize` passes `int8.quantize_array`'s, so
        a model's scales are bit for bit those of rounding.
    Returns:
      (values int8 shaped like w, scale float32 shaped like w's output axes).
    """
    shape = w.shape
    k = math.prod(shape[: len(shape) - out_ndim])
    W = np.asarray(w, np.float32).reshape(k, -1).copy()
    x = np.asarray(x).reshape(-1, k)
    H = np.zeros((k, k))
    for start in range(0, len(x), 4096):  # float64 products without a float64 copy of x
        chunk = x[start : start + 4096].astype(np.float64)
        H += chunk.T @ chunk
    H *= 2 / len(x)
    if not (np.isfinite(W).all() and np.isfinite(H).all()):
        what = "weight" if not np.isfinite(W).all() else "calibration activations"
        raise LlamaError(
            f"GPTQ: a {list(shape)} weight has non-finite {what} (NaN or inf); the "
            "checkpoint is damaged or the model overflows in its dtype (try float32)."
        )

    if scale is None:
        absmax = np.abs(W).max(axis=0)
        scale = np.where(absmax > 0, absmax / np.float32(127), 1.0)
    scale = np.asarray(scale, np.float32).reshape(-1)
    # An input that is zero on every calibration token gets H[i, i] = 1: no error is
    # passed to or from it, so it is plainly rounded.
    diag = np.diag(H).copy()
    diag[diag == 0] = 1
    np.fill_diagonal(H, diag)
    order = np.argsort(-diag, kind="stable")  # the inputs that matter most go first
    W, H = W[order], H[order][:, order]
    H[np.diag_indices(k)] += damp * np.mean(diag)
    try:
        Hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)  # upper triangular
    except np.linalg.LinAlgError:
        raise LlamaError(
            f"GPTQ: the calibration activations of a {list(shape)} weight give a singular "
            f"Hessian even with damp={damp}; use more calibration text or a larger damp."
        ) from None

    Q = np.zeros(W.shape, np.int8)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        W1, Hinv1 = W[i1:i2], Hinv[i1:i2, i1:i2]
        E1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            q = np.clip(np.round(W1[i] / scale), -127, 127)
            Q[i1 + i] = q
            E1[i] = (W1[i] - q * scale) / Hinv1[i, i]
            W1[i + 1 :] -= np.outer(Hinv1[i, i + 1 :], E1[i])
        W[i2:] -= Hinv[i1:i2, i2:].T @ E1
    values = np.empty_like(Q)
    values[order] = Q
    return values.reshape(shape), scale.reshape(shape[len(shape) - out_ndim :])


class _Calibrating(nnx.Module):
    """A projection during the calibration pass: quantized on its first call."""

    def __init__(self, weight: nnx.Param, path: tuple[str, ...], damp: float, bar):
        self.weight = weight
        self.path = path
        self.damp = damp
        self.bar = bar
        self.quantized = nnx.data(None)

    def __call__(self, spec: str, x: jax.Array, dtype, out_dtype=None) -> jax.Array:
        if self.quantized is None:
            w = self.weight[...]
            out_ndim = len(QUANTIZED_OUTPUT_AXES[self.path])
            n_in = w.ndim - out_ndim
            if tuple(x.shape[x.ndim - n_in :]) != tuple(w.shape[:n_in]):
                raise LlamaError(
                    f"GPTQ: einsum {spec!r} does not take the {'.'.join(self.path)} "
                    "weight's input axes last in its activations."
                )
            # Rounding's int8 form gives the scales (kept as they are) and the placement.
            rounded, scale = int8.quantize_array(w, self.path)
            values, _ = gptq_weight(
                np.asarray(w), np.asarray(x), out_ndim, self.damp, np.asarray(scale)
            )
            self.quantized = int8.Int8Weight(jax.device_put(values, rounded.sharding), scale)
            self.bar.update(1)
        return self.quantized(spec, x, dtype, out_dtype)


def calibration_rows(tokenizer, text: str, rows: int = 16, length: int = 512) -> np.ndarray:
    """Calibration tokens from text: consecutive pieces of it, each row starting with BOS.

    Args:
      tokenizer: the model's `Tokenizer`.
      text: the calibration text.
      rows: at most this many rows.
      length: tokens per row (BOS included).
    Returns:
      int32 [n, length] with n <= rows full rows, or one shorter row when the text
      does not fill one.
    """
    if rows < 1 or length < 2:
        raise LlamaError(f"GPTQ: rows={rows} and length={length} must be >= 1 and >= 2.")
    ids = tokenizer.encode(text, bos=False)
    if len(ids) < MIN_TOKENS:
        raise LlamaError(
            f"GPTQ: the calibration text is {len(ids)} tokens; give at least {MIN_TOKENS} "
            "(a few thousand, like what the model will read, work best)."
        )
    step = length - 1
    n = min(rows, max(1, len(ids) // step))
    pieces = [ids[i * step : (i + 1) * step] for i in range(n)]
    return np.asarray([[tokenizer.bos_id, *piece] for piece in pieces], np.int32)


def quantize(model, tokens, *, damp: float = 0.01, progress: bool = True):
    """Quantize a model's projection weights to int8 by GPTQ, in place.

    The same weights as `int8.quantize` (wq, wk, wv, wo, w1, w2, w3 of every block and an
    untied `output`) become `Int8Weight`s with per-output-channel absmax scales; their
    values are chosen from the model's activations on `tokens`.

    Args:
      model: a `Transformer` with float projection weights (changed in place; left as it
        was if the pass fails). Memory holds the float model plus its int8 weights.
      tokens: calibration token ids [B, T] (ints in [0, vocab_size), T <= max_seq_len):
        text like what the model will read. All of it is run in one forward pass.
      damp: Hessian dampening, a fraction of its mean diagonal (GPTQ's 0.01), in (0, 1].
      progress: show a progress bar over the weights.
    Returns:
      The model.
    """
    cfg = model.cfg
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise LlamaError(
            f"GPTQ: calibration tokens must be a non-empty [batch, length] array of ints, "
            f"got shape {tokens.shape} of {tokens.dtype}."
        )
    if tokens.shape[1] > cfg.max_seq_len:
        raise LlamaError(
            f"GPTQ: calibration rows of {tokens.shape[1]} tokens exceed the model's "
            f"max_seq_len={cfg.max_seq_len}; use shorter rows."
        )
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise LlamaError(
            f"GPTQ: calibration token ids must lie in [0, {cfg.vocab_size}), got "
            f"{tokens.min()}..{tokens.max()}; tokenize with this model's tokenizer."
        )
    if not 0 < damp <= 1:
        raise LlamaError(f"GPTQ: damp={damp} must lie in (0, 1].")
    found = int8.projections(model)
    for owner, name, path in found:
        if not isinstance(getattr(owner, name), nnx.Param):
            raise LlamaError(
                f"GPTQ: the {'.'.join(path)} weight is a {type(getattr(owner, name)).__name__}, "
                "not a float parameter; quantize a float model (load it without quantize=, "
                "without adapters)."
            )
    with tqdm(total=len(found), unit="weight", desc="gptq", disable=not progress) as bar:
        calibrating = []
        for owner, name, path in found:
            stand_in = _Calibrating(getattr(owner, name), path, damp, bar)
            setattr(owner, name, stand_in)
            calibrating.append((owner, name, stand_in))
        try:
            # Op by op: each stand-in quantizes itself from the concrete inputs it sees.
            Transformer.__call__(model, jnp.asarray(tokens, jnp.int32))
        finally:
            # Every stand-in leaves: all int8 weights, or after an error all the float
            # ones, so the model is never left half quantized.
            complete = all(s.quantized is not None for _, _, s in calibrating)
            for owner, name, stand_in in calibrating:
                setattr(owner, name, stand_in.quantized if complete else stand_in.weight)
    return model
