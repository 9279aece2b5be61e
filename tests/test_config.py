"""Configs: every official preset has the published parameter count; bad configs fail early."""

import json

import pytest

import llama_jax as lj
from llama_jax.checkpoint.configs import config_from_hf, config_from_meta, config_to_hf

# Published parameter counts (Meta's model cards / the HF checkpoints' totals).
PUBLISHED = {
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}
# The rounded figures quoted in papers and model cards.
QUOTED = {
    "llama2-7b": 6.74e9,
    "llama3-8b": 8.03e9,
    "llama2-70b": 6.90e10,
    "llama3.1-405b": 4.06e11,
    "llama3.2-1b": 1.24e9,
    "llama3.2-3b": 3.21e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_official_preset_builds_abstractly_with_published_count(name):
    cfg = lj.PRESETS[name]
    model = lj.abstract_model(cfg)  # jax.eval_shape: no memory allocated
    n = lj.count_params(model)
    assert n == PUBLISHED[name] == cfg.num_params()
    if name in QUOTED:
        assert abs(n - QUOTED[name]) / QUOTED[name] < 0.005
    assert len(model.layers) == cfg.n_layers
    assert model.layers[0].attention.wq.shape == (cfg.dim, cfg.n_heads, cfg.head_dim)


def test_preset_details():
    assert lj.PRESETS["llama3.1-8b"].rope_scaling.factor == 8.0
    assert lj.PRESETS["llama3.2-1b"].rope_scaling.factor == 32.0
    assert lj.PRESETS["llama3.2-3b"].tie_word_embeddings
    assert lj.PRESETS["llama2-70b"].ffn_hidden_dim == 28672
    assert lj.PRESETS["llama1-7b"].norm_eps == 1e-6
    assert lj.PRESETS["llama3-8b"].rope_scaling is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(dim=60, n_heads=8), "n_heads"),
        (dict(dim=72, n_heads=8), "head dim"),
        (dict(rope_scaling={"rope_type": "yarn"}), "rope_type"),
        (dict(param_dtype="int8"), "param_dtype"),
        (dict(n_layers=0), "n_layers"),
        (
            dict(rope_scaling={"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
            "low_freq_factor",
        ),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(lj.LlamaError, match=field):
        lj.LlamaConfig(**kwargs)


def test_unknown_preset_lists_known_names():
    with pytest.raises(lj.LlamaError, match="llama3.1-8b"):
        lj.get_preset("llama4-8b")


def test_config_round_trips_through_json_and_checkpoint_formats():
    for cfg in lj.PRESETS.values():
        assert lj.LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        hf = config_from_hf(json.loads(json.dumps(config_to_hf(cfg))))
        assert hf.num_params() == cfg.num_params()
        assert hf.rope_scaling == cfg.rope_scaling and hf.rope_theta == cfg.rope_theta
    meta = config_from_meta(
        {
            "dim": 2048,
            "n_layers": 16,
            "n_heads": 32,
            "n_kv_heads": 8,
            "vocab_size": 128256,
            "ffn_dim_multiplier": 1.5,
            "multiple_of": 256,
            "norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "use_scaled_rope": True,
        }
    )
    assert meta.num_params() == PUBLISHED["llama3.2-1b"]
    assert meta.rope_scaling.factor == 32.0 and meta.tie_word_embeddings
    assert meta.max_seq_len == 131072
    llama2 = config_from_meta(
        {
            "dim": 4096,
            "multiple_of": 256,
            "n_heads": 32,
            "n_layers": 32,
            "norm_eps": 1e-05,
            "vocab_size": -1,
        }
    )
    assert llama2.num_params() == PUBLISHED["llama2-7b"] and llama2.max_seq_len == 4096
    llama1 = config_from_meta(
        {
            "dim": 4096,
            "multiple_of": 256,
            "n_heads": 32,
            "n_layers": 32,
            "norm_eps": 1e-06,
            "vocab_size": -1,
        }
    )
    assert llama1.max_seq_len == 2048 and llama1.n_kv_heads is None


def test_hf_config_newer_rope_parameters_layout():
    hf = config_to_hf(lj.PRESETS["llama3.1-8b"])
    hf.pop("rope_theta")
    hf.pop("rope_scaling")
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0


def test_unknown_architecture_is_refused():
    with pytest.raises(lj.LlamaError, match="LlamaForCausalLM"):
        config_from_hf({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
