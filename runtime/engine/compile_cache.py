"""The persistent XLA compilation cache, and the shapes each artifact ran with: a second process
start reuses compiled executables and prepares them while it loads (runtime.engine.programs).

jax's cache settings are process-wide. They are set here only while the host application has
left them alone (the directory unset, or set by this module): a host's own cache directory is
used as it is, and a host that turned the cache off keeps it off. A cache this module set up
is also looked after: an unreadable entry (truncated by a killed writer or a full disk) is
removed and rebuilt, and a directory that cannot be used is reported (`warn`) and left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

from runtime.errors import describe

ENV_VAR = "MAMBA2_AOT_CACHE_DIR"
_ENTRY_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"  # jax's file cache: <key>-cache (+ <key>-atime)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DEFAULT_MIN_COMPILE_SECS = 1.0  # jax's default for jax_persistent_cache_min_compile_time_secs

Warn = Callable[[str], None]


def cache_dir() -> Path:
    """$MAMBA2_AOT_CACHE_DIR, else $XDG_CACHE_HOME/mamba2-aot/xla, else ~/.cache/mamba2-aot/xla."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mamba2-aot" / "xla"


@dataclasses.dataclass
class _Owned:
    """The cache directory this module configured in jax (and so may repair)."""

    path: Path
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    repairs: int = 0  # bumped each time unreadable entries are removed


_owned: _Owned | None = None
_setup = threading.Lock()


def enable(path: Path | None = None, warn: Warn = lambda message: None) -> Path | None:
    """The persistent cache directory compiles go through: the host's own, if it set one;
    else `path` (default `cache_dir()`), every compile cached. None when the cache is off: the
    host turned it off, or the directory cannot be used (then `warn` says why)."""
    global _owned
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None  # the host's choice
    with _setup:
        current = jax.config.jax_compilation_cache_dir
        if current and (_owned is None or current != str(_owned.path)):
            return Path(current)  # the host's cache: its settings are left as they are
        path = Path(path) if path else cache_dir()
        problem = _unusable(path)
        if problem is not None:
            warn(f"cannot use the compile cache at {path} ({problem}): every start compiles again; "
                 f"set {ENV_VAR} to a writable directory")
            return None
        if current != str(path):
            jax.config.update("jax_compilation_cache_dir", str(path))
            if current:  # ours, moved: jax keeps the directory it opened until reset
                from jax.experimental.compilation_cache import compilation_cache

                compilation_cache.reset_cache()
        if jax.config.jax_persistent_cache_min_compile_time_secs == _DEFAULT_MIN_COMPILE_SECS:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if _owned is None or _owned.path != path:  # one record per directory: repairs are counted there
            _owned = _Owned(path)
    return path


def _unusable(path: Path) -> str | None:
    """Why `path` cannot hold the cache (it must be a directory this process can write), or None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


# -- compiling through the cache ------------------------------------------------------------------
try:  # thread-local: only this thread's compile raises, other code keeps jax's own handling
    from jax._src.config import raise_persistent_cache_errors as _raising_cache_errors
except ImportError:  # pragma: no cover - a jax without it: jax's own warnings then
    _raising_cache_errors = None


def compile_lowered(lowered, warn: Warn = lambda message: None):
    """`lowered.compile()`, through the cache when this module set it up: an unreadable entry is
    removed (and rebuilt by this compile), and a cache that cannot be read or written is
    switched off, each said once through `warn` instead of jax's warning per entry."""
    owned = _owned
    import jax

    if (owned is None or _raising_cache_errors is None or not jax.config.jax_enable_compilation_cache
            or jax.config.jax_compilation_cache_dir != str(owned.path)):
        return lowered.compile()
    failure = None
    for _ in range(3):
        repairs = owned.repairs
        try:
            with _raising_cache_errors(True):
                return lowered.compile()
        except OSError as e:  # reading or writing an entry: permissions, a full disk
            _switch_off(owned, e, warn)
            return lowered.compile()
        except Exception as e:  # noqa: BLE001 - an unreadable entry, or a real compile error
            failure = e
            if not _repair(owned, repairs, warn):
                break
    executable = lowered.compile()  # jax's own handling: a real compile error raises here
    warn(f"the compile cache at {owned.path} has an entry jax cannot read ({describe(failure)}): "
         "compiled without it")
    return executable


def _repair(owned: _Owned, repairs: int, warn: Warn) -> bool:
    """Remove unreadable entries; False when there were none (and no other thread removed any
    since `repairs` was read): the failure was not the cache's."""
    with owned.lock:
        if owned.repairs != repairs:
            return True
        bad = [f for f in _entries(owned.path) if not _readable(f)]
        for f in bad:
            for p in (f, f.with_name(f.name[: -len(_ENTRY_SUFFIX)] + _ATIME_SUFFIX)):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
        if not bad:
            return False
        owned.repairs += 1
    warn(f"the compile cache at {owned.path} had {len(bad)} unreadable "
         f"entr{'y' if len(bad) == 1 else 'ies'} (truncated or corrupt): removed, and rebuilt as "
         "programs compile")
    return True


def _entries(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.name.endswith(_ENTRY_SUFFIX) and p.is_file()]
    except OSError:
        return []


def _readable(entry: Path) -> bool:
    """Whether a cache entry decompresses (jax writes zlib, or zstd where it has zstandard;
    both detect truncation). True when it cannot be checked here."""
    try:
        data = entry.read_bytes()
        if data[:4] != _ZSTD_MAGIC:
            zlib.decompress(data)
            return True
        try:
            import zstandard
        except ImportError:
            return True
        zstandard.ZstdDecompressor().decompress(data)
        return True
    except OSError:
        return True  # gone or unreadable to us: not ours to judge
    except Exception:  # noqa: BLE001 - zlib.error, zstandard.ZstdError
        return False


def _switch_off(owned: _Owned, e: OSError, warn: Warn) -> None:
    """Stop using a cache that cannot be read or written (a partial entry is removed)."""
    global _owned
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    with _setup:
        if _owned is owned:
            _owned = None
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()
        else:
            return  # another thread did it (and said so)
    if e.filename and Path(e.filename).parent == owned.path and Path(e.filename).name.endswith(_ENTRY_SUFFIX):
        try:
            Path(e.filename).unlink(missing_ok=True)
        except OSError:
            pass
    warn(f"cannot use the compile cache at {owned.path} ({e.strerror or e}): continuing without it; "
         "every start compiles again until it is writable")


# -- shapes used per artifact (the warm start) -------------------------------------------------
_SHAPES_DIR = "shapes"  # beside jax's cache entries, one JSON file per artifact
_MAX_SHAPES = 4  # most recent first; the next process prepares these while it loads


def artifact_key(files: dict[str, str], platform: str) -> str:
    """An artifact's identity on this platform: a digest of its function files' sha256s."""
    text = json.dumps({"platform": platform, "files": dict(sorted(files.items()))}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def remembered_shapes(key: str) -> list[dict]:
    """The shapes the last process with this artifact used; [] when none (or unreadable)."""
    try:
        entries = json.loads((cache_dir() / _SHAPES_DIR / f"{key}.json").read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict)][:_MAX_SHAPES] if isinstance(entries, list) else []


def remember_shapes(key: str, entries: list[dict]) -> None:
    """Record the shapes in use (most recent first), atomically; best effort."""
    folder = cache_dir() / _SHAPES_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries[:_MAX_SHAPES], f)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        Path(tmp).unlink(missing_ok=True)
