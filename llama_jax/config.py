"""Model configuration: one frozen dataclass and a preset for every official LLaMA size.

A `LlamaConfig` holds everything Meta's `params.json` and Hugging Face's `config.json`
can say about a LLaMA model, plus the dtype policy used to run it. Derived values
(head dim, FFN width) are properties, and every invariant is checked when the config is
built, so a config that cannot work fails at construction with the field's name.

    >>> from llama_jax import PRESETS
    >>> cfg = PRESETS["llama3.1-8b"]
    >>> cfg.head_dim, cfg.ffn_hidden_dim
    (128, 14336)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llama_jax.errors import LlamaError, brief, check_int, check_real

DTYPES = ("float32", "bfloat16", "float16")


# Bounds on every size field: an order of magnitude above the largest release (405B:
# dim 16384, 126 layers, 128 heads, FFN 53248, vocabulary 128256, context 131072), so a
# typo or a hostile file is refused before anything is sized from it.
_MAX = dict(dim=2**20, n_layers=2**14, n_heads=2**14, n_kv_heads=2**14, vocab_size=2**24)
_MAX.update(multiple_of=2**22, ffn_dim=2**22, max_seq_len=2**26, original_max_seq_len=2**26)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 rotary frequency scaling ("llama3" in HF's `rope_scaling`).

    Wavelengths shorter than `original_max_seq_len / high_freq_factor` keep their
    frequency, wavelengths longer than `original_max_seq_len / low_freq_factor` are
    divided by `factor`, and the band between is interpolated smoothly. Llama 3.1 uses
    factor 8, Llama 3.2 (1B, 3B) factor 32, both from an original context of 8192.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise LlamaError(
                f"rope_scaling.rope_type={brief(self.rope_type)} is not supported: LLaMA models "
                "use 'llama3' scaling (Llama 3.1/3.2) or none at all (rope_scaling=None)."
            )
        for field in ("factor", "low_freq_factor", "high_freq_factor"):
            value = check_real(f"rope_scaling.{field}", getattr(self, field), high=1e6)
            object.__setattr__(self, field, value)
        if not self.low_freq_factor < self.high_freq_factor:
            raise LlamaError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}."
            )
        limit = _MAX["original_max_seq_len"]
        check_int("rope_scaling.original_max_seq_len", self.original_max_seq_len, high=limit)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of one LLaMA model, plus the dtypes it runs in.

    Field names follow Meta's `params.json` (dim, n_layers, n_heads, ...). The FFN width
    is either given outright (`ffn_dim`, as HF's `intermediate_size`) or derived with
    Meta's rule from `multiple_of` and `ffn_dim_multiplier`. Translations from and to
    Meta's and Hugging Face's config files live in `llama_jax.checkpoint.configs`.
    """

    dim: int = 4096  # D, model width
    n_layers: int = 32  # L
    n_heads: int = 32  # N, query heads
    n_kv_heads: int | None = None  # K, key/value heads; None means n_heads (plain MHA)
    vocab_size: int = 32000  # V
    multiple_of: int = 256  # Meta rounds the FFN width up to a multiple of this
    ffn_dim_multiplier: float | None = None  # Llama 2 70B and Llama 3 scale the FFN width
    ffn_dim: int | None = None  # explicit FFN width F; overrides the rule above
    norm_eps: float = 1e-5  # Llama 1 used 1e-6, Llama 2 and later 1e-5
    rope_theta: float = 10000.0  # Llama 3 raised the rotary base to 500000
    rope_scaling: RopeScaling | None = None  # Llama 3.1/3.2 long-context scaling
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B share tok_embeddings and output
    max_seq_len: int = 4096  # longest context the model was trained for
    param_dtype: str = "float32"  # dtype the weights are stored in
    dtype: str = "float32"  # dtype of activations and matmuls; norms/softmax/logits stay f32
    name: str = "custom"

    def __post_init__(self):
        # The one validation of every field, whatever built the config (a preset, Meta's
        # params.json, HF's config.json, llama_jax.json): types, finiteness, ranges.
        if isinstance(self.rope_scaling, dict):
            known = {f.name for f in dataclasses.fields(RopeScaling)}
            unknown = sorted(map(str, set(self.rope_scaling) - known))
            if unknown:
                raise LlamaError(
                    f"rope_scaling has unknown field(s) {unknown}; known: {sorted(known)}."
                )
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise LlamaError(
                "LlamaConfig.rope_scaling must be null or an object, got "
                f"{brief(self.rope_scaling)}."
            )
        for field in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            check_int(f"LlamaConfig.{field}", getattr(self, field), high=_MAX[field])
        for field in ("n_kv_heads", "ffn_dim"):
            if getattr(self, field) is not None:
                check_int(f"LlamaConfig.{field}", getattr(self, field), high=_MAX[field])
        object.__setattr__(
            self, "norm_eps", check_real("LlamaConfig.norm_eps", self.norm_eps, high=1.0)
        )
        object.__setattr__(
            self, "rope_theta", check_real("LlamaConfig.rope_theta", self.rope_theta, high=1e12)
        )
        if self.ffn_dim_multiplier is not None:
            value = check_real("LlamaConfig.ffn_dim_multiplier", self.ffn_dim_multiplier, high=1e3)
            object.__setattr__(self, "ffn_dim_multiplier", value)
        if not isinstance(self.tie_word_embeddings, bool):
            raise LlamaError(
                f"LlamaConfig.tie_word_embeddings must be true or false, got "
                f"{brief(self.tie_word_embeddings)}."
            )
        if not isinstance(self.name, str):
            raise LlamaError(f"LlamaConfig.name must be a string, got {brief(self.name)}.")
        for field in ("param_dtype", "dtype"):
            if not isinstance(getattr(self, field), str) or getattr(self, field) not in DTYPES:
                raise LlamaError(
                    f"LlamaConfig.{field}={brief(getattr(self, field))} is not one of {DTYPES}."
                )
        if self.dim % self.n_heads:
            raise LlamaError(
                f"LlamaConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "the head dim is dim / n_heads."
            )
        if self.n_heads % self.kv_heads:
            raise LlamaError(
                f"LlamaConfig.n_heads={self.n_heads} is not divisible by n_kv_heads="
                f"{self.kv_heads}: grouped-query attention shares each KV head among "
                "n_heads / n_kv_heads query heads."
            )
        if self.head_dim % 2:
            raise LlamaError(
                f"LlamaConfig head dim dim/n_heads={self.head_dim} is odd; rotary embedding "
                "rotates pairs of features, so it must be even."
            )
        if not 1 <= self.ffn_hidden_dim <= _MAX["ffn_dim"]:
            raise LlamaError(
                f"LlamaConfig FFN width {self.ffn_hidden_dim} (from "
                f"multiple_of={self.multiple_of}, "
                f"ffn_dim_multiplier={self.ffn_dim_multiplier}) must be between 1 and "
                f"{_MAX['ffn_dim']}."
            )

    # Derived values ---------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """K: the number of key/value heads (n_kv_heads, or n_heads when unset)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        """H = dim / n_heads."""
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """F, the SwiGLU width: `ffn_dim`, or Meta's rule from `model.py`.

        Meta starts from 4 * dim, takes two thirds (SwiGLU has three matrices instead of
        two), scales by `ffn_dim_multiplier` and rounds up to a multiple of `multiple_of`.
        """
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Parameter count, computed from the shapes alone."""
        D, F, H, V = self.dim, self.ffn_hidden_dim, self.head_dim, self.vocab_size
        N, K = self.n_heads, self.kv_heads
        attention = D * N * H + 2 * D * K * H + N * H * D
        block = attention + 3 * D * F + 2 * D
        output = 0 if self.tie_word_embeddings else D * V
        return V * D + self.n_layers * block + D + output

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed (and re-validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `LlamaConfig.from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LlamaConfig:
        """Build a config from `to_dict` output (llama_jax.json), validated like any other.

        Args:
          data: a dict of LlamaConfig fields (rope_scaling as a dict or null).
        Returns:
          The config.
        Raises:
          LlamaError: not a dict, an unknown field, or a field of the wrong type or range.
        """
        if not isinstance(data, dict):
            raise LlamaError(f"a LlamaConfig must be a JSON object, got {brief(data)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise LlamaError(
                f"Unknown LlamaConfig field(s) {unknown}; known fields: {sorted(known)}."
            )
        return cls(**data)


# What each release shares; a preset adds its width D, depth L, heads N and FFN rule.
_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)  # MHA, 2k context
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)  # 4k context
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, norm_eps=1e-5, rope_theta=500000.0)
_LLAMA31 = dict(_LLAMA3, rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072)
_LLAMA32 = dict(_LLAMA31, rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True)
_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


def _preset(name, release, dim, n_layers, n_heads, multiple_of, ffn_mult, **kw) -> LlamaConfig:
    fields = dict(release, multiple_of=multiple_of, ffn_dim_multiplier=ffn_mult, **kw)
    return LlamaConfig(name=name, dim=dim, n_layers=n_layers, n_heads=n_heads, **fields)


PRESETS: dict[str, LlamaConfig] = {
    c.name: c
    for c in [
        # _preset(name, release, D, L, N, multiple_of, ffn_dim_multiplier, **other fields)
        # Llama 1 (Feb 2023): MHA, 2k context, norm eps 1e-6.
        _preset("llama1-7b", _LLAMA1, 4096, 32, 32, 256, None),
        _preset("llama1-13b", _LLAMA1, 5120, 40, 40, 256, None),
        _preset("llama1-33b", _LLAMA1, 6656, 60, 52, 256, None),
        _preset("llama1-65b", _LLAMA1, 8192, 80, 64, 256, None),
        # Llama 2 (Jul 2023): 4k context; 70B adds GQA with 8 KV heads.
        _preset("llama2-7b", _LLAMA2, 4096, 32, 32, 256, None),
        _preset("llama2-13b", _LLAMA2, 5120, 40, 40, 256, None),
        _preset("llama2-70b", _LLAMA2, 8192, 80, 64, 4096, 1.3, n_kv_heads=8),
        # Llama 3 (Apr 2024): 128k-token tiktoken vocabulary, GQA everywhere, theta 5e5.
        _preset("llama3-8b", _LLAMA3, 4096, 32, 32, 1024, 1.3, max_seq_len=8192),
        _preset("llama3-70b", _LLAMA3, 8192, 80, 64, 4096, 1.3, max_seq_len=8192),
        # Llama 3.1 (Jul 2024): 128k context through rope scaling (factor 8).
        _preset("llama3.1-8b", _LLAMA31, 4096, 32, 32, 1024, 1.3),
        _preset("llama3.1-70b", _LLAMA31, 8192, 80, 64, 4096, 1.3),
        _preset("llama3.1-405b", _LLAMA31, 16384, 126, 128, 4096, 1.2),
        # Llama 3.2 (Sep 2024): small text models with tied embeddings, scaling factor 32.
        _preset("llama3.2-1b", _LLAMA32, 2048, 16, 32, 256, 1.5),
        _preset("llama3.2-3b", _LLAMA32, 3072, 28, 24, 256, 1.0),
        # Tiny models for tests, notebooks and the quickstart; same code paths, any laptop.
        LlamaConfig(name="tiny", vocab_size=256, ffn_dim=128, max_seq_len=256, **_TINY),
        LlamaConfig(
            name="tiny-llama3",
            vocab_size=512,
            ffn_dim=160,
            rope_theta=500000.0,
            max_seq_len=512,
            rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=64),
            **_TINY,
        ),
        # A 134M-parameter model for the benchmarks: big enough to be bandwidth-bound.
        LlamaConfig(
            name="bench-134m",
            dim=768,
            n_layers=12,
            n_heads=12,
            vocab_size=32000,
            ffn_dim=2048,
            max_seq_len=2048,
        ),
    ]
}


def get_preset(name: str) -> LlamaConfig:
    """Look up a preset by name, with a message listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise LlamaError(
            f"Unknown preset {name!r}. Known presets: {', '.join(sorted(PRESETS))}."
        ) from None
