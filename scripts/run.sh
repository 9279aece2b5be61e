#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it on first use.
#
#   bash scripts/run.sh llama-jax quickstart     # the main job
#   bash scripts/run.sh pytest                   # the test suite (what CI runs)
#
# The environment lives in .venv/ and is reinstalled whenever pyproject.toml changes.
# torch is pinned to the CPU build 2.13.0 first: an unpinned torch (pulled in by
# transformers) would download a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "scripts/run.sh: installing llama-jax and its test dependencies into .venv ..." >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet -e ".[dev]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
if [ "$#" -eq 0 ]; then
    echo "usage: bash scripts/run.sh COMMAND [ARGS...]" >&2
    exit 2
fi
exec "$@"
