"""Per-row random keys: a row's tokens depend only on its seed, never on batch or backend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.errors import RequestError


def row_keys(seed: int | Sequence[int], rows: int) -> np.ndarray:
    """uint32[rows, 2] threefry key data. An int seed gives row i the key fold_in(key(seed), i);
    a list gives one seed per row."""
    import jax

    try:
        seeds = [seed] * rows if isinstance(seed, (int, np.integer)) else list(seed)
        ok = len(seeds) == rows and not any(
            isinstance(s, bool) or int(s) != s or not 0 <= s < 2**63 for s in seeds)
    except (TypeError, ValueError, OverflowError):  # a string, None, a float nan, ...
        ok = False
    if not ok:
        raise RequestError(f"seed must be an integer >= 0 or a list of {rows} of them")
    base = jax.random.PRNGKey
    keys = [
        jax.random.fold_in(base(int(s)), i) if isinstance(seed, (int, np.integer)) else base(int(s))
        for i, s in enumerate(seeds)
    ]
    return np.stack([np.asarray(jax.random.key_data(k), np.uint32) for k in keys])
