"""Process-level settings that make CPU training faster and leaner: the memory allocator.

A training step frees and reallocates the same activation and gradient buffers every step.
glibc's defaults serve big blocks with fresh ``mmap``s and give freed heap tops back to the
kernel, so every step touches hundreds of thousands of new pages (page faults, and elementwise ops
several times slower than on warm memory; docs/performance.md has the measurements). Two cures,
chosen by the ``NVAE_MALLOC`` environment variable:

- ``tcmalloc`` (gperftools' allocator, e.g. Debian's ``libtcmalloc-minimal4``): keeps freed blocks
  in per-size free lists, so pages are reused without faults and with little fragmentation.
  ``LD_PRELOAD`` must name it before the process starts, so the script entry points
  (:func:`select_allocator`) re-execute themselves once with it preloaded.
- ``heap``: glibc, with freed memory kept in the heap (no mmap, no trimming; :func:`keep_heap_memory`);
  a fragmented heap holds more memory than is in use.

``auto`` (the default) takes tcmalloc where it is installed and the heap otherwise; ``default``
keeps glibc's behaviour (a long-lived process that must give memory back between jobs).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from typing import Optional

MODES = ("auto", "tcmalloc", "heap", "default")
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' sonames without "lib" and ".so"
REEXECUTED = "NVAE_MALLOC_PRELOADED"  # set in the re-executed process: never exec twice
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)
_applied = False


def malloc_mode() -> str:
    """``NVAE_MALLOC`` (one of :data:`MODES`, default ``auto``); ValueError naming the variable otherwise."""
    mode = os.environ.get("NVAE_MALLOC", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"NVAE_MALLOC must be one of {', '.join(MODES)}, got {os.environ['NVAE_MALLOC']!r}")
    return mode


def tcmalloc_loaded() -> bool:
    """True if this process runs with a tcmalloc library mapped (preloaded)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libtcmalloc" in line for line in maps)
    except OSError:  # not Linux
        return False


def find_tcmalloc() -> Optional[str]:
    """The tcmalloc library to preload: from the system's linker cache, else this environment's lib/."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    prefixes = [sys.prefix, os.environ.get("CONDA_PREFIX", "")]
    for prefix in filter(None, prefixes):  # pip or conda packages of gperftools
        for name in TCMALLOC_LIBRARIES:
            hits = sorted(glob.glob(os.path.join(prefix, "lib", f"lib{name}.so*")))
            if hits:
                return hits[0]
    return None


def preloads(env: dict[str, str]) -> list[str]:
    """The libraries in ``env``'s LD_PRELOAD (separated by colons or spaces, as ld.so reads it)."""
    return [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]


def preload_environment(env: dict[str, str], library: str) -> dict[str, str]:
    """``env`` with ``library`` first in LD_PRELOAD (entries already there kept) and the re-exec marker."""
    preload = [library] + [p for p in preloads(env) if p != library]
    return {**env, "LD_PRELOAD": ":".join(preload), REEXECUTED: "1"}


def select_allocator(program: str = "nvae") -> str:
    """Set up the allocator ``NVAE_MALLOC`` asks for; may replace this process (``os.execve``).

    For script entry points only (``if __name__ == "__main__"``), before heavy imports: with
    tcmalloc requested (``tcmalloc``, or ``auto`` where it is installed) and not yet loaded, the
    process re-executes itself with the same command line and tcmalloc in ``LD_PRELOAD``; child
    processes (DDP ranks) inherit it. Returns the allocator in use: see :func:`allocator_name`.
    A bad ``NVAE_MALLOC``, or ``tcmalloc`` where none can be loaded, exits with a one-line error.
    """
    try:
        mode = malloc_mode()
    except ValueError as err:
        raise SystemExit(f"{program}: error: {err}") from None
    if mode in ("auto", "tcmalloc") and sys.platform.startswith("linux") and not tcmalloc_loaded():
        library = find_tcmalloc()
        if library and not os.environ.get(REEXECUTED):
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, sys.orig_argv, preload_environment(dict(os.environ), library))
        if mode == "tcmalloc":
            why = "it did not load from LD_PRELOAD" if library else "no libtcmalloc was found"
            raise SystemExit(f"{program}: error: NVAE_MALLOC=tcmalloc but {why} (install gperftools' tcmalloc, "
                             f"e.g. apt install libtcmalloc-minimal4, or set NVAE_MALLOC=auto)")
    keep_heap_memory()
    return allocator_name()


def allocator_name() -> str:
    """'tcmalloc', 'glibc, heap kept' (after :func:`keep_heap_memory`) or 'glibc'."""
    if tcmalloc_loaded():
        return "tcmalloc"
    return "glibc, heap kept" if _applied else "glibc"


def keep_heap_memory() -> bool:
    """Stop glibc from mmapping big blocks and trimming the heap; True if applied.

    Applied on glibc Linux unless ``NVAE_MALLOC`` is ``default`` or tcmalloc is loaded (which has
    its own free lists; its ``mallopt`` is a no-op).
    """
    global _applied
    if _applied:
        return True
    wanted = os.environ.get("NVAE_MALLOC", "").strip().lower()  # validated by select_allocator
    if not sys.platform.startswith("linux") or wanted == "default" or tcmalloc_loaded():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
