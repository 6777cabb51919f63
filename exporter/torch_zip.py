"""torch.save files (the zip format of PyTorch >= 1.6) as read-only checkpoints, without torch.

The archive holds `<prefix>/data.pkl` (the state dict's structure, read by the restricted
`statedict_reader`) and one `<prefix>/data/<key>` record per storage. torch.save stores
records uncompressed, so a tensor is a view of the memory-mapped file: reading a checkpoint
never holds a second copy of it. Everything about the archive is checked before use: one
prefix, no duplicate members, little-endian data, each record exactly as large as its storage
record says and inside the file, each tensor view inside its storage.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from runtime.engine.checkpoints import Checkpoint, _shard_path
from runtime.errors import WeightsError

from exporter.statedict_reader import Refused, StorageRef, StorageType, read_state_dict

MAX_PKL_BYTES = 64 << 20  # data.pkl of a 10k-tensor state dict is ~1 MB
_KEY = re.compile(r"[A-Za-z0-9_]+\Z")
# What zipfile raises on damaged or unusual archives (RuntimeError: encrypted members).
_ZIP_ERRORS = (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def _legacy_kind(path: Path) -> str:
    """What a non-zip file looks like, for the refusal."""
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "the legacy tar format of torch.save (PyTorch < 0.4), which is not supported"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]"):
        return "the legacy (PyTorch < 1.6) torch.save format, which is not supported: re-save it with a current PyTorch"
    return "not a torch.save file (not a zip archive)"


class TorchZipCheckpoint(Checkpoint):
    """The tensors of one torch.save file: names, shapes and dtypes from data.pkl; data on `read`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = None
        try:
            if not zipfile.is_zipfile(self.path):
                raise WeightsError(f"{self.path} is {_legacy_kind(self.path)}")
            with zipfile.ZipFile(self.path) as zf:
                self._size = self.path.stat().st_size
                self._records = self._index(zf)
                self._storages: dict[str, StorageRef] = {}
                pkl = self._read_pkl(zf)
                self._tensors = read_state_dict(pkl, self._storage)
        except Refused as e:
            raise WeightsError(f"{self.path}: refusing to read it: {e} (only tensors are read; nothing in it "
                               "was run)") from None
        except _ZIP_ERRORS as e:
            raise WeightsError(f"cannot read {self.path}: {e}; re-download it") from None
        self._meta = {n: (t.shape, t.storage.dtype) for n, t in self._tensors.items()}
        self._map: np.memmap | None = None

    def _index(self, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise Refused("the archive lists a member twice")
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise Refused("the archive has no single <name>/data.pkl: it is not a torch.save file")
        self._prefix = pkls[0][: -len("data.pkl")]
        if any(not n.startswith(self._prefix) for n in names):
            raise Refused("the archive holds members outside its torch.save directory")
        records = {i.filename[len(self._prefix):]: i for i in infos}
        order = records.get("byteorder")
        if order is not None and zf.read(order).strip() != b"little":
            raise Refused("its tensors are stored big-endian")
        return records

    def _read_pkl(self, zf: zipfile.ZipFile) -> bytes:
        info = self._records["data.pkl"]
        if info.file_size > MAX_PKL_BYTES:
            raise Refused(f"data.pkl has {info.file_size} bytes, far more than a state dict needs")
        with zf.open(info) as f:
            return f.read(MAX_PKL_BYTES + 1)

    def _storage(self, kind: StorageType, key: str, numel: int) -> StorageRef:
        """Check a storage record against its archive member; the same key always means one storage."""
        seen = self._storages.get(key)
        if seen is not None:
            if (seen.dtype, seen.numel) != (kind.dtype, numel):
                raise Refused(f"storage {key} is described twice, differently")
            return seen
        info = self._records.get(f"data/{key}") if _KEY.match(key) else None
        if info is None:
            raise Refused(f"storage record {key[:40]!r} has no data/{key[:40]} member")
        if info.file_size != numel * kind.dtype.itemsize:
            raise Refused(f"storage {key} holds {info.file_size} bytes, not the {numel} x "
                          f"{kind.dtype.itemsize} bytes its record says")
        if info.flag_bits & 1:
            raise Refused(f"storage {key} is encrypted")
        ref = StorageRef(key, kind.dtype, numel)
        self._storages[key] = ref
        return ref

    # -- Checkpoint interface
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[1]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only (possibly strided) view of the file's data: no copy."""
        self._entry(name)
        t = self._tensors[name]
        storage = self._storage_array(t.storage)
        item = storage.itemsize
        return np.lib.stride_tricks.as_strided(storage[t.offset:], t.shape, [s * item for s in t.stride],
                                               writeable=False)

    def _storage_array(self, ref: StorageRef) -> np.ndarray:
        info = self._records[f"data/{ref.key}"]
        if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses; other writers might
            try:
                with zipfile.ZipFile(self.path) as zf, zf.open(info) as f:
                    raw = f.read(info.file_size + 1)
            except _ZIP_ERRORS as e:
                raise WeightsError(f"cannot read storage {ref.key} of {self.path}: {e}; re-download it") from None
            if len(raw) != info.file_size:
                raise WeightsError(f"{self.path}: storage {ref.key} does not have its recorded size: the file is corrupt")
            return np.frombuffer(raw, ref.dtype)
        start = self._data_start(info)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[start:start + info.file_size].view(ref.dtype)

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its local header (whose lengths may differ
        from the central directory's)."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
        if len(head) != _LOCAL_HEADER.size:
            raise WeightsError(f"{self.path}: storage {info.filename} lies past the end of the file: it is truncated")
        sig, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if sig != b"PK\x03\x04" or start + info.file_size > self._size:
            raise WeightsError(f"{self.path}: storage {info.filename} lies outside the file: it is truncated or corrupt")
        return start

    def close(self) -> None:
        self._map = None  # views already handed out keep their map alive


class ShardedTorchCheckpoint(Checkpoint):
    """Several torch.save files and the `pytorch_model.bin.index.json` that maps names to them."""

    def __init__(self, index: Path):
        self.path = index
        self.config = None
        try:
            wmap = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError) as e:
            raise WeightsError(f"cannot parse {index}: {e}; re-download the checkpoint") from None
        if not isinstance(wmap, dict) or not wmap:
            raise WeightsError(f"{index} has no 'weight_map' object; re-download the checkpoint")
        self._shards: dict[str, TorchZipCheckpoint] = {}
        self._where: dict[str, TorchZipCheckpoint] = {}
        for name, shard in wmap.items():
            ck = self._shard(index, shard)
            if name not in ck:
                raise WeightsError(f"{index} lists tensor {name} in {shard}, which does not contain it: "
                                   "the index is stale or the download incomplete")
            self._where[name] = ck
        for shard, ck in self._shards.items():
            extra = [n for n in ck.names() if self._where.get(n) is not ck]
            if extra:
                raise WeightsError(f"{shard} holds {extra[0]}, which {index.name} does not map to it: "
                                   "the index is stale or the shards are mixed up")
        self._meta = {n: ck._entry(n) for n, ck in self._where.items()}

    def _shard(self, index: Path, shard) -> TorchZipCheckpoint:
        if not isinstance(shard, str) or shard not in self._shards:  # paths checked as for safetensors shards (no escaping the dir)
            self._shards[shard] = TorchZipCheckpoint(_shard_path(index.parent, index, shard))
        return self._shards[shard]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[1]

    def read(self, name: str) -> np.ndarray:
        self._entry(name)
        return self._where[name].read(name)

    def close(self) -> None:
        for ck in self._shards.values():
            ck.close()


def open_torch_checkpoint(path: Path) -> Checkpoint:
    """One torch.save file, or a sharded set through its `*.bin.index.json`."""
    if path.name.endswith(".index.json"):
        return ShardedTorchCheckpoint(path)
    return TorchZipCheckpoint(path)
