"""Tensor names and layouts: Meta's checkpoints, Hugging Face's, and this model's.

Three layouts of the same weights:

* Meta (`consolidated.*.pth`): `layers.{i}.attention.wq.weight` shaped [out, in], rotary
  embedding on interleaved pairs (x[2j], x[2j+1]).
* Hugging Face (`model.safetensors`): `model.layers.{i}.self_attn.q_proj.weight`, also
  [out, in], but rotary embedding on halves (x[j], x[j + H/2]). Their conversion script
  permuted the rows of wq and wk within every head so the half-split code gives the
  same result; `hf_to_meta_qk` undoes that and `meta_to_hf_qk` redoes it.
* llama.cpp (GGUF): `blk.{i}.attn_q.weight`, [out, in] once dequantized, rows permuted
  back to Meta's order by llama.cpp's converter (`gguf_to_meta_qk`).
* This package: Meta's names, input-first einsum shapes (wq [D, N, H]), Meta's rotary
  convention, and one dict per block under "layers".

Every function here works on one tensor at a time, so converters can stream.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError

# The rotary permutation ------------------------------------------------------------
#
# Within one head, Meta's row r = 2j + p (pair j, member p in {0, 1}) is HF's row
# p * H/2 + j. As array reshapes, for a weight w of n heads shaped [n * H, D_in]:
#
#     meta_to_hf:  w.reshape(n, H/2, 2, D_in).swapaxes(1, 2).reshape(n * H, D_in)
#     hf_to_meta:  w.reshape(n, 2, H/2, D_in).swapaxes(1, 2).reshape(n * H, D_in)


def meta_to_hf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute wq or wk rows from Meta's interleaved pairs to HF's half-split form."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_to_meta_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `meta_to_hf_qk`: HF's half-split rows back to Meta's interleaved pairs."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)


# llama.cpp's GGUF files. Its converter (convert_hf_to_gguf.py, LlamaModel.permute)
# permutes the rows of HF's wq and wk once more, per head of H rows:
#
#     hf_to_gguf:  w.reshape(n, 2, H/2, D_in).swapaxes(1, 2).reshape(n * H, D_in)
#
# so GGUF row n*H + 2j + p is HF row n*H + p*H/2 + j, which is Meta's row n*H + 2j + p:
# llama.cpp's permutation is the inverse of HF's, and a GGUF file holds wq and wk in
# Meta's interleaved order, the order llama.cpp's own rotary (pairs of adjacent
# features) needs. For wk, n is the number of KV heads.


def gguf_to_meta_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """wq or wk rows from a GGUF file in Meta's order: llama.cpp's permutation undone.

    Undoing it (GGUF -> HF) and then HF's (HF -> Meta) composes to the identity, as the
    comment above derives, so `w` is returned as it is; the function exists so that the
    GGUF reader states the step and the tests check the derivation.

    Args:
      w: [n_heads * H, D_in], rows as the GGUF file stores them.
      n_heads: heads of this weight (query heads for wq, KV heads for wk).
    Returns:
      the same rows in Meta's interleaved order.
    """
    if w.ndim != 2 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise LlamaError(f"A GGUF wq/wk of shape {w.shape} does not split into {n_heads} heads.")
    return w


# Names ----------------------------------------------------------------------------

_HF_TO_META_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_META_TO_HF_LAYER = {v: k for k, v in _HF_TO_META_LAYER.items()}
_HF_TO_META_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_META_TO_HF_TOP = {v: k for k, v in _HF_TO_META_TOP.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def hf_to_meta_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attention.wq.weight`."""
    if name in _HF_TO_META_TOP:
        return _HF_TO_META_TOP[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _HF_TO_META_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_META_LAYER[m.group(2)]}.weight"
    raise LlamaError(f"Tensor {name!r} is not part of a Hugging Face LlamaForCausalLM.")


def meta_to_hf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in _META_TO_HF_TOP:
        return _META_TO_HF_TOP[name]
    m = _META_LAYER.fullmatch(name)
    if m and m.group(2) in _META_TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{_META_TO_HF_LAYER[m.group(2)]}.weight"
    raise LlamaError(f"Tensor {name!r} is not part of a Meta LLaMA checkpoint.")


def hf_to_meta_tensor(name: str, w: np.ndarray, cfg: LlamaConfig) -> tuple[str, np.ndarray]:
    """One HF tensor -> (Meta name, Meta-layout tensor); wq and wk are un-permuted."""
    meta = hf_to_meta_name(name)
    if meta.endswith("attention.wq.weight"):
        w = hf_to_meta_qk(w, cfg.n_heads)
    elif meta.endswith("attention.wk.weight"):
        w = hf_to_meta_qk(w, cfg.kv_heads)
    return meta, w


def meta_to_hf_tensor(name: str, w: np.ndarray, cfg: LlamaConfig) -> tuple[str, np.ndarray]:
    """One Meta tensor -> (HF name, HF-layout tensor); wq and wk are permuted."""
    hf = meta_to_hf_name(name)
    if name.endswith("attention.wq.weight"):
        w = meta_to_hf_qk(w, cfg.n_heads)
    elif name.endswith("attention.wk.weight"):
        w = meta_to_hf_qk(w, cfg.kv_heads)
    return hf, w


# Meta <-> this package ------------------------------------------------------------


def meta_shape(name: str, cfg: LlamaConfig) -> tuple[int, ...]:
    """The full (unsharded) shape Meta's checkpoint has for tensor `name`."""
    D, F, V, H = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.head_dim
    N, K = cfg.n_heads, cfg.kv_heads
    if name in ("tok_embeddings.weight", "output.weight"):
        return (V, D)
    if name == "norm.weight":
        return (D,)
    m = _META_LAYER.fullmatch(name)
    shapes = {
        "attention.wq": (N * H, D),
        "attention.wk": (K * H, D),
        "attention.wv": (K * H, D),
        "attention.wo": (D, N * H),
        "feed_forward.w1": (F, D),
        "feed_forward.w3": (F, D),
        "feed_forward.w2": (D, F),
        "attention_norm": (D,),
        "ffn_norm": (D,),
    }
    if m and m.group(2) in shapes:
        return shapes[m.group(2)]
    raise LlamaError(f"Tensor {name!r} is not part of a Meta LLaMA checkpoint.")


def meta_to_param(
    name: str, w: np.ndarray, cfg: LlamaConfig
) -> tuple[tuple[str, ...], int | None, np.ndarray]:
    """One Meta tensor -> (parameter path, layer index or None, array in our layout).

    Checks the shape against the config first, naming the tensor when it disagrees.
    """
    expected = meta_shape(name, cfg)
    if tuple(w.shape) != expected:
        raise LlamaError(
            f"Tensor {name!r} has shape {tuple(w.shape)} but the config "
            f"(dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}, "
            f"ffn={cfg.ffn_hidden_dim}, vocab_size={cfg.vocab_size}) needs {expected}. "
            "Check that params.json / config.json belongs to these weights."
        )
    D, H = cfg.dim, cfg.head_dim
    if name == "tok_embeddings.weight":
        return ("tok_embeddings",), None, w
    if name == "output.weight":
        return ("output",), None, w.T
    if name == "norm.weight":
        return ("norm", "weight"), None, w
    m = _META_LAYER.fullmatch(name)
    layer, key = int(m.group(1)), m.group(2)
    group, leaf = key.split(".") if "." in key else (key, "weight")
    if leaf in ("wq", "wk", "wv"):
        w = w.reshape(-1, H, D).transpose(2, 0, 1)  # [n*H, D] -> [D, n, H]
    elif leaf == "wo":
        w = w.T.reshape(-1, H, D)  # [D, N*H] -> [N, H, D]
    elif leaf in ("w1", "w3", "w2"):
        w = w.T  # [out, in] -> [in, out]
    return ("layers", group, leaf), layer, w


def param_to_meta(
    path: tuple[str, ...], w: np.ndarray, cfg: LlamaConfig, layer: int | None = None
) -> tuple[str, np.ndarray]:
    """Inverse of `meta_to_param` for one parameter (of block `layer` when in a block)."""
    if path == ("tok_embeddings",):
        return "tok_embeddings.weight", w
    if path == ("output",):
        return "output.weight", w.T
    if path == ("norm", "weight"):
        return "norm.weight", w
    _, group, leaf = path
    if leaf in ("wq", "wk", "wv"):
        D, n, H = w.shape
        w = w.transpose(1, 2, 0).reshape(n * H, D)
    elif leaf == "wo":
        N, H, D = w.shape
        w = w.reshape(N * H, D).T
    elif leaf in ("w1", "w3", "w2"):
        w = w.T
    name = (
        f"layers.{layer}.{group}.weight"
        if leaf == "weight"
        else f"layers.{layer}.{group}.{leaf}.weight"
    )
    return name, np.ascontiguousarray(w)


def meta_names(cfg: LlamaConfig) -> list[str]:
    """Every tensor name a Meta checkpoint of this config holds, in file order."""
    names = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        names += [
            f"layers.{i}.attention.wq.weight",
            f"layers.{i}.attention.wk.weight",
            f"layers.{i}.attention.wv.weight",
            f"layers.{i}.attention.wo.weight",
            f"layers.{i}.feed_forward.w1.weight",
            f"layers.{i}.feed_forward.w2.weight",
            f"layers.{i}.feed_forward.w3.weight",
            f"layers.{i}.attention_norm.weight",
            f"layers.{i}.ffn_norm.weight",
        ]
    names.append("norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("output.weight")
    return names


def params_from_meta(tensors: dict[str, np.ndarray], cfg: LlamaConfig) -> dict:
    """A whole Meta state dict (in memory) -> the model's nested dict of parameters.

    For small models and tests; the streaming converters place tensors one at a time.
    Blocks are keyed by number: {"layers": {0: {"attention": {"wq": ...}}, ...}, ...}.
    """
    out: dict = {}
    for name in meta_names(cfg):
        if name not in tensors:
            raise LlamaError(f"Tensor {name!r} is missing from the checkpoint.")
        path, layer, w = meta_to_param(name, np.asarray(tensors[name]), cfg)
        _set(out, path if layer is None else (path[0], layer, *path[1:]), w)
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig) -> dict:
    """A whole HF LlamaForCausalLM state dict (in memory) -> the model's nested parameters."""
    meta = {}
    for name, w in tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        meta_name, w = hf_to_meta_tensor(name, np.asarray(w), cfg)
        meta[meta_name] = w
    return params_from_meta(meta, cfg)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def meta_params(cfg: LlamaConfig) -> dict:
    """Meta's `params.json` for `cfg`, such that Meta's FFN-width rule gives cfg's F.

    Meta's file has no field for the FFN width; its code derives it from `multiple_of`
    and `ffn_dim_multiplier`. A config with an explicit width (from HF's
    `intermediate_size`) that the rule does not reproduce gets `multiple_of = F` and a
    multiplier of (F + 0.5) / int(8 D / 3), which the rule turns back into exactly F.
    """
    from llama_jax.checkpoint.configs import config_from_meta, config_to_meta

    params = config_to_meta(cfg)
    s = cfg.rope_scaling
    if s is not None and (s.low_freq_factor, s.high_freq_factor, s.original_max_seq_len) != (
        1.0,
        4.0,
        8192,
    ):
        # Meta's code hard-codes these three; params.json can only carry the factor.
        warnings.warn(
            f"rope_scaling {s} differs from Meta's fixed low_freq_factor=1, "
            "high_freq_factor=4, original_max_seq_len=8192, which params.json cannot "
            "express; Meta's code will use its own values.",
            stacklevel=2,
        )
    F = cfg.ffn_hidden_dim
    if config_from_meta(params).ffn_hidden_dim != F:
        params["multiple_of"] = F
        params["ffn_dim_multiplier"] = (F + 0.5) / int(2 * (4 * cfg.dim) / 3)
        if config_from_meta(params).ffn_hidden_dim != F:
            raise LlamaError(f"FFN width {F} cannot be expressed in Meta's params.json.")
    return params


def reshape_view(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reshape without copying; raises if the strides do not allow it."""
    v = x.view()
    v.shape = shape  # numpy refuses (AttributeError) instead of silently copying
    return v


def param_slot(name: str, cfg: LlamaConfig) -> tuple[tuple[str, ...], int | None, tuple]:
    """(parameter path, layer or None, shape in our layout) of Meta tensor `name`."""
    shape = meta_shape(name, cfg)
    fake = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape, (0,) * len(shape))
    path, layer, w = meta_to_param(name, fake, cfg)  # shapes only: no memory
    return path, layer, tuple(w.shape)


def meta_view(name: str, param: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """A view of `param` (our layout) shaped and ordered like Meta's tensor `name`.

    Writing Meta's tensor into the view fills `param`, so converters can read straight
    into the final layout: the inverse of `meta_to_param` as strides, never a copy.
    """
    m = _META_LAYER.fullmatch(name)
    leaf = "" if m is None else m.group(2).split(".")[-1]
    if name == "output.weight" or leaf in ("w1", "w2", "w3"):
        return param.T
    if leaf in ("wq", "wk", "wv"):
        D, n, H = param.shape
        return reshape_view(param.transpose(1, 2, 0), (n * H, D))  # [D, n, H] -> [n*H, D]
    if leaf == "wo":
        N, H, D = param.shape
        return reshape_view(param, (N * H, D)).T  # [N, H, D] -> [D, N*H]
    return param
