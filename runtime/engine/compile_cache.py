"""The persistent XLA compilation cache, and the shapes each artifact ran with: a second process
start reuses compiled executables and prepares them while it loads (runtime.engine.programs)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

ENV_VAR = "MAMBA2_AOT_CACHE_DIR"


def cache_dir() -> Path:
    """$MAMBA2_AOT_CACHE_DIR, else $XDG_CACHE_HOME/mamba2-aot/xla, else ~/.cache/mamba2-aot/xla."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mamba2-aot" / "xla"


def enable(path: Path | None = None) -> Path | None:
    """Point jax's persistent cache at `path` (default `cache_dir()`); every compile is cached.

    Returns the directory, or None when it cannot be created (the cache is then simply off).
    """
    import jax

    path = Path(path) if path else cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


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
