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
# Back glibc's malloc with transparent huge pages. XLA's CPU backend allocates its
# temporary buffers afresh on every call and glibc returns large ones to the kernel, so
# each step faulted in every page of them again (445,000 faults, 0.8 s of kernel time per
# bench-134m training step); 2 MiB pages cut that ~200-fold and the step by ~14%.
case "${GLIBC_TUNABLES:-}" in
    *glibc.malloc.hugetlb*) ;;
    "") export GLIBC_TUNABLES="glibc.malloc.hugetlb=1" ;;
    *) export GLIBC_TUNABLES="$GLIBC_TUNABLES:glibc.malloc.hugetlb=1" ;;
esac
if [ "$#" -eq 0 ]; then
    echo "usage: bash scripts/run.sh COMMAND [ARGS...]" >&2
    exit 2
fi
exec "$@"
