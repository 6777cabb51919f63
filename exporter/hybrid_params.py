"""Flat params of hybrid models: shapes, binding to the nnx model, and the weight specification.

Names are the checkpoints' own (what the hub files and transformers' `save_pretrained` hold).
Where transformers' in-memory names differ they are listed as aliases, and Nemotron-H's
per-expert tensors are stacked into one [E, ...] parameter through the spec's "stack" sources.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from exporter.hybrid import HybridLM
from exporter.hybrid_config import HybridConfig
from exporter.numerics import Numerics
from exporter.params import flat_shapes, merge_flat

# HybridConfig fields a checkpoint's config.json must agree with, under their HF names, per family.
_MATCH = {
    "bamba": {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_attention_heads": "num_attention_heads",
              "num_key_value_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
              "mamba_n_heads": "mamba_num_heads", "mamba_d_state": "mamba_d_state",
              "mamba_n_groups": "mamba_n_groups", "mamba_d_conv": "mamba_d_conv",
              "tie_word_embeddings": "tie_word_embeddings"},
    "granitemoehybrid": {"hidden_size": "hidden_size", "vocab_size": "vocab_size",
                         "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
                         "shared_intermediate_size": "intermediate_size", "num_local_experts": "num_experts",
                         "mamba_n_heads": "mamba_num_heads", "mamba_d_state": "mamba_d_state",
                         "mamba_n_groups": "mamba_n_groups", "tie_word_embeddings": "tie_word_embeddings"},
    "nemotron_h": {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_attention_heads": "num_attention_heads",
                   "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim",
                   "mamba_num_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim",
                   "ssm_state_size": "mamba_d_state", "n_groups": "mamba_n_groups",
                   "tie_word_embeddings": "tie_word_embeddings"},
    "falcon_h1": {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_attention_heads": "num_attention_heads",
                  "num_key_value_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
                  "mamba_n_heads": "mamba_num_heads", "mamba_d_state": "mamba_d_state",
                  "mamba_n_groups": "mamba_n_groups", "tie_word_embeddings": "tie_word_embeddings"},
    "zamba2": {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_attention_heads": "num_attention_heads",
               "num_key_value_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
               "n_mamba_heads": "mamba_num_heads", "mamba_d_state": "mamba_d_state", "mamba_ngroups": "mamba_n_groups",
               "num_mem_blocks": "num_mem_blocks", "tie_word_embeddings": "tie_word_embeddings"},
    "mamba_ssm": {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "vocab_size": "vocab_size",
                  "tie_embeddings": "tie_word_embeddings"},
}


@functools.lru_cache(maxsize=None)
def _abstract(cfg: HybridConfig, dtype_name: str, numerics: Numerics | None = None):
    model = nnx.eval_shape(lambda: HybridLM(cfg, jnp.dtype(dtype_name), numerics))
    return nnx.split(model)


def param_shapes(cfg: HybridConfig, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{checkpoint name: ShapeDtypeStruct} for every parameter, in a stable order."""
    return flat_shapes(_abstract(cfg, jnp.dtype(dtype).name)[1])


def bind(cfg: HybridConfig, params: dict, dtype=jnp.float32, numerics: Numerics | None = None) -> HybridLM:
    """An nnx HybridLM over `params` (traceable: call inside jit/export); numerics: the platform's
    kernel choices (exporter.numerics.for_platform), default the reference ones."""
    graphdef, state = _abstract(cfg, jnp.dtype(dtype).name, numerics)
    return merge_flat(graphdef, state, params)


def _sources(cfg: HybridConfig, name: str) -> dict:
    """{"sources": [...]} (and for per-expert checkpoint tensors "stack": [...]) for one parameter."""
    if cfg.family == "nemotron_h":
        m = re.fullmatch(r"(backbone\.layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)", name)
        if m:  # whole under its own (or transformers' in-memory) name, else stacked from per-expert tensors
            prefix, proj = m.groups()
            return {"sources": [name, f"model{prefix[8:]}.{proj}"],
                    "stack": [[f"{prefix}.{j}.{proj}.weight", f"model{prefix[8:]}.{j}.{proj}.weight"]
                              for j in range(cfg.num_experts)]}
        return {"sources": [name, "model." + name[len("backbone."):]] if name.startswith("backbone.") else [name]}
    if cfg.family == "mamba_ssm" and name == "backbone.embedding.weight":  # HF Mamba2's spelling
        return {"sources": [name, "backbone.embeddings.weight"]}
    if cfg.family == "granitemoehybrid":  # transformers' in-memory names for the MoE tensors
        for ours, theirs in ((".block_sparse_moe.input_linear.weight", ".block_sparse_moe.experts.gate_up_proj"),
                             (".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj"),
                             (".block_sparse_moe.router.layer.weight", ".block_sparse_moe.router.weight")):
            if name.endswith(ours):
                return {"sources": [name, name[: -len(ours)] + theirs]}
    return {"sources": [name]}


def _init_rule(cfg: HybridConfig, name: str) -> dict:
    """Seeded random weights: mamba_ssm-like ranges for the SSM parameters, N(0, 0.02) otherwise."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf == "A_log":
        return {"kind": "uniform", "low": 0.0, "high": math.log(16.0)}
    if leaf == "dt_bias":
        inv = lambda d: d + math.log(-math.expm1(-d))  # noqa: E731  softplus^-1
        return {"kind": "uniform", "low": inv(0.001), "high": inv(0.1)}
    if leaf == "D" or (leaf == "weight" and "norm" in parent):
        return {"kind": "constant", "value": 1.0}
    if leaf in ("bias", "e_score_correction_bias"):
        return {"kind": "constant", "value": 0.0}
    if parent == "conv1d":
        return {"kind": "uniform", "low": -0.5, "high": 0.5}
    return {"kind": "normal", "std": 0.02}


def weight_spec(cfg: HybridConfig, dtype=jnp.float32) -> dict:
    """The manifest's weight specification for a hybrid model."""
    tensors = [
        {"name": name, "shape": list(s.shape), "dtype": jnp.dtype(s.dtype).name,
         **_sources(cfg, name), "init": _init_rule(cfg, name)}
        for name, s in param_shapes(cfg, dtype).items()
    ]
    return {
        "tensors": tensors,
        "ignore": ["lm_head.weight"] if cfg.tie_word_embeddings else [],
        "config_match": {theirs: getattr(cfg, ours) for theirs, ours in _MATCH[cfg.family].items()},
    }


def count_params(cfg: HybridConfig) -> int:
    return sum(math.prod(s.shape) for s in param_shapes(cfg).values())


def load_hybrid(model: str, weights: str | None = None, dtype=jnp.float32, seed: int = 0):
    """(config, live HybridLM) from a preset or checkpoint dir (weights default to the dir)."""
    from exporter.hybrid_config import load_hybrid_config
    from exporter.loading import checkpoint_dir, load_params

    cfg = load_hybrid_config(model)
    params = load_params(cfg, weights if weights is not None else checkpoint_dir(model), dtype, seed)
    return cfg, bind(cfg, params, dtype)
