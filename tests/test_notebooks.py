"""Every teaching notebook runs top to bottom, draws its figures and keeps its shape.

The notebooks' source is notebooks/NN_name.py, a jupytext percent-format script;
notebooks/NN_name.ipynb beside it is the same notebook with its outputs, written by
`python scripts/build_notebooks.py` (two generated cells in front: the Colab link and the
install command). Two kinds of test:

- execution: each .py is converted in memory and executed with nbclient in a fresh
  IPython kernel of this interpreter (scripts/build_notebooks.py's `execute`, the same
  code that builds the .ipynb files), so a cell that raises, or a check inside a notebook
  that no longer holds against the package, fails the test;
- agreement (fast): each .ipynb holds exactly the .py's cells after the generated ones,
  and a figure wherever the .py draws one, so the two cannot drift.

Set LLAMA_JAX_NOTEBOOK_OUT=DIR to keep the executed notebooks (with their outputs) there.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "build_notebooks", ROOT / "scripts/build_notebooks.py"
)
build_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_notebooks)

NOTEBOOKS = build_notebooks.notebook_paths()
HEADER = 2  # generated cells in front of every .ipynb: Colab link, install command

# The first cell the test adds: it records which interpreter runs the kernel.
_PROBE = "import sys as _sys; print('KERNEL-PREFIX=' + _sys.prefix)"


def execute(path: Path, tmp_path: Path):
    """Execute one notebook's .py; returns the executed nbformat notebook."""
    nb = build_notebooks.read_source(path)
    nb.cells.insert(0, jupytext.reads(f"# %%\n{_PROBE}\n", fmt="py:percent").cells[0])
    build_notebooks.execute(nb, tmp_path)
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


def draws_figure(cell) -> bool:
    """A cell that shows a figure: plt.show(), or a live figure through display()."""
    return cell.cell_type == "code" and (
        "plt.show()" in cell.source or "display(fig" in cell.source
    )


# One notebook per topic of the teaching set.
TOPICS = [
    "01_architecture",
    "02_weights",
    "03_sharding",
    "04_generation",
    "05_finetuning",
    "06_lora",
    "07_speculative",
]


def test_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS][: len(TOPICS)] == TOPICS


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

    # Every cell that shows a figure must have produced one as an image.
    figure_cells = [c for c in code if draws_figure(c)]
    assert figure_cells, f"{path.name} draws no figures"
    blank = [c.source.splitlines()[0] for c in figure_cells if not has_image(c)]
    assert not blank, f"cells whose figure did not render: {blank}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_matches_its_py(path):
    """The committed .ipynb is the .py's notebook, executed: same cells, figures present."""
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.is_file(), f"no {ipynb.name}: run `python scripts/build_notebooks.py {path.stem}`"
    built = nbformat.read(ipynb, as_version=4)
    source = build_notebooks.read_source(path)
    rebuild = f"{ipynb.name} differs from {path.name}: run scripts/build_notebooks.py {path.stem}"

    header = [(c.cell_type, c.source) for c in built.cells[:HEADER]]
    assert header == build_notebooks.header_sources(path.stem), rebuild
    got = [(c.cell_type, c.source) for c in built.cells[HEADER:]]
    want = [(c.cell_type, c.source) for c in source.cells]
    assert got == want, rebuild

    code = [c for c in built.cells[HEADER:] if c.cell_type == "code"]
    assert all(c.get("outputs") is not None for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{ipynb.name} was saved with an error: {errors[0].get('ename')}"
    missing = [c.source.splitlines()[0] for c in code if draws_figure(c) and not has_image(c)]
    assert not missing, f"{ipynb.name}: figures without an image/png output: {missing}"
    assert any(c.outputs for c in code), f"{ipynb.name} holds no outputs"


def test_header_points_at_one_repository():
    """The Colab link and the install command both come from REPO_URL."""
    url = build_notebooks.REPO_URL
    (kind1, badge), (kind2, install) = build_notebooks.header_sources("01_architecture")
    assert (kind1, kind2) == ("markdown", "code")
    assert "colab.research.google.com/github/" + url.removeprefix("https://github.com/") in badge
    assert "notebooks/01_architecture.ipynb" in badge
    assert f"llama-jax @ git+{url}" in install and "torch" not in install


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
