"""Process settings the package makes when it is imported (glibc's malloc, on Linux).

XLA's CPU backend allocates every call's temporary buffers afresh; how the C library
recycles them decides how fast a decode step is. Setting LLAMA_JAX_MALLOC=default in the
environment leaves the C library's own settings alone.
"""

from __future__ import annotations

import ctypes
import os
import sys


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep large freed blocks for reuse instead of unmapping them.

    XLA's CPU backend allocates each call's temporary buffers afresh. By default glibc
    serves blocks over 128 KiB-32 MiB with mmap and unmaps them on free, so the next call
    page-faults every page in again (a bench-134m decode step spent more time in the
    kernel than in its products). Serving them from the heap and not trimming it lets the
    next call reuse the same pages. Memory the process no longer needs stays mapped (up to
    `M_TRIM_THRESHOLD` at the top of the heap); `malloc_trim(0)` still returns it.
    No effect outside Linux with glibc.
    """
    if not sys.platform.startswith("linux") or os.environ.get("LLAMA_JAX_MALLOC") == "default":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to set
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
    mallopt(M_MMAP_MAX, 0)  # no mmap per block: large blocks come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # give the heap's top back only beyond 1 GiB free
    mallopt(M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps, not one block at a time
