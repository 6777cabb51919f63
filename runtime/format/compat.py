"""Can this artifact run here? jax version window, calling convention, platform, expiry date."""

from __future__ import annotations

import datetime as _dt
import re
import sys
from typing import TYPE_CHECKING

from runtime.errors import CompatibilityError

if TYPE_CHECKING:
    from runtime.format.manifest import Manifest

# X[.Y[.Z[.W]]] then an optional pre/post/dev tag, then an optional +local label.
_VERSION = re.compile(
    r"v?(\d+(?:\.\d+){0,3})"
    r"(?:[.\-_]?(dev|a|alpha|b|beta|rc|c|post)[.\-_]?(\d*))?"
    r"(?:[.\-_]?(dev)[.\-_]?(\d*))?"
    r"(?:\+[A-Za-z0-9.]+)?",
    re.IGNORECASE,
)
# PEP 440 order: X.devN < XaN < XbN < XrcN < X < X.postN
_STAGE = {"dev": 0, "a": 1, "alpha": 1, "b": 2, "beta": 2, "rc": 3, "c": 3, "post": 5}
_FINAL = 4


def parse_version(text: str) -> tuple[int, ...]:
    """A sortable key for a version string like '0.10.2', '0.5.0rc1' or '0.6.0.dev20250101'.

    Raises ValueError for anything else.
    """
    m = _VERSION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    release, stage, num, dev, dev_num = m.groups()
    parts = [int(p) for p in release.split(".")]
    key = tuple(parts + [0] * (4 - len(parts)))
    rank = _STAGE[stage.lower()] if stage else _FINAL
    tail = (rank, int(num or 0))
    # A trailing .devN sorts before the same version without it (1.0rc1.dev2 < 1.0rc1).
    tail += (0, int(dev_num or 0)) if dev and stage and stage.lower() != "dev" else (1, 0)
    return key + tail


def jax_version() -> str:
    """The installed jax version, without importing jax when it is not loaded yet."""
    if "jax" in sys.modules:
        return sys.modules["jax"].__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jax")
    except PackageNotFoundError:
        raise CompatibilityError("jax is not installed: pip install mamba2-aot") from None


def in_jax_window(manifest: "Manifest", version: str | None = None) -> bool:
    """Whether `version` (default: the installed jax) lies in the artifact's jax window."""
    c = manifest.compatibility
    try:
        v = parse_version(version or jax_version())
    except ValueError:
        return False
    return parse_version(c.jax_min) <= v < parse_version(c.jax_max_exclusive)


def check_jax_version(manifest: "Manifest") -> None:
    import jax

    if not in_jax_window(manifest, jax.__version__):
        c = manifest.compatibility
        raise CompatibilityError(
            f"artifact was exported with jax {manifest.producer.jax} and supports jax "
            f"[{c.jax_min}, {c.jax_max_exclusive}); this is jax {jax.__version__}: "
            "re-export with this jax (mamba2-aot export ...)"
        )


def check_calling_convention(manifest: "Manifest") -> None:
    from jax import export

    v = manifest.serialization.calling_convention_version
    lo = export.minimum_supported_calling_convention_version
    hi = export.maximum_supported_calling_convention_version
    if not lo <= v <= hi:
        raise CompatibilityError(
            f"artifact uses jax.export calling convention {v}, this jax supports {lo}..{hi}: "
            "re-export with this jax (mamba2-aot export ...)"
        )


def current_platform() -> str:
    """This process's default jax backend as an artifact platform name: cpu, cuda, rocm or tpu."""
    import jax

    backend = jax.default_backend().lower()
    if backend in ("cuda", "rocm", "cpu", "tpu"):
        return backend
    if backend == "gpu":
        try:
            version = str(jax.devices()[0].client.platform_version).lower()
        except Exception:  # noqa: BLE001 - plugin clients differ; cuda is the common case
            version = ""
        return "rocm" if "rocm" in version or "hip" in version else "cuda"
    return backend


def check_platform(manifest: "Manifest", backend: str | None = None) -> str:
    """The platform to run on (default: the current backend); it must be one the artifact has."""
    platform = current_platform() if backend is None else backend.lower()
    if platform not in manifest.platforms:
        raise CompatibilityError(
            f"artifact has platforms [{', '.join(manifest.platforms)}] but this machine runs "
            f"{platform}: re-export with --platform {platform}"
        )
    return platform


def expiry_warning(manifest: "Manifest", today: _dt.date | None = None) -> str | None:
    """A warning when the artifact is past its compatibility date, else None."""
    expires = _dt.date.fromisoformat(manifest.compatibility.expires)
    today = today or _dt.datetime.now(_dt.timezone.utc).date()
    if today <= expires:
        return None
    return (
        f"artifact passed its compatibility date {expires.isoformat()}: jax may stop loading it; "
        "re-export it with the current mamba2-aot"
    )


def check_compatibility(manifest: "Manifest", backend: str | None = None) -> list[str]:
    """Raise CompatibilityError if the artifact cannot run here; return warnings (expiry)."""
    check_jax_version(manifest)
    check_calling_convention(manifest)
    check_platform(manifest, backend)
    warning = expiry_warning(manifest)
    return [warning] if warning else []
