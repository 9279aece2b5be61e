"""Every teaching notebook runs top to bottom, draws its figures and keeps its shape.

The notebooks live in notebooks/ as jupytext percent-format scripts (no outputs in git).
Each test converts one to a notebook in memory and executes it with nbclient in a fresh
IPython kernel of this interpreter, so a cell that raises, or a check inside a notebook
that no longer holds against the package, fails the test. Nothing is installed or
registered globally: the kernel is the "python3" kernelspec, which jupyter_client starts
with `sys.executable`, and Jupyter's runtime files go to a temporary directory.

Set LLAMA_JAX_NOTEBOOK_OUT=DIR to keep the executed notebooks (with their outputs) there.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))

# Generous per-cell limit: a cell stuck this long is broken, not slow.
CELL_TIMEOUT_S = 300

# The first cell the test adds: it records which interpreter runs the kernel.
_PROBE = "import sys as _sys; print('KERNEL-PREFIX=' + _sys.prefix)"


def kernel_env(tmp_path: Path) -> dict[str, str]:
    """The kernel's environment: the user's, minus what the test process set for itself.

    The test suite simulates 8 CPU devices through XLA_FLAGS; the notebooks must not rely
    on that (the sharding notebook sets the flag itself, as a reader's kernel would).
    Matplotlib uses the inline backend so figures become image/png outputs.
    """
    env = dict(os.environ)
    flags = env.pop("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "jupyter-runtime")
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences a debugger warning per kernel
    env.pop("LLAMA_JAX_CHECKPOINT", None)  # CI runs the built-in tiny models
    return env


def execute(path: Path, tmp_path: Path):
    """Execute one notebook; returns the executed nbformat notebook."""
    nb = jupytext.read(path)
    nb.cells.insert(0, jupytext.reads(f"# %%\n{_PROBE}\n", fmt="py:percent").cells[0])
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_env(tmp_path), cwd=str(tmp_path))
    out_dir = os.environ.get("LLAMA_JAX_NOTEBOOK_OUT")
    if out_dir:  # keep the executed notebook, outputs and all, for reading
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out_dir) / f"{path.stem}.ipynb")
    return nb


def _children_cpu_s() -> float:
    try:
        import resource  # Unix only; the timing line is informational
    except ImportError:
        return float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cell_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def has_image(cell) -> bool:
    return any(
        o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
        for o in cell.get("outputs", [])
    )


# One notebook per topic of the teaching set.
TOPICS = [
    "01_architecture",
    "02_weights",
    "03_sharding",
    "04_generation",
    "05_finetuning",
    "06_lora",
]


def test_notebooks_exist():
    # Stored as jupytext scripts; .ipynb copies made by readers are git-ignored.
    assert [p.stem for p in NOTEBOOKS] == TOPICS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_draws(path, tmp_path):
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    nb = execute(path, tmp_path)
    seconds, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_start
    # The kernel is a child process: its CPU time is counted once it has exited.
    print(f"{path.name}: executed in {seconds:.1f}s wall, {cpu:.1f}s kernel CPU")

    probe, cells = nb.cells[0], nb.cells[1:]
    assert f"KERNEL-PREFIX={sys.prefix}" in cell_text(probe), "kernel runs another Python"

    code = [c for c in cells if c.cell_type == "code"]
    assert code, "no code cells"
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors

    # Every cell that shows a figure (plt.show(), or a live figure through display())
    # must have produced one as an image.
    figure_cells = [c for c in code if "plt.show()" in c.source or "display(fig" in c.source]
    assert figure_cells, f"{path.name} draws no figures"
    blank = [c.source.splitlines()[0] for c in figure_cells if not has_image(c)]
    assert not blank, f"cells whose figure did not render: {blank}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    """Title, what you will learn, how to run it, the checkpoint switch, where next."""
    nb = jupytext.read(path)
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert markdown and markdown[0].startswith("# "), "first cell must be a '# Title'"
    intro = markdown[0].lower()
    assert "what you will learn" in intro
    assert "how to run" in intro and "cpu" in intro and "gpu" in intro and "tpu" in intro
    assert "where to go next" in markdown[-1].lower()
    assert "LLAMA_JAX_CHECKPOINT" in path.read_text(), "no switch to a real checkpoint"


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"README does not link {path.name}"
