"""How much memory one hybrid prefill call's temporaries take: the bound `inspect` states (as
exporter.memory does for Mamba-2)."""

from __future__ import annotations

import jax.numpy as jnp

from exporter.blocks import KV_BLOCK, MOE_TILE
from exporter.hybrid import state_shapes
from exporter.hybrid_config import ATTENTION_KINDS, MAMBA_KINDS, HybridConfig


def prefill_activation_bytes(cfg: HybridConfig, dtype, tokens: int, chunk: int, batch: int, capacity: int) -> int:
    """An upper bound on the temporaries of one prefill call of `batch` rows over `tokens` =
    batch x length positions, with KV caches of `capacity` slots.

    Layers run one after another, so the widest layer's per-token set bounds that part: a Mamba-2
    layer's SSD temporaries ([tokens, heads, chunk] float32 decay, scores x decay, segment sums)
    and projections; an attention layer's q/k/v (and float32 RoPE copies) and one key block of
    scores ([tokens, heads, KV_BLOCK] float32: the online softmax never holds more); an MLP's
    width; a MoE's router logits and shared MLP (its experts run tile by tile: a constant). Falcon-H1
    runs attention and Mamba-2 in one layer, Zamba2 a shared block before its Mamba-2: their sets
    add. The layers' new states are alive until stacked into the output: one batch of state.
    """
    f32, item = 4, jnp.dtype(dtype).itemsize
    d = cfg.hidden_size
    m = cfg.mixer_config
    mamba = (3 * m.num_heads * chunk * f32 + m.in_proj_size * (f32 + item) + 2 * m.conv_dim * f32
             + 3 * m.intermediate_size * f32)
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = (H + 2 * G) * D
    attention = (qkv * (item + 2 * f32) + 3 * H * min(KV_BLOCK, capacity) * f32 + 2 * H * D * f32
                 + 2 * (cfg.attention_in_size or d) * f32 + (2 * qkv * f32 if cfg.attention_conv else 0))
    mlp = cfg.intermediate_size * (3 * f32 + 2 * item)
    moe = (cfg.num_experts * f32 + cfg.shared_intermediate_size * (3 * f32 + 2 * item)
           + cfg.experts_per_tok * 16 + 2 * d * f32) if cfg.num_experts else 0
    sets = []
    for kind in set(cfg.layer_types):
        size = (mamba if kind in MAMBA_KINDS else 0) + (attention if kind in ATTENTION_KINDS else 0)
        if cfg.family in ("bamba", "falcon_h1", "zamba2", "granitemoehybrid") or kind == "mlp":
            size += mlp
        if kind == "moe" or cfg.family == "granitemoehybrid":
            size += moe
        if cfg.family == "mamba_ssm" and cfg.intermediate_size:
            size += mlp
        sets.append(size)
    per_token = max(sets) + 4 * d * f32  # the residual stream, norms
    # Expert tiles ([tile, d] in, [tile, 2 x inner] out, float32) and the assignment arrays.
    moe_fixed = MOE_TILE * (d + 3 * cfg.moe_intermediate_size) * f32 + cfg.num_experts * MOE_TILE * 8 \
        if cfg.num_experts else 0
    state = sum(s.size * jnp.dtype(s.dtype).itemsize for s in state_shapes(cfg, batch, dtype, capacity).values())
    # +10% and 64 KiB for what the terms leave out (masks, logits, XLA's own scratch), as in
    # exporter.memory; checked against XLA's memory analysis in tests/test_hybrid_export.py.
    return int(1.1 * (tokens * per_token + state + moe_fixed)) + (1 << 16)
