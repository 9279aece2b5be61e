"""llama.cpp's GGUF files as a checkpoint source: `llama-jax convert model.gguf DST`.

A GGUF file holds everything in one place: the architecture as metadata
(`llama.block_count`, `llama.embedding_length`, ...), the tensors under llama.cpp's names
(`blk.{i}.attn_q.weight`, ...), often quantized (Q4_0, Q8_0, K-quants, ...), and the
tokenizer's vocabulary, merges and chat template. `GGUFSource` presents it with the same
face as the readers in sources.py:

- the config comes from the metadata and is checked against every tensor's shape before
  any tensor data is read;
- tensors are dequantized to float32 by the `gguf` package, one at a time on request,
  from a memory map of the file, so host memory stays near one tensor;
- llama.cpp's converter permutes the rows of wq and wk; `layout.gguf_to_meta_qk` says
  how that permutation relates to Meta's and HF's layouts;
- `tokenizer_files()` writes the vocabulary out as a Hugging Face `tokenizer.json` plus a
  `tokenizer_config.json` (BOS/EOS, chat template), which `Tokenizer.load` reads.

Anything malformed (bad magic, a truncated file, absurd counts or shapes, another
architecture, a tensor type the `gguf` package cannot dequantize) is refused with one
`LlamaError` before anything is written.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter

import numpy as np

from llama_jax.checkpoint import layout
from llama_jax.checkpoint.sources import Source
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.errors import LlamaError

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
# The smallest possible encodings of one tensor-info and one key-value entry, used to
# refuse header counts that the file cannot possibly hold.
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8
_MIN_KV_BYTES = 8 + 1 + 4 + 1

# Meta's name of each per-block tensor -> llama.cpp's.
_BLOCK_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}

# llama.cpp's token types (llama_token_type): control tokens are special.
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4
_TOKEN_UNUSED, _TOKEN_BYTE = 5, 6

# llama.cpp's pre-tokenizer names whose split is Llama 3's regular expression.
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")


def meta_to_gguf_name(name: str) -> str:
    """llama.cpp's name of the tensor Meta calls `name` ("layers.0.attention.wq.weight")."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{_BLOCK_NAMES[rest.removesuffix('.weight')]}.weight"


def _check_header(path: str) -> None:
    """Refuse what is not a GGUF file, or one whose header counts cannot be true."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise LlamaError(f"Cannot read {path}: {e.strerror or e}.") from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise LlamaError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'"
            + (", and is shorter than a GGUF header" if len(head) < 24 else "")
            + "); pass a .gguf model file from llama.cpp."
        )
    for order in "<>":  # GGUF files may be big-endian; the version tells which
        version, n_tensors, n_kv = struct.unpack(order + "IQQ", head[4:24])
        if version in _SUPPORTED_VERSIONS:
            break
    else:
        raise LlamaError(
            f"{path}: GGUF version {struct.unpack('<I', head[4:8])[0]} is not supported "
            f"(versions {_SUPPORTED_VERSIONS} are); convert it with a current llama.cpp."
        )
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
        raise LlamaError(
            f"{path}: the header claims {n_tensors:,} tensors and {n_kv:,} metadata entries, "
            f"more than its {size:,} bytes can hold; the file is damaged or truncated."
        )


class GGUFSource(Source):
    """A llama.cpp GGUF file of a LLaMA-architecture model (`general.architecture` llama).

    Attributes:
      cfg: the `LlamaConfig` from the metadata, in float32 unless every weight is
        stored as float16 or bfloat16 (then that dtype).
      tokenizer: always None: the tokenizer is generated, see `tokenizer_files`.
    """

    kind = "gguf"

    def __init__(self, path: str):
        from gguf import GGUFReader

        self.src = path
        self.notes = []
        if not os.path.isfile(path):
            raise LlamaError(f"{path}: no such file; pass the .gguf model file.")
        _check_header(path)
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # the gguf package raises ValueError, IndexError, ...
            raise LlamaError(
                f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is "
                "damaged or truncated. Download it again."
            ) from None
        self.meta = {name: field for name, field in self.reader.fields.items()}
        self.tensors = {t.name: t for t in self.reader.tensors}
        if len(self.tensors) != len(self.reader.tensors):
            raise LlamaError(f"{path}: a tensor name appears twice; the file is damaged.")
        self.cfg = self._config()
        self._check_tensors()
        self.dtype = np.dtype(np.float32)
        kinds = {self.tensors[meta_to_gguf_name(n)].tensor_type.name for n in self.names()}
        if kinds in ({"F16"}, {"BF16"}):
            import ml_dtypes

            name = "float16" if kinds == {"F16"} else "bfloat16"
            self.dtype = np.dtype(np.float16 if name == "float16" else ml_dtypes.bfloat16)
            self.cfg = self.cfg.replace(param_dtype=name, dtype=name)

    @property
    def has_output(self) -> bool:
        return "output.weight" in self.tensors

    # Metadata ---------------------------------------------------------------------

    def _get(self, key: str, default=None, *, required: bool = False):
        field = self.meta.get(key)
        if field is None:
            if required:
                raise LlamaError(
                    f"{self.src}: metadata {key!r} is missing; the file is not a complete "
                    "llama.cpp LLaMA model."
                )
            return default
        try:
            return field.contents()
        except Exception as e:
            raise LlamaError(f"{self.src}: metadata {key!r} is unreadable ({e}).") from None

    def _int(self, key: str, default=None, *, required: bool = False) -> int | None:
        value = self._get(key, default, required=required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise LlamaError(f"{self.src}: metadata {key!r} = {value!r} is not a positive integer.")
        return int(value)

    def _config(self) -> LlamaConfig:
        arch = self._get("general.architecture", required=True)
        if arch != "llama":
            raise LlamaError(
                f"{self.src}: general.architecture is {arch!r}; only LLaMA-architecture "
                "models ('llama') can be converted."
            )
        a = "llama."
        dim = self._int(a + "embedding_length", required=True)
        n_heads = self._int(a + "attention.head_count", required=True)
        head_dim = dim // n_heads
        for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
            value = self._int(a + key)
            if value is not None and (value != head_dim or dim % n_heads):
                raise LlamaError(
                    f"{self.src}: {a + key} = {value} but embedding_length / head_count = "
                    f"{dim} / {n_heads}; LLaMA rotates and attends over the whole head."
                )
        scaling_type = self._get(a + "rope.scaling.type")
        if scaling_type not in (None, "none"):
            raise LlamaError(
                f"{self.src}: rope scaling {scaling_type!r} is not part of the LLaMA family."
            )
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise LlamaError(f"{self.src}: tensor 'token_embd.weight' is missing.")
        vocab = int(emb.shape[-1]) if len(emb.shape) == 2 else 0
        declared = self._int(a + "vocab_size")
        if declared is not None and declared != vocab:
            raise LlamaError(
                f"{self.src}: llama.vocab_size = {declared} but token_embd.weight has "
                f"{vocab} rows; the file is inconsistent."
            )
        try:
            return LlamaConfig(
                dim=dim,
                n_layers=self._int(a + "block_count", required=True),
                n_heads=n_heads,
                n_kv_heads=self._int(a + "attention.head_count_kv"),
                vocab_size=vocab,
                ffn_dim=self._int(a + "feed_forward_length", required=True),
                norm_eps=float(self._get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self._get(a + "rope.freq_base", 10000.0)),
                rope_scaling=self._rope_scaling(dim // n_heads),
                tie_word_embeddings="output.weight" not in self.tensors,
                max_seq_len=self._int(a + "context_length", 4096),
                name=str(self._get("general.name", "custom")),
            )
        except (TypeError, ValueError) as e:
            raise LlamaError(f"{self.src}: metadata does not describe a model ({e}).") from None
        except LlamaError as e:
            raise LlamaError(f"{self.src}: {e}") from None

    def _rope_scaling(self, head_dim: int) -> RopeScaling | None:
        """Llama 3.1/3.2 scaling: llama.cpp stores its per-frequency divisors as `rope_freqs`."""
        t = self.tensors.get("rope_freqs.weight")
        if t is None:
            return None
        if tuple(int(d) for d in t.shape) != (head_dim // 2,) or t.tensor_type.name != "F32":
            raise LlamaError(
                f"{self.src}: tensor 'rope_freqs.weight' should be {head_dim // 2} float32 "
                f"values, found {tuple(int(d) for d in t.shape)} {t.tensor_type.name}."
            )
        divisors = np.asarray(t.data, np.float64)
        theta = float(self._get("llama.rope.freq_base", 10000.0))
        # Files from llama.cpp's converter carry only the divisors; the largest is the
        # factor (stored as float32, hence the rounding).
        factor = float(self._get("llama.rope.scaling.factor", round(float(divisors.max()), 4)))
        original = int(self._get("llama.rope.scaling.original_context_length", 8192))
        scaling = RopeScaling(factor=factor, original_max_seq_len=original)
        want = llama3_rope_divisors(scaling, theta, head_dim)
        if not np.allclose(divisors, want, rtol=1e-5):
            raise LlamaError(
                f"{self.src}: tensor 'rope_freqs.weight' is not Llama 3.1/3.2's rotary scaling "
                f"(factor {factor}, low/high frequency factors 1/4, original context "
                f"{original}); this scaling is not supported."
            )
        return scaling

    # Tensors ----------------------------------------------------------------------

    def _check_tensors(self) -> None:
        from gguf import GGMLQuantizationType
        from gguf.quants import _type_traits

        can_read = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
        expected = {meta_to_gguf_name(n): n for n in self.names()}
        for name in self.tensors:
            if name not in expected and name not in ("rope_freqs.weight", "output.weight"):
                raise LlamaError(
                    f"{self.src}: tensor {name!r} is not part of a LLaMA model; is this a "
                    "different architecture?"
                )
        for gguf_name, meta in expected.items():
            t = self.tensors.get(gguf_name)
            if t is None:
                raise LlamaError(f"{self.src}: tensor {gguf_name!r} is missing.")
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
            want = layout.meta_shape(meta, self.cfg)
            if shape != want:
                raise LlamaError(
                    f"{self.src}: tensor {gguf_name!r} has shape {shape} but the metadata "
                    f"(dim={self.cfg.dim}, heads={self.cfg.n_heads}/{self.cfg.kv_heads}, "
                    f"ffn={self.cfg.ffn_hidden_dim}, vocab={self.cfg.vocab_size}) needs {want}."
                )
            if t.tensor_type not in can_read:
                raise LlamaError(
                    f"{self.src}: tensor {gguf_name!r} is stored as {t.tensor_type.name}, which "
                    "the gguf package cannot dequantize; requantize the model with llama.cpp."
                )

    def read_into(self, name: str, out: np.ndarray) -> None:
        from gguf.quants import dequantize

        gguf_name = meta_to_gguf_name(name)
        t = self.tensors[gguf_name]
        try:
            w = dequantize(t.data, t.tensor_type).reshape(out.shape)  # [out, in], float32
        except Exception as e:
            raise LlamaError(
                f"{self.src}: tensor {gguf_name!r} ({t.tensor_type.name}) cannot be "
                f"dequantized ({type(e).__name__}: {e}); the file is damaged."
            ) from None
        leaf = name.split(".")[-2]
        if leaf in ("wq", "wk"):
            n = self.cfg.n_heads if leaf == "wq" else self.cfg.kv_heads
            w = layout.gguf_to_meta_qk(w, n)
        out[...] = w

    # Tokenizer --------------------------------------------------------------------

    def tokenizer_files(self) -> dict[str, bytes]:
        """The GGUF vocabulary as Hugging Face tokenizer files, or {} when there is none.

        Two kinds of vocabulary are rebuilt (`tokenizer.ggml.model`):

        - "gpt2": byte-level BPE from the tokens and merges (Llama 3 and most recent models);
        - "llama": SentencePiece BPE with byte fallback (Llama 1 and 2) from the tokens,
          scores and token types, see `_sentencepiece_bpe`.

        Returns:
          {"tokenizer.json": ..., "tokenizer_config.json": ..., "generation_config.json":
          ...} as bytes; {} for other vocabularies.
        Raises:
          LlamaError: the vocabulary metadata is inconsistent.
        """
        kind = self._get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            return {}
        tokens = self._get("tokenizer.ggml.tokens", required=True)
        types = self._get("tokenizer.ggml.token_type") or [1] * len(tokens)
        for key, value in (("tokens", tokens), ("token_type", types)):
            if not isinstance(value, list):
                raise LlamaError(f"{self.src}: tokenizer.ggml.{key} is not an array.")
        if len(types) != len(tokens) or len(tokens) > self.cfg.vocab_size:
            raise LlamaError(
                f"{self.src}: {len(tokens)} tokens and {len(types)} token types for a model of "
                f"{self.cfg.vocab_size} embeddings; the vocabulary metadata is inconsistent."
            )
        if not all(isinstance(t, str) for t in tokens):
            raise LlamaError(f"{self.src}: tokenizer.ggml.tokens holds a value that is not text.")
        known = range(_TOKEN_NORMAL, _TOKEN_BYTE + 1)
        bad = next(
            (t for t in types if not isinstance(t, int | np.integer) or t not in known), None
        )
        if bad is not None:
            raise LlamaError(
                f"{self.src}: tokenizer.ggml.token_type holds {bad!r}; llama.cpp's token "
                "types are 1 to 6. The vocabulary metadata is damaged."
            )
        types = [int(t) for t in types]
        # llama.cpp's defaults for a SentencePiece vocabulary that does not name them.
        defaults = {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
        if kind == "llama":
            defaults = {k: v for k, v in defaults.items() if v < len(tokens)}
        else:
            defaults = {}

        def token_id(key: str) -> int | None:
            i = self._get(f"tokenizer.ggml.{key}", defaults.get(key))
            if i is None:
                return None
            if isinstance(i, bool) or not isinstance(i, int | np.integer):
                raise LlamaError(f"{self.src}: tokenizer.ggml.{key} = {i!r} is not a token id.")
            if not 0 <= int(i) < len(tokens):
                raise LlamaError(
                    f"{self.src}: tokenizer.ggml.{key} = {i} is not a token id (the "
                    f"vocabulary has {len(tokens)} tokens); the file is damaged."
                )
            return int(i)

        def token(key: str) -> str | None:
            i = token_id(key)
            return None if i is None else tokens[i]

        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to.
        add_bos = bool(self._get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(self._get("tokenizer.ggml.add_eos_token", False))
        if len(set(tokens)) != len(tokens):
            twice = next(t for t, n in Counter(tokens).items() if n > 1)
            raise LlamaError(
                f"{self.src}: the vocabulary lists the token {twice!r} twice; the file is damaged."
            )
        if kind == "gpt2":
            merges = self._get("tokenizer.ggml.merges", required=True)
            pre = self._get("tokenizer.ggml.pre", "default")
            try:
                tok = _byte_level_bpe(tokens, merges, types, pre)
            except LlamaError as e:
                raise LlamaError(f"{self.src}: {e}") from None
            bos, eos = token("bos_token_id"), token("eos_token_id")
            _add_ends(tok, bos if add_bos else None, eos if add_eos else None)
        else:
            scores = self._get("tokenizer.ggml.scores", required=True)
            if not isinstance(scores, list) or len(scores) != len(tokens):
                n = len(scores) if isinstance(scores, list) else "no array of"
                raise LlamaError(
                    f"{self.src}: {len(tokens)} tokens but {n} scores; the "
                    "vocabulary metadata is inconsistent."
                )
            try:
                scores = np.asarray(scores, np.float64)
            except (TypeError, ValueError):
                scores = np.array([np.nan])
            if scores.ndim != 1 or not np.isfinite(scores).all():
                raise LlamaError(
                    f"{self.src}: tokenizer.ggml.scores holds a value that is not a finite "
                    "number; the vocabulary metadata is damaged."
                )
            tok = _sentencepiece_bpe(
                tokens,
                scores.tolist(),
                types,
                unk=token("unknown_token_id"),
                add_space_prefix=bool(self._get("tokenizer.ggml.add_space_prefix", True)),
                bos=token("bos_token_id") if add_bos else None,
                eos=token("eos_token_id") if add_eos else None,
            )

        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
            "add_bos_token": add_bos,
            "add_eos_token": add_eos,
            "model_max_length": self.cfg.max_seq_len,
        }
        if kind == "llama":
            # Decoded text is the SentencePiece model's, with no spaces removed before
            # punctuation (transformers' clean-up would).
            config["clean_up_tokenization_spaces"] = False
        template = self._get("tokenizer.chat_template")
        if isinstance(template, str):
            config["chat_template"] = template
        config = {k: v for k, v in config.items() if v is not None}
        files = {
            "tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        }
        # End of turn (llama.cpp's eot/eom) ends generation as well as end of text.
        stops = [
            i
            for key in ("eos_token_id", "eot_token_id", "eom_token_id")
            if (i := token_id(key)) is not None
        ]
        if stops:
            generation = {"eos_token_id": sorted(set(stops), key=stops.index)}
            files["generation_config.json"] = json.dumps(generation, indent=2).encode()
        return files


def _add_listed_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Give `tok` the vocabulary's control tokens (special: never matched in a user's text
    by `Tokenizer.encode`) and user-defined ones (plain added tokens, matched whole)."""
    from tokenizers import AddedToken

    added = [
        AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str):
    """A `tokenizers.Tokenizer` for a GGUF byte-level BPE vocabulary ("gpt2" model)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    from llama_jax.tokenizer import LLAMA3_PATTERN

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise LlamaError("The GGUF vocabulary lists a token twice; the file is damaged.")
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise LlamaError(f"The GGUF merge {m!r} is not two tokens separated by a space.")
        pairs.append((parts[0], parts[1]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _LLAMA3_PRE:
        # llama.cpp: Llama 3's split, and its BPE takes whole words found in the vocabulary
        # before merging (tokenizer.json's ignore_merges).
        model = models.BPE(vocab, pairs, ignore_merges=True)
        pre_tok = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level]
        )
    else:
        model = models.BPE(vocab, pairs)
        gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            # llama.cpp's "smollm": every digit on its own, then GPT-2's split (SmolLM's
            # tokenizer.json: Digits(individual_digits) + ByteLevel).
            pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
        else:
            pre_tok = gpt2
    tok = RustTokenizer(model)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    _add_listed_tokens(tok, tokens, types)
    return tok


def _sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    *,
    unk: str | None,
    add_space_prefix: bool,
    bos: str | None,
    eos: str | None,
):
    """A `tokenizers.Tokenizer` for a GGUF SentencePiece vocabulary ("llama" model).

    SentencePiece's BPE repeatedly joins the adjacent pair whose join is the piece of
    highest score. A BPE model whose merges are every split of every piece into two pieces,
    ranked by the joined piece's score, does the same (transformers' `generate_merges`).
    Control, unknown and byte pieces are never the result of a join in SentencePiece, nor
    are unused ones kept, so they make no merges. Characters without a piece become their
    UTF-8 bytes `<0xNN>` (byte fallback).

    Text is prepared as Hugging Face's Llama 1/2 tokenizer.json and llama.cpp prepare it:
    spaces become "▁", and "▁" is put before the text (`add_space_prefix`, SentencePiece's
    dummy prefix) and before text that follows a special or user-defined token. Control
    tokens are special added tokens (never matched in a user's text by `Tokenizer.encode`),
    user-defined ones plain added tokens (always matched whole, as llama.cpp does).

    Args:
      tokens, scores, types: the file's vocabulary, already checked.
      unk: the unknown token's text (byte fallback makes it rare).
      add_space_prefix: SentencePiece's dummy prefix (`tokenizer.ggml.add_space_prefix`).
      bos, eos: the texts the post-processor puts around a sequence (for users of the
        tokenizer.json outside llama-jax), or None.
    Returns:
      the tokenizer.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    joinable = {
        t: s
        for t, s, ty in zip(tokens, scores, types, strict=True)
        if ty in (_TOKEN_NORMAL, _TOKEN_USER_DEFINED)
    }
    ranked = []
    for piece, score in joinable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in joinable and right in joinable:
                ranked.append((-score, vocab[piece], k, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = RustTokenizer(model)
    spaces = normalizers.Replace(" ", "▁")
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if add_space_prefix else spaces
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # the dummy prefix is not part of the text
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    _add_listed_tokens(tok, tokens, types)
    _add_ends(tok, bos, eos)
    return tok


def _add_ends(tok, bos: str | None, eos: str | None) -> None:
    """Give `tok` a post-processor that adds `bos` before and `eos` after each text.

    What llama.cpp adds when the GGUF's add_bos_token / add_eos_token say so; written into
    tokenizer.json, so that transformers adds them too (as Meta's Llama 3 tokenizer.json
    adds <|begin_of_text|>).
    """
    from tokenizers import processors

    ends = [t for t in (bos, eos) if t is not None]
    if not ends:
        return
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
    tok.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(ends)],
    )


def llama3_rope_divisors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp stores as `rope_freqs`: each rotary frequency's divisor under scaling.

    Args:
      scaling: Llama 3.1/3.2 rope scaling.
      theta: the rotary base.
      head_dim: H.
    Returns:
      [H/2] float64: 1 for short wavelengths, `factor` for long ones, smooth in between.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freqs
    low = scaling.original_max_seq_len / scaling.low_freq_factor
    high = scaling.original_max_seq_len / scaling.high_freq_factor
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    between = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < high, 1.0, np.where(wavelen > low, scaling.factor, between))
