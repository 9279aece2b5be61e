"""Execute the teaching notebooks and write them as .ipynb files with their outputs.

The notebooks' source is the jupytext percent-format script `notebooks/NN_name.py` (it
diffs like code). This script runs each one top to bottom in a fresh IPython kernel of
this interpreter and writes `notebooks/NN_name.ipynb` beside it: the same cells, after two
generated ones (an "Open in Colab" link and the install command), with every output and
figure (PNG), so that GitHub shows the figures and Colab or Jupyter open it in one click.

    python scripts/build_notebooks.py                    # every notebook
    python scripts/build_notebooks.py 01_architecture    # some of them

Run it after editing a notebook's `.py`; tests/test_notebooks.py fails while an .ipynb
differs from its .py. The kernel is the "python3" kernelspec (jupyter_client starts it
with `sys.executable`), started in a temporary directory with the user's environment minus
the test suite's simulated devices and `LLAMA_JAX_CHECKPOINT`, exactly as the tests run
the notebooks (they import `execute` from here).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"

# The repository the Colab links and the install command point at: the one place to
# change when the project moves (then rebuild every notebook).
REPO_URL = "https://github.com/llama-jax/llama-jax"
BRANCH = "main"

# Generous per-cell limit: a cell stuck this long is broken, not slow.
CELL_TIMEOUT_S = 300


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    """The notebooks' .py sources, all of them or those named (stem or file name).

    Args:
      names: e.g. ["01_architecture", "notebooks/03_sharding.py"]; None or [] for all.
    Returns:
      Paths of the existing .py files, sorted.
    """
    every = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
    if not names:
        return every
    by_stem = {p.stem: p for p in every}
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".py").removesuffix(".ipynb")
        if stem not in by_stem:
            raise SystemExit(f"no notebook {name!r}; the notebooks are {sorted(by_stem)}")
        chosen.append(by_stem[stem])
    return sorted(set(chosen))


def colab_url(stem: str) -> str:
    """The Colab address that opens notebooks/<stem>.ipynb from the repository."""
    path = REPO_URL.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{stem}.ipynb"


def install_command() -> str:
    """The one pip command that installs the package on a laptop or in Colab (no PyTorch)."""
    return f'pip install "llama-jax @ git+{REPO_URL}"'


def header_sources(stem: str) -> list[tuple[str, str]]:
    """The two generated first cells of notebook `stem`: (cell type, source) pairs."""
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"({colab_url(stem)})"
        f" · source: [`notebooks/{stem}.py`]({REPO_URL}/blob/{BRANCH}/notebooks/{stem}.py)"
    )
    install = (
        "# Installs llama-jax and its dependencies (JAX, Flax, ...; not PyTorch), unless it\n"
        "# is importable already (a clone with `pip install -e .` skips this). Same command\n"
        "# in a terminal:\n"
        f"#     {install_command()}\n"
        "import importlib.util\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        f'REQUIREMENT = "llama-jax @ git+{REPO_URL}"\n'
        'if importlib.util.find_spec("llama_jax") is None:\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", REQUIREMENT], '
        "check=True)"
    )
    return [("markdown", badge), ("code", install)]


def read_source(path: Path):
    """The notebook as jupytext reads its .py (no outputs), without the generated cells."""
    import jupytext

    return jupytext.read(path)


def with_header(nb, stem: str):
    """A copy of `nb` with the generated Colab and install cells in front."""
    import nbformat

    nb = copy.deepcopy(nb)
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells[:0] = [make[kind](source) for kind, source in header_sources(stem)]
    return nb


def kernel_env(workdir: Path) -> dict[str, str]:
    """The kernel's environment: the user's, minus what a test process sets for itself.

    The test suite simulates 8 CPU devices through XLA_FLAGS; the notebooks must not rely
    on that (the sharding notebook sets the flag itself, as a reader's kernel would).
    Matplotlib uses the inline backend so figures become image/png outputs; Jupyter's
    runtime files go under `workdir`.
    """
    env = dict(os.environ)
    flags = env.pop("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["JUPYTER_RUNTIME_DIR"] = str(workdir / "jupyter-runtime")
    env["IPYTHONDIR"] = str(workdir / "ipython")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences a debugger warning per kernel
    env.pop("LLAMA_JAX_CHECKPOINT", None)  # the notebooks' own default models
    return env


def execute(nb, workdir: Path):
    """Execute a notebook in place in a fresh kernel of this interpreter, cwd `workdir`.

    Args:
      nb: an nbformat notebook (e.g. from `read_source`).
      workdir: the kernel's working directory (files a notebook writes land there).
    Returns:
      nb, with outputs.
    """
    import nbclient

    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=kernel_env(workdir), cwd=str(workdir))
    return nb


def clean(nb):
    """Drop what changes on every run without meaning anything: timings, run ids."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.pop("id", None)
    nb.metadata.pop("widgets", None)
    nb.nbformat, nb.nbformat_minor = 4, 4  # no cell ids: smaller, stabler diffs
    return nb


def build(path: Path) -> tuple[Path, float]:
    """Execute notebooks/<stem>.py and write notebooks/<stem>.ipynb; returns (path, seconds)."""
    import nbformat

    nb = with_header(read_source(path), path.stem)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"nb-{path.stem}-") as tmp:
        execute(nb, Path(tmp))
    seconds = time.perf_counter() - start
    out = path.with_suffix(".ipynb")
    partial = out.with_name(out.name + ".partial")
    nbformat.write(clean(nb), partial)
    partial.replace(out)  # whole or not at all
    return out, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to build (default: all)")
    args = parser.parse_args(argv)
    for path in notebook_paths(args.names):
        print(f"{path.name}: running ...", flush=True)
        out, seconds = build(path)
        print(f"{path.name}: wrote {out.relative_to(ROOT)} ({seconds:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
