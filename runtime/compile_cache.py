"""The persistent XLA compilation cache: a second process start reuses compiled executables."""

from __future__ import annotations

import os
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
