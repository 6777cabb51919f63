"""Checkpoints in, a validated `{name: array}` params dict out: everything from the weight spec.

Names, shapes and dtypes are checked against the spec from checkpoint metadata alone, before
any tensor data is read (readers: runtime.engine.checkpoints). Each tensor is then copied once, into a
64-byte aligned host buffer that XLA's CPU client adopts without another copy (`to_device`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from runtime.engine.checkpoints import Checkpoint, open_checkpoint
from runtime.errors import WeightsError
from runtime.format.weightspec import (
    WeightSpec,
    WeightTensor,
    config_value,
    fmt_shape,
    is_float_dtype,
    parse_weight_spec,
)

_MAX_LISTED = 5  # problems spelled out in one message

# ---------------------------------------------------------------------------------------------
# Config check


def _same(a, b) -> bool:
    a, b = config_value(a), config_value(b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num):  # bools compare as 0/1 (HF writes true/false)
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            return math.isnan(fa) and math.isnan(fb)
        return fa == fb or math.isclose(fa, fb, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_config(checkpoint_config: Mapping | None, spec, *, source: str | os.PathLike | None = None) -> None:
    """Every spec `config_match` key present in the checkpoint's config must agree (WeightsError)."""
    if checkpoint_config is None:
        return
    spec = parse_weight_spec(spec)
    cfg = checkpoint_config
    diffs = [f"{k} {_show(cfg[k])} != {_show(want)}" for k, want in spec.config_match.items()
             if k in cfg and not _same(cfg[k], want)]
    if diffs:
        where = f" ({source})" if source is not None else ""
        raise WeightsError(
            f"checkpoint config{where} differs from the artifact's: {', '.join(diffs)} (checkpoint != artifact): "
            "the artifact was exported for another model; use that model's weights or re-export the "
            "artifact from this checkpoint"
        )


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (bool, type(None), str)) else str(v)


# ---------------------------------------------------------------------------------------------
# Loading


def _problems(n_label: str, problems: list[str]) -> str:
    n = len(problems)
    listed = "; ".join(problems[:_MAX_LISTED])
    more = f"; ... and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
    return f"{n} problem{'s' if n != 1 else ''}{n_label}: {listed}{more}"


def _resolve(ckpt: Checkpoint, aliases: tuple[str, ...]) -> str | None:
    for a in aliases:
        if a in ckpt:
            return a
    return None


def source_label(src: str, t: WeightTensor) -> str:
    """How a checkpoint tensor is named in messages: `src`, or `src (for name)` for an alias."""
    return src if src == t.name else f"{src} (for {t.name})"


def plan_load(ckpt: Checkpoint, spec: WeightSpec) -> dict[str, str]:
    """{spec tensor: the checkpoint name to read} from metadata alone; WeightsError listing all
    mismatches."""
    problems: list[str] = []
    plan: dict[str, str] = {}
    used: dict[str, str] = {}  # checkpoint name -> spec tensor

    for t in spec.tensors:
        src = _resolve(ckpt, t.sources)
        if src is None:
            also = f" (also looked for {', '.join(t.sources[1:])})" if len(t.sources) > 1 else ""
            problems.append(f"missing {t.sources[0]} {fmt_shape(t.shape)}{also}")
            continue
        used[src] = t.name
        label = source_label(src, t)
        shape, dt = ckpt.shape(src), ckpt.dtype(src)
        if shape != t.shape:
            problems.append(f"{label} has shape {fmt_shape(shape)}, expected {fmt_shape(t.shape)}")
        if dt is None or not is_float_dtype(dt):
            problems.append(f"{label} has dtype {ckpt.dtype_name(src)}, expected {t.dtype.name} "
                            "(a floating-point tensor)")
        plan[t.name] = src
    ignore = set(spec.ignore)
    alias_of = {a: t for t in spec.tensors for a in t.sources}
    for name in ckpt.names():
        if name in used or name in ignore:
            continue
        note = ""
        if name in alias_of:
            note = f" (an alias of {alias_of[name].name}, which was taken from another name already)"
        problems.append(f"unexpected {name} {fmt_shape(ckpt.shape(name))}{note}")
    if problems:
        raise WeightsError(
            f"checkpoint {ckpt.path} does not match the artifact's weights: {_problems('', problems)} "
            "(are these the weights of the model the artifact was exported for? otherwise re-export the "
            "artifact for this checkpoint)"
        )
    return plan


def count_nonfinite(arr: np.ndarray) -> tuple[int, int]:
    """(NaN count, Inf count) of a float array; bfloat16 checked on its bits."""
    if arr.dtype == np.dtype(ml_dtypes.bfloat16):
        bits = arr.view(np.uint16)
        special = (bits & 0x7F80) == 0x7F80
        if not special.any():
            return 0, 0
        nan = int(np.count_nonzero(special & ((bits & 0x007F) != 0)))
        return nan, int(np.count_nonzero(special)) - nan
    if arr.dtype.kind == "f":
        if np.isfinite(arr).all():
            return 0, 0
        return int(np.count_nonzero(np.isnan(arr))), int(np.count_nonzero(np.isinf(arr)))
    as32 = arr.astype(np.float32)  # other ml_dtypes floats
    return count_nonfinite(as32)


def nonfinite_error(path, counts: Mapping[str, tuple[int, int]]) -> WeightsError | None:
    """The error for tensors with NaN/Inf values ({label: (NaN count, Inf count)}), or None."""
    bad = [f"{label} has {nan + inf} non-finite values ({nan} NaN, {inf} Inf)"
           for label, (nan, inf) in counts.items() if nan or inf]
    if not bad:
        return None
    return WeightsError(f"checkpoint {path} has non-finite weights: {_problems('', bad)} (the checkpoint is "
                        "corrupt or from a diverged run; re-download or re-convert it)")


def load_weights(path, spec, *, check_finite: bool = True,
                 on_checked: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """{spec name: numpy array in the spec's dtype} from a checkpoint, strictly checked against `spec`.

    Each array is a `host_buffer` the checkpoint's data was copied (and cast) into once.
    `on_checked` runs once names, shapes and dtypes have passed, before any data is read."""
    spec = parse_weight_spec(spec)
    with open_checkpoint(path) as ckpt:
        check_config(ckpt.config, spec, source=ckpt.path)
        plan = plan_load(ckpt, spec)  # metadata only: nothing read yet
        if on_checked is not None:
            on_checked()
        out: dict[str, np.ndarray] = {}
        counts: dict[str, tuple[int, int]] = {}
        for t, (src, arr) in zip(spec.tensors, ckpt.read_many([plan[t.name] for t in spec.tensors])):
            if src != plan[t.name]:
                raise WeightsError(f"checkpoint {ckpt.path} returned {src} when {plan[t.name]} was asked for: "
                                   "the reader is out of order (a bug: please report it)")
            dest = host_buffer(t.shape, t.dtype)
            np.copyto(dest, arr.reshape(dest.shape), casting="unsafe")
            if check_finite:
                counts[source_label(src, t)] = count_nonfinite(dest)
            out[t.name] = dest
        error = nonfinite_error(ckpt.path, counts)
        if error is not None:
            raise error
    return out


# ---------------------------------------------------------------------------------------------
# Host buffers and device placement


_ALIGN = 64  # bytes: XLA's CPU client adopts host arrays aligned to this without copying


def host_buffer(shape, dtype) -> np.ndarray:
    """An uninitialised array aligned to 64 bytes: on CPU, `to_device` then adopts it zero-copy."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def to_device(params: Mapping[str, Any], shardings=None, *, consume: bool = False) -> dict:
    """jax.device_put each array; `shardings` is one Sharding/Device for all, or {name: sharding}.

    On CPU, `host_buffer` arrays become device arrays without a copy (the device array then owns
    that memory: do not write to the host array afterwards). consume=True pops each host array
    from `params` (a dict) once it is on the device, so peak memory stays near one model.
    """
    import jax

    if isinstance(shardings, Mapping):
        unknown = sorted(set(shardings) - set(params))
        if unknown:
            raise WeightsError(f"shardings name {len(unknown)} tensors that are not parameters: "
                               f"{', '.join(unknown[:5])}; use the weight spec's tensor names")
    out = {}
    for name in list(params):
        sharding = shardings.get(name) if isinstance(shardings, Mapping) else shardings
        out[name] = jax.block_until_ready(jax.device_put(params[name], sharding))
        if consume:
            del params[name]
    return out


__all__ = [
    "WeightSpec", "WeightTensor", "parse_weight_spec", "check_config", "plan_load", "load_weights",
    "to_device", "count_nonfinite", "nonfinite_error", "host_buffer",
]
