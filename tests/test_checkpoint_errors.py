"""Bad inputs to `llama-jax convert` / `export`: a clear message, exit code 2, no DST left.

Every case runs the real command line and then checks that neither the destination nor
a temporary sibling of it exists.
"""

import json
import os
import pickle
import shutil
import zipfile

import pytest

import llama_jax as lj
from llama_jax.checkpoint import convert, store
from llama_jax.cli import main
from tests.checkpoint_helpers import write_hf_dir, write_meta_dir
from tests.hf_oracle import make_hf_model

CFG = lj.LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=96, max_seq_len=128
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A pristine HF directory and a 2-shard Meta directory, copied by each test."""
    root = tmp_path_factory.mktemp("sources")
    hf = make_hf_model(CFG, seed=0)
    write_hf_dir(hf, root / "hf")
    write_hf_dir(hf, root / "hf_sharded", max_shard_size="40KB")
    write_meta_dir(hf, CFG, root / "meta", 2)
    return root


def copy(sources, name, tmp_path):
    return shutil.copytree(sources / name, tmp_path / name)


def fails(tmp_path, capsys, *argv, match: str):
    """Run the CLI, expect exit 2 with `match` in the message and nothing written."""
    dst = tmp_path / "dst"
    code = main([*map(str, argv), str(dst)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst")]  # no temp sibling
    return err


def test_missing_directory(tmp_path, capsys):
    fails(tmp_path, capsys, "convert", tmp_path / "nowhere", match="nowhere: no such directory")


def test_no_params_json_or_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "consolidated.00.pth").write_bytes(b"")
    fails(
        tmp_path,
        capsys,
        "convert",
        tmp_path / "empty",
        match="neither params.json (Meta layout) nor config.json",
    )


def test_missing_meta_shard(sources, tmp_path, capsys):
    src = copy(sources, "meta", tmp_path)
    os.rename(src / "consolidated.01.pth", src / "consolidated.02.pth")
    fails(tmp_path, capsys, "convert", src, match="consolidated.01.pth is missing")


def test_missing_last_meta_shard_is_caught_by_the_shapes(sources, tmp_path, capsys):
    src = copy(sources, "meta", tmp_path)
    os.remove(src / "consolidated.01.pth")
    fails(tmp_path, capsys, "convert", src, match="'tok_embeddings.weight' has shape (64, 64)")


def test_missing_hf_shard(sources, tmp_path, capsys):
    src = copy(sources, "hf_sharded", tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    os.remove(shard)
    fails(tmp_path, capsys, "convert", src, match=f"shard {shard.name} listed in")


def test_truncated_pth(sources, tmp_path, capsys):
    src = copy(sources, "meta", tmp_path)
    path = src / "consolidated.01.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fails(tmp_path, capsys, "convert", src, match="consolidated.01.pth: truncated or corrupt")


def test_corrupt_safetensors_header(sources, tmp_path, capsys):
    src = copy(sources, "hf", tmp_path)
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json!!!"
    path.write_bytes(bytes(data))
    fails(tmp_path, capsys, "convert", src, match="model.safetensors: corrupt safetensors header")


def test_safetensors_offsets_past_the_end(sources, tmp_path, capsys):
    src = copy(sources, "hf", tmp_path)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    fails(tmp_path, capsys, "convert", src, match="the file is truncated or corrupt")


@pytest.mark.parametrize("layout_", ["hf", "meta"])
def test_tensor_shape_disagrees_with_config(layout_, sources, tmp_path, capsys):
    src = copy(sources, layout_, tmp_path)
    if layout_ == "hf":
        c = json.loads((src / "config.json").read_text())
        c["intermediate_size"] = 128
        (src / "config.json").write_text(json.dumps(c))
        match = "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (96, 64)"
    else:
        p = json.loads((src / "params.json").read_text())
        p["n_kv_heads"] = 4
        (src / "params.json").write_text(json.dumps(p))
        match = "tensor 'layers.0.attention.wk.weight' has shape (32, 64)"
    fails(tmp_path, capsys, "convert", src, match=match)


def test_unknown_architecture(sources, tmp_path, capsys):
    src = copy(sources, "hf", tmp_path)
    c = json.loads((src / "config.json").read_text())
    c.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (src / "config.json").write_text(json.dumps(c))
    err = fails(tmp_path, capsys, "convert", src, match="MistralForCausalLM")
    assert "config.json" in err


def test_unknown_tensor_is_named(sources, tmp_path, capsys):
    import torch

    src = copy(sources, "meta", tmp_path)
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    sd["layers.0.attention.q_norm.weight"] = torch.ones(16)
    torch.save(sd, src / "consolidated.00.pth")
    fails(tmp_path, capsys, "convert", src, match="'layers.0.attention.q_norm.weight'")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_asking_for_a_callable_is_refused_and_never_runs(sources, tmp_path, capsys):
    src = copy(sources, "meta", tmp_path)
    marker = tmp_path / "pwned"
    path = src / "consolidated.00.pth"
    with zipfile.ZipFile(path, "w") as zf:  # torch's layout, with a hostile data.pkl
        hostile = pickle.dumps({"tok_embeddings.weight": _Exploit(marker)}, protocol=2)
        zf.writestr("consolidated.00/data.pkl", hostile)
        zf.writestr("consolidated.00/version", "3\n")
    err = fails(tmp_path, capsys, "convert", src, match="asks for posix.system")
    assert "consolidated.00.pth" in err
    assert not marker.exists()


def test_legacy_non_zip_pth_is_refused(sources, tmp_path, capsys):
    src = copy(sources, "meta", tmp_path)
    (src / "consolidated.00.pth").write_bytes(pickle.dumps({"a": 1}))
    fails(tmp_path, capsys, "convert", src, match="not a zip-format torch checkpoint")


def test_failure_midway_leaves_nothing(sources, tmp_path, monkeypatch):
    calls = []
    real = store.write_group

    def flaky(root, sub, tree):
        calls.append(sub)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-conversion
        real(root, sub, tree)

    monkeypatch.setattr(store, "write_group", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(sources / "hf", tmp_path / "dst", progress=False)
    assert os.listdir(tmp_path) == []


def test_export_errors(sources, tmp_path, capsys):
    fails(tmp_path, capsys, "export", sources / "hf", match=f"no {store.CONFIG_FILE}")
    assert main(["convert", str(sources / "hf"), str(tmp_path / "ck")]) == 0
    shutil.rmtree(tmp_path / "ck" / "params" / "layers" / "00001")
    capsys.readouterr()
    fails(
        tmp_path,
        capsys,
        "export",
        tmp_path / "ck",
        "--to",
        "meta",
        match="00001: missing; the checkpoint is incomplete",
    )


def test_load_refuses_arrays_that_disagree_with_the_recorded_config(sources, tmp_path):
    convert(sources / "hf", tmp_path / "ck", progress=False)
    meta_file = tmp_path / "ck" / store.CONFIG_FILE
    meta = json.loads(meta_file.read_text())
    meta["config"]["ffn_dim"] = 128
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(lj.LlamaError, match=r"'w1'\] has shape \(64, 96\) on disk"):
        lj.load(tmp_path / "ck")
