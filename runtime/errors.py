"""The exceptions mamba2-aot raises on bad input; the CLI prints them as one line and exits 2.

Every message is a single line that names the problem and how to fix it.
"""

from __future__ import annotations


class Mamba2AOTError(Exception):
    """Base of every error the user can fix (bad artifact, input, version, ...)."""


class ArtifactError(Mamba2AOTError):
    """The artifact directory is missing, incomplete, has a bad manifest or an unsafe path."""


class IntegrityError(ArtifactError):
    """An artifact file does not match the size or sha256 recorded in the manifest."""


class CompatibilityError(Mamba2AOTError):
    """The artifact cannot run here: jax version, backend platform or calling convention."""


class WeightsError(Mamba2AOTError):
    """A checkpoint is missing, unreadable, or does not match the artifact's weight spec."""


class RequestError(Mamba2AOTError):
    """A generation request is invalid: prompts, limits or sampling values."""


class ExportError(Mamba2AOTError):
    """Writing an artifact (or other output) failed, e.g. destination exists or is unwritable."""


class Mamba2AOTWarning(RuntimeWarning):
    """Something the user should know that does not stop the work (an expired artifact, random
    weights, an unusable compile cache); also listed in `LoadedModel.warnings`."""


def describe(e: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters): a library's exception in a
    one-line message that wraps it (raised `from e`, so the whole of it stays in the chain)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


__all__ = [
    "Mamba2AOTWarning", "describe", "Mamba2AOTError", "ArtifactError", "IntegrityError", "CompatibilityError",
    "WeightsError", "RequestError", "ExportError",
]
