"""Assemble and write an artifact directory through the runtime's format code."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

import runtime
from runtime.tools.atomic import atomic_directory, write_file
from runtime.format.integrity import file_record
from runtime.format.manifest import FORMAT_NAME, SCHEMA_VERSION
from runtime.tools.writers import write_manifest

from exporter.functions import SEMANTICS_VERSION, ModelFunctions
from exporter.lowering import FUNCTIONS, export_all, serialization_version, signature
from exporter.memory import prefill_activation_bytes
from exporter.numerics import for_platform
from exporter.params import weight_spec
from exporter.state import state_bytes

FILE_SUFFIX = ".jaxexport"
PREFILL_SEGMENT = 2048  # the largest prompt bucket: longer prompts are prefilled in segments


def _pow2_buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from lo up to hi, with hi itself last: log2(hi/lo)+1 compilations at most."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    return out + [hi]


def compatibility_window(now: dt.datetime) -> dict:
    """The jax versions the artifact may run on: from the exporting jax to the end of its minor
    series, which is where the runtime's own pin ends (pyproject: jax<0.11 for jax 0.10; tested),
    for at most 180 days. jax.export promises more (a newer jax for 6 months, a 3-weeks-older one),
    but a runtime can only be installed with the jax its pin allows: a release that moves the pin
    to the next minor re-exports, it does not trust a window it never tested."""
    major, minor = (int(x) for x in jax.__version__.split(".")[:2])
    return {
        "jax_min": jax.__version__.split("+")[0],
        "jax_max_exclusive": f"{major}.{minor + 1}.0",
        "expires": (now + dt.timedelta(days=180)).date().isoformat(),
    }


def build_manifest(fns: ModelFunctions, platforms, files: dict[str, dict], now: dt.datetime,
                   calling_convention: int, prefill_segment: int = PREFILL_SEGMENT) -> dict:
    cfg, limits = fns.cfg, fns.limits
    segment = min(prefill_segment, limits.max_prompt_tokens, limits.max_prefill_tokens)
    numerics = {p: for_platform(p, cfg.chunk_size, fns.dtype).to_dict() for p in platforms}
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "semantics_version": SEMANTICS_VERSION,
        "created": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "producer": {"package": "mamba2-aot", "version": runtime.__version__,
                     "jax": jax.__version__, "jaxlib": jaxlib.__version__},
        "serialization": {
            "jax_export_version": serialization_version(),
            "calling_convention_version": calling_convention,
        },
        "compatibility": compatibility_window(now),
        "platforms": list(platforms),
        "dtype": jnp.dtype(fns.dtype).name,
        "model": {
            "architecture": "mamba2", "config": cfg.to_dict(),
            "state": {"bytes_per_sequence": state_bytes(cfg, fns.dtype), "grows_with_length": False},
            "numerics": numerics,
        },
        "tokens": {"bos_id": cfg.bos_token_id, "eos_id": cfg.eos_token_id, "pad_id": cfg.pad_token_id},
        "limits": {**limits.to_dict(), "vocab_size": cfg.vocab_size},
        "memory": {"prefill_activation_bytes": max(
            prefill_activation_bytes(cfg, fns.dtype, limits.max_prefill_tokens, n["chunk_size"],
                                     limits.max_batch) for n in numerics.values())},
        "buckets": {
            "prompt": _pow2_buckets(min(16, segment), segment),
            "batch": _pow2_buckets(1, limits.max_batch),
        },
        "functions": {
            name: {**signature(fns, name),
                   "files": {p: _rel(p, name) for p in platforms}}
            for name in FUNCTIONS
        },
        "weights": weight_spec(cfg, fns.dtype),
        "mesh": _mesh_record(fns),
        "files": files,
    }


def _mesh_record(fns: ModelFunctions) -> dict | None:
    """None for one device; else the mesh and every weight's and cache array's PartitionSpec."""
    if fns.devices == 1:
        return None
    from exporter.sharding import plan

    return plan(fns.cfg, fns.devices, fns.dtype).manifest_record()


def _rel(platform: str, name: str) -> str:
    return f"{platform}/{name}{FILE_SUFFIX}"


def write_artifact(fns: ModelFunctions, platforms, out: Path, force: bool,
                   progress: Callable[[str, str, int, float], None] = lambda *a: None,
                   prefill_segment: int = PREFILL_SEGMENT) -> dict:
    """Export every (platform, function) and write the artifact atomically. Returns the manifest."""
    now = dt.datetime.now(dt.timezone.utc)
    files = {}
    with atomic_directory(Path(out), force=force) as tmp:
        calling_convention = 0
        for platform, name, exported, blob, seconds in export_all(fns, platforms):
            calling_convention = max(calling_convention, exported.calling_convention_version)
            path = tmp / _rel(platform, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, blob)
            files[_rel(platform, name)] = file_record(path)
            progress(platform, name, len(blob), seconds)
        manifest = build_manifest(fns, platforms, files, now, calling_convention, prefill_segment)
        write_manifest(tmp, manifest)
    return manifest

