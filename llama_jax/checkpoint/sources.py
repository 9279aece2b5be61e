"""Readers for the two layouts people arrive with: Meta's and Hugging Face's.

Both present the same face, `Source`: a `LlamaConfig` and `tensor(name)`, which returns
one whole tensor under its Meta name and in Meta's layout (HF's rotary rows already
un-permuted, Meta's model-parallel shards already joined). Everything is checked from
the headers before any tensor data is read: missing files and tensors, shapes against
the config, unknown tensor names. Tensors are then read one at a time on request.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from llama_jax.checkpoint import layout
from llama_jax.checkpoint.configs import config_from_hf, config_from_meta
from llama_jax.checkpoint.jsonio import read_json
from llama_jax.checkpoint.safetensors_io import read_safetensors
from llama_jax.checkpoint.torch_zip import read_pth
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.errors import LlamaError

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype_name(dtype: np.dtype, what: str) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPE_NAMES:
        raise LlamaError(f"{what} has dtype {name}; weights must be float32, bfloat16 or float16.")
    return name


def _read_json(path: str) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise LlamaError(f"{path}: expected a JSON object.")
    return data


def _check_layers(where: str, names, pattern: str, cfg: LlamaConfig, config_file: str) -> None:
    """The blocks present in the weights must be exactly 0..n_layers-1.

    Compared before any per-layer list is built, so a config claiming 10^9 layers is
    refused at once instead of sizing anything from it.
    """
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    if found != set(range(cfg.n_layers)):
        raise LlamaError(
            f"{where}: {config_file} says n_layers={cfg.n_layers} but the weights hold "
            f"{len(found)} blocks"
            + (f" numbered {min(found)}..{max(found)}" if found else "")
            + f"; check that {config_file} belongs to these weights and no file is missing."
        )


class Source:
    """A checkpoint to convert: its config and its tensors under Meta's names."""

    kind: str
    cfg: LlamaConfig
    tokenizer: str | None = None
    notes: list[str]  # constants the reader assumed, for the converter to print

    @property
    def has_output(self) -> bool:
        """Whether the weights carry an output layer (output.weight / lm_head.weight)."""
        raise NotImplementedError

    def output_is_embedding(self, embedding: np.ndarray | None = None) -> bool:
        """Whether output.weight is bit-identical to tok_embeddings.weight as stored.

        Args:
          embedding: tok_embeddings.weight already read in the stored dtype, or None.
        Returns:
          True only when both exist with the same shape and the same bytes.
        """
        if not self.has_output:
            return False
        if embedding is None or embedding.dtype != self.dtype:
            embedding = self.tensor("tok_embeddings.weight")
        output = self.tensor("output.weight")
        return bool(np.array_equal(output.view(np.uint8), embedding.view(np.uint8)))

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


def detect(src: str, source: str | None = None, **overrides) -> Source:
    """Open SRC as a Meta or an HF checkpoint.

    Args:
      src: a directory with `params.json` + `consolidated.*.pth` (Meta) or `config.json`
        + safetensors / pytorch_model*.bin (Hugging Face), or a llama.cpp `.gguf` file.
      source: "meta" or "hf" to force the layout; None to detect it from the files.
      **overrides: LlamaConfig fields (and `rope_scaling_factor`) that win over what the
        config file says or what is assumed; None values are ignored.
    Returns:
      A validated `Source`.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
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
    return MetaSource(src, **overrides) if source == "meta" else HFSource(src, **overrides)


# Meta -------------------------------------------------------------------------------

# How Meta's model-parallel shards split each tensor (fairscale layers).
_COLUMN_PARALLEL = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "feed_forward.w1",
    "feed_forward.w3",
)
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

    def __init__(self, src: str, **overrides):
        self.src = src
        params_path = os.path.join(src, "params.json")
        if not os.path.isfile(params_path):
            raise LlamaError(f"{src}: no params.json; a Meta checkpoint directory has one.")
        params = read_json(params_path)
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
        self.notes = []
        try:
            has_output = "output.weight" in self.shards[0]
            cfg = config_from_meta(params, has_output=has_output, notes=self.notes, **overrides)
        except LlamaError as e:
            raise LlamaError(f"{params_path}: {str(e).removeprefix('params.json: ')}") from None
        _check_layers(paths[0], self.shards[0], r"layers\.(\d{1,9})\.", cfg, "params.json")
        first = self.shards[0]
        if "tok_embeddings.weight" not in first:
            raise LlamaError(f"{paths[0]}: tensor 'tok_embeddings.weight' is missing.")
        dtype = _dtype_name(first["tok_embeddings.weight"].dtype, f"{paths[0]} tok_embeddings")
        self.cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
        self.dtype = first["tok_embeddings.weight"].dtype
        # Meta's downloads keep tokenizer.model beside the weights or one level up.
        parent = os.path.dirname(os.path.abspath(src))
        for candidate in (
            os.path.join(src, "tokenizer.model"),
            os.path.join(parent, "tokenizer.model"),
        ):
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

    @property
    def has_output(self) -> bool:
        return "output.weight" in self.shards[0]


# Hugging Face -------------------------------------------------------------------------


class HFSource(Source):
    """`config.json` + `model*.safetensors` (with or without an index) or `pytorch_model*.bin`."""

    kind = "hf"

    def __init__(self, src: str, **overrides):
        self.src = src
        self.notes = []
        config_path = os.path.join(src, "config.json")
        if not os.path.isfile(config_path):
            raise LlamaError(f"{src}: no config.json; a Hugging Face model directory has one.")
        factor = overrides.pop("rope_scaling_factor", None)
        try:
            cfg = config_from_hf(read_json(config_path), **overrides)
            if factor is not None:
                if cfg.rope_scaling is None:
                    raise LlamaError("--rope-scaling-factor: config.json has no rope scaling.")
                fields = {**cfg.rope_scaling.__dict__, "factor": factor}
                cfg = cfg.replace(rope_scaling=RopeScaling(**fields))
        except LlamaError as e:
            raise LlamaError(f"{config_path}: {str(e).removeprefix('config.json: ')}") from None
        self.tensors = self._index(src)
        _check_layers(src, self.tensors, r"model\.layers\.(\d{1,9})\.", cfg, "config.json")
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
        for index_name, reader in (
            ("model.safetensors.index.json", read_safetensors),
            ("pytorch_model.bin.index.json", read_pth),
        ):
            index_path = os.path.join(src, index_name)
            if os.path.isfile(index_path):
                weight_map = _read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise LlamaError(f"{index_path}: no 'weight_map' object.")
                for f in weight_map.values():
                    # Shards are plain file names beside the index: never a path that
                    # leads the reader out of SRC.
                    if not isinstance(f, str) or f in ("", ".", "..") or os.path.basename(f) != f:
                        raise LlamaError(
                            f"{index_path}: weight_map names {str(f)[:80]!r}, not a file name "
                            "in this directory; the index is corrupt or crafted."
                        )
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
        for pattern, reader in (
            ("*.safetensors", read_safetensors),
            ("pytorch_model*.bin", read_pth),
        ):
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
            try:
                meta = layout.hf_to_meta_name(name)
            except LlamaError:
                raise LlamaError(
                    f"{getattr(t, 'path', self.src)}: tensor {name!r} is not part of a "
                    "LlamaForCausalLM; is this a different architecture?"
                ) from None
            self._meta_to_hf[meta] = name
        names = layout.meta_names(self.cfg)
        if self.has_output and "output.weight" not in names:
            names.append("output.weight")  # tied, but its shape is checked all the same
        for meta in names:
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

    @property
    def has_output(self) -> bool:
        return "output.weight" in self._meta_to_hf

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
