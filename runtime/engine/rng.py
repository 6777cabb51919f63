"""Per-row random keys: a row's tokens depend only on its seed, never on batch or backend.

The implementation is pinned to threefry2x32 (not the process default). A seed is any integer
in [0, 2**64): its key is [seed >> 32, seed mod 2**32], the key jax itself derives from a 64-bit
seed, so seeds beyond 2**32 give distinct streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np

from runtime.errors import RequestError

IMPL = "threefry2x32"
_MAX_SEED = 1 << 64


def _is_seed(s) -> bool:
    return isinstance(s, Integral) and not isinstance(s, bool) and 0 <= int(s) < _MAX_SEED


def seed_key(seed: int) -> np.ndarray:
    """uint32[2] threefry key data of a seed in [0, 2**64)."""
    s = int(seed)
    return np.array([s >> 32, s & 0xFFFFFFFF], np.uint32)


def row_keys(seed: int | Sequence[int], rows: int) -> np.ndarray:
    """uint32[rows, 2] threefry key data. An int seed gives row i the key fold_in(key(seed), i);
    a list gives one seed per row (row i: key(seed_i))."""
    if _is_seed(seed):
        seeds, per_row = [int(seed)] * rows, False
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)) and len(seed) == rows \
            and all(_is_seed(s) for s in seed):
        seeds, per_row = [int(s) for s in seed], True
    else:
        raise RequestError(f"seed must be an integer >= 0 (below 2**64) or a list of {rows} of them, "
                           f"got {seed!r:.60}")
    if per_row:
        return np.stack([seed_key(s) for s in seeds]) if rows else np.zeros((0, 2), np.uint32)
    import jax

    base = jax.random.wrap_key_data(seed_key(seeds[0]), impl=IMPL)
    folded = [jax.random.fold_in(base, i) for i in range(rows)]
    return np.stack([np.asarray(jax.random.key_data(k), np.uint32) for k in folded]) if rows \
        else np.zeros((0, 2), np.uint32)
