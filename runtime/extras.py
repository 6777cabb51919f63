"""Optional dependencies, imported on first use: a missing one is a one-line error naming the
extra that installs it (`pip install 'mamba2-aot[orbax]'`), never a bare ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType

from runtime.errors import Mamba2AOTError

# module -> (extra, what needs it)
EXTRAS = {
    "orbax.checkpoint": ("orbax", "orbax checkpoints"),
    "tokenizers": ("tokenizers", "text prompts (the checkpoint's tokenizer.json)"),
}


def optional_import(module: str, error: type[Mamba2AOTError] = Mamba2AOTError) -> ModuleType:
    """`module`, or `error` saying which extra to install when it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra, needs = EXTRAS[module]
        raise error(f"{needs} need the {module.split('.')[0]} package, which is not installed "
                    f"({e}): pip install 'mamba2-aot[{extra}]'") from e
