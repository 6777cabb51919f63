"""Flat parameter dicts keyed by HF checkpoint names, and their binding to the nnx model.

Exported functions take `{name: array}` (plain dicts serialize; nnx.State does not). The
weight specification written into the manifest lets the runtime build that dict from a
checkpoint without any model code.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from exporter.config import Mamba2Config
from exporter.model import Mamba2LM
from exporter.numerics import Numerics

# mamba_ssm checkpoints name the embedding `backbone.embedding`; HF `backbone.embeddings`.
_ALIASES = {"backbone.embeddings.weight": ["backbone.embedding.weight"]}
# Keys of an HF config.json that must agree with the artifact's model.
CONFIG_MATCH_KEYS = (
    "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "head_dim", "expand",
    "n_groups", "conv_kernel", "num_heads", "tie_word_embeddings", "use_bias", "use_conv_bias",
)


def _name(path) -> str:
    return ".".join(str(k) for k in path)


def _path(name: str) -> tuple:
    return tuple(int(k) if k.isdigit() else k for k in name.split("."))


@functools.lru_cache(maxsize=None)
def _abstract(cfg: Mamba2Config, dtype_name: str, numerics: Numerics | None = None):
    model = nnx.eval_shape(lambda: Mamba2LM(cfg, jnp.dtype(dtype_name), numerics))
    return nnx.split(model)


def flat_shapes(state) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted name: ShapeDtypeStruct} of an abstract nnx state, in its stable order."""
    out = {}
    for path, var in state.flat_state():
        v = var.get_value()
        out[_name(path)] = jax.ShapeDtypeStruct(v.shape, v.dtype)
    return out


def param_shapes(cfg: Mamba2Config, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{HF name: ShapeDtypeStruct} for every parameter, in a stable order."""
    return flat_shapes(_abstract(cfg, jnp.dtype(dtype).name)[1])


def bind(cfg: Mamba2Config, params: dict[str, jax.Array], dtype=jnp.float32,
         numerics: Numerics | None = None) -> Mamba2LM:
    """An nnx model over `params` (traceable: call inside jit/export); numerics: the platform's
    kernel choices (exporter.numerics.for_platform), default the reference ones."""
    graphdef, state = _abstract(cfg, jnp.dtype(dtype).name, numerics)
    return merge_flat(graphdef, state, params)


def merge_flat(graphdef, abstract_state, params: dict[str, jax.Array]):
    """nnx.merge over a flat {dotted name: array} dict (traceable)."""
    nested: dict = {}
    for name, value in params.items():
        node = nested
        *parents, leaf = _path(name)
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    state = jax.tree.map(lambda x: x, abstract_state)  # copy: the cached abstract state stays abstract
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def _init_rule(cfg: Mamba2Config, name: str) -> dict:
    """How seeded random weights are drawn for one tensor (mamba_ssm-like ranges)."""
    leaf = name.rsplit(".", 2)[-2:]
    if leaf[-1] == "A_log":  # A in [1, 16]
        return {"kind": "uniform", "low": 0.0, "high": math.log(16.0)}
    if leaf[-1] == "dt_bias":  # softplus^-1 of dt in [time_step_min, time_step_max]
        inv = lambda d: d + math.log(-math.expm1(-d))  # noqa: E731
        return {"kind": "uniform", "low": inv(cfg.time_step_min), "high": inv(cfg.time_step_max)}
    if leaf[-1] == "D" or (leaf[-1] == "weight" and leaf[0] in ("norm", "norm_f")):
        return {"kind": "constant", "value": 1.0}
    if leaf[-1] == "bias":
        return {"kind": "constant", "value": 0.0}
    if leaf[0] == "conv1d":
        return {"kind": "uniform", "low": -0.5, "high": 0.5}
    return {"kind": "normal", "std": 0.02}


def weight_spec(cfg: Mamba2Config, dtype=jnp.float32) -> dict:
    """The manifest's weight specification: names, shapes, dtypes, checkpoint sources, init rules."""
    tensors = [
        {
            "name": name,
            "shape": list(s.shape),
            "dtype": jnp.dtype(s.dtype).name,
            "sources": [name, *_ALIASES.get(name, [])],
            "init": _init_rule(cfg, name),
        }
        for name, s in param_shapes(cfg, dtype).items()
    ]
    cfg_dict = cfg.to_dict()
    return {
        "tensors": tensors,
        # A tied model ignores a stored lm_head (some writers keep the duplicate).
        "ignore": ["lm_head.weight"] if cfg.tie_word_embeddings else [],
        "config_match": {k: cfg_dict[k] for k in CONFIG_MATCH_KEYS},
    }


def count_params(cfg: Mamba2Config) -> int:
    return sum(math.prod(s.shape) for s in param_shapes(cfg).values())
