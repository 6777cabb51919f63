"""Build the live model from a checkpoint (or seeded random weights) through the runtime's reader."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from exporter.config import Mamba2Config, load_config
from exporter.model import Mamba2LM
from exporter.params import bind, weight_spec
from runtime.weights import load_weights, parse_weight_spec, random_weights


def load_params(cfg: Mamba2Config, weights: str | None, dtype=jnp.float32, seed: int = 0) -> dict:
    """{HF name: jax array}: from a checkpoint path, or seeded random weights when `weights` is None."""
    spec = parse_weight_spec(weight_spec(cfg, dtype))
    arrays = random_weights(spec, seed) if weights is None else load_weights(weights, spec)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def load_model(model: str, weights: str | None = None, dtype=jnp.float32, seed: int = 0):
    """(config, live Mamba2LM). `model` is a preset or HF checkpoint dir; weights default to it if a dir."""
    cfg = load_config(model)
    if weights is None and Path(model).exists():  # a checkpoint dir (or its config.json) holds the weights
        weights = str(Path(model) if Path(model).is_dir() else Path(model).parent)
    params = load_params(cfg, weights, dtype, seed)
    return cfg, bind(cfg, params, dtype)


def model_from_params(cfg: Mamba2Config, params: dict, dtype=jnp.float32) -> Mamba2LM:
    return bind(cfg, params, dtype)
