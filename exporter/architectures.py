"""The model architectures an artifact can hold, and what the exporter needs from each: how to
bind weights to a live model (which follows the decode loop's protocol), parameter and state
shapes, the weight specification, the manifest's model section, the SSD chunk the platform
numerics start from, a prefill memory bound and tensor-parallel layouts. The runtime never sees
this: it reads what the exporter wrote.

`context` below is the artifact's limits.max_context: the tokens one sequence may hold (None for
Mamba-2, whose state does not grow); hybrids size their KV caches by it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp

from exporter.config import ConfigError, Mamba2Config
from exporter.hybrid_config import HybridConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # the manifest's model.architecture
    bind: Callable[..., Any]  # (cfg, params, dtype, numerics) -> live model
    param_shapes: Callable[..., dict]  # (cfg, dtype) -> {name: ShapeDtypeStruct}
    state_shapes: Callable[..., dict]  # (cfg, batch, dtype, context) -> {leaf: ShapeDtypeStruct}
    weight_spec: Callable[..., dict]  # (cfg, dtype) -> the manifest's weight specification
    describe: Callable[..., dict]  # (cfg, dtype, context) -> the manifest's model section
    chunk_size: Callable[..., int]  # cfg -> the model's SSD chunk (exporter.numerics.for_platform)
    prefill_bytes: Callable[..., int]  # (cfg, dtype, tokens, chunk, batch, context) -> temporaries bound
    sharding_plan: Callable[..., Any]  # (cfg, devices, dtype, context) -> exporter.sharding.ShardingPlan


# ---------------------------------------------------------------------------------------------
# Mamba-2


def _mamba2_state(cfg, batch, dtype, context=None):
    from exporter.state import state_shapes

    return state_shapes(cfg, batch, dtype)


def _mamba2_describe(cfg: Mamba2Config, dtype, context=None) -> dict:
    from exporter.state import state_bytes

    return {"architecture": "mamba2", "config": cfg.to_dict(),
            "state": {"bytes_per_sequence": state_bytes(cfg, dtype), "grows_with_length": False}}


def _mamba2_bind(cfg, params, dtype, numerics=None):
    from exporter.params import bind

    return bind(cfg, params, dtype, numerics)


def _mamba2_params(cfg, dtype=jnp.float32):
    from exporter.params import param_shapes

    return param_shapes(cfg, dtype)


def _mamba2_spec(cfg, dtype=jnp.float32):
    from exporter.params import weight_spec

    return weight_spec(cfg, dtype)


def _mamba2_prefill_bytes(cfg, dtype, tokens, chunk, batch, context=None):
    from exporter.memory import prefill_activation_bytes

    return prefill_activation_bytes(cfg, dtype, tokens, chunk, batch)


def _mamba2_plan(cfg, devices, dtype, context=None):
    from exporter.sharding import plan

    return plan(cfg, devices, dtype)


MAMBA2 = Architecture("mamba2", _mamba2_bind, _mamba2_params, _mamba2_state, _mamba2_spec, _mamba2_describe,
                      lambda cfg: cfg.chunk_size, _mamba2_prefill_bytes, _mamba2_plan)


# ---------------------------------------------------------------------------------------------
# Hybrids (exporter.hybrid): the KV capacity holds the artifact's longest context


def _capacity(context) -> int:
    from exporter.hybrid import kv_capacity

    if context is None:
        raise ValueError("a hybrid model needs limits.max_context (its KV caches' capacity)")
    return kv_capacity(context)


def _hybrid_state(cfg: HybridConfig, batch, dtype, context):
    from exporter.hybrid import state_shapes

    return state_shapes(cfg, batch, dtype, _capacity(context))


def _hybrid_describe(cfg: HybridConfig, dtype, context) -> dict:
    from exporter.hybrid import state_summary

    return {"architecture": "hybrid", "family": cfg.family,
            "state": {**state_summary(cfg, dtype, _capacity(context)), "grows_with_length": True},
            "config": cfg.to_dict()}


def _hybrid_bind(cfg, params, dtype, numerics=None):
    from exporter.hybrid_params import bind

    return bind(cfg, params, dtype, numerics)


def _hybrid_params(cfg, dtype=jnp.float32):
    from exporter.hybrid_params import param_shapes

    return param_shapes(cfg, dtype)


def _hybrid_spec(cfg, dtype=jnp.float32):
    from exporter.hybrid_params import weight_spec

    return weight_spec(cfg, dtype)


def _hybrid_prefill_bytes(cfg, dtype, tokens, chunk, batch, context):
    from exporter.hybrid_memory import prefill_activation_bytes

    return prefill_activation_bytes(cfg, dtype, tokens, chunk, batch, _capacity(context))


def _hybrid_plan(cfg, devices, dtype, context):
    from exporter.hybrid_sharding import plan

    return plan(cfg, devices, dtype, _capacity(context))


HYBRID = Architecture("hybrid", _hybrid_bind, _hybrid_params, _hybrid_state, _hybrid_spec, _hybrid_describe,
                      lambda cfg: cfg.mamba_chunk_size, _hybrid_prefill_bytes, _hybrid_plan)

REGISTRY = {"mamba2": MAMBA2, "hybrid": HYBRID}
# A hybrid exported without --max-context holds this many tokens per sequence (prompt + new).
DEFAULT_HYBRID_CONTEXT = 8192


def context_limit(cfg, requested: int | None) -> int | None:
    """limits.max_context for an export: a hybrid's KV capacity (the request, default
    DEFAULT_HYBRID_CONTEXT, rounded up to whole attention key blocks); Mamba-2 keeps the request
    (None: unbounded, its state does not grow)."""
    if not isinstance(cfg, HybridConfig):
        return requested
    from exporter.hybrid import kv_capacity

    return kv_capacity(DEFAULT_HYBRID_CONTEXT if requested is None else requested)


def architecture(cfg) -> Architecture:
    """The architecture of a config object."""
    if isinstance(cfg, HybridConfig):
        return HYBRID
    if isinstance(cfg, Mamba2Config):
        return MAMBA2
    raise TypeError(f"no architecture for {type(cfg).__name__}")


def config_from_manifest(model: dict):
    """The config object a manifest's model section describes."""
    kind = model.get("architecture")
    if kind == "hybrid":
        return HybridConfig.from_dict(model["config"])
    if kind == "mamba2":
        return Mamba2Config.from_dict(model["config"])
    raise ConfigError(f"unknown model architecture {kind!r} in the manifest")


def load_model_config(model: str):
    """A preset name (Mamba-2 or hybrid), a checkpoint directory, or its config file, read as the
    family its config.json declares (HF model_type, or mamba_ssm's keys)."""
    from exporter.config import PRESETS as MAMBA2_PRESETS
    from exporter.config import load_config
    from exporter.hybrid_config import PRESETS as HYBRID_PRESETS
    from exporter.hybrid_config import is_hybrid_config, load_hybrid_config

    if model in HYBRID_PRESETS:
        return HYBRID_PRESETS[model]
    if model in MAMBA2_PRESETS:
        return MAMBA2_PRESETS[model]
    path = Path(model)
    file = path / "config.json" if path.is_dir() else path
    if file.name == "config.json" and file.is_file():
        try:
            d = json.loads(file.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {file}: {e}") from None
        if isinstance(d, dict) and is_hybrid_config(d):
            return load_hybrid_config(str(file))
    try:
        return load_config(model)
    except ConfigError as e:
        if model not in MAMBA2_PRESETS and not path.exists() and "/" not in model:
            names = ", ".join([*MAMBA2_PRESETS, *HYBRID_PRESETS])
            raise ConfigError(f"unknown model {model!r}: use one of {names} or a checkpoint directory") from None
        raise e
