"""Sharding on 8 simulated CPU devices: each mesh preset against the single-device model.

The configurations stand in for the official presets' shapes (MHA, GQA, MQA, tied
embeddings, Llama 3 rope scaling) at a size that compiles in about a second.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import llama_jax as lj
from llama_jax import sharding as sh
from llama_jax.model import build_model

TINY = dict(dim=64, n_layers=2, n_heads=8, vocab_size=128, ffn_dim=128, max_seq_len=64)
CONFIGS = {
    "mha": lj.LlamaConfig(**TINY),
    "gqa": lj.LlamaConfig(**{**TINY, "n_kv_heads": 2}),
    "mqa": lj.LlamaConfig(**{**TINY, "n_kv_heads": 1}),
    "tied": lj.LlamaConfig(**{**TINY, "n_kv_heads": 4, "tie_word_embeddings": True}),
    "llama3_scaling": lj.LlamaConfig(
        **{
            **TINY,
            "n_kv_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": lj.RopeScaling(factor=8.0, original_max_seq_len=8),
        }
    ),
}
MESHES = ["dp", "fsdp", "tp", "fsdp_tp"]
B, T = 8, 16


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest reference value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def batch(cfg, seed=0):
    """Tokens [B, T] and a left-padded mask (rows 1 and 5 start with padding)."""
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T), dtype=np.int32)
    mask = np.ones((B, T), bool)
    mask[1, :3] = False
    mask[5, :7] = False
    return tokens, mask


_WEIGHTS: dict[str, dict] = {}
_REFERENCE: dict[str, np.ndarray] = {}


def weights(name) -> dict:
    """Random weights for a config, drawn with numpy (nothing to compile), non-unit norms."""
    if name not in _WEIGHTS:
        rng = np.random.default_rng(sorted(CONFIGS).index(name))
        abstract = nnx.to_pure_dict(nnx.state(lj.abstract_model(CONFIGS[name])))
        _WEIGHTS[name] = jax.tree_util.tree_map_with_path(
            lambda path, a: (
                1 + 0.1 * rng.standard_normal(a.shape, np.float32)
                if "weight" in jax.tree_util.keystr(path)
                else 0.05 * rng.standard_normal(a.shape, np.float32)
            ),
            abstract,
        )
    return _WEIGHTS[name]


def model_of(name, mesh=None):
    """A model with `weights(name)` on one device, or moved onto `mesh` by shard_model."""
    model = lj.abstract_model(CONFIGS[name])
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, weights(name)))
    nnx.update(model, state)
    return sh.shard_model(model, mesh)


def reference_logits(name):
    """The unsharded model's logits on one device (computed once per config)."""
    if name not in _REFERENCE:
        tokens, mask = batch(CONFIGS[name])
        _REFERENCE[name] = np.asarray(sh.jit_forward(model_of(name))(tokens, mask))
    return _REFERENCE[name]


def shard_bytes_on(device, tree) -> int:
    """Bytes of `tree`'s arrays held by one device."""
    return sum(
        s.data.nbytes
        for a in jax.tree.leaves(tree)
        for s in a.addressable_shards
        if s.device == device
    )


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_forward_matches_single_device(name, mesh_name):
    mesh = sh.make_mesh(mesh_name)
    model = model_of(name, mesh)
    tokens, mask = batch(CONFIGS[name])
    logits = sh.jit_forward(model, mesh)(tokens, mask)
    assert logits.sharding.mesh.shape == mesh.shape
    assert logits.sharding.spec == sh.logical_to_spec(
        ("batch", "length", "act_vocab"), logits.shape, mesh
    )
    assert rel_err(logits, reference_logits(name)) < 1e-5


def test_build_model_on_a_plain_jax_mesh():
    # jax.make_mesh's default axis types are Explicit; there a naive embedding gather
    # raises a ShardingTypeError. build_model takes the mesh as the same grid with Auto
    # axes: the weights are created directly sharded, equal the single-device ones (up
    # to an ulp: jit fuses the sampling), and the model runs jitted and eagerly.
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert all(t == AxisType.Explicit for t in mesh.axis_types)
    cfg = CONFIGS["tied"]
    plain, sharded = build_model(cfg, seed=7), build_model(cfg, seed=7, mesh=mesh)
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(params_of(plain)),
        jax.tree_util.tree_leaves_with_path(params_of(sharded)),
        strict=True,
    ):
        assert b.sharding.mesh.shape == mesh.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    assert sharded.tok_embeddings[...].sharding.spec == P("tensor", "fsdp")

    tokens, mask = batch(cfg)
    want = sh.jit_forward(plain)(tokens, mask)
    assert rel_err(sh.jit_forward(sharded, mesh)(tokens, mask), want) < 1e-5
    assert all(t == AxisType.Auto for t in sharded.tok_embeddings[...].sharding.mesh.axis_types)
    with jax.set_mesh(sh.make_mesh(mesh)):  # eager, op by op, on the same grid
        eager = sharded(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert rel_err(eager, want) < 1e-5


def test_auto_axes_mesh_from_jax_make_mesh():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    model = model_of("mqa", mesh)
    tokens, mask = batch(CONFIGS["mqa"])
    assert rel_err(sh.jit_forward(model, mesh)(tokens, mask), reference_logits("mqa")) < 1e-5


def test_gqa_with_fewer_kv_heads_than_the_tensor_axis():
    # n_kv_heads=2 on tensor=4: the KV projections are replicated over tensor, the query
    # heads split, and every device uses the KV heads its query heads need.
    assert CONFIGS["gqa"].kv_heads == 2
    mesh = sh.make_mesh("data=2,tensor=4")
    model = model_of("gqa", mesh)
    assert model.layers[0].attention.wk[...].sharding.spec == P(None, None, None)
    assert model.layers[0].attention.wq[...].sharding.spec == P(None, "tensor", None)
    tokens, mask = batch(CONFIGS["gqa"])
    assert rel_err(sh.jit_forward(model, mesh)(tokens, mask), reference_logits("gqa")) < 1e-5


@pytest.mark.parametrize("mesh_name", ["fsdp_tp"])
def test_sharded_prefill_and_decode_match_single_device(mesh_name):
    cfg = CONFIGS["gqa"]
    tokens, mask = batch(cfg)
    nxt = np.arange(B, dtype=np.int32)[:, None] + 5  # one decode token per row

    def run(model, mesh):
        graphdef, state = nnx.split(model)

        def prefill(state, tokens, mask, cache):
            return nnx.merge(graphdef, state)(tokens, attention_mask=mask, cache=cache)

        def decode(state, tok, cache):
            return nnx.merge(graphdef, state)(tok, cache=cache)

        cache = lj.KVCache.create(cfg, B, 32)
        if mesh is None:
            logits, cache = jax.jit(prefill)(state, tokens, mask, cache)
            step, _ = jax.jit(decode)(state, nxt, cache)
            return logits, step, None
        state_sh = sh.param_shardings(state, mesh)
        cache_sh = sh.cache_shardings(cache, mesh)
        rows = sh.batch_sharding(mesh, (B, T))
        one = sh.batch_sharding(mesh, (B, 1))
        logit_sh = sh.logical_sharding(mesh, ("batch", "length", "act_vocab"), (B, T, 128))
        step_sh = sh.logical_sharding(mesh, ("batch", "length", "act_vocab"), (B, 1, 128))
        cache = jax.device_put(cache, cache_sh)
        with sh.use_mesh(mesh):
            logits, cache = jax.jit(
                prefill,
                in_shardings=(state_sh, rows, rows, cache_sh),
                out_shardings=(logit_sh, cache_sh),
            )(state, tokens, mask, cache)
            step, cache = jax.jit(
                decode, in_shardings=(state_sh, one, cache_sh), out_shardings=(step_sh, cache_sh)
            )(state, nxt, cache)
        return logits, step, cache

    want_prefill, want_step, _ = run(model_of("gqa"), None)
    mesh = sh.make_mesh(mesh_name)
    got_prefill, got_step, cache = run(model_of("gqa", mesh), mesh)
    assert rel_err(got_prefill, want_prefill) < 1e-5
    assert rel_err(got_step, want_step) < 1e-5
    for k in cache.k:  # each layer's [B, K, S, H] keys sharded by the rules table
        assert k.sharding.spec == sh.logical_to_spec(sh.CACHE_AXES["k"], k.shape, mesh)
    assert int(cache.index) == T + 1


def test_sharded_gradients_match_single_device():
    # The core of a train step: loss and gradients under fsdp x tensor equal one device's.
    tokens, mask = batch(CONFIGS["llama3_scaling"])

    def loss(params, graphdef, tokens, mask):
        model = nnx.merge(graphdef, params)
        logits = model(tokens[:, :-1], attention_mask=mask[:, :-1])
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    grad = jax.value_and_grad(loss)
    graphdef, state = nnx.split(model_of("llama3_scaling"))
    want_loss, want_grads = jax.jit(grad, static_argnums=1)(state, graphdef, tokens, mask)

    mesh = sh.make_mesh("fsdp_tp")
    graphdef, state = nnx.split(model_of("llama3_scaling", mesh))
    state_sh = sh.param_shardings(state, mesh)
    rows = sh.batch_sharding(mesh, (B, T))
    with sh.use_mesh(mesh):
        step = jax.jit(
            lambda s, t, m: grad(s, graphdef, t, m),
            in_shardings=(state_sh, rows, rows),
            out_shardings=(sh.replicated(mesh), state_sh),
        )
        got_loss, got_grads = step(state, tokens, mask)
    assert abs(float(got_loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
        assert rel_err(g, want[path]) < 1e-5, jax.tree_util.keystr(path)


@pytest.mark.parametrize("explicit", [True, False])
def test_load_a_checkpoint_onto_a_mesh(tmp_path, explicit):
    # llama_jax.load restores each array onto its sharding, on a mesh from plain
    # jax.make_mesh (Explicit axes, taken as the same grid with Auto axes) or an Auto one.
    path = lj.checkpoint.save(model_of("gqa"), tmp_path / "ckpt")
    types = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(types,) * 3)
    model = lj.load(path, mesh=mesh)
    assert model.layers[0].attention.wq[...].sharding.spec == P("fsdp", "tensor", None)
    assert model.layers[0].attention.wq[...].sharding.mesh.axis_types == (AxisType.Auto,) * 3
    tokens, mask = batch(CONFIGS["gqa"])
    assert rel_err(sh.jit_forward(model, mesh)(tokens, mask), reference_logits("gqa")) < 1e-5


# --------------------------------------------------------------------------- placement


def test_build_model_never_holds_the_whole_model_on_a_device(monkeypatch):
    # The jitted initialiser build_model compiles: per device, its outputs and its
    # temporaries together stay near 1/8 of the model (the random bits are generated
    # sharded too), never a full copy.
    cfg = lj.LlamaConfig(
        dim=512, n_layers=4, n_heads=8, vocab_size=4096, ffn_dim=1024, max_seq_len=64
    )
    jitted = []
    real_jit = jax.jit

    def recording_jit(fn, **kwargs):
        jitted.append(real_jit(fn, **kwargs))
        return jitted[-1]

    monkeypatch.setattr(jax, "jit", recording_jit)
    model = build_model(cfg, seed=0, mesh="fsdp")
    monkeypatch.undo()
    assert len(jitted) == 1
    memory = jitted[0].lower().compile().memory_analysis()
    total = cfg.num_params() * 4
    assert memory.output_size_in_bytes <= total / 8 * 1.01
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < total / 3
    held = shard_bytes_on(jax.devices()[0], params_of(model))
    assert abs(held - memory.output_size_in_bytes) < 1024  # XLA counts a tuple table too


def test_fsdp_splits_every_weight_eight_ways():
    mesh = sh.make_mesh("fsdp")
    params = params_of(model_of("mha", mesh))
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        assert "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)), jax.tree_util.keystr(path)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    for device in jax.devices():
        assert shard_bytes_on(device, params) == total // 8


def test_tensor_parallel_splits_heads_mlp_and_vocab():
    cfg = CONFIGS["mha"]
    model = model_of("mha", sh.make_mesh("tp"))
    a, f = model.layers[0].attention, model.layers[0].feed_forward
    assert a.wq[...].sharding.spec == P(None, "tensor", None)
    assert a.wk[...].sharding.spec == P(None, "tensor", None)
    assert a.wo[...].sharding.spec == P("tensor", None, None)
    assert f.w1[...].sharding.spec == P(None, "tensor")
    assert f.w2[...].sharding.spec == P("tensor", None)
    assert model.tok_embeddings[...].sharding.spec == P("tensor", None)
    assert model.output[...].sharding.spec == P(None, "tensor")
    assert model.norm.weight[...].sharding.spec == P(None)  # [D]: small, replicated
    params = params_of(model)
    norms = cfg.dim * (2 * cfg.n_layers + 1) * 4
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert shard_bytes_on(jax.devices()[3], params) == (total - norms) // 8 + norms


def test_fsdp_tp_specs_follow_the_rules_table():
    mesh = sh.make_mesh("fsdp_tp")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    model = model_of("gqa", mesh)
    expected = {
        ("tok_embeddings",): P("tensor", "fsdp"),
        ("layers", "attention", "wq"): P("fsdp", "tensor", None),
        ("layers", "attention", "wk"): P("fsdp", "tensor", None),
        ("layers", "attention", "wo"): P("tensor", None, "fsdp"),
        ("layers", "feed_forward", "w1"): P("fsdp", "tensor"),
        ("layers", "feed_forward", "w2"): P("tensor", "fsdp"),
        ("layers", "ffn_norm", "weight"): P("fsdp"),
        ("norm", "weight"): P("fsdp"),
        ("output",): P("fsdp", "tensor"),
    }
    flat = {  # paths without the layer number, as in the rules table
        tuple(str(k.key) for k in path if not isinstance(k.key, int)): x
        for path, x in jax.tree_util.tree_leaves_with_path(params_of(model))
    }
    for path, spec in expected.items():
        assert flat[path].sharding.spec == spec, path
    for path, x in flat.items():
        assert x.sharding.spec == sh.logical_to_spec(sh.PARAM_AXES[path], x.shape, mesh)


def test_bytes_per_device_is_planned_without_allocating():
    mesh = sh.make_mesh("fsdp_tp")
    params = params_of(model_of("tied", mesh))
    abstract = nnx.to_pure_dict(nnx.state(lj.abstract_model(CONFIGS["tied"])))
    planned = sh.bytes_per_device(abstract, sh.param_shardings(abstract, mesh))
    assert planned == shard_bytes_on(jax.devices()[0], params)
    assert planned < sum(x.nbytes for x in jax.tree.leaves(params)) / 7


def test_dp_replicates_the_weights():
    params = params_of(model_of("mqa", sh.make_mesh("dp")))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert shard_bytes_on(jax.devices()[5], params) == total


def test_param_shardings_of_an_abstract_model_allocate_nothing():
    # Plan a 405B model's shardings on 8 devices without memory: the restore target.
    cfg = lj.PRESETS["llama3.1-405b"]
    mesh = sh.make_mesh("fsdp_tp")
    state = nnx.state(lj.abstract_model(cfg))
    shardings = sh.param_shardings(state, mesh)
    wq = shardings["layers"][0]["attention"]["wq"]
    wq = wq.get_value() if isinstance(wq, nnx.Variable) else wq
    assert wq.spec == P("fsdp", "tensor", None)
    sh.validate(cfg, mesh)


# --------------------------------------------------------------------------- meshes


@pytest.mark.parametrize(
    "spec, sizes",
    [
        ("dp", (8, 1, 1)),
        ("replicated", (8, 1, 1)),
        ("fsdp", (1, 8, 1)),
        ("tp", (1, 1, 8)),
        ("fsdp_tp", (1, 4, 2)),
        ("data=2,fsdp=-1,tensor=2", (2, 2, 2)),
        (" tensor=4 , data=-1 ", (2, 1, 4)),
        ({"fsdp": 2, "tensor": -1}, (1, 2, 4)),
        ("data=1,fsdp=8,tensor=1", (1, 8, 1)),
    ],
)
def test_make_mesh_resolves_sizes(spec, sizes):
    mesh = sh.make_mesh(spec)
    assert mesh.axis_names == sh.MESH_AXES
    assert tuple(mesh.shape[a] for a in sh.MESH_AXES) == sizes
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_auto_mesh_keeps_the_device_grid():
    explicit = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    auto = sh.auto_mesh(explicit)
    assert auto.axis_types == (AxisType.Auto,) * 3
    assert auto.axis_names == explicit.axis_names
    assert (auto.device_ids == explicit.device_ids).all()


def test_make_mesh_none_and_explicit():
    assert sh.make_mesh(None) is None
    mesh = sh.make_mesh("fsdp")
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sh.make_mesh(mesh) is mesh
    explicit = jax.make_mesh((1, 8, 1), sh.MESH_AXES)  # JAX's default: Explicit axes
    assert all(t == AxisType.Explicit for t in explicit.axis_types)
    assert sh.make_mesh(explicit).axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize(
    "spec, words",
    [
        ("data=3", ["3 devices", "there are 8"]),
        ("data=2,fsdp=2", ["4 devices", "there are 8"]),
        ("data=3,fsdp=-1", ["multiple of 3", "8"]),
        ("data=-1,fsdp=-1", ["at most one axis may be -1"]),
        ("pipeline=2", ["unknown axis 'pipeline'", "data, fsdp, tensor"]),
        ("data=two", ["'data'", "'two'"]),
        ("data=0,fsdp=-1", ["data=0"]),
        ("data", ["'data'", "AXIS=SIZE"]),
        ("data=2,data=4", ["'data' is given twice"]),
    ],
)
def test_bad_meshes_are_refused_with_the_numbers(spec, words):
    with pytest.raises(lj.LlamaError) as e:
        sh.make_mesh(spec)
    for word in words:
        assert word in str(e.value)


def test_a_mesh_with_foreign_axis_names_is_refused():
    mesh = jax.make_mesh((8,), ("x",))
    with pytest.raises(lj.LlamaError, match="axes \\('x',\\)"):
        build_model(CONFIGS["mha"], mesh=mesh)


@pytest.mark.parametrize(
    "cfg, mesh, words",
    [
        (CONFIGS["mha"].replace(n_heads=4, n_kv_heads=4), "tensor=8", ["n_heads=4", "tensor=8"]),
        (
            lj.LlamaConfig(**{**TINY, "ffn_dim": 100}),
            "tensor=8",
            ["ffn_hidden_dim", "100", "tensor=8"],
        ),
        (lj.LlamaConfig(**{**TINY, "dim": 52, "n_heads": 2}), "fsdp=-1", ["dim=52", "fsdp=8"]),
        (
            lj.LlamaConfig(**{**TINY, "dim": 48, "n_heads": 6, "n_kv_heads": 3}),
            "data=4,tensor=2",
            ["n_kv_heads=3", "tensor=2"],
        ),
    ],
)
def test_splits_that_cannot_work_are_refused_before_compiling(cfg, mesh, words):
    mesh = sh.make_mesh(mesh)
    with pytest.raises(lj.LlamaError) as e:
        build_model(cfg, mesh=mesh)
    for word in words:
        assert word in str(e.value)


def test_param_shardings_refuse_heads_that_cannot_split():
    # What llama_jax.load and the train step rely on when they shard a parameter tree.
    cfg = CONFIGS["mha"].replace(n_heads=4, n_kv_heads=4)
    state = nnx.state(lj.abstract_model(cfg))
    with pytest.raises(lj.LlamaError, match=r"layers/attention/w[qo]: .*n_heads=4.* tensor=8"):
        sh.param_shardings(state, sh.make_mesh("tensor=8"))


def test_a_batch_that_does_not_divide_is_refused():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    with pytest.raises(lj.LlamaError, match="Batch size: 6 rows .* data=2 x fsdp=2 = 4"):
        sh.batch_sharding(mesh, (6, 16))


def test_mesh_flag_parses_into_a_mesh():
    from llama_jax.cli.common import add_mesh_argument

    parser = argparse.ArgumentParser()
    add_mesh_argument(parser)
    assert parser.parse_args([]).mesh is None
    args = parser.parse_args(["--mesh", "data=2,fsdp=-1,tensor=2"])
    assert dict(sh.make_mesh(args.mesh).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert "fsdp_tp" in parser.format_help()


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 3, 8))
    assert sh.constrain(x, ("batch", "length", "act_embed")) is x


def test_info_command_runs_sharded(capsys):
    from llama_jax.cli import main

    assert main(["info", "tiny", "--forward", "--mesh", "data=2,fsdp=-1,tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=2 fsdp=2 tensor=2 (8 devices" in out
    assert "logits (4, 16, 256)" in out
    assert main(["info", "tiny", "--mesh", "tensor=8"]) == 2
    assert "n_heads=4 cannot be split over the mesh axis tensor=8" in capsys.readouterr().err


def test_info_plans_a_pod_without_its_devices(capsys):
    from llama_jax.cli import main

    # 405B in float32 over fsdp=32 x tensor=8: 405,853,388,800 * 4 bytes / 256 = 5.91 GiB.
    argv = ["info", "llama3.1-405b", "--mesh", "fsdp=-1,tensor=8", "--devices", "256"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "planned mesh data=1 fsdp=32 tensor=8 (256 devices" in out
    assert "5.91 GiB of float32 weights per device" in out
    assert main(["info", "llama3.1-8b", "--mesh", "tensor=16", "--devices", "64"]) == 2
    assert "16 devices but there are 64" in capsys.readouterr().err
