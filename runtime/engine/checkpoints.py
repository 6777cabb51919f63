"""Checkpoint readers: named tensors from safetensors (HF single or sharded) and orbax.

Shapes and dtypes come from file headers and metadata alone; tensor data is read on demand.
Never unpickles anything: a `.bin`/`.pt`-only checkpoint is refused with a pointer to
`mamba2-aot convert-checkpoint`. Safetensors data is memory-mapped, so a read is a view of the file (no copy):
the caller copies it once, into the buffer the device will use.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from runtime.environment import environment_problem
from runtime.errors import WeightsError, describe

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
HF_CONFIG = "config.json"
# Written by save_orbax beside the orbax files: the model config the weights belong to.
ORBAX_CONFIG = "mamba2_aot_config.json"
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
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
    _meta: dict[str, tuple]  # name -> (shape, the format's own dtype), from metadata alone

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0]

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

    def _entry(self, name: str) -> tuple:
        if name not in self._meta:
            raise self._unknown(name)
        return self._meta[name]

    def _unknown(self, name: str) -> WeightsError:
        return WeightsError(f"checkpoint {self.path} has no tensor {name!r} "
                            f"(it has {len(self.names())} tensors; list them with .names())")


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except OSError as e:
        raise WeightsError(environment_problem(e, file) or f"cannot read {file}: {e.strerror or e}") from e
    except (SafetensorError, ValueError) as e:
        detail = str(e).replace("\n", " ")
        raise WeightsError(
            f"{file} is not a valid safetensors file (truncated?): {detail}; "
            "re-download or re-convert the checkpoint"
        ) from e


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (HF sharding): headers checked by `safe_open`, data memory-mapped."""

    def __init__(self, path: Path, files: Mapping[str, Path] | list[Path], config: dict | None):
        self.path = path
        self.config = config
        self._maps: dict[Path, tuple[np.ndarray, int, dict[str, tuple[int, int]]]] = {}
        self._raw: dict[Path, mmap.mmap] = {}  # the maps themselves (views of them are handed out)
        self._where: dict[str, Path] = {}  # tensor name -> its file
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        if isinstance(files, Mapping):  # sharded: {tensor name: shard file}
            by_file: dict[Path, list[str]] = {}
            for name, file in files.items():
                by_file.setdefault(file, []).append(name)
        else:
            by_file = {file: None for file in files}
        for file, names in by_file.items():  # one file open at a time: headers only
            with _open_safetensors(file) as handle:
                keys = set(handle.keys())
                for name in names if names is not None else sorted(keys):
                    if name not in keys:
                        raise WeightsError(
                            f"{path}: the index lists tensor {name} in {file.name}, which does not contain it; "
                            "the sharded checkpoint is incomplete or its index is stale: re-download it")
                    if name in self._where:
                        raise WeightsError(f"{path}: tensor {name} is stored twice "
                                           f"({self._where[name].name} and {file.name})")
                    sl = handle.get_slice(name)
                    self._where[name] = file
                    self._meta[name] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> np.dtype | None:
        return _st_dtype(self._entry(name)[1])

    def dtype_name(self, name: str) -> str:
        dt = self.dtype(name)
        return dt.name if dt is not None else self._meta[name][1]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the memory-mapped file (no copy)."""
        shape, dtype = self.shape(name), self.dtype(name)  # an unknown name raises here
        file = self._where[name]
        try:
            mapped, data_start, offsets = self._mapped(file)
            begin, end = offsets[name]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(environment_problem(e, file) or f"cannot read tensor {name} from {file}: {e}; "
                               "the file may be corrupt: re-download or re-convert it") from e
        if dtype is None or end - begin != math.prod(shape) * dtype.itemsize or data_start + end > mapped.size:
            raise WeightsError(f"tensor {name} in {file} has {end - begin} bytes of data, which does not fit "
                               f"its dtype and shape {self.dtype_name(name)}{list(shape)}: the file is corrupt")
        return mapped[data_start + begin:data_start + end].view(dtype).reshape(shape)

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """As `read`, one tensor at a time. Once the caller asks for the next tensor, the previous
        one's pages leave this process (madvise DONTNEED; they stay in the page cache), so a load
        that copies each tensor never holds the mapped file beside its copies (130m: peak RSS
        1179 -> 687 MiB). Views stay valid: a read-only file mapping refaults on access."""
        for name in names:
            arr = self.read(name)
            yield name, arr
            self._release(name)

    def _release(self, name: str) -> None:
        file = self._where[name]
        raw, data_start = self._raw[file], self._maps[file][1]
        begin, end = self._maps[file][2][name]
        start = (data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            raw.madvise(mmap.MADV_DONTNEED, start, data_start + end - start)
        except (AttributeError, OSError, ValueError):  # no madvise here: the pages stay mapped
            pass

    def _mapped(self, file: Path) -> tuple[np.ndarray, int, dict[str, tuple[int, int]]]:
        """(read-only map of the file, where tensor data starts, {name: (begin, end)}).

        The header layout (8-byte little-endian length, then JSON with each tensor's
        `data_offsets`) is the safetensors format; `safe_open` has already validated it."""
        if file not in self._maps:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                self._raw[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            offsets = {k: (int(v["data_offsets"][0]), int(v["data_offsets"][1]))
                       for k, v in header.items() if k != "__metadata__"}
            self._maps[file] = (np.frombuffer(self._raw[file], np.uint8), 8 + n, offsets)
        return self._maps[file]

    def close(self) -> None:
        self._maps.clear()  # views already handed out keep their map alive
        self._raw.clear()


class OrbaxCheckpoint(Checkpoint):
    """An orbax PyTree checkpoint of a (flat or nested) dict of arrays, restored as numpy."""

    def __init__(self, path: Path):
        from runtime.extras import optional_import

        ocp = optional_import("orbax.checkpoint", WeightsError)  # only orbax checkpoints need it
        self._ocp = ocp
        self.path = path
        self._ckptr = ocp.PyTreeCheckpointer()
        try:
            meta = self._ckptr.metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            raise WeightsError(f"cannot read the orbax checkpoint {path}: {describe(e)}; "
                               "re-write it with save_orbax") from e
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

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[1]

    def restore(self, names: list[str], shardings: Mapping[str, Any] | None = None,
                dtypes: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """{name: array} in one orbax restore: numpy arrays, or, given {name: jax Sharding},
        jax arrays restored straight into their shards (each host reads only the shards it
        holds), cast to `dtypes[name]` where given."""
        import jax

        ocp = self._ocp
        item: dict = {}
        args: dict = {}
        for name in names:
            if name not in self._keys:
                raise self._unknown(name)
            shape, dtype = self._meta[name]
            if shardings is None:  # an abstract target with numpy restore type: no sharding warnings
                leaf, arg = jax.ShapeDtypeStruct(shape, dtype), ocp.RestoreArgs(restore_type=np.ndarray)
            else:
                dtype = (dtypes or {}).get(name, dtype)
                leaf = jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[name])
                arg = ocp.ArrayRestoreArgs(sharding=shardings[name], dtype=dtype, restore_type=jax.Array)
            *parents, key = self._keys[name]
            node_i, node_a = item, args
            for k in parents:
                node_i, node_a = node_i.setdefault(k, {}), node_a.setdefault(k, {})
            node_i[key], node_a[key] = leaf, arg
        try:
            out = self._ckptr.restore(
                self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            raise WeightsError(f"cannot read {', '.join(names[:3])} from the orbax checkpoint {self.path}: "
                               f"{describe(e)}") from e
        result = {}
        for name in names:
            node = out
            for k in self._keys[name]:
                node = node[k]
            result[name] = np.asarray(node) if shardings is None else node
        return result

    def read(self, name: str) -> np.ndarray:
        return self.restore([name])[name]

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Restored in batches of about _ORBAX_BATCH_BYTES (one orbax restore per batch)."""
        batch: list[str] = []
        size = 0
        for name in names:
            shape, dtype = self._meta[name] if name in self._meta else ((), np.dtype(np.uint8))
            batch.append(name)
            size += math.prod(shape) * dtype.itemsize
            if size >= _ORBAX_BATCH_BYTES:
                yield from self.restore(batch).items()
                batch, size = [], 0
        if batch:
            yield from self.restore(batch).items()


def _read_json_config(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())  # Python's json reads HF's `Infinity`
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot parse {file}: {e}; fix or remove it") from e
    if not isinstance(cfg, dict):
        raise WeightsError(f"{file} is not a JSON object; fix or remove it")
    return cfg


def _pickle_refusal(what: str, src: Path) -> WeightsError:
    return WeightsError(
        f"{what} is a pickle-based PyTorch checkpoint (.bin/.pt), which is never loaded (unpickling runs "
        f"arbitrary code); convert it to safetensors first: mamba2-aot convert-checkpoint {src} OUT "
        "(a reader that can only build tensors; mamba_ssm and HF checkpoints), then load OUT"
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
        raise WeightsError(f"cannot parse {index}: {e}; re-download the checkpoint") from e
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
            raise _pickle_refusal(str(p), p)
        if p.name.endswith(".index.json"):
            if p.name.startswith("pytorch_model"):
                raise _pickle_refusal(str(p), p.parent)
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
        raise _pickle_refusal(f"{p} ({', '.join(pickles[:3])})", p)
    raise WeightsError(f"{p} has no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or orbax checkpoint; "
                       "point at a HF checkpoint directory, a .safetensors file or a save_orbax directory")
