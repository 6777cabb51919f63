"""Checkpoints in, a validated `{name: array}` params dict out: everything from the weight spec.

Names, shapes and dtypes are checked against the spec from checkpoint metadata alone, before
any tensor data is read (readers: runtime.engine.checkpoints). Each tensor is then copied once, into a
64-byte aligned host buffer that XLA's CPU client adopts without another copy (`to_device`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from runtime.engine.checkpoints import Checkpoint, open_checkpoint
from runtime.errors import WeightsError
from runtime.format.weightspec import (
    TensorSpec,
    WeightSpec,
    fmt_shape,
    is_float_dtype,
    parse_weight_spec,
)

_MAX_LISTED = 5  # problems spelled out in one message

# ---------------------------------------------------------------------------------------------
# Config check


def _norm_value(v):
    if isinstance(v, Mapping) and set(v) == {"__float__"}:  # transformers 5 writes inf as {"__float__": "Infinity"}
        v = v["__float__"]
    if isinstance(v, str) and v in ("Infinity", "inf", "+Infinity", "-Infinity", "-inf", "NaN", "nan"):
        return float(v.replace("Infinity", "inf"))
    if isinstance(v, (list, tuple)):
        return tuple(_norm_value(x) for x in v)
    return v


def _same(a, b) -> bool:
    a, b = _norm_value(a), _norm_value(b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num):  # bools compare as 0/1 (HF writes true/false)
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            return math.isnan(fa) and math.isnan(fb)
        return fa == fb or math.isclose(fa, fb, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _effective_config(cfg: Mapping) -> dict:
    out = dict(cfg)
    # mamba_ssm-style configs store the unpadded vocabulary and pad the embedding to a multiple.
    mult, vocab = out.get("pad_vocab_size_multiple"), out.get("vocab_size")
    if isinstance(mult, int) and mult > 1 and isinstance(vocab, int) and not isinstance(vocab, bool):
        out["vocab_size"] = -(-vocab // mult) * mult
    return out


def check_config(checkpoint_config: Mapping | None, spec, *, source: str | os.PathLike | None = None) -> None:
    """Every spec `config_match` key present in the checkpoint's config must agree (WeightsError)."""
    if checkpoint_config is None:
        return
    spec = parse_weight_spec(spec)
    cfg = _effective_config(checkpoint_config)
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


def plan_load(ckpt: Checkpoint, spec: WeightSpec) -> dict[str, list[str]]:
    """{spec tensor: checkpoint names to read} from metadata alone; WeightsError listing all mismatches."""
    problems: list[str] = []
    plan: dict[str, list[str]] = {}
    used: dict[str, str] = {}  # checkpoint name -> spec tensor

    def check_one(t: TensorSpec, src: str, want_shape: tuple[int, ...], label: str) -> None:
        shape = ckpt.shape(src)
        dt = ckpt.dtype(src)
        if shape != want_shape:
            problems.append(f"{label} has shape {fmt_shape(shape)}, expected {fmt_shape(want_shape)}")
        if dt is None or not is_float_dtype(dt):
            problems.append(f"{label} has dtype {ckpt.dtype_name(src)}, expected {t.dtype.name} "
                            "(a floating-point tensor)")

    for t in spec.tensors:
        if t.sources is not None:
            src = _resolve(ckpt, t.sources)
            if src is None:
                also = f" (also looked for {', '.join(t.sources[1:])})" if len(t.sources) > 1 else ""
                shown = t.sources[0]
                problems.append(f"missing {shown} {fmt_shape(t.shape)}{also}")
                continue
            used[src] = t.name
            label = src if src == t.name else f"{src} (for {t.name})"
            check_one(t, src, t.shape, label)
            plan[t.name] = [src]
        else:
            names = []
            for j, entry in enumerate(t.stack):
                src = _resolve(ckpt, entry)
                if src is None:
                    also = f" (also looked for {', '.join(entry[1:])})" if len(entry) > 1 else ""
                    problems.append(f"missing {entry[0]} {fmt_shape(t.shape[1:])} (slice {j} of {t.name}){also}")
                    continue
                used[src] = t.name
                check_one(t, src, t.shape[1:], f"{src} (slice {j} of {t.name})")
                names.append(src)
            plan[t.name] = names
    ignore = set(spec.ignore)
    alias_of = {a: t for t in spec.tensors for a in t.all_source_names()}
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
        bad: list[str] = []
        reader = ckpt.read_many([n for t in spec.tensors for n in plan[t.name]])
        for t in spec.tensors:
            dest = host_buffer(t.shape, t.dtype)
            for j, src in enumerate(plan[t.name]):
                name, arr = next(reader)
                assert name == src, (name, src)
                part = dest[j] if t.stack is not None else dest
                np.copyto(part, arr.reshape(part.shape), casting="unsafe")
                if check_finite:
                    nan, inf = count_nonfinite(part)
                    if nan or inf:
                        label = (f"{src} (slice {j} of {t.name})" if t.stack is not None
                                 else src if src == t.name else f"{src} (for {t.name})")
                        bad.append(f"{label} has {nan + inf} non-finite values ({nan} NaN, {inf} Inf)")
            out[t.name] = dest
        if bad:
            raise WeightsError(
                f"checkpoint {ckpt.path} has non-finite weights: {_problems('', bad)} (the checkpoint is "
                "corrupt or from a diverged run; re-download or re-convert it)"
            )
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
    "WeightSpec", "TensorSpec", "parse_weight_spec", "check_config", "plan_load", "load_weights",
    "to_device", "count_nonfinite", "host_buffer",
]
