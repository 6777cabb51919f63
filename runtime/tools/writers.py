"""Writers: the manifest and orbax checkpoints, each written atomically (runtime.tools.atomic)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.engine.checkpoints import ORBAX_CONFIG
from runtime.environment import environment_problem, fmt_bytes, free_space
from runtime.errors import ExportError, describe
from runtime.format.manifest import MANIFEST_NAME, encode_manifest
from runtime.tools.atomic import atomic_directory, atomic_write_bytes


def write_manifest(artifact_dir: str | os.PathLike, obj: dict) -> Path:
    """Validate `obj` and write it atomically to `<artifact_dir>/manifest.json`."""
    path = Path(artifact_dir) / MANIFEST_NAME
    atomic_write_bytes(path, encode_manifest(obj))
    return path


def save_orbax(params: Mapping[str, Any], path, config: Mapping | None = None, *, force: bool = False) -> Path:
    """Write `params` as an orbax checkpoint at `path` (+ `config` as JSON beside it), atomically.

    Built in a temporary sibling directory and renamed into place (runtime.tools.atomic); an existing
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

    from runtime.extras import optional_import

    ocp = optional_import("orbax.checkpoint", ExportError)  # only orbax checkpoints need it
    need = sum(a.nbytes for a in arrays.values())
    free = free_space(dest.parent)
    if free is not None and free < need:  # refused up front: orbax's own failure is noisy
        raise ExportError(f"cannot write {dest}: not enough space on its device; it needs {fmt_bytes(need)}, "
                          f"{fmt_bytes(free)} free there: free some space or write elsewhere")

    with atomic_directory(dest, force=force) as tmp:
        inner = tmp / "orbax"  # orbax wants a fresh directory; its files then move up one level
        try:
            ocp.PyTreeCheckpointer().save(inner, args=ocp.args.PyTreeSave(arrays))
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            problem = environment_problem(e, dest, need) or _full_disk(e, dest, need)
            raise ExportError(problem or f"cannot write the orbax checkpoint {dest}: {describe(e)}") from e
        for entry in list(inner.iterdir()):
            os.rename(entry, tmp / entry.name)
        inner.rmdir()
        if config_text is not None:
            (tmp / ORBAX_CONFIG).write_text(config_text + "\n")
    return dest


def _full_disk(e: BaseException, dest: Path, need: int) -> str | None:
    """orbax (tensorstore) reports a full disk as text, not as an OSError."""
    if "No space left on device" not in str(e):
        return None
    import errno

    return environment_problem(OSError(errno.ENOSPC, "No space left on device"), dest, need)
