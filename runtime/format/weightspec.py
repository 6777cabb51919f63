"""The weight specification an artifact carries: which tensors it takes and where they come from.

The manifest's `"weights"` object (written by the exporter) is all the runtime knows about the
model's parameters:

    {"tensors": [{"name": ..., "shape": [...], "dtype": "float32" | "bfloat16" | ...,
                  "sources": [checkpoint name, alias, ...]      # first one present wins
                  "init": {"kind": "normal", "std": s} | {"kind": "uniform", "low": a, "high": b}
                          | {"kind": "constant", "value": v}}, ...],
     "ignore": [checkpoint names allowed in a checkpoint but unused],
     "config_match": {key: value a checkpoint's config.json must agree with}}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy, so np.dtype("bfloat16") works)
import numpy as np

from runtime.errors import WeightsError

_INIT_KINDS = {"normal": ("std",), "uniform": ("low", "high"), "constant": ("value",)}


def is_float_dtype(dtype) -> bool:
    """True for numpy floats and ml_dtypes' floats (bfloat16, float8_*), False for ints/bools."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return True
    if dt.kind != "V":
        return False
    try:
        ml_dtypes.finfo(dt)
    except (ValueError, TypeError):
        return False
    return True


def float_dtype(name: str) -> np.dtype:
    """The numpy dtype for a float dtype name ("float32", "bfloat16", ...); ValueError otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a string, got {name!r}")
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}") from None
    if not is_float_dtype(dt):
        raise ValueError(f"dtype {name!r} is not a floating-point type")
    return dt


# How config.json files spell non-finite floats: Python's json reads Infinity/NaN as floats;
# transformers 5 writes {"__float__": "Infinity"}; some writers quote them.
_FLOAT_WORDS = frozenset({"Infinity", "+Infinity", "-Infinity", "inf", "+inf", "-inf", "NaN", "nan"})


def _float_object(v) -> bool:
    return isinstance(v, Mapping) and set(v) == {"__float__"}


def json_float(v) -> float:
    """A float from a config file: a number, a numeric string ("Infinity", "1e-3"), or
    transformers 5's {"__float__": "Infinity"}. TypeError or ValueError for anything else."""
    if _float_object(v):
        v = v["__float__"]
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"not a number: {v!r:.60}")
    return float(v)


def config_value(v):
    """A config.json value as compared with the artifact's `config_match`: the spellings of
    non-finite floats become floats, lists become tuples, anything else is left as it is."""
    if _float_object(v) or (isinstance(v, str) and v in _FLOAT_WORDS):
        return json_float(v)
    if isinstance(v, (list, tuple)):
        return tuple(config_value(x) for x in v)
    return v


def fmt_shape(shape) -> str:
    """`[3352, 768]`, as shapes appear in messages."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


@dataclasses.dataclass(frozen=True)
class WeightTensor:
    """One parameter: its name in the params dict, shape, dtype, checkpoint sources and init rule.

    (Not the manifest's signature tensors, runtime.format.manifest.TensorSpec: those describe
    a function's inputs and outputs, with symbolic dimensions.)"""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sources: tuple[str, ...]  # checkpoint names to take it from, first present wins
    init: Mapping[str, Any]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name,
                "sources": list(self.sources), "init": dict(self.init)}


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    tensors: tuple[WeightTensor, ...]
    ignore: tuple[str, ...] = ()
    config_match: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def __getitem__(self, name: str) -> WeightTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "ignore": list(self.ignore),
            "config_match": dict(self.config_match),
        }


def _bad(where: str, what: str) -> WeightsError:
    return WeightsError(
        f"invalid weight spec in the artifact manifest: {where}: {what} "
        "(the artifact is damaged or from an incompatible exporter; re-export it)"
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(value, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(n, str) and n for n in value):
        raise _bad(where, f"{field!r} must be a non-empty list of non-empty strings, got {value!r}")
    return tuple(value)


def _init(value, where: str) -> dict:
    if not isinstance(value, Mapping) or not isinstance(value.get("kind"), str) or value["kind"] not in _INIT_KINDS:
        raise _bad(where, f"'init' must be an object with kind one of {', '.join(_INIT_KINDS)}, got {value!r}")
    kind = value["kind"]
    out: dict[str, Any] = {"kind": kind}
    for key in _INIT_KINDS[kind]:
        v = value.get(key)
        if not _is_number(v) or not math.isfinite(v):
            raise _bad(where, f"init {kind!r} needs a finite number {key!r}, got {v!r}")
        out[key] = float(v)
    if kind == "normal" and out["std"] < 0:
        raise _bad(where, f"init normal std must be >= 0, got {out['std']}")
    if kind == "normal" and "mean" in value:
        if not _is_number(value["mean"]) or not math.isfinite(value["mean"]):
            raise _bad(where, f"init normal 'mean' must be a finite number, got {value['mean']!r}")
        out["mean"] = float(value["mean"])
    if kind == "uniform" and out["low"] > out["high"]:
        raise _bad(where, f"init uniform low {out['low']} > high {out['high']}")
    return out


def _tensor(obj, i: int) -> WeightTensor:
    where = f"tensors[{i}]"
    if not isinstance(obj, Mapping):
        raise _bad(where, f"must be an object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(where, f"'name' must be a non-empty string, got {name!r}")
    where = f"tensors[{i}] ({name})"
    shape = obj.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(where, f"'shape' must be a list of non-negative integers, got {shape!r}")
    shape = tuple(int(d) for d in shape)
    try:
        dtype = float_dtype(obj.get("dtype"))
    except ValueError as e:
        raise _bad(where, f"'dtype': {e}") from None
    if obj.get("sources") is None:
        raise _bad(where, "needs 'sources' (the checkpoint names to read it from)")
    return WeightTensor(name=name, shape=shape, dtype=dtype, sources=_names(obj["sources"], where, "sources"),
                        init=_init(obj.get("init"), where))


def parse_weight_spec(obj) -> WeightSpec:
    """Validate the manifest's `"weights"` object into a WeightSpec (WeightsError when malformed)."""
    if isinstance(obj, WeightSpec):
        return obj
    if not isinstance(obj, Mapping):
        raise _bad("weights", f"must be an object, got {type(obj).__name__}")
    tensors = obj.get("tensors")
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise _bad("weights", "'tensors' must be a non-empty list")
    specs = tuple(_tensor(t, i) for i, t in enumerate(tensors))
    seen: dict[str, str] = {}
    names: set[str] = set()
    for t in specs:
        if t.name in names:
            raise _bad(f"tensor {t.name}", "the name appears twice")
        names.add(t.name)
        for src in t.sources:
            if seen.get(src, t.name) != t.name:
                raise _bad(f"tensor {t.name}", f"checkpoint name {src!r} is also a source of {seen[src]}")
            seen[src] = t.name
    ignore = obj.get("ignore", [])
    if ignore is None:
        ignore = []
    if not isinstance(ignore, (list, tuple)) or not all(isinstance(n, str) for n in ignore):
        raise _bad("weights", f"'ignore' must be a list of strings, got {ignore!r}")
    config_match = obj.get("config_match", {})
    if config_match is None:
        config_match = {}
    if not isinstance(config_match, Mapping) or not all(isinstance(k, str) for k in config_match):
        raise _bad("weights", f"'config_match' must be an object, got {config_match!r}")
    return WeightSpec(tensors=specs, ignore=tuple(ignore), config_match=dict(config_match))


__all__ = ["WeightTensor", "WeightSpec", "parse_weight_spec", "is_float_dtype", "float_dtype", "fmt_shape",
           "json_float", "config_value"]
