"""Tensor-parallel layouts for hybrid models (the mesh and fallbacks as in exporter.sharding).

Split across the ("model", N) mesh, everything else replicated:
  * embeddings / lm_head [vocab, d]: vocabulary;
  * Mamba-2 mixers as in exporter.sharding (in_proj rows, conv channels, heads, gated norm;
    out_proj input columns);
  * attention: q/k/v projection rows (heads; mamba_ssm's fused q|k|v in_proj likewise) and
    biases, o_proj / out_proj input columns;
  * MLPs: gate/up (fused or not) rows, down input columns;
  * MoE: stacked experts [E, ...] on the expert axis (expert parallel); routers replicated;
  * state: conv channels, SSM heads, KV heads of the KV cache, attention conv channels; "pos"
    replicated.
A dimension not divisible by N is replicated instead, and reported as a fallback.
"""

from __future__ import annotations

import re

import jax

from exporter.hybrid import state_shapes
from exporter.hybrid_config import HybridConfig
from exporter.hybrid_params import param_shapes
from exporter.sharding import ShardingPlan, _split

_MIXERS = r"\.(mamba|mixer)\."  # Mamba-2 mixers (and Nemotron's / mamba_ssm's mixers of every kind)
_RULES: tuple[tuple[re.Pattern, int], ...] = tuple((re.compile(p), d) for p, d in (
    (r"(^|\.)(embed_tokens|embeddings?)\.weight$", 0),
    (r"^lm_head\.weight$", 0),
    (r"\.experts\.(up_proj|down_proj)$", 0),  # Nemotron [E, ., .]
    (r"\.block_sparse_moe\.(input|output)_linear\.weight$", 0),  # Granite [E, ., .]
    (r"\.(router|gate)\.", None),  # routers: replicated
    (_MIXERS + r"in_proj\.(weight|bias)$", 0),
    (_MIXERS + r"conv1d\.(weight|bias)$", 0),
    (_MIXERS + r"(dt_bias|A_log|D)$", 0),
    (_MIXERS + r"norm\.weight$", 0),
    (r"\.(out_proj|o_proj|down_proj|output_linear|fc2)\.weight$", 1),
    (r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|input_linear|gate_up_proj|fc1)\.(weight|bias)$", 0),
))
_STATE_DIMS = {"conv": 2, "ssm": 1, "k": 2, "v": 2, "attn_conv": 2, "pos": None}  # by kind ("conv.3" -> conv)


def weight_dim(name: str) -> int | None:
    """The dim of weight `name` that tensor parallelism splits, or None (replicated)."""
    if "adapter" in name:  # Zamba2's low-rank adapters: tiny
        return None
    for pattern, dim in _RULES:
        if pattern.search(name):
            return dim
    return None


def plan(cfg: HybridConfig, devices: int, dtype=jax.numpy.float32, capacity: int = 256) -> ShardingPlan:
    """Weights and state over a ("model", devices) mesh; `cache` holds the state's specs."""
    if int(devices) != devices or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    fallbacks: list[str] = []
    weights = {name: _split(name, s.shape, weight_dim(name), devices, fallbacks)
               for name, s in param_shapes(cfg, dtype).items()}
    state = {}
    for name, s in state_shapes(cfg, 1, dtype, capacity).items():  # batch: axis 0 of every leaf
        shown = "[" + ", ".join("b" if i == 0 else str(d) for i, d in enumerate(s.shape)) + "]"
        state[name] = _split(f"state.{name}", s.shape, _STATE_DIMS[name.split(".")[0]], devices, fallbacks, shown)
    return ShardingPlan(int(devices), weights, state, tuple(fallbacks))
