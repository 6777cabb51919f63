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

__version__ = "0.2.0"


def __getattr__(name: str):
    """`runtime.load(...)`, imported on first use (importing `runtime` alone does not load jax)."""
    if name == "load":
        from runtime.engine.startup import gc_paused

        with gc_paused():  # importing jax
            from runtime.engine.model import load
        return load
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


__all__ = [
    "load", "__version__", "Mamba2AOTError", "ArtifactError", "IntegrityError", "CompatibilityError",
    "WeightsError", "RequestError", "ExportError",
]
