"""Lowering with jax.export: one serialized module per (platform, function)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from exporter.flatten import flatten_exported
from exporter.functions import ARG_NAMES, ModelFunctions

FUNCTIONS = ("prefill", "decode")


def default_dtype(platform: str):
    """float32 on cpu (bf16 matmul is ~400x slower on AVX2 CPUs), bfloat16 on accelerators."""
    return jnp.float32 if platform == "cpu" else jnp.bfloat16


def resolve_dtype(dtype, platforms) -> jnp.dtype:
    """The dtype asked for, else the platforms' common default (an error if they differ)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    defaults = {jnp.dtype(default_dtype(p)).name for p in platforms}
    if len(defaults) > 1:
        from runtime.errors import ExportError

        raise ExportError(
            f"platforms {', '.join(platforms)} default to different dtypes (cpu float32, accelerators "
            "bfloat16): pass --dtype, or export cpu and accelerators separately")
    return jnp.dtype(defaults.pop())


def export_one(fns: ModelFunctions, name: str, platform: str) -> jax.export.Exported:
    fns = dataclasses.replace(fns, platform=platform)
    fn: Callable = getattr(fns, name)
    args = getattr(fns, f"{name}_args")()
    if fns.devices > 1:  # tensor parallel: GSPMD partitions per exporter.sharding's specs
        from exporter.sharding import function_shardings, plan

        ins, outs = function_shardings(plan(fns.cfg, fns.devices, fns.dtype), name)
        return jax.export.export(jax.jit(fn, in_shardings=ins, out_shardings=outs),
                                 platforms=(platform,))(*args)
    # One device: the module is flattened (start-up cost of shape refinement, exporter.flatten).
    return flatten_exported(jax.export.export(jax.jit(fn), platforms=(platform,))(*args))


def export_all(fns: ModelFunctions, platforms) -> Iterator[tuple[str, str, jax.export.Exported, bytes, float]]:
    """Yields (platform, function, Exported, serialized bytes, seconds) as each export finishes."""
    for platform in platforms:
        for name in FUNCTIONS:
            t0 = time.perf_counter()
            exported = export_one(fns, name, platform)
            blob = bytes(exported.serialize())
            yield platform, name, exported, blob, time.perf_counter() - t0


def serialization_version() -> int:
    """The flatbuffer format version jax.export writes (not public API; recorded for diagnosis)."""
    from jax._src.export import serialization

    return int(getattr(serialization, "_SERIALIZATION_VERSION", 0))


def signature(fns: ModelFunctions, name: str) -> dict:
    """Names, shapes (symbolic dims as strings) and dtypes of a function's flattened inputs and outputs."""
    in_names, out_names = ARG_NAMES[name]
    args = getattr(fns, f"{name}_args")()
    outs = jax.eval_shape(getattr(fns, name), *args)
    return {"inputs": _describe(in_names, args), "outputs": _describe(out_names, outs)}


def _describe(names, values) -> list[dict]:
    rows = []
    for top, value in zip(names, values):
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            suffix = "".join(f"/{getattr(k, 'key', getattr(k, 'idx', k))}" for k in path)
            rows.append({
                "name": top + suffix,
                "shape": [d if isinstance(d, int) else str(d) for d in leaf.shape],
                "dtype": jnp.dtype(leaf.dtype).name,
            })
    return rows
