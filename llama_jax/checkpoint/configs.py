"""Meta's `params.json` and Hugging Face's `config.json`, to and from `LlamaConfig`.

Every value is handed to `LlamaConfig`, whose one validation checks types, finiteness
and ranges; this module only maps names and decides what a file does not say.

Meta's `params.json` does not record a release's constants: the rotary scaling factor
(8 for Llama 3.1, 32 for Llama 3.2), whether the output layer is tied to the embedding
(Llama 3.2) and the context length. Only a file whose shape is exactly an official
release's (every size, norm_eps, rope_theta, use_scaled_rope: compared with `PRESETS`)
takes that release's constants. Any other `use_scaled_rope` model gets what Meta's
reference code (llama_models/llama3/model.py `apply_scaling`) applies to every model:
factor 8, low_freq_factor 1, high_freq_factor 4, original context 8192; its output
layer is untied unless the weights have no `output.weight`. Each assumption is reported
in `notes` so the converter can print it.
"""

from __future__ import annotations

from typing import Any

from llama_jax.config import PRESETS, LlamaConfig, RopeScaling
from llama_jax.errors import LlamaError, brief

_META_FIELDS = frozenset(
    "dim n_layers n_heads n_kv_heads vocab_size multiple_of ffn_dim_multiplier norm_eps "
    "rope_theta use_scaled_rope max_seq_len max_batch_size rope_scaling_factor "
    "tie_word_embeddings".split()
)
# Context length of a custom model, which params.json cannot say (--max-seq-len changes it).
_CUSTOM_CONTEXT = 4096
_CUSTOM_SCALED_CONTEXT = 131072


def _official(cfg: LlamaConfig) -> LlamaConfig | None:
    """The release preset whose shape `cfg` has exactly, or None."""

    def shape(c: LlamaConfig) -> tuple:
        return (
            c.dim,
            c.n_layers,
            c.n_heads,
            c.kv_heads,
            c.vocab_size,
            c.ffn_hidden_dim,
            c.norm_eps,
            c.rope_theta,
            c.rope_scaling is not None,
        )

    for preset in PRESETS.values():
        if preset.name.startswith("llama") and shape(preset) == shape(cfg):
            return preset
    return None


def config_from_meta(
    params: Any,
    *,
    has_output: bool | None = None,
    notes: list[str] | None = None,
    **overrides: Any,
) -> LlamaConfig:
    """Read Meta's `params.json` (every Llama 1 to 3.2 release, and custom shapes).

    `n_kv_heads` absent means plain MHA; `vocab_size` of -1 (Llama 1/2 files) means
    32000; `use_scaled_rope` turns on Llama 3.1 scaling. The release constants the file
    cannot hold are chosen as the module docstring says.

    Args:
      params: the parsed params.json.
      has_output: whether the weights carry `output.weight` (None: unknown). A custom
        model without one ties its output layer to the embedding.
      notes: a list that receives one line per constant that was assumed.
      **overrides: LlamaConfig fields that win over the file and the assumptions, plus
        `rope_scaling_factor` (the CLI's --rope-scaling-factor).
    Returns:
      The validated config.
    Raises:
      LlamaError: not a JSON object, an unknown or missing field, or a bad value.
    """
    if not isinstance(params, dict):
        raise LlamaError(f"params.json must be a JSON object, got {brief(params)}.")
    unknown = sorted(map(str, set(params) - _META_FIELDS))
    if unknown:
        raise LlamaError(
            f"params.json has unknown field(s) {unknown}; known: {sorted(_META_FIELDS)}."
        )
    for field in ("dim", "n_layers", "n_heads"):
        if field not in params:
            raise LlamaError(f"params.json: missing field {field!r}.")
    notes = [] if notes is None else notes
    overrides = dict(overrides)
    scaled = params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise LlamaError(
            f"params.json: use_scaled_rope must be true or false, got {brief(scaled)}."
        )
    vocab = params.get("vocab_size", -1)
    kw: dict[str, Any] = dict(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=32000 if vocab in (-1, None) else vocab,
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=RopeScaling() if scaled else None,
    )
    release = _official(LlamaConfig(**kw))
    if release is not None:
        kw.update(
            rope_scaling=release.rope_scaling,
            max_seq_len=release.max_seq_len,
            tie_word_embeddings=release.tie_word_embeddings,
        )
        notes.append(
            f"params.json has the exact shape of {release.name}: its constants are used "
            f"(rope factor {release.rope_scaling.factor if scaled else 'none'}, "
            f"{'tied' if release.tie_word_embeddings else 'untied'} output, "
            f"context {release.max_seq_len})."
        )
    else:
        tied = has_output is False
        context = _CUSTOM_SCALED_CONTEXT if scaled else _CUSTOM_CONTEXT
        kw.update(max_seq_len=context, tie_word_embeddings=tied)
        notes.append(
            "params.json matches no official release, so Meta's reference constants are "
            "assumed: "
            + (
                "rope scaling factor 8, low_freq_factor 1, high_freq_factor 4, original "
                "context 8192; "
                if scaled
                else ""
            )
            + f"{'tied (no output.weight)' if tied else 'untied'} output; context {context}. "
            "Change them with --rope-scaling-factor, --max-seq-len, --[no-]tie-word-embeddings."
        )
    # Values written into params.json by this package's exports win over guesses.
    for field in ("max_seq_len", "tie_word_embeddings"):
        if field in params:
            kw[field] = params[field]
    factor = overrides.pop("rope_scaling_factor", params.get("rope_scaling_factor"))
    if factor is not None:
        if not scaled:
            raise LlamaError(
                "a rope scaling factor was given but params.json has no use_scaled_rope: true."
            )
        kw["rope_scaling"] = RopeScaling(factor=factor)
    kw.update(overrides)
    return LlamaConfig(**kw)


def config_to_meta(cfg: LlamaConfig) -> dict[str, Any]:
    """Meta's `params.json` for `cfg`, which Meta's loader and `config_from_meta` accept.

    Meta's loader passes `max_seq_len` and `max_batch_size` itself (a file holding either
    fails with "got multiple values for keyword argument"), so neither is written. The
    rotary factor and the tie are written only when `config_from_meta` would not infer
    them from the file and its output.weight (export always writes one); Meta's loader
    ignores both fields, and its reference code always applies factor 8.
    """
    p: dict[str, Any] = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": cfg.multiple_of,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
    }
    if cfg.n_kv_heads is not None:
        p["n_kv_heads"] = cfg.n_kv_heads
    if cfg.ffn_dim_multiplier is not None:
        p["ffn_dim_multiplier"] = cfg.ffn_dim_multiplier
    if cfg.rope_scaling is not None:
        p["use_scaled_rope"] = True
        inferred = config_from_meta(p).rope_scaling.factor
        if inferred != cfg.rope_scaling.factor:
            p["rope_scaling_factor"] = cfg.rope_scaling.factor
    if config_from_meta(p, has_output=True).tie_word_embeddings != cfg.tie_word_embeddings:
        p["tie_word_embeddings"] = cfg.tie_word_embeddings
    return p


def _rope_dict(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LlamaError(f"config.json: {where} must be an object or null, got {brief(value)}.")
    return value


def config_from_hf(config: Any, **overrides: Any) -> LlamaConfig:
    """Read a Hugging Face `config.json` of a LlamaForCausalLM.

    Both layouts are understood: the older top-level `rope_theta` + `rope_scaling`
    and the newer `rope_parameters` dict.

    Args:
      config: the parsed config.json.
      **overrides: LlamaConfig fields that win over the file.
    Returns:
      The validated config.
    Raises:
      LlamaError: another architecture, a missing field or a bad value.
    """
    if not isinstance(config, dict):
        raise LlamaError(f"config.json must be a JSON object, got {brief(config)}.")
    c = config
    archs = c.get("architectures") or ["LlamaForCausalLM"]
    if (
        c.get("model_type", "llama") != "llama"
        or not isinstance(archs, list)
        or ("LlamaForCausalLM" not in archs)
    ):
        raise LlamaError(
            f"config.json describes model_type={brief(c.get('model_type'))}, "
            f"architectures={brief(archs)}; only LlamaForCausalLM (model_type 'llama') is "
            "supported."
        )
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
    ):
        if field not in c:
            raise LlamaError(f"config.json: missing field {field!r}.")
    rope = _rope_dict(c.get("rope_parameters"), "rope_parameters")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling_dict = _rope_dict(c.get("rope_scaling"), "rope_scaling") or rope
    rope_type = scaling_dict.get("rope_type", scaling_dict.get("type", "default"))
    scaling = None
    if rope_type not in ("default", None):
        if rope_type != "llama3":
            raise LlamaError(
                f"config.json asks for rope_type={brief(rope_type)}; LLaMA checkpoints use "
                "'llama3' scaling or 'default'."
            )
        names = {
            "factor": "factor",
            "low_freq_factor": "low_freq_factor",
            "high_freq_factor": "high_freq_factor",
            "original_max_seq_len": "original_max_position_embeddings",
        }
        for hf_name in names.values():
            if hf_name not in scaling_dict:
                raise LlamaError(f"config.json: rope_scaling is missing {hf_name!r}.")
        scaling = RopeScaling(**{ours: scaling_dict[hf] for ours, hf in names.items()})
    dim, n_heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim")
    if (
        head_dim is not None
        and _ints(dim, n_heads)
        and (dim % n_heads or head_dim != dim // n_heads)
    ):
        raise LlamaError(
            f"config.json has head_dim={brief(head_dim)} with hidden_size={brief(dim)} and "
            f"num_attention_heads={brief(n_heads)}; LLaMA needs head_dim = hidden_size / heads."
        )
    tie = c.get("tie_word_embeddings", False)
    kw: dict[str, Any] = dict(
        dim=dim,
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads"),
        vocab_size=c["vocab_size"],
        ffn_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=tie,
        max_seq_len=c.get("max_position_embeddings", 4096),
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """A `config.json` dict that transformers' LlamaForCausalLM loads."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_seq_len,
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.ffn_hidden_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else dict(rope),
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
    }
