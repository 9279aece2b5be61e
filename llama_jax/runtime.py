"""Process settings: glibc's malloc (made when the package is imported) and the compile cache.

XLA's CPU backend allocates every call's temporary buffers afresh; how the C library
recycles them decides how fast a decode step is. Setting LLAMA_JAX_MALLOC=default in the
environment leaves the C library's own settings alone.

`use_compilation_cache` keeps compiled programs on disk for the next process; the
`llama-jax` command turns it on, the library leaves it to the user.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import stat
import sys
from pathlib import Path

COMPILE_CACHE_BYTES = 1 << 30  # beyond this the compile cache drops its least recently used
OFF = ("off", "0", "false", "no", "none")  # values of LLAMA_JAX_COMPILE_CACHE that turn it off


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


def cache_root() -> Path:
    """Where llama-jax keeps what it can make again: $LLAMA_JAX_CACHE, or ~/.cache/llama-jax."""
    root = os.environ.get("LLAMA_JAX_CACHE") or os.path.expanduser("~/.cache/llama-jax")
    return Path(root)


def _processor_tag() -> str:
    """A short hash of this machine's processor and its instruction set.

    Compiled CPU programs use the instructions of the machine that compiled them; a cache
    in a home directory shared by different machines keeps each machine's apart.
    """
    text = f"{platform.system()} {platform.machine()} {platform.processor()}\n"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block describes them all
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _not_private(path: Path) -> str | None:
    """Why `path` must not hold programs this process runs, or None if it may.

    The cache's programs are loaded and run as they are, so, as ssh asks of ~/.ssh, the
    folder and every folder above it must belong to the user or to root, and none may be
    writable by others: the folder itself not at all, a folder above it only with the
    sticky bit (as /tmp), where others cannot rename what is not theirs.
    """
    if not hasattr(os, "getuid"):
        return None
    for folder in (path, *path.parents):
        st = folder.stat()
        if st.st_uid not in (os.getuid(), 0):
            return f"{folder} belongs to another user"
        if st.st_mode & 0o022 and (folder == path or not st.st_mode & stat.S_ISVTX):
            return f"others may write to {folder} (chmod go-w it)"
    return None


def _remove_half_written(path: Path) -> None:
    """Delete the entries JAX left half-written in its cache folder `path`.

    JAX writes a program (NAME-cache) and then its last use (NAME-atime), neither
    atomically, and never rewrites an entry that exists: a process killed in between, or
    a full disk, leaves a file that every later run warns about (a truncated program) or
    that stops all later writes (a program without its time). Such an entry has one file
    of the two, which is removed under the lock JAX itself takes, so no writer is cut
    short.
    """
    import filelock

    try:
        with filelock.FileLock(path / ".lockfile", timeout=5):
            names = {p.name for p in path.iterdir()}
            for name in names:
                for ours, other in (("-cache", "-atime"), ("-atime", "-cache")):
                    if name.endswith(ours) and name[: -len(ours)] + other not in names:
                        (path / name).unlink(missing_ok=True)
    except (OSError, filelock.Timeout):
        pass  # another process holds it long: leave the entries to a later run


def use_compilation_cache() -> str | None:
    """Keep compiled programs on disk, so that the next process loads instead of compiling.

    Turns on JAX's persistent compilation cache for programs that took at least a second
    to compile (`lj.generate`'s prefill and decode programs, training steps), which
    otherwise every new process compiles again. The directory is
    $LLAMA_JAX_COMPILE_CACHE (an absolute path), or `cache_root() / "xla"`, with one
    folder per kind of processor under it, made readable by the user alone; beyond
    `COMPILE_CACHE_BYTES` JAX removes the least recently used programs from it, and
    entries a killed process left half-written are removed here. A JAX cache directory
    the user has already set is kept, and LLAMA_JAX_COMPILE_CACHE=off (or 0, false, no,
    none) turns the cache off.

    Returns:
      The directory in use, or None when the cache is off, or its folder cannot be made
      or is not the user's alone: then programs are compiled as usual, and a line on
      stderr says why (for the default folder, only when it is not the user's alone).
    """
    import jax

    if jax.config.jax_compilation_cache_dir:  # the user's own JAX setting
        return jax.config.jax_compilation_cache_dir
    setting = os.environ.get("LLAMA_JAX_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    base = Path(os.path.expanduser(setting)) if setting else cache_root() / "xla"
    path = base / _processor_tag()

    def note(why: str) -> None:
        print(f"llama-jax: compile cache {path}: {why}; compiling without it.", file=sys.stderr)

    if not path.is_absolute():
        if setting:
            note("LLAMA_JAX_COMPILE_CACHE must be an absolute path (or off)")
        return None
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        if setting:  # a folder the user named: say why it is not used
            note(f"cannot make it ({getattr(e, 'strerror', None) or e})")
        return None
    try:
        problem = _not_private(path)
        if not problem:
            path.chmod(0o700)  # a folder made under another umask: readable by the user alone
    except OSError as e:
        problem = f"cannot check it ({e.strerror})"
    if problem:
        note(problem)
        return None
    _remove_half_written(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    return str(path)
