"""The GPU benchmark scripts run their own code end to end with --smoke on the CPU.

They are run on a lent GPU only now and then, so these keep them from breaking between
runs. Nothing here checks a timing: only that every section ran and wrote its figures.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_gpu_int8_smoke_checks_every_tiling(tmp_path):
    done = run("gpu_int8.py", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel matches float64" in done.stdout


def test_gpu_smoke_takes_the_chosen_sections(tmp_path):
    tiles = tmp_path / "tiles.json"
    tiles.write_text(json.dumps({"chosen": {"block_n": 32, "block_k": 64, "programs": 8}}))
    done = run(
        "gpu.py",
        "--smoke",
        "--out",
        str(tmp_path),
        "--sections",
        "decode,kvcache,int8,prefill",
        "--int8-tiles",
        str(tiles),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "benchmark_gpu.json").read_text())
    caches = {f"batch{b}_256slots{c}" for b in (1, 8) for c in ("", "_int8cache")}
    plain = {"batch1", "batch8", "batch1_int8", "batch8_int8"}
    assert set(result["decode"]["small"]) == plain | caches
    assert set(result["prefill"]) == {"xla"} and "train" not in result
    assert result["machine"]["int8_tiles"]["block_n"] == 32
    assert result["machine"]["elapsed_s"] > 0


def test_gpu_refuses_an_unknown_section(tmp_path):
    done = run("gpu.py", "--smoke", "--out", str(tmp_path), "--sections", "decode,warp")
    assert done.returncode == 2 and "unknown ['warp']" in done.stderr
    assert not (tmp_path / "benchmark_gpu.json").exists()
