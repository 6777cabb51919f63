"""Build the live model from a checkpoint (or seeded random weights) through the runtime's reader."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from exporter.architectures import architecture, load_model_config
from runtime.engine.weights import load_weights, parse_weight_spec
from runtime.tools.random_init import random_weights


def load_params(cfg, weights: str | None, dtype=jnp.float32, seed: int = 0) -> dict:
    """{checkpoint name: jax array} for a Mamba2Config or HybridConfig: from a checkpoint path, or
    seeded random weights when `weights` is None."""
    spec = parse_weight_spec(architecture(cfg).weight_spec(cfg, dtype))
    arrays = random_weights(spec, seed) if weights is None else load_weights(weights, spec)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def load_model(model: str, weights: str | None = None, dtype=jnp.float32, seed: int = 0):
    """(config, live model: Mamba2LM or HybridLM). `model` is a preset or checkpoint dir; weights
    default to it if a dir."""
    cfg = load_model_config(model)
    params = load_params(cfg, weights if weights is not None else checkpoint_dir(model), dtype, seed)
    return cfg, architecture(cfg).bind(cfg, params, dtype)


def checkpoint_dir(model: str) -> str | None:
    """The directory holding a checkpoint's weights when `model` is a checkpoint dir or its
    config.json; None for a preset name."""
    path = Path(model)
    if not path.exists():
        return None
    return str(path if path.is_dir() else path.parent)
