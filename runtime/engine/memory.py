"""Giving freed heap memory back to the OS after one-off work (glibc; a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import sys

_UNRESOLVED = object()
_malloc_trim = _UNRESOLVED


def release_freed_memory() -> bool:
    """glibc's malloc_trim(0): free pages left in the allocator's arenas go back to the OS.

    Compiling a program (or loading it from the persistent cache) frees most of what it
    allocated, but glibc keeps those pages resident in the compiling threads' arenas, where
    the main thread's later allocations do not reuse them: 130m's prefill + decode leave
    ~50-70 MiB free but resident. Called once per compiled program (a few ms), never per
    call. Returns whether a trim ran.
    """
    global _malloc_trim
    if _malloc_trim is _UNRESOLVED:
        _malloc_trim = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim  # the process's own C library, no lookup
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _malloc_trim = fn
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                pass
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
