"""OSErrors the environment causes (a full disk, permissions, a read-only file system, the
file-size and open-file limits) as one-line messages that say what to fix."""

from __future__ import annotations

import errno
import os
import shutil

try:  # imported up front: at the open-file limit, importing it then would fail (EMFILE)
    import resource
except ImportError:  # not on every platform
    resource = None


def fmt_bytes(n: int) -> str:
    """`69.7 KiB`, as sizes appear in messages and `inspect` (binary units, as `df -h` counts)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def free_space(path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing ancestor)."""
    p = os.path.abspath(path)
    while p and not os.path.exists(p):  # the nearest existing ancestor's filesystem
        p = os.path.dirname(p) if os.path.dirname(p) != p else ""
    try:
        return shutil.disk_usage(p or "/").free
    except OSError:
        return None


def _limit(name: str) -> int | None:
    """This process's soft resource limit `name` (RLIMIT_FSIZE in bytes), None if unlimited/unknown."""
    try:
        soft = resource.getrlimit(getattr(resource, name))[0]
    except (AttributeError, OSError, ValueError):  # resource None, or no such limit here
        return None
    return None if soft == getattr(resource, "RLIM_INFINITY", -1) else soft


def environment_problem(e: BaseException, path=None, need: int | None = None) -> str | None:
    """A one-line message for an OSError the environment causes (a full disk, permissions, a
    read-only file system, the file-size or open-file limits), `e` or its `__cause__` chain;
    None for anything else. `path`: what was being written (default: the error's own);
    `need`: how many bytes the write needed."""
    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, OSError):
        seen.add(id(e))
        e = e.__cause__  # explicit wrapping only (`raise ... from e`)
    if e is None or e.errno is None:
        return None
    where = path if path is not None else (e.filename if e.filename is not None else "a file")
    needs = f"; it needs {fmt_bytes(need)}" if need is not None else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        free = free_space(where) if where != "a file" else None
        free_text = f", {fmt_bytes(free)} free there" if free is not None else ""
        kind = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return f"cannot write {where}: {kind}{needs}{free_text}: free some space or write elsewhere"
    if e.errno == errno.EFBIG:
        limit = _limit("RLIMIT_FSIZE")
        shown = f" of {fmt_bytes(limit)}" if limit is not None else ""
        return (f"cannot write {where}: over this process's file size limit{shown} (`ulimit -f`){needs}: "
                "raise the limit")
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}: fix its permissions or use another path"
    if e.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system: use another path"
    if e.errno == errno.EMFILE:
        opening = f" opening {where}" if where != "a file" else ""
        limit = _limit("RLIMIT_NOFILE")
        shown = f" (this process may open {limit})" if limit is not None else ""
        return f"too many open files{opening}{shown}: raise the limit (`ulimit -n`)"
    if e.errno == errno.ENFILE:
        return "too many open files on this system (the kernel's file table is full): close some programs"
    if e.errno == errno.ENOMEM:
        return "out of memory: close other programs or use a smaller model or batch"
    return None
