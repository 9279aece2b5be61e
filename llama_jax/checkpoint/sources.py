"""Readers for the two layouts people arrive with: Meta's and Hugging Face's.

Both present the same face, `Source`: a `LlamaConfig` and `tensor(name)`, which returns
one whole tensor under its Meta name and in Meta's layout (HF's rotary rows already
un-permuted, Meta's model-parallel shards already joined). Everything is checked from
the headers before any tensor data is read: missing files and tensors, shapes against
the config, unknown tensor names. Tensors are then read one at a time on request.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings

import numpy as np

from llama_jax.checkpoint import layout
from llama_jax.checkpoint.safetensors_io import read_safetensors
from llama_jax.checkpoint.torch_zip import read_pth
from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype_name(dtype: np.dtype, what: str) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPE_NAMES:
        raise LlamaError(f"{what} has dtype {name}; weights must be float32, bfloat16 or float16.")
    return name


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LlamaError(f"{path}: cannot read it as JSON ({e}).") from None
    if not isinstance(data, dict):
        raise LlamaError(f"{path}: expected a JSON object.")
    return data


class Source:
    """A checkpoint to convert: its config and its tensors under Meta's names."""

    kind: str
    cfg: LlamaConfig
    tokenizer: str | None = None

    def names(self) -> list[str]:
        """The Meta tensor names to convert, in file order."""
        return layout.meta_names(self.cfg)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Fill `out`, a Meta-shaped (possibly strided) view, with tensor `name`."""
        raise NotImplementedError

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` (a Meta name), whole and in Meta's layout."""
        out = np.empty(layout.meta_shape(name, self.cfg), self.dtype)
        self.read_into(name, out)
        return out


def detect(src: str, source: str | None = None) -> Source:
    """Open SRC as a Meta or an HF checkpoint.

    Args:
      src: a directory with `params.json` + `consolidated.*.pth` (Meta) or `config.json`
        + safetensors / pytorch_model*.bin (Hugging Face), or a llama.cpp `.gguf` file.
      source: "meta" or "hf" to force the layout; None to detect it from the files.
    Returns:
      A validated `Source`.
    """
    if src.lower().endswith(".gguf"):  # llama.cpp's single-file format
        from llama_jax.checkpoint.gguf import GGUFSource

        return GGUFSource(src)
    if not os.path.isdir(src):
        raise LlamaError(f"{src}: no such directory; pass the directory holding the weights.")
    if source not in (None, "meta", "hf"):
        raise LlamaError(f"--from {source!r}: expected 'meta' or 'hf'.")
    has_meta = os.path.isfile(os.path.join(src, "params.json"))
    has_hf = os.path.isfile(os.path.join(src, "config.json"))
    if source is None:
        if has_meta:
            source = "meta"
        elif has_hf:
            source = "hf"
        else:
            raise LlamaError(
                f"{src}: found neither params.json (Meta layout) nor config.json (Hugging Face "
                "layout). Point SRC at the directory that holds the weights and their config."
            )
    return MetaSource(src) if source == "meta" else HFSource(src)


# Meta -------------------------------------------------------------------------------

# How Meta's model-parallel shards split each tensor (fairscale layers).
_COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1",
                    "feed_forward.w3")  # fmt: skip
_ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


class MetaSource(Source):
    """`params.json` + `consolidated.00.pth` ... `consolidated.NN.pth`.

    Column-parallel tensors (wq, wk, wv, w1, w3, output) are joined on dim 0, row-parallel
    ones (wo, w2) on dim 1, the token embedding on dim 1 for Llama 1/2 and on dim 0 for
    Llama 3+, and the norms are replicated. With more shards than KV heads (405B: 16
    shards, 8 KV heads) each KV head is stored in several consecutive shards; one copy is
    kept after checking that the copies agree.
    """

    kind = "meta"

    def __init__(self, src: str):
        self.src = src
        params_path = os.path.join(src, "params.json")
        if not os.path.isfile(params_path):
            raise LlamaError(f"{src}: no params.json; a Meta checkpoint directory has one.")
        params = _read_json(params_path)
        try:
            cfg = LlamaConfig.from_meta_params(params)
        except KeyError as e:
            raise LlamaError(f"{params_path}: missing field {e}.") from None
        except LlamaError as e:
            raise LlamaError(f"{params_path}: {e}") from None
        paths = sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))
        if not paths:
            raise LlamaError(f"{src}: params.json but no consolidated.NN.pth weight files.")
        numbers = []
        for p in paths:
            m = re.fullmatch(r"consolidated\.(\d+)\.pth", os.path.basename(p))
            if not m:
                raise LlamaError(f"{p}: unexpected file name; expected consolidated.NN.pth.")
            numbers.append(int(m.group(1)))
        for want, got in enumerate(numbers):
            if want != got:
                raise LlamaError(
                    f"{src}: shard consolidated.{want:02d}.pth is missing (found "
                    f"{[os.path.basename(p) for p in paths]}); download every shard."
                )
        self.paths = paths
        self.shards = [read_pth(p) for p in paths]
        first = self.shards[0]
        if "tok_embeddings.weight" not in first:
            raise LlamaError(f"{paths[0]}: tensor 'tok_embeddings.weight' is missing.")
        dtype = _dtype_name(first["tok_embeddings.weight"].dtype, f"{paths[0]} tok_embeddings")
        self.cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
        self.dtype = first["tok_embeddings.weight"].dtype
        # Meta's downloads keep tokenizer.model beside the weights or one level up.
        parent = os.path.dirname(os.path.abspath(src))
        for candidate in (os.path.join(src, "tokenizer.model"),
                          os.path.join(parent, "tokenizer.model")):  # fmt: skip
            if os.path.isfile(candidate):
                self.tokenizer = candidate
                break
        self._check()

    def _check(self) -> None:
        expected = set(layout.meta_names(self.cfg))
        allowed = expected | {"rope.freqs", "output.weight"}
        for path, shard in zip(self.paths, self.shards, strict=True):
            for name in shard:
                if name not in allowed:
                    raise LlamaError(
                        f"{path}: tensor {name!r} is not part of a LLaMA checkpoint; is this "
                        "a different architecture?"
                    )
            missing = sorted(expected - set(shard))
            if missing:
                raise LlamaError(
                    f"{path}: tensor {missing[0]!r} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + "; the file is incomplete or belongs to a different model."
                )
        for name in layout.meta_names(self.cfg):
            self._plan(name)  # raises on a shape that disagrees with params.json

    def _plan(self, name: str):
        """(pieces to join, join axis or None, duplicate groups) for tensor `name`."""
        cfg = self.cfg
        pieces = [shard[name] for shard in self.shards]
        n = len(pieces)
        key = name.removeprefix("layers.").split(".", 1)[-1].removesuffix(".weight")
        dup = 1
        if n == 1 or key.endswith("norm") or name == "norm.weight":
            axis = None
        elif name == "tok_embeddings.weight":
            axis = 0 if pieces[0].shape[1] == cfg.dim else 1
        elif key in _COLUMN_PARALLEL or name == "output.weight":
            axis = 0
            if key in ("attention.wk", "attention.wv") and n > cfg.kv_heads:
                if n % cfg.kv_heads == 0 and pieces[0].shape[0] == cfg.head_dim:
                    dup = n // cfg.kv_heads
        elif key in _ROW_PARALLEL:
            axis = 1
        else:
            axis = None
        kept = pieces[::dup]
        shape = list(kept[0].shape)
        for p in kept[1:]:
            other = [d for i, d in enumerate(p.shape) if i != axis]
            if len(p.shape) != len(shape) or other != [d for i, d in enumerate(shape) if i != axis]:
                raise LlamaError(
                    f"{p.path}: tensor {name!r} has shape {p.shape}, which does not fit "
                    f"{kept[0].path}'s {kept[0].shape}; the shards are from different models."
                )
        if axis is not None:
            shape[axis] = sum(p.shape[axis] for p in kept)
        want = layout.meta_shape(name, cfg)
        if tuple(shape) != want:
            where = self.paths[0] if n == 1 else f"{n} shards {os.path.basename(self.paths[0])}.."
            raise LlamaError(
                f"{where}: tensor {name!r} has shape {tuple(shape)} but params.json "
                f"(dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}, "
                f"ffn={cfg.ffn_hidden_dim}, vocab_size={cfg.vocab_size}) needs {want}. "
                "Check that params.json belongs to these weights and no shard is missing."
            )
        return pieces, axis, dup

    def read_into(self, name: str, out: np.ndarray) -> None:
        pieces, axis, dup = self._plan(name)
        if axis is None:
            pieces[0].read_into(out)
            return
        start = 0
        for i, piece in enumerate(pieces[::dup]):
            index = [slice(None)] * out.ndim
            index[axis] = slice(start, start + piece.shape[axis])
            part = out[tuple(index)]
            piece.read_into(part)
            start += piece.shape[axis]
            for copy in pieces[i * dup + 1 : (i + 1) * dup]:  # one KV head, small
                if not np.array_equal(copy.read(), part.astype(copy.dtype)):
                    raise LlamaError(
                        f"{copy.path}: tensor {name!r} should repeat the KV head of the "
                        "previous shard but differs from it; the shards are inconsistent."
                    )

    def check_tied_output(self, embedding: np.ndarray) -> None:
        """Llama 3.2 files may carry output.weight although it is tied: warn if it differs."""
        if not self.cfg.tie_word_embeddings or "output.weight" not in self.shards[0]:
            return
        output = np.concatenate([s["output.weight"].read() for s in self.shards], axis=0)
        if output.shape != embedding.shape or not np.array_equal(output, embedding):
            warnings.warn(
                f"{self.paths[0]}: output.weight differs from tok_embeddings.weight, but the "
                "model ties them (params.json: use_scaled_rope with factor 32); output.weight "
                "is dropped.",
                stacklevel=2,
            )


# Hugging Face -------------------------------------------------------------------------


class HFSource(Source):
    """`config.json` + `model*.safetensors` (with or without an index) or `pytorch_model*.bin`."""

    kind = "hf"

    def __init__(self, src: str):
        self.src = src
        config_path = os.path.join(src, "config.json")
        if not os.path.isfile(config_path):
            raise LlamaError(f"{src}: no config.json; a Hugging Face model directory has one.")
        try:
            cfg = LlamaConfig.from_hf(_read_json(config_path))
        except KeyError as e:
            raise LlamaError(f"{config_path}: missing field {e}.") from None
        except LlamaError as e:
            raise LlamaError(f"{config_path}: {e}") from None
        self.tensors = self._index(src)
        if "model.embed_tokens.weight" not in self.tensors:
            raise LlamaError(f"{src}: tensor 'model.embed_tokens.weight' is missing.")
        emb = self.tensors["model.embed_tokens.weight"]
        dtype = _dtype_name(emb.dtype, "model.embed_tokens.weight")
        self.cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
        self.dtype = emb.dtype
        for candidate in ("tokenizer.model", "original/tokenizer.model"):
            if os.path.isfile(os.path.join(src, candidate)):
                self.tokenizer = os.path.join(src, candidate)
                break
        self._check()

    @staticmethod
    def _index(src: str) -> dict:
        """{HF name: lazy tensor} over every weight file of the directory."""
        for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                                   ("pytorch_model.bin.index.json", read_pth)):  # fmt: skip
            index_path = os.path.join(src, index_name)
            if os.path.isfile(index_path):
                weight_map = _read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise LlamaError(f"{index_path}: no 'weight_map' object.")
                files = sorted(set(weight_map.values()))
                for f in files:
                    if not os.path.isfile(os.path.join(src, f)):
                        raise LlamaError(
                            f"{src}: shard {f} listed in {index_name} is missing; download it."
                        )
                tensors = {}
                for f in files:
                    tensors.update(reader(os.path.join(src, f)))
                for name, f in weight_map.items():
                    if name not in tensors:
                        raise LlamaError(f"{os.path.join(src, f)}: tensor {name!r} is missing.")
                return tensors
        for pattern, reader in (("*.safetensors", read_safetensors),
                                ("pytorch_model*.bin", read_pth)):  # fmt: skip
            files = sorted(glob.glob(os.path.join(src, pattern)))
            if files:
                tensors = {}
                for f in files:
                    tensors.update(reader(f))
                return tensors
        raise LlamaError(
            f"{src}: config.json but no weights (model*.safetensors or pytorch_model*.bin)."
        )

    def _check(self) -> None:
        self._meta_to_hf: dict[str, str] = {}
        for name, t in self.tensors.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            try:
                meta = layout.hf_to_meta_name(name)
            except LlamaError:
                raise LlamaError(
                    f"{getattr(t, 'path', self.src)}: tensor {name!r} is not part of a "
                    "LlamaForCausalLM; is this a different architecture?"
                ) from None
            self._meta_to_hf[meta] = name
        for meta in layout.meta_names(self.cfg):
            if meta not in self._meta_to_hf:
                raise LlamaError(
                    f"{self.src}: tensor {layout.meta_to_hf_name(meta)!r} is missing from the "
                    "weight files."
                )
            t = self.tensors[self._meta_to_hf[meta]]
            want = layout.meta_shape(meta, self.cfg)
            if tuple(t.shape) != want:
                raise LlamaError(
                    f"{t.path}: tensor {self._meta_to_hf[meta]!r} has shape {tuple(t.shape)} "
                    f"but config.json needs {want}; check that config.json belongs to these "
                    "weights."
                )

    def read_into(self, name: str, out: np.ndarray) -> None:
        t = self.tensors[self._meta_to_hf[name]]
        leaf = name.split(".")[-2]
        if leaf in ("wq", "wk"):
            # HF row n*H + p*H/2 + j is Meta row n*H + 2j + p (see layout.py): view `out`
            # in HF's order and let the copy do the permutation.
            n = self.cfg.n_heads if leaf == "wq" else self.cfg.kv_heads
            H = self.cfg.head_dim
            out = layout.reshape_view(out, (n, H // 2, 2, out.shape[-1])).swapaxes(
                1, 2
            )  # [n, 2, H/2, D]
        t.read_into(out)
