"""mamba2-aot runtime: load a frozen `jax.export` artifact plus weights and generate."""

from runtime.errors import (
    ArtifactError,
    CompatibilityError,
    ExportError,
    IntegrityError,
    Mamba2AOTError,
    RequestError,
    WeightsError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__", "Mamba2AOTError", "ArtifactError", "IntegrityError", "CompatibilityError",
    "WeightsError", "RequestError", "ExportError",
]
