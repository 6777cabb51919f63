"""Start-up helpers: the cyclic garbage collector paused while jax is imported and a model loads."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic GC for the block, then restore it (a no-op when it is already off).

    Importing jax and lowering the artifact's modules allocate hundreds of thousands of
    long-lived objects, and the collector's repeated full passes over them cost ~0.1 s of a
    2.2 s warm start on a 2-core machine (measured: scripts/bench.py --only start). Nothing
    here creates reference cycles that must be reclaimed before the block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
