"""Files from strangers: crafted pickles, zip containers, safetensors headers and configs.

Property tests (Hypothesis) generate malformed inputs and require, for each, either one
LlamaError or a result the reference implementation agrees with: torch.load(...,
weights_only=True) for `.pth` files, the `safetensors` library for safetensors files.
Through the command line: exit 2, one line, no traceback, no DST, nothing outside DST
touched. Memory stays bounded (tracemalloc). Then one focused test per case of issue 12.
"""

import json
import os
import resource
import shutil
import struct
import tempfile
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_jax as lj
from llama_jax.checkpoint import store
from llama_jax.checkpoint.configs import config_from_hf, config_from_meta, config_to_hf
from llama_jax.checkpoint.jsonio import MAX_DEPTH, loads
from llama_jax.checkpoint.safetensors_io import read_safetensors
from llama_jax.checkpoint.sources import detect
from llama_jax.checkpoint.torch_zip import (
    MAX_PICKLE_BYTES,
    _global,
    _int,
    _str,
    _tuple,
    read_pth,
    write_pth,
)
from llama_jax.cli import main

FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SLOW = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
MB = 2**20


# Builders --------------------------------------------------------------------------


def tensor_pickle(entries, tail: bytes = b"") -> bytes:
    """A state-dict pickle like torch.save's; entries: (name, key, numel, offset, size, stride).

    Every field is written as given (negative and huge numbers included).
    """
    ordered_dict = _global("collections", "OrderedDict") + b")R"
    out = [b"\x80\x02", ordered_dict, b"("]
    for name, key, numel, offset, size, stride in entries:
        storage = (
            _tuple(
                [
                    _str("storage"),
                    _global("torch", "FloatStorage"),
                    _str(key),
                    _str("cpu"),
                    _int(numel),
                ]
            )
            + b"Q"
        )
        args = _tuple(
            [
                storage,
                _int(offset),
                _tuple(map(_int, size)),
                _tuple(map(_int, stride)),
                b"\x89",
                ordered_dict,
            ]
        )
        out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R", tail]
    out += [b"u", b"."]
    return b"".join(out)


def write_zip(path, pkl: bytes, storages: dict, compress=zipfile.ZIP_STORED) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl, compress_type=compress)
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return str(path)


def safetensors_file(path, header, data: bytes) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def bounded(fn, limit: int):
    """Run fn under tracemalloc; fail if it allocated more than `limit` bytes at peak."""
    tracemalloc.start()
    try:
        return fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit, f"peak {peak / MB:.1f} MiB"


def read_all(path, reader):
    """Every tensor of a file, or the LlamaError; any other exception fails the test."""
    try:
        return {k: t.read() for k, t in reader(path).items()}
    except lj.LlamaError as e:
        return e


# .pth: properties ------------------------------------------------------------------

counts = st.integers(min_value=-4, max_value=12) | st.sampled_from([2**31, 2**40, 2**63 + 5])


@FAST
@given(
    numel=st.integers(0, 24),
    offset=counts,
    size=st.lists(counts, max_size=3),
    stride=st.lists(counts, max_size=3),
)
def test_pth_tensor_metadata_is_refused_or_read_as_torch_reads_it(numel, offset, size, stride):
    with tempfile.TemporaryDirectory() as d:
        storage = np.arange(numel, dtype=np.float32).tobytes()
        path = write_zip(
            os.path.join(d, "x.pth"),
            tensor_pickle([("w", "0", numel, offset, size, stride)]),
            {"0": storage},
        )
        got = bounded(lambda: read_all(path, read_pth), 4 * MB)
        fits = (
            offset >= 0
            and len(size) == len(stride)
            and min(size + stride, default=0) >= 0
            and int(np.prod(size, dtype=object)) <= numel
            and (
                int(np.prod(size, dtype=object)) == 0
                or offset + 1 + sum((a - 1) * b for a, b in zip(size, stride, strict=True)) <= numel
            )
        )
        if isinstance(got, lj.LlamaError):
            assert not fits, got  # a valid tensor must not be refused
            return
        assert fits
        want = torch.load(path, weights_only=True)["w"]  # the oracle, only on a valid file
        np.testing.assert_array_equal(got["w"], want.numpy())


@FAST
@given(data=st.data())
def test_mutated_pth_is_refused_or_read_consistently(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.pth")
        write_pth(
            path,
            [("a", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.ones(4, np.float32))],
        )
        raw = bytearray(open(path, "rb").read())
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        open(path, "wb").write(bytes(raw))
        got = bounded(lambda: read_all(path, read_pth), 4 * MB)
        if not isinstance(got, lj.LlamaError):
            for name, arr in got.items():  # whatever was read lies inside the file
                assert arr.size <= len(raw) // 4, name


# safetensors: properties ------------------------------------------------------------

ints = st.integers(-3, 40) | st.sampled_from([2**64, 10**30]) | st.floats(allow_nan=True)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "I8", "F8_E4M3", "X"]),
        "shape": st.lists(ints, max_size=3),
        "data_offsets": st.lists(ints, max_size=3),
    }
)


@FAST
@given(
    header=st.dictionaries(st.sampled_from(["a", "b", "c"]), entries, max_size=3),
    data_len=st.integers(0, 64),
)
def test_safetensors_header_is_refused_or_read_as_the_library_reads_it(header, data_len):
    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as d:
        raw = json.dumps(header).encode()  # NaN and Infinity included, as Python writes them
        path = safetensors_file(os.path.join(d, "x.safetensors"), raw, bytes(range(data_len)))
        got = bounded(lambda: read_all(path, read_safetensors), 4 * MB)
        if isinstance(got, lj.LlamaError):
            return
        want = load_file(path)  # the format's own reader must agree with what we accepted
        assert got.keys() == want.keys()
        for k in got:
            assert np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)), k


@FAST
@given(depth=st.integers(MAX_DEPTH + 1, 50_000), bracket=st.sampled_from(["[", '{"a":']))
def test_deep_json_is_refused_without_recursion(depth, bracket):
    with pytest.raises(lj.LlamaError, match="nested"):
        loads((bracket * depth).encode(), "x.json")


# Configs: properties -----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
BASE_META = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128,
    "multiple_of": 32,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
BASE_HF = config_to_hf(lj.PRESETS["tiny-llama3"])
BASE_OURS = lj.PRESETS["tiny-llama3"].to_dict()


def _assert_sane(cfg: lj.LlamaConfig):
    for v in (cfg.norm_eps, cfg.rope_theta, cfg.ffn_hidden_dim, cfg.dim, cfg.n_layers):
        assert np.isfinite(v) and v > 0
    assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.kv_heads == 0


@FAST
@given(which=st.sampled_from(["meta", "hf", "ours"]), value=json_values, data=st.data())
def test_any_config_value_gives_a_valid_config_or_one_llama_error(which, value, data):
    base = {"meta": BASE_META, "hf": BASE_HF, "ours": BASE_OURS}[which]
    field = data.draw(st.sampled_from(sorted(base)))
    cfg = json.loads(json.dumps({**base, field: value}))  # through JSON, as from a file
    build = {"meta": config_from_meta, "hf": config_from_hf, "ours": lj.LlamaConfig.from_dict}[
        which
    ]
    try:
        _assert_sane(build(cfg))
    except lj.LlamaError:
        pass


# Through the command line: exit 2, one line, nothing outside DST touched -------------


def snapshot(root) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st_ = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st_.st_size, st_.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def meta_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("meta")
    cfg = config_from_meta(BASE_META, has_output=True)
    rng = np.random.default_rng(0)
    from llama_jax.checkpoint.layout import meta_names, meta_shape

    write_pth(
        src / "consolidated.00.pth",
        [(n, rng.standard_normal(meta_shape(n, cfg)).astype(np.float32)) for n in meta_names(cfg)],
    )
    (src / "params.json").write_text(json.dumps(BASE_META))
    return src


def cli_refuses_cleanly(src, root, capsys):
    before = snapshot(root)
    dst = os.path.join(root, "dst")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["convert", str(src), dst])
    err = capsys.readouterr().err
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
    assert grown < 256 * MB
    if code == 0:  # a harmless mutation (e.g. a weight's value): a complete DST
        assert os.path.isfile(os.path.join(dst, store.CONFIG_FILE))
        shutil.rmtree(dst)
    else:
        lines = [line for line in err.splitlines() if line.startswith("llama-jax")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert not os.path.lexists(dst)
    assert snapshot(root) == before  # SRC and every sibling untouched, no temporaries


@SLOW
@given(data=st.data())
def test_cli_on_mutated_meta_checkpoint(meta_src, tmp_path, capsys, data):
    root = tempfile.mkdtemp(dir=tmp_path)
    src = shutil.copytree(meta_src, os.path.join(root, "src"))
    pth = os.path.join(src, "consolidated.00.pth")
    raw = bytearray(open(pth, "rb").read())
    where = data.draw(st.sampled_from(["pickle", "anywhere", "params"]))
    if where == "params":
        field = data.draw(st.sampled_from(sorted(BASE_META)))
        params = {**BASE_META, field: data.draw(json_values)}
        open(os.path.join(src, "params.json"), "w").write(json.dumps(params))
    else:
        lo = raw.find(b"data.pkl") if where == "pickle" else 0
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(lo, len(raw) - 1))] = data.draw(st.integers(0, 255))
        open(pth, "wb").write(bytes(raw))
    cli_refuses_cleanly(src, root, capsys)


# One focused test per case of issue 12 ------------------------------------------------


def _pth(tmp_path, *entry, numel=16, tail=b""):
    storage = np.arange(numel, dtype=np.float32).tobytes()
    return write_zip(
        tmp_path / "x.pth", tensor_pickle([("w", "0", numel, *entry)], tail), {"0": storage}
    )


def test_negative_strides_cannot_read_outside_the_storage(tmp_path):
    path = _pth(tmp_path, 15, (4, 4), (-4, 1))
    with pytest.raises(lj.LlamaError, match="non-negative integers"):
        read_pth(path)


def test_negative_offset_cannot_read_other_parts_of_the_zip(tmp_path):
    path = _pth(tmp_path, -64, (4,), (1,))
    with pytest.raises(lj.LlamaError, match="offset -64"):
        read_pth(path)


def test_zero_strides_cannot_ask_for_terabytes(tmp_path):
    path = _pth(tmp_path, 0, (2**20, 2**20), (0, 0))
    with pytest.raises(lj.LlamaError, match="reaches past the 16 elements"):
        bounded(lambda: read_pth(path), 2 * MB)


def test_a_tensor_past_its_storage_is_refused(tmp_path):
    with pytest.raises(lj.LlamaError, match="reaches past"):
        read_pth(_pth(tmp_path, 8, (4, 4), (4, 1)))


def test_data_pkl_inflating_to_gigabytes_is_refused_with_bounded_memory(tmp_path):
    bomb = (
        tensor_pickle([("w", "0", 1, 0, (1,), (1,))])[:-1] + b"N0" * (MAX_PICKLE_BYTES // 2) + b"."
    )
    path = write_zip(tmp_path / "bomb.pth", bomb, {"0": b"\0" * 4}, zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < MB
    with pytest.raises(lj.LlamaError, match="inflates to more than"):
        bounded(lambda: read_pth(path), MAX_PICKLE_BYTES + 4 * MB)


def test_pickle_cannot_rewrite_a_checked_tensor(tmp_path):
    build = b"}" + _str("shape") + _tuple([_int(2**40)]) + b"sb"  # BUILD {"shape": ...}
    with pytest.raises(lj.LlamaError, match="BUILD"):
        read_pth(_pth(tmp_path, 0, (4,), (1,), tail=build))


def test_safetensors_deep_header_and_huge_shapes(tmp_path):
    deep = safetensors_file(tmp_path / "deep.safetensors", b"[" * 100_000, b"")
    with pytest.raises(lj.LlamaError, match="nested"):
        read_safetensors(deep)
    for shape in ([1e30], [float("inf")], [2**64]):
        path = safetensors_file(
            tmp_path / "s.safetensors",
            {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}},
            b"\0" * 4,
        )
        with pytest.raises(lj.LlamaError, match="shape must be a list"):
            read_safetensors(path)


def test_overlapping_safetensors_offsets_are_refused_like_the_library(tmp_path):
    from safetensors.numpy import load_file

    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = safetensors_file(tmp_path / "o.safetensors", header, b"\0" * 12)
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type
        load_file(path)
    with pytest.raises(lj.LlamaError, match="overlaps the previous tensor"):
        read_safetensors(path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rope_theta", float("nan"), "rope_theta must be finite"),
        ("norm_eps", float("inf"), "norm_eps must be finite"),
        ("dim", "64", "dim must be an integer"),
        ("n_heads", 0, "n_heads must be between 1"),
        ("n_layers", 10**9, "n_layers must be between 1"),
    ],
)
def test_params_json_values_through_the_cli(meta_src, tmp_path, capsys, field, value, match):
    src = shutil.copytree(meta_src, tmp_path / "src")
    (src / "params.json").write_text(json.dumps({**BASE_META, field: value}))
    cli_refuses_cleanly(src, tmp_path, capsys)
    main(["convert", str(src), str(tmp_path / "dst")])
    assert match in capsys.readouterr().err


def test_hf_config_json_bad_values(tmp_path):
    for change, match in [
        ({"rope_scaling": "llama3"}, "rope_scaling must be an object"),
        ({"rms_norm_eps": float("nan")}, "norm_eps must be finite"),
        ({"num_attention_heads": 0}, "n_heads must be between 1"),
    ]:
        with pytest.raises(lj.LlamaError, match=match):
            config_from_hf({**BASE_HF, **change})
    with pytest.raises(lj.LlamaError, match="must be a JSON object"):
        config_from_hf(None)


def test_llama_jax_json_is_validated_like_any_config(tmp_path):
    with pytest.raises(lj.LlamaError, match="rope_theta must be finite"):
        lj.LlamaConfig.from_dict({**BASE_OURS, "rope_theta": float("nan")})
    with pytest.raises(lj.LlamaError, match="must be a JSON object"):
        lj.LlamaConfig.from_dict(None)


def test_n_layers_is_compared_with_the_tensors_present(meta_src, tmp_path):
    src = shutil.copytree(meta_src, tmp_path / "src")
    (src / "params.json").write_text(json.dumps({**BASE_META, "n_layers": 5000}))
    with pytest.raises(lj.LlamaError, match="n_layers=5000 but the weights hold 2 blocks"):
        bounded(lambda: detect(str(src)), 16 * MB)


def test_index_cannot_point_outside_src(tmp_path):
    from llama_jax.checkpoint.sources import HFSource

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(BASE_HF))
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}})
    )
    with pytest.raises(lj.LlamaError, match="not a file name in this directory"):
        HFSource(str(src))
