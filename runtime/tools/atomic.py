"""All-or-nothing writes: a directory (an artifact) or a single file appears whole or not at all.

`atomic_directory` builds into a hidden temp directory beside the destination (same filesystem)
and renames it into place under an exclusive lock, so a killed writer never leaves a partial
destination and never damages an earlier one. Concurrent writers to one destination: one wins;
the others get ExportError (without force) or replace it whole (with force).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from runtime.environment import environment_problem
from runtime.errors import ExportError

STALE_SECONDS = 3600  # unlocked leftovers of killed writers older than this are removed


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _old_prefix(name: str) -> str:
    return f".{name}.old-"


def _cannot_write(path: Path, e: OSError, need: int | None = None) -> ExportError:
    return ExportError(environment_problem(e, path, need) or f"cannot write to {path}: {e.strerror or e}")


def _prepare_parent(dest: Path) -> Path:
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):  # e.g. --out under a regular file
            raise ExportError(f"cannot write to {parent}: part of that path is a file, not a directory: "
                              "choose another destination") from e
        raise _cannot_write(parent, e) from e
    return parent  # not writable (permissions, a read-only file system): the temp dir says which


def _lock_nowait(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if someone else holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale(parent: Path, name: str, max_age: float = STALE_SECONDS) -> None:
    """Remove temp/backup leftovers for `name` that are unlocked and older than `max_age` seconds."""
    prefixes = (_tmp_prefix(name), _old_prefix(name))
    now = time.time()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefixes):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < max_age:
                continue
        except OSError:
            continue
        fd = _lock_nowait(Path(entry.path))
        if fd is None:
            continue  # a live writer holds it
        try:
            _remove(Path(entry.path))
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk."""
    for dirpath, _, filenames in os.walk(root):
        for fn in [*filenames, "."]:
            p = os.path.join(dirpath, fn)
            if fn != "." and not os.path.isfile(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False when unsupported here."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, dest: Path) -> None:
    """Put `tmp` at `dest`, which exists; `dest` is never observed missing when renameat2 works."""
    if _exchange(tmp, dest):
        _remove(tmp)  # now holds the previous destination
        return
    backup = Path(tempfile.mkdtemp(prefix=_old_prefix(dest.name), dir=dest.parent))
    backup.rmdir()
    os.rename(dest, backup)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(backup, dest)
        raise
    _remove(backup)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _exists_error(dest: Path) -> ExportError:
    return ExportError(f"{dest} already exists: pass --force to replace it")


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory to fill; on success it becomes `dest` in one rename.

    On an exception the temp directory is removed and `dest` is left as it was.
    """
    dest = Path(os.path.abspath(dest))
    parent = _prepare_parent(dest)
    if os.path.lexists(dest) and not force:
        raise _exists_error(dest)
    clean_stale(parent, dest.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest.name), dir=parent))
    except OSError as e:
        raise _cannot_write(parent, e) from e
    guard = _lock_nowait(tmp)  # tells clean_stale this temp dir is in use
    try:
        try:
            yield tmp
        except OSError as e:  # writing a file of it (a full disk, a size limit, ...)
            _remove(tmp)
            where = dest / Path(e.filename).relative_to(tmp) if _inside(e.filename, tmp) else dest
            raise _cannot_write(where, e, getattr(e, "bytes_needed", None)) from e
        except BaseException:
            _remove(tmp)
            raise
        try:
            _commit(tmp, dest, force)
        except BaseException as e:
            _remove(tmp)
            if isinstance(e, OSError):
                raise _cannot_write(dest, e) from e
            raise
    finally:
        if guard is not None:
            os.close(guard)


def _commit(tmp: Path, dest: Path, force: bool) -> None:
    _fsync_tree(tmp)
    with _locked(dest.parent / f".{dest.name}.lock"):
        if os.path.lexists(dest):
            if not force:
                raise _exists_error(dest)
            _replace(tmp, dest)
        else:
            os.rename(tmp, dest)
    _fsync_dir(dest.parent)


def _inside(name, folder: Path) -> bool:
    return isinstance(name, (str, os.PathLike)) and Path(name).is_relative_to(folder)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a file inside `atomic_directory`'s temp dir. When the environment refuses
    (a full disk, ...), the OSError carries `bytes_needed`, and atomic_directory turns it into an
    ExportError naming the file at its destination and the space it needs."""
    try:
        Path(path).write_bytes(data)
    except OSError as e:  # a failed write() names no file: this one does
        error = OSError(e.errno, e.strerror, os.fspath(path))
        error.bytes_needed = len(data)
        raise error from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file and os.replace: readers see old or new, never partial."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cannot_write(path, e, len(data)) from e
        raise
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
