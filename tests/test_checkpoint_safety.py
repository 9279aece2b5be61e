"""The user's files survive, and Meta's format is read as Meta's own code reads it.

One test per case of issue 12: DST that is, contains or lies inside SRC; --force over a
directory, a file and a symbolic link; a dangling symlink, a read-only parent and a full
disk; SIGINT and SIGTERM mid-write; truncated, zeroed and half-deleted Orbax groups;
release constants only for exact official shapes; a tied output dropped only when
bit-identical; `export --to meta` accepted by Meta's loader; and a small Llama
3.1-shaped Meta checkpoint whose logits match Meta's reference model (llama-models).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from llama_jax.checkpoint import convert, load, load_config, store
from llama_jax.checkpoint.configs import config_from_meta
from llama_jax.checkpoint.layout import meta_params
from llama_jax.cli import main
from tests.checkpoint_helpers import write_hf_dir, write_meta_dir
from tests.hf_oracle import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = lj.LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=96, max_seq_len=128
)
TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 24))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    hf = make_hf_model(CFG, seed=0)
    write_hf_dir(hf, root / "hf")
    return root


def snapshot(root) -> dict:
    """Every path under `root` with its size and mtime: what 'untouched' means."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def siblings(parent, name="dst") -> list[str]:
    return [p for p in os.listdir(parent) if p.startswith(f".{name}.")]


def error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "llama-jax" in line]  # not the progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# DST and SRC -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_dst_that_is_inside_or_contains_src_is_refused_before_anything(
    where, sources, tmp_path, capsys
):
    src = shutil.copytree(sources / "hf", tmp_path / "outer" / "hf")
    dst = {"same": src, "inside": src / "sub", "contains": tmp_path / "outer"}[where]
    before = snapshot(tmp_path)
    err = error_line(capsys, ["convert", src, dst, "--force"])
    assert "source" in err and str(dst) in err
    assert snapshot(tmp_path) == before  # the weights are still there, nothing was created


def test_export_dst_equal_to_the_checkpoint_is_refused(sources, tmp_path, capsys):
    convert(sources / "hf", tmp_path / "ck", progress=False)
    before = snapshot(tmp_path)
    error_line(capsys, ["export", tmp_path / "ck", tmp_path / "ck", "--force"])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["dir", "file", "symlink", "dangling"])
def test_force_replaces_dst_only_when_complete_and_leaves_no_sibling(
    kind, sources, tmp_path, capsys
):
    dst = tmp_path / "dst"
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("weeks of work")
    if kind == "dir":
        dst.mkdir()
        (dst / "old.txt").write_text("old")
    elif kind == "file":
        dst.write_text("a file")
    else:
        dst.symlink_to(target if kind == "symlink" else tmp_path / "nowhere")
    err = error_line(capsys, ["convert", sources / "hf", dst])  # no --force: refused
    assert "already exists" in err
    assert main(["convert", str(sources / "hf"), str(dst), "--force"]) == 0
    assert (dst / store.CONFIG_FILE).is_file() and not dst.is_symlink()
    assert (target / "keep.txt").read_text() == "weeks of work"  # a link's target survives
    assert siblings(tmp_path) == []


def test_failed_conversion_with_force_keeps_the_old_dst(sources, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old.txt").write_text("old")
    bad = shutil.copytree(sources / "hf", tmp_path / "bad")
    (bad / "config.json").write_text(
        json.dumps({**json.loads((bad / "config.json").read_text()), "rms_norm_eps": "1e-5"})
    )
    error_line(capsys, ["convert", bad, tmp_path / "dst", "--force"])
    assert (tmp_path / "dst" / "old.txt").read_text() == "old"
    assert siblings(tmp_path) == []


def test_read_only_parent_is_one_line(sources, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the file system say what it would
        real = os.makedirs

        def read_only(path, *args, **kwargs):
            if str(path).startswith(str(parent)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "makedirs", read_only)
    try:
        err = error_line(capsys, ["convert", sources / "hf", parent / "dst"])
        assert ("Permission denied" in err or "Read-only" in err) and str(parent) in err
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(sources, tmp_path, capsys, monkeypatch):
    real = store.write_group
    calls = []

    def full_after_two(root, sub, tree):
        calls.append(sub)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(root, sub))
        real(root, sub, tree)

    monkeypatch.setattr(store, "write_group", full_after_two)
    err = error_line(capsys, ["convert", sources / "hf", tmp_path / "dst"])
    assert "No space left on device" in err
    assert not (tmp_path / "dst").exists() and siblings(tmp_path) == []


SLOW_CONVERT = r"""
import sys, time
sys.path.insert(0, {root!r})
from llama_jax.checkpoint import store
from llama_jax.cli import main
real = store.write_group
def slow(root, sub, tree):
    real(root, sub, tree)
    print("WROTE", flush=True)
    time.sleep(60)
store.write_group = slow
sys.exit(main(["convert", {src!r}, {dst!r}, "--force"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_leaves_no_temporary_or_old_sibling(sig, sources, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    code = SLOW_CONVERT.format(root=ROOT, src=str(sources / "hf"), dst=str(dst))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "WROTE"  # inside the temporary directory
    assert siblings(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert siblings(tmp_path) == []
    assert (dst / "old.txt").read_text() == "old"


# Orbax groups ---------------------------------------------------------------------------


def _damage(group, how):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(group) for f in fs if "manifest" in f)
    if how == "truncated":
        with open(files[0], "r+b") as f:
            f.truncate(0)
    elif how == "zeroed":
        for name in ("_METADATA", *[os.path.relpath(p, group) for p in files]):
            p = os.path.join(group, name)
            with open(p, "r+b") as f:
                f.write(b"\0" * os.path.getsize(p))
    else:  # half-deleted: the data files are gone
        for d, _, fs in os.walk(group):
            if os.path.basename(d) == "d":
                for f in fs:
                    os.remove(os.path.join(d, f))


@pytest.mark.parametrize("how", ["truncated", "zeroed", "half-deleted"])
def test_damaged_orbax_group_names_the_group(how, sources, tmp_path):
    convert(sources / "hf", tmp_path / "ck", progress=False)
    group = tmp_path / "ck" / "params" / "layers" / "00001"
    _damage(group, how)
    with pytest.raises(lj.LlamaError, match=r"layers/00001: this tensor group is damaged"):
        load(tmp_path / "ck")
    with pytest.raises(lj.LlamaError, match="damaged"):
        store.check_group(str(group))
    store.check_group(str(tmp_path / "ck" / "params" / "layers" / "00000"))  # intact


def test_llama_jax_json_with_a_billion_layers_is_refused_without_allocating(sources, tmp_path):
    convert(sources / "hf", tmp_path / "ck", progress=False)
    meta_file = tmp_path / "ck" / store.CONFIG_FILE
    meta = json.loads(meta_file.read_text())
    meta["config"]["n_layers"] = 10**9
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(lj.LlamaError, match="n_layers must be between 1 and"):
        load_config(tmp_path / "ck")
    meta["config"]["n_layers"] = 3
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(lj.LlamaError, match="00002: missing"):
        load_config(tmp_path / "ck")


# Meta's format -----------------------------------------------------------------------

OFFICIAL_32_1B = {
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


def test_only_an_exact_official_shape_selects_release_constants():
    notes = []
    cfg = config_from_meta(OFFICIAL_32_1B, has_output=False, notes=notes)
    assert (cfg.rope_scaling.factor, cfg.tie_word_embeddings, cfg.max_seq_len) == (
        32.0,
        True,
        131072,
    )
    assert "llama3.2-1b" in notes[0]
    # One layer fewer: a custom model. Meta's reference constants, output kept.
    notes = []
    custom = config_from_meta({**OFFICIAL_32_1B, "n_layers": 15}, has_output=True, notes=notes)
    assert (custom.rope_scaling.factor, custom.tie_word_embeddings) == (8.0, False)
    assert "factor 8" in notes[0] and "--rope-scaling-factor" in notes[0]
    assert config_from_meta(
        {**OFFICIAL_32_1B, "n_layers": 15}, has_output=False
    ).tie_word_embeddings
    flags = config_from_meta(OFFICIAL_32_1B, rope_scaling_factor=16.0, max_seq_len=4096)
    assert (flags.rope_scaling.factor, flags.max_seq_len) == (16.0, 4096)


def test_export_params_json_is_accepted_by_meta_loader_and_read_back(tmp_path):
    pytest.importorskip("llama_models")
    from llama_models.llama3.args import ModelArgs

    for cfg in [
        lj.PRESETS["llama3.1-8b"],
        lj.PRESETS["llama3.2-1b"],
        lj.PRESETS["llama2-7b"],
        CFG.replace(rope_scaling=lj.RopeScaling(factor=32.0), tie_word_embeddings=True),
    ]:
        params = json.loads(json.dumps(meta_params(cfg)))  # what export --to meta writes
        assert "max_seq_len" not in params
        # What Meta's generation.py does with the file:
        args = ModelArgs(max_seq_len=512, max_batch_size=4, **params)
        assert (args.dim, args.n_layers, args.n_kv_heads) == (cfg.dim, cfg.n_layers, cfg.kv_heads)
        back = config_from_meta(params, has_output=True)
        assert back.num_params() == cfg.num_params()
        assert back.rope_scaling == cfg.rope_scaling
        assert back.tie_word_embeddings == cfg.tie_word_embeddings


def _meta_reference(params: dict, seed: int):
    """Meta's own Llama 3 model (llama_models/llama3/model.py) with random weights."""
    pytest.importorskip("fairscale")
    pytest.importorskip("llama_models")
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    if not dist.is_initialized():
        store_file = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(max_seq_len=64, max_batch_size=2, **params)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # fairscale leaves them uninitialised
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def test_custom_llama31_shaped_meta_checkpoint_matches_meta_reference(tmp_path, capsys):
    params = {
        "dim": 128,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 256,
        "multiple_of": 32,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    ref = _meta_reference(params, seed=0)
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(params))
    torch.save(ref.state_dict(), src / "consolidated.00.pth")
    assert main(["convert", str(src), str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "note: params.json matches no official release" in out and "factor 8" in out
    cfg = load_config(tmp_path / "ck")
    assert cfg.rope_scaling.factor == 8.0 and not cfg.tie_word_embeddings
    model = load(tmp_path / "ck")
    want_out = ref.state_dict()["output.weight"].numpy()
    assert np.array_equal(np.asarray(model.output.value).T, want_out)  # kept, bit for bit
    with torch.no_grad():
        want = ref(torch.from_numpy(TOKENS), 0).numpy()
    got = np.asarray(model(jnp.asarray(TOKENS, jnp.int32)))
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 1e-4, err
    # The guess this replaces (factor 32, as if it were Llama 3.2) gives other logits.
    wrong = shutil.copytree(tmp_path / "ck", tmp_path / "wrong")
    meta = json.loads((wrong / store.CONFIG_FILE).read_text())
    meta["config"]["rope_scaling"]["factor"] = 32.0
    (wrong / store.CONFIG_FILE).write_text(json.dumps(meta))
    got32 = np.asarray(load(wrong)(jnp.asarray(TOKENS, jnp.int32)))
    assert np.max(np.abs(got32 - want)) / np.max(np.abs(want)) > 100 * err


def test_tied_output_is_dropped_only_when_bit_identical(tmp_path, capsys):
    tied = CFG.replace(tie_word_embeddings=True)
    hf = make_hf_model(tied, seed=1)
    write_meta_dir(hf, tied, tmp_path / "same", 1, tied_output=True)
    convert(tmp_path / "same", tmp_path / "ck_same", progress=False)
    assert load_config(tmp_path / "ck_same").tie_word_embeddings
    # A distinct output.weight under a config that ties: kept, untied, with a note.
    src = shutil.copytree(tmp_path / "same", tmp_path / "differs")
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    state["output.weight"] = state["output.weight"] + 1e-3
    torch.save(state, src / "consolidated.00.pth")
    summary = convert(src, tmp_path / "ck_differs", progress=False)
    assert not load_config(tmp_path / "ck_differs").tie_word_embeddings
    assert any("output layer is kept" in n for n in summary["notes"])
    model = load(tmp_path / "ck_differs")
    assert np.array_equal(np.asarray(model.output.value).T, state["output.weight"].numpy())
    # Asking for ties would drop it: refused.
    err = error_line(capsys, ["convert", src, tmp_path / "ck3", "--tie-word-embeddings"])
    assert "would drop output.weight" in err


def test_hf_tied_config_with_distinct_lm_head_keeps_it(tmp_path):
    tied = CFG.replace(tie_word_embeddings=True)
    hf = make_hf_model(tied, seed=2)
    write_hf_dir(hf, tmp_path / "hf")
    from safetensors.numpy import load_file, save_file

    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] * 2
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    convert(tmp_path / "hf", tmp_path / "ck", progress=False)
    model = load(tmp_path / "ck")
    assert np.array_equal(np.asarray(model.output.value).T, state["lm_head.weight"])


def test_rope_scaling_factor_flag(tmp_path):
    params = {
        "dim": 64,
        "n_layers": 1,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 128,
        "multiple_of": 32,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    cfg = config_from_meta(params)
    hf = make_hf_model(cfg, seed=3)
    write_meta_dir(hf, cfg, tmp_path / "meta", 1)
    argv = [
        "convert",
        str(tmp_path / "meta"),
        str(tmp_path / "ck"),
        "--rope-scaling-factor",
        "16",
        "--max-seq-len",
        "2048",
    ]
    assert main(argv) == 0
    got = load_config(tmp_path / "ck")
    assert (got.rope_scaling.factor, got.max_seq_len) == (16.0, 2048)


def test_signal_helper_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with tempfile.TemporaryDirectory() as d, store.atomic_directory(os.path.join(d, "x")):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
