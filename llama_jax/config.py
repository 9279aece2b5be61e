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

from llama_jax.errors import LlamaError

DTYPES = ("float32", "bfloat16", "float16")


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
                f"rope_scaling.rope_type={self.rope_type!r} is not supported: LLaMA models use "
                "'llama3' scaling (Llama 3.1/3.2) or none at all (rope_scaling=None)."
            )
        if self.factor <= 0:
            raise LlamaError(f"rope_scaling.factor must be positive, got {self.factor}.")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise LlamaError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}."
            )
        if self.original_max_seq_len <= 0:
            raise LlamaError(
                "rope_scaling.original_max_seq_len must be positive, "
                f"got {self.original_max_seq_len}."
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of one LLaMA model, plus the dtypes it runs in.

    Field names follow Meta's `params.json` (dim, n_layers, n_heads, ...). The FFN width
    is either given outright (`ffn_dim`, as HF's `intermediate_size`) or derived with
    Meta's rule from `multiple_of` and `ffn_dim_multiplier`.
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
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for field in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise LlamaError(f"LlamaConfig.{field} must be a positive integer, got {value!r}.")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0
        ):
            raise LlamaError(
                "LlamaConfig.n_kv_heads must be a positive integer or None, "
                f"got {self.n_kv_heads!r}."
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
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise LlamaError(f"LlamaConfig.ffn_dim must be positive, got {self.ffn_dim}.")
        if self.norm_eps <= 0:
            raise LlamaError(f"LlamaConfig.norm_eps must be positive, got {self.norm_eps}.")
        if self.rope_theta <= 0:
            raise LlamaError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta}.")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise LlamaError(
                    f"LlamaConfig.{field}={getattr(self, field)!r} is not one of {DTYPES}."
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
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Build a config from `to_dict` output, naming any unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LlamaError(
                f"Unknown LlamaConfig field(s) {unknown}; known fields: {sorted(known)}."
            )
        return cls(**data)

    # Translations to and from the checkpoints' own config files -------------------

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Read Meta's `params.json` (every Llama 1 to 3.2 release).

        `n_kv_heads` absent means plain MHA; `vocab_size` of -1 (Llama 1/2 files) means
        32000; `use_scaled_rope` turns on Llama 3.1 scaling, with factor 32 for the 3.2
        models with tied embeddings (their files do not say it) and 8 otherwise. Meta's
        files do not record the context length either: it is taken from the release the
        file belongs to (2048 for Llama 1's norm_eps 1e-6, 4096 for Llama 2, 8192 for
        Llama 3's 128256-token vocabulary, 131072 with scaled rope).
        """
        p = dict(params)
        vocab = p.get("vocab_size", -1)
        scaling = None
        if p.get("use_scaled_rope"):
            factor = p.get("rope_scaling_factor")
            if factor is None:
                factor = 32.0 if p["dim"] <= 3072 else 8.0
            scaling = RopeScaling(factor=float(factor))
        known = {
            "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
            "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
            "max_batch_size", "rope_scaling_factor",
        }  # fmt: skip
        unknown = sorted(set(p) - known)
        if unknown:
            raise LlamaError(f"params.json has unknown field(s) {unknown}; known: {sorted(known)}.")
        kw: dict[str, Any] = dict(
            dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads"), vocab_size=32000 if vocab in (-1, None) else vocab,
            multiple_of=p.get("multiple_of", 256), ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
            norm_eps=p.get("norm_eps", 1e-5), rope_theta=float(p.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
        )  # fmt: skip
        if "max_seq_len" in p:
            kw["max_seq_len"] = p["max_seq_len"]
        elif scaling is not None:
            kw["max_seq_len"] = 131072
        elif kw["vocab_size"] == 128256:
            kw["max_seq_len"] = 8192
        elif kw["norm_eps"] == 1e-6:
            kw["max_seq_len"] = 2048
        if scaling is not None and scaling.factor == 32.0:
            kw["tie_word_embeddings"] = True
        kw.update(overrides)
        return cls(**kw)

    def to_meta_params(self) -> dict[str, Any]:
        """Meta's `params.json` for this config (what `from_meta_params` reads back)."""
        p: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "vocab_size": self.vocab_size, "multiple_of": self.multiple_of,
            "norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }  # fmt: skip
        if self.n_kv_heads is not None:
            p["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            p["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_scaling is not None:
            p["use_scaled_rope"] = True
            p["rope_scaling_factor"] = self.rope_scaling.factor
        return p

    @classmethod
    def from_hf(cls, config: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Read a Hugging Face `config.json` of a LlamaForCausalLM.

        Both layouts are understood: the older top-level `rope_theta` + `rope_scaling`
        and the newer `rope_parameters` dict.
        """
        c = dict(config)
        archs = c.get("architectures") or ["LlamaForCausalLM"]
        if c.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
            raise LlamaError(
                f"config.json describes model_type={c.get('model_type')!r}, "
                f"architectures={archs}; only LlamaForCausalLM (model_type 'llama') is supported."
            )
        rope = c.get("rope_parameters") or {}
        theta = float(c.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling_dict = c.get("rope_scaling") or rope
        rope_type = scaling_dict.get("rope_type", scaling_dict.get("type", "default"))
        scaling = None
        if rope_type not in ("default", None):
            if rope_type != "llama3":
                raise LlamaError(
                    f"config.json asks for rope_type={rope_type!r}; LLaMA checkpoints use "
                    "'llama3' scaling or 'default'."
                )
            scaling = RopeScaling(
                factor=float(scaling_dict["factor"]),
                low_freq_factor=float(scaling_dict["low_freq_factor"]),
                high_freq_factor=float(scaling_dict["high_freq_factor"]),
                original_max_seq_len=int(scaling_dict["original_max_position_embeddings"]),
            )
        dim, n_heads = c["hidden_size"], c["num_attention_heads"]
        head_dim = c.get("head_dim") or dim // n_heads
        if head_dim * n_heads != dim:
            raise LlamaError(
                f"config.json has head_dim={head_dim} with hidden_size={dim} and "
                f"num_attention_heads={n_heads}; LLaMA needs head_dim = hidden_size / heads."
            )
        kw: dict[str, Any] = dict(
            dim=dim, n_layers=c["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
            ffn_dim=c["intermediate_size"], norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_seq_len=int(c.get("max_position_embeddings", 4096)),
        )  # fmt: skip
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' LlamaForCausalLM loads."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope.update(
                rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_seq_len,
            )  # fmt: skip
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "intermediate_size": self.ffn_hidden_dim, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(rope),
            "rope_parameters": rope, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
            "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
        }  # fmt: skip

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per weight multiply-add, plus attention scores.

        Training costs about three times this (forward + two backward matmuls).
        """
        D, F, H, N, K = self.dim, self.ffn_hidden_dim, self.head_dim, self.n_heads, self.kv_heads
        per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
        # The embedding lookup is a gather (no FLOPs); the output projection always runs.
        matmul_params = self.n_layers * per_layer + D * self.vocab_size
        attention = 2 * 2 * self.n_layers * seq_len * self.n_heads * self.head_dim
        return 2 * matmul_params + attention


def _llama1(name: str, dim: int, n_layers: int, n_heads: int) -> LlamaConfig:
    return LlamaConfig(
        name=name, dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000,
        multiple_of=256, norm_eps=1e-6, max_seq_len=2048,
    )  # fmt: skip


def _llama2(name: str, dim: int, n_layers: int, n_heads: int, **kw: Any) -> LlamaConfig:
    kw.setdefault("multiple_of", 256)
    return LlamaConfig(
        name=name, dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000,
        norm_eps=1e-5, max_seq_len=4096, **kw,
    )  # fmt: skip


def _llama3(name: str, dim: int, n_layers: int, n_heads: int, **kw: Any) -> LlamaConfig:
    kw.setdefault("n_kv_heads", 8)
    kw.setdefault("max_seq_len", 8192)
    return LlamaConfig(
        name=name, dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=128256,
        norm_eps=1e-5, rope_theta=500000.0, **kw,
    )  # fmt: skip


_LLAMA31_SCALING = RopeScaling(factor=8.0)
_LLAMA32_SCALING = RopeScaling(factor=32.0)

PRESETS: dict[str, LlamaConfig] = {
    c.name: c
    for c in [
        # Llama 1 (Feb 2023): MHA, 2k context, norm eps 1e-6.
        _llama1("llama1-7b", 4096, 32, 32),
        _llama1("llama1-13b", 5120, 40, 40),
        _llama1("llama1-33b", 6656, 60, 52),
        _llama1("llama1-65b", 8192, 80, 64),
        # Llama 2 (Jul 2023): 4k context; 70B adds GQA with 8 KV heads.
        _llama2("llama2-7b", 4096, 32, 32),
        _llama2("llama2-13b", 5120, 40, 40),
        _llama2("llama2-70b", 8192, 80, 64, n_kv_heads=8, multiple_of=4096,
                ffn_dim_multiplier=1.3),
        # Llama 3 (Apr 2024): 128k-token tiktoken vocabulary, GQA everywhere, theta 5e5.
        _llama3("llama3-8b", 4096, 32, 32, multiple_of=1024, ffn_dim_multiplier=1.3),
        _llama3("llama3-70b", 8192, 80, 64, multiple_of=4096, ffn_dim_multiplier=1.3),
        # Llama 3.1 (Jul 2024): 128k context through rope scaling (factor 8).
        _llama3("llama3.1-8b", 4096, 32, 32, multiple_of=1024, ffn_dim_multiplier=1.3,
                rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
        _llama3("llama3.1-70b", 8192, 80, 64, multiple_of=4096, ffn_dim_multiplier=1.3,
                rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
        _llama3("llama3.1-405b", 16384, 126, 128, multiple_of=4096, ffn_dim_multiplier=1.2,
                rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
        # Llama 3.2 (Sep 2024): small text models with tied embeddings, scaling factor 32.
        _llama3("llama3.2-1b", 2048, 16, 32, multiple_of=256, ffn_dim_multiplier=1.5,
                rope_scaling=_LLAMA32_SCALING, max_seq_len=131072, tie_word_embeddings=True),
        _llama3("llama3.2-3b", 3072, 28, 24, multiple_of=256, ffn_dim_multiplier=1.0,
                rope_scaling=_LLAMA32_SCALING, max_seq_len=131072, tie_word_embeddings=True),
        # Tiny models for tests, notebooks and the quickstart; same code paths, any laptop.
        LlamaConfig(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                    ffn_dim=128, max_seq_len=256),
        LlamaConfig(name="tiny-llama3", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    vocab_size=512, ffn_dim=160, rope_theta=500000.0, max_seq_len=512,
                    rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=64)),
        # A 134M-parameter model for the benchmarks: big enough to be bandwidth-bound.
        LlamaConfig(name="bench-134m", dim=768, n_layers=12, n_heads=12, vocab_size=32000,
                    ffn_dim=2048, max_seq_len=2048),
    ]
}  # fmt: skip


def get_preset(name: str) -> LlamaConfig:
    """Look up a preset by name, with a message listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise LlamaError(
            f"Unknown preset {name!r}. Known presets: {', '.join(sorted(PRESETS))}."
        ) from None
