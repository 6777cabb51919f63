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


__all__ = [
    "Mamba2AOTError", "ArtifactError", "IntegrityError", "CompatibilityError",
    "WeightsError", "RequestError", "ExportError",
]
