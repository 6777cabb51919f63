"""Artifact file integrity: safe member paths, sha256 records, and verification against the manifest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from runtime.errors import ArtifactError, IntegrityError

if TYPE_CHECKING:
    from runtime.format.manifest import Manifest

_CHUNK = 1 << 20
_REFETCH = "re-export or re-copy the artifact"


def _outside(rel: str) -> ArtifactError:
    return ArtifactError(f"manifest entry {rel!r} points outside the artifact directory: {_REFETCH}")


def check_member_name(rel: object) -> str:
    """Lexical check of a manifest path: a non-empty, relative, '/'-separated name without '..'."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"manifest entry {rel!r} is not a file name: {_REFETCH}")
    if rel.startswith("/") or ".." in rel.split("/"):
        raise _outside(rel)
    if "\\" in rel or any(ord(ch) < 32 or ord(ch) == 127 for ch in rel):
        raise ArtifactError(f"manifest entry {rel!r} contains a backslash or control character: {_REFETCH}")
    if any(part in ("", ".") for part in rel.split("/")):
        raise ArtifactError(f"manifest entry {rel!r} is not a normalized relative path: {_REFETCH}")
    return rel


def safe_member(root: str | os.PathLike, rel: str) -> Path:
    """`root/rel`, refusing names (or symlinks) that lead outside `root`."""
    check_member_name(rel)
    base = Path(root).resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError):  # symlink loop
        raise ArtifactError(f"manifest entry {rel!r} is an unresolvable symlink: {_REFETCH}") from None
    if target == base or not target.is_relative_to(base):
        raise _outside(rel)
    return target


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """{"sha256", "bytes"} of a file, as stored in the manifest's `files`."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def _member(root, manifest: "Manifest", rel: str):
    """(path, record) of an artifact file that exists with its recorded size."""
    record = manifest.files.get(rel)
    if record is None:
        raise ArtifactError(f"artifact file {rel!r} is not listed in the manifest: {_REFETCH}")
    path = safe_member(root, rel)
    if not path.is_file():
        what = "missing" if not path.exists() else "not a regular file"
        raise ArtifactError(f"artifact file {rel} is {what}: {_REFETCH}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ArtifactError(f"cannot read artifact file {rel}: {e.strerror or e}") from e
    _check_size(rel, size, record.bytes)
    return path, record


def _check_size(rel: str, size: int, recorded: int) -> None:
    if size != recorded:
        raise IntegrityError(f"{rel} is corrupt (size mismatch: {size} bytes, manifest says {recorded}): {_REFETCH}")


def read_verified(root: str | os.PathLike, manifest: "Manifest", rel: str) -> bytes:
    """The bytes of artifact file `rel`, read once and checked against its recorded size and
    sha256: what is checked is what the caller uses (no second read that could differ)."""
    path, record = _member(root, manifest, rel)
    try:
        with open(path, "rb") as f:
            data = f.read(record.bytes + 1)
    except OSError as e:
        raise ArtifactError(f"cannot read artifact file {rel}: {e.strerror or e}") from e
    _check_size(rel, len(data), record.bytes)  # changed since the stat
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise IntegrityError(f"{rel} is corrupt (sha256 mismatch): {_REFETCH}")
    return data


def verify_files(root: str | os.PathLike, manifest: "Manifest", names: Iterable[str] | None = None) -> None:
    """Check that each listed file (or only `names`) exists and matches its recorded size and
    sha256 (hashed in chunks, never held whole)."""
    for rel in list(manifest.files) if names is None else list(names):
        path, record = _member(root, manifest, rel)
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise ArtifactError(f"cannot read artifact file {rel}: {e.strerror or e}") from e
        if digest != record.sha256:
            raise IntegrityError(f"{rel} is corrupt (sha256 mismatch): {_REFETCH}")
