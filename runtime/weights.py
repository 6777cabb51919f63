"""Checkpoints in, a validated `{name: array}` params dict out: everything from the weight spec.

Reads safetensors (an HF checkpoint directory, single or sharded, or one `.safetensors` file)
and orbax checkpoints written by `save_orbax`. Never unpickles anything: a `.bin`/`.pt`-only
checkpoint is refused with a pointer to converting it. Names, shapes and dtypes are checked
against the spec from file headers alone before any tensor data is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from runtime.atomic import atomic_directory
from runtime.errors import ExportError, WeightsError
from runtime.weightspec import (
    TensorSpec,
    WeightSpec,
    fmt_shape,
    is_float_dtype,
    parse_weight_spec,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
HF_CONFIG = "config.json"
# Written by save_orbax beside the orbax files: the model config the weights belong to.
ORBAX_CONFIG = "mamba2_aot_config.json"
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_LISTED = 5  # problems spelled out in one message
_ORBAX_BATCH_BYTES = 1 << 29  # bytes restored per orbax call when reading many tensors

# safetensors dtype codes -> numpy dtypes (ml_dtypes for bfloat16 and the float8s).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "C64": np.complex64, "C128": np.complex128,
}


def _st_dtype(code: str):
    dt = _ST_DTYPES.get(code)
    return np.dtype(dt) if dt is not None else None


# ---------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoint:
    """A read-only set of named tensors; shapes and dtypes come from metadata, data on `read`."""

    path: Path
    config: dict | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> np.dtype | None:
        """The tensor's numpy dtype, or None for a dtype numpy cannot represent."""
        raise NotImplementedError

    def dtype_name(self, name: str) -> str:
        dt = self.dtype(name)
        return dt.name if dt is not None else "unknown"

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        for n in names:
            yield n, self.read(n)

    def close(self) -> None:
        pass

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unknown(self, name: str) -> WeightsError:
        return WeightsError(f"checkpoint {self.path} has no tensor {name!r} "
                            f"(it has {len(self.names())} tensors; list them with .names())")


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except OSError as e:
        raise WeightsError(f"cannot read {file}: {e.strerror or e}") from None
    except (SafetensorError, ValueError) as e:
        detail = str(e).replace("\n", " ")
        raise WeightsError(
            f"{file} is not a valid safetensors file (truncated?): {detail}; "
            "re-download or re-convert the checkpoint"
        ) from None


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (HF sharding) read lazily through `safe_open`."""

    def __init__(self, path: Path, files: Mapping[str, Path] | list[Path], config: dict | None):
        self.path = path
        self.config = config
        self._handles: dict[Path, Any] = {}
        self._keys: dict[Path, set[str]] = {}
        self._where: dict[str, tuple[Path, Any]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        try:
            if isinstance(files, Mapping):  # sharded: {tensor name: shard file}
                for name, file in files.items():
                    h = self._handle(file)
                    if name not in self._keys[file]:
                        raise WeightsError(
                            f"{path}: the index lists tensor {name} in {file.name}, which does not contain it; "
                            "the sharded checkpoint is incomplete or its index is stale: re-download it"
                        )
                    self._add(name, file, h)
            else:
                for file in files:
                    h = self._handle(file)
                    for name in self._keys[file]:
                        if name in self._where:
                            raise WeightsError(f"{path}: tensor {name} is stored twice "
                                               f"({self._where[name][0].name} and {file.name})")
                        self._add(name, file, h)
        except BaseException:
            self.close()
            raise

    def _handle(self, file: Path):
        if file not in self._handles:
            h = _open_safetensors(file)
            self._handles[file] = h
            self._keys[file] = set(h.keys())
        return self._handles[file]

    def _add(self, name: str, file: Path, handle) -> None:
        sl = handle.get_slice(name)
        self._where[name] = (file, handle)
        self._meta[name] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._meta:
            raise self._unknown(name)
        return self._meta[name][0]

    def dtype(self, name: str) -> np.dtype | None:
        if name not in self._meta:
            raise self._unknown(name)
        return _st_dtype(self._meta[name][1])

    def dtype_name(self, name: str) -> str:
        dt = self.dtype(name)
        return dt.name if dt is not None else self._meta[name][1]

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise self._unknown(name)
        file, handle = self._where[name]
        try:
            arr = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            detail = str(e).replace("\n", " ")
            raise WeightsError(f"cannot read tensor {name} from {file}: {detail}; "
                               "the file may be corrupt: re-download or re-convert it") from None
        want = self.dtype(name)
        if want is not None and arr.dtype != want:  # older safetensors: bf16 as raw 2-byte words
            arr = arr.view(want)
        return arr.reshape(self.shape(name))

    def close(self) -> None:
        for h in self._handles.values():
            exit_ = getattr(h, "__exit__", None)
            if exit_ is not None:
                try:
                    exit_(None, None, None)
                except Exception:  # noqa: BLE001 - closing is best-effort
                    pass
        self._handles.clear()


class OrbaxCheckpoint(Checkpoint):
    """An orbax PyTree checkpoint of a (flat or nested) dict of arrays, restored as numpy."""

    def __init__(self, path: Path):
        import orbax.checkpoint as ocp  # lazily: only orbax checkpoints need it

        self._ocp = ocp
        self.path = path
        self._ckptr = ocp.PyTreeCheckpointer()
        try:
            meta = self._ckptr.metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            raise WeightsError(f"cannot read the orbax checkpoint {path}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}; re-write it with save_orbax") from None
        self._keys: dict[str, tuple[str, ...]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._flatten(tree, ())
        self.config = _read_json_config(path / ORBAX_CONFIG)

    def _flatten(self, node, keys: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                self._flatten(v, keys + (str(k),))
            return
        shape, dtype = getattr(node, "shape", None), getattr(node, "dtype", None)
        if shape is None or dtype is None or not keys:
            raise WeightsError(f"orbax checkpoint {self.path} holds a {type(node).__name__} at "
                               f"{'.'.join(keys) or 'its root'}; expected a dict of arrays (write it with save_orbax)")
        name = ".".join(keys)
        self._keys[name] = keys
        self._meta[name] = (tuple(int(d) for d in shape), np.dtype(dtype))

    def names(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._meta:
            raise self._unknown(name)
        return self._meta[name][0]

    def dtype(self, name: str) -> np.dtype:
        if name not in self._meta:
            raise self._unknown(name)
        return self._meta[name][1]

    def _restore(self, names: list[str]) -> dict[str, np.ndarray]:
        import jax

        ocp = self._ocp
        item: dict = {}
        args: dict = {}
        for name in names:
            if name not in self._keys:
                raise self._unknown(name)
            *parents, leaf = self._keys[name]
            node_i, node_a = item, args
            for k in parents:
                node_i, node_a = node_i.setdefault(k, {}), node_a.setdefault(k, {})
            shape, dtype = self._meta[name]
            # An abstract target with numpy restore type: no per-array sharding warnings.
            node_i[leaf] = jax.ShapeDtypeStruct(shape, dtype)
            node_a[leaf] = ocp.RestoreArgs(restore_type=np.ndarray)
        try:
            out = self._ckptr.restore(
                self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"cannot read {', '.join(names[:3])} from the orbax checkpoint {self.path}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        result = {}
        for name in names:
            node = out
            for k in self._keys[name]:
                node = node[k]
            result[name] = np.asarray(node)
        return result

    def read(self, name: str) -> np.ndarray:
        return self._restore([name])[name]

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Restored in batches of about _ORBAX_BATCH_BYTES (one orbax restore per batch)."""
        batch: list[str] = []
        size = 0
        for name in names:
            shape, dtype = self._meta[name] if name in self._meta else ((), np.dtype(np.uint8))
            batch.append(name)
            size += math.prod(shape) * dtype.itemsize
            if size >= _ORBAX_BATCH_BYTES:
                yield from self._restore(batch).items()
                batch, size = [], 0
        if batch:
            yield from self._restore(batch).items()


def _read_json_config(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())  # Python's json reads HF's `Infinity`
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot parse {file}: {e}; fix or remove it") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{file} is not a JSON object; fix or remove it")
    return cfg


def _pickle_refusal(what: str) -> WeightsError:
    return WeightsError(
        f"{what} is a pickle-based PyTorch checkpoint (.bin/.pt), which is never loaded (unpickling runs "
        "arbitrary code); convert it to safetensors first, e.g. with transformers: "
        "Mamba2ForCausalLM.from_pretrained(dir).save_pretrained(out_dir) (safetensors is the default)"
    )


def _is_orbax_dir(path: Path) -> bool:
    return any((path / m).exists() for m in _ORBAX_MARKERS)


def _shard_path(directory: Path, index: Path, shard) -> Path:
    if not isinstance(shard, str) or not shard:
        raise WeightsError(f"{index}: weight_map has a non-string shard {shard!r}; the index is corrupt")
    # Lexical check only: HF's cache links shards to ../../blobs/, which is fine.
    norm = os.path.normpath(shard)
    if os.path.isabs(shard) or norm == ".." or norm.startswith(".." + os.sep) or os.path.isabs(norm):
        raise WeightsError(f"{index}: shard path {shard!r} escapes the checkpoint directory; refusing to read it")
    file = directory / norm
    if not file.is_file():
        raise WeightsError(f"{index} lists shard {shard}, which is missing from {directory}; "
                           "the download is incomplete: re-download the checkpoint")
    return file


def _open_sharded(directory: Path, index: Path, config: dict | None) -> SafetensorsCheckpoint:
    try:
        obj = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot parse {index}: {e}; re-download the checkpoint") from None
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise WeightsError(f"{index} has no 'weight_map' object; re-download the checkpoint")
    files: dict[str, Path] = {}
    for name, shard in wmap.items():
        files[name] = _shard_path(directory, index, shard)
    return SafetensorsCheckpoint(directory, files, config)


def open_checkpoint(path) -> Checkpoint:
    """Open a checkpoint: an HF directory (model.safetensors or a sharded index, + config.json),
    one .safetensors file, a model.safetensors.index.json, or an orbax checkpoint from save_orbax."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"no checkpoint at {p}: no such file or directory")
    if p.is_file():
        if p.suffix in _PICKLE_SUFFIXES:
            raise _pickle_refusal(str(p))
        if p.name.endswith(".index.json"):
            if p.name.startswith("pytorch_model"):
                raise _pickle_refusal(str(p))
            return _open_sharded(p.parent, p, _read_json_config(p.parent / HF_CONFIG))
        return SafetensorsCheckpoint(p, [p], None)
    if not p.is_dir():
        raise WeightsError(f"{p} is neither a file nor a directory")
    if _is_orbax_dir(p):
        return OrbaxCheckpoint(p)
    config = _read_json_config(p / HF_CONFIG)
    if (p / SAFETENSORS_INDEX).is_file():
        return _open_sharded(p, p / SAFETENSORS_INDEX, config)
    if (p / SAFETENSORS_SINGLE).is_file():
        return SafetensorsCheckpoint(p, [p / SAFETENSORS_SINGLE], config)
    singles = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if len(singles) == 1:
        return SafetensorsCheckpoint(p, singles, config)
    if singles:
        raise WeightsError(f"{p} has {len(singles)} .safetensors files but no {SAFETENSORS_INDEX}; "
                           "pass the file to load, or add the index")
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES or f.name.endswith(".bin.index.json"))
    if pickles:
        raise _pickle_refusal(f"{p} ({', '.join(pickles[:3])})")
    raise WeightsError(f"{p} has no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or orbax checkpoint; "
                       "point at a HF checkpoint directory, a .safetensors file or a save_orbax directory")


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


def load_weights(path, spec, *, check_finite: bool = True) -> dict[str, np.ndarray]:
    """{spec name: numpy array in the spec's dtype} from a checkpoint, strictly checked against `spec`."""
    spec = parse_weight_spec(spec)
    with open_checkpoint(path) as ckpt:
        check_config(ckpt.config, spec, source=ckpt.path)
        plan = plan_load(ckpt, spec)  # metadata only: nothing read yet
        out: dict[str, np.ndarray] = {}
        bad: list[str] = []
        reader = ckpt.read_many([n for t in spec.tensors for n in plan[t.name]])
        for t in spec.tensors:
            parts = []
            for j, src in enumerate(plan[t.name]):
                name, arr = next(reader)
                assert name == src, (name, src)
                arr = arr.astype(t.dtype, copy=False)
                if check_finite:
                    nan, inf = count_nonfinite(arr)
                    if nan or inf:
                        label = (f"{src} (slice {j} of {t.name})" if t.stack is not None
                                 else src if src == t.name else f"{src} (for {t.name})")
                        bad.append(f"{label} has {nan + inf} non-finite values ({nan} NaN, {inf} Inf)")
                parts.append(arr)
            out[t.name] = np.stack(parts) if t.stack is not None else parts[0]
        if bad:
            raise WeightsError(
                f"checkpoint {ckpt.path} has non-finite weights: {_problems('', bad)} (the checkpoint is "
                "corrupt or from a diverged run; re-download or re-convert it)"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Random weights

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
                out[t.name] = np.full(t.shape, t.init["value"], dtype=t.dtype)
                continue
            buf = np.empty(t.size, np.float32)
            key = _name_key(t.name)
            blocks = [(buf[s:s + _BLOCK], t.init, seed, key, b) for b, s in enumerate(range(0, t.size, _BLOCK))]
            if len(blocks) == 1:
                _fill(*blocks[0])
            else:
                for f in [ex.submit(_fill, *blk) for blk in blocks]:
                    f.result()
            out[t.name] = buf.reshape(t.shape).astype(t.dtype, copy=False)
    return out


# ---------------------------------------------------------------------------------------------
# Orbax writing and device placement


def save_orbax(params: Mapping[str, Any], path, config: Mapping | None = None, *, force: bool = False) -> Path:
    """Write `params` as an orbax checkpoint at `path` (+ `config` as JSON beside it), atomically.

    Built in a temporary sibling directory and renamed into place (runtime.atomic); an existing
    `path` is replaced only with force=True. Read it back with `open_checkpoint` / `load_weights`.
    """
    dest = Path(path).absolute()
    if os.path.lexists(dest) and not force:
        raise ExportError(f"{dest} already exists: pass force=True (--force) to replace it")
    if not isinstance(params, Mapping) or not params:
        raise ExportError("save_orbax needs a non-empty dict of {name: array}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ExportError(f"cannot save parameter name {name!r} to orbax: names must be non-empty and have no '/'")
        arrays[name] = np.asarray(value)  # numpy leaves: restored as numpy, no sharding metadata
    config_text = None
    if config is not None:
        try:
            config_text = json.dumps(dict(config), indent=2, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ExportError(f"the config for {dest} is not JSON-serializable: {e}") from None

    import orbax.checkpoint as ocp  # lazily: only orbax checkpoints need it

    with atomic_directory(dest, force=force) as tmp:
        inner = tmp / "orbax"  # orbax wants a fresh directory; its files then move up one level
        try:
            ocp.PyTreeCheckpointer().save(inner, args=ocp.args.PyTreeSave(arrays))
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            raise ExportError(f"cannot write the orbax checkpoint {dest}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        for entry in list(inner.iterdir()):
            os.rename(entry, tmp / entry.name)
        inner.rmdir()
        if config_text is not None:
            (tmp / ORBAX_CONFIG).write_text(config_text + "\n")
    return dest


def to_device(params: Mapping[str, Any], shardings=None, *, consume: bool = False) -> dict:
    """jax.device_put each array; `shardings` is one Sharding/Device for all, or {name: sharding}.

    consume=True pops each host array from `params` (a dict) once it is on the device, so peak
    memory is one model plus one tensor, not two models.
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
    "Checkpoint", "SafetensorsCheckpoint", "OrbaxCheckpoint", "WeightSpec", "TensorSpec",
    "parse_weight_spec", "open_checkpoint", "check_config", "plan_load", "load_weights",
    "random_weights", "save_orbax", "to_device", "count_nonfinite",
]
