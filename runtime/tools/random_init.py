"""Seeded random weights from an artifact's weight specification (tests, benchmarks, smoke runs)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import numpy as np

from runtime.engine.weights import host_buffer
from runtime.errors import WeightsError
from runtime.format.weightspec import parse_weight_spec

_BLOCK = 1 << 22  # elements per independently seeded block (fixed: results never depend on threads)


def _name_key(name: str) -> tuple[int, ...]:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return tuple(int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4))


def _fill(out: np.ndarray, init: Mapping, seed: int, key: tuple[int, ...], block: int) -> None:
    kind = init["kind"]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key + (block,)))
    if kind == "normal":
        rng.standard_normal(out=out, dtype=np.float32)
        out *= np.float32(init["std"])
        if init.get("mean"):
            out += np.float32(init["mean"])
    elif kind == "uniform":
        rng.random(out=out, dtype=np.float32)
        lo, hi = init["low"], init["high"]
        out *= np.float32(hi - lo)
        out += np.float32(lo)
        np.clip(out, np.float32(lo), np.float32(hi), out=out)
    else:  # pragma: no cover - parse_weight_spec admits no other kind
        raise WeightsError(f"unknown init kind {kind!r}")


def random_weights(spec, seed: int) -> dict[str, np.ndarray]:
    """Seeded random weights following each tensor's init rule, in the spec's dtypes.

    Each tensor is drawn from its own stream keyed by (seed, sha256(name), block), so a tensor's
    values do not depend on the others, the thread count, the process or the machine (for a
    given numpy version: numpy does not promise identical Generator streams across releases).
    """
    spec = parse_weight_spec(spec)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise WeightsError(f"seed must be an integer, got {seed!r}")
    seed = int(seed) % (1 << 64)
    out: dict[str, np.ndarray] = {}
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as ex:
        for t in spec.tensors:
            if t.init["kind"] == "constant":
                out[t.name] = host_buffer(t.shape, t.dtype)
                out[t.name].fill(t.init["value"])
                continue
            buf = host_buffer((t.size,), np.float32)
            key = _name_key(t.name)
            blocks = [(buf[s:s + _BLOCK], t.init, seed, key, b) for b, s in enumerate(range(0, t.size, _BLOCK))]
            if len(blocks) == 1:
                _fill(*blocks[0])
            else:
                for f in [ex.submit(_fill, *blk) for blk in blocks]:
                    f.result()
            out[t.name] = buf.reshape(t.shape).astype(t.dtype, copy=False)
    return out


