"""Zamba2's layers: Mamba-2 layers, and "hybrid" layers in which a transformer block shared with
other hybrid layers (num_mem_blocks distinct ones, used in turn) reads [h, embedding] and feeds
the layer's Mamba-2 input through a per-layer linear.

The shared blocks are one nnx module referenced from several layers, so their parameters appear
once, under the first layer that uses them (as in the checkpoints). Each hybrid layer has its own
low-rank adapters inside its block (slot = its index among the hybrid layers) and its own KV cache.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from exporter.blocks import Attention, activation
from exporter.hybrid_config import HybridConfig
from exporter.hybrid_layers import Ctx, run_attention, run_mamba
from exporter.model import Linear, Mixer, RMSNorm
from exporter.numerics import Numerics

F32 = jnp.float32


def _adapters(n: int, block_id: int, M: int, d_in: int, rank: int, d_out: int, dtype, numerics) -> nnx.List:
    """Slot i (a hybrid layer) has a low-rank adapter [Linear(d_in, r), Linear(r, d_out)] in the
    block it uses (i % M == block_id); the other slots are empty."""
    return nnx.List([
        nnx.List([Linear(d_in, rank, False, dtype, numerics), Linear(rank, d_out, False, dtype, numerics)])
        if i % M == block_id else None
        for i in range(n)
    ])


def _low_rank(adapter, x):
    return adapter[1](adapter[0](x))


class ZambaAttention(Attention):
    """Attention over [h, embedding] (2 * hidden wide), with optional per-layer q/k/v adapters."""

    def __init__(self, cfg: HybridConfig, dtype, numerics: Numerics, block_id: int, n_hybrid: int):
        super().__init__(cfg, dtype, numerics)
        d_in, r, M = cfg.attention_in_size, cfg.shared_adapter_rank, cfg.num_mem_blocks
        self.has_adapters = bool(r)
        if r:
            self.linear_q_adapter_list = _adapters(n_hybrid, block_id, M, d_in, r, d_in, dtype, numerics)
            self.linear_k_adapter_list = _adapters(n_hybrid, block_id, M, d_in, r, d_in, dtype, numerics)
            self.linear_v_adapter_list = _adapters(n_hybrid, block_id, M, d_in, r, d_in, dtype, numerics)

    def _project(self, h, adapter):
        q, k, v = super()._project(h, adapter)
        if self.has_adapters:
            q = q + _low_rank(self.linear_q_adapter_list[adapter], h)
            k = k + _low_rank(self.linear_k_adapter_list[adapter], h)
            v = v + _low_rank(self.linear_v_adapter_list[adapter], h)
        return q, k, v


class ZambaMLP(nnx.Module):
    """gate_up_proj (+ the layer's adapter) -> act(gate) * up -> down_proj."""

    def __init__(self, cfg: HybridConfig, dtype, numerics: Numerics, block_id: int, n_hybrid: int):
        d, inner = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = Linear(d, 2 * inner, cfg.mlp_bias, dtype, numerics)
        self.down_proj = Linear(inner, d, cfg.mlp_bias, dtype, numerics)
        self.gate_up_proj_adapter_list = _adapters(n_hybrid, block_id, cfg.num_mem_blocks, d, cfg.adapter_rank,
                                                   2 * inner, dtype, numerics)
        self.act = cfg.mlp_act

    def __call__(self, x, adapter: int):
        gate_up = self.gate_up_proj(x) + _low_rank(self.gate_up_proj_adapter_list[adapter], x)
        gate, up = jnp.split(gate_up.astype(F32), 2, axis=-1)
        return self.down_proj((activation(self.act, gate) * up).astype(self.down_proj.weight.dtype))


class ZambaSharedBlock(nnx.Module):
    """shared_transformer: norm([h, embedding]) -> attention -> pre_ff_layernorm -> MLP (no residuals)."""

    def __init__(self, cfg: HybridConfig, dtype, numerics: Numerics, block_id: int, n_hybrid: int):
        self.dtype = dtype
        self.input_layernorm = RMSNorm(cfg.attention_in_size, cfg.norm_eps, dtype)
        self.self_attn = ZambaAttention(cfg, dtype, numerics, block_id, n_hybrid)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.feed_forward = ZambaMLP(cfg, dtype, numerics, block_id, n_hybrid)

    def __call__(self, resid, ctx: Ctx, kv, adapter: int, step: bool):
        x = self.input_layernorm(jnp.concatenate([resid, ctx.emb], axis=-1)).astype(self.dtype)
        out, kv = run_attention(self.self_attn, x, ctx, kv, step, adapter)
        out = self.feed_forward(self.pre_ff_layernorm(out).astype(self.dtype), adapter)
        return out, kv


class ZambaMambaLayer(nnx.Module):
    """input_layernorm(h [+ the hybrid block's output]) -> mamba -> residual (onto h)."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, numerics: Numerics):
        self.kind, self.dtype = kind, dtype
        self.mamba = Mixer(cfg.mixer_config, dtype, numerics)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)

    def __call__(self, resid, ctx: Ctx, st: dict, step: bool, extra=None):
        x = resid if extra is None else resid + extra
        out, mamba_st = run_mamba(self.mamba, self.input_layernorm(x).astype(self.dtype), ctx, st["mamba"], step)
        return resid + out.astype(F32), {**st, "mamba": mamba_st}


class ZambaHybridLayer(nnx.Module):
    """shared_transformer -> linear -> added to the input of this layer's mamba_decoder."""

    def __init__(self, cfg: HybridConfig, block: ZambaSharedBlock, slot: int, dtype, numerics: Numerics):
        self.kind, self.slot = "hybrid", slot
        self.shared_transformer = block
        self.linear = Linear(cfg.hidden_size, cfg.hidden_size, False, dtype, numerics)
        self.mamba_decoder = ZambaMambaLayer(cfg, "mamba", dtype, numerics)

    def __call__(self, resid, ctx: Ctx, st: dict, step: bool):
        t, kv = self.shared_transformer(resid, ctx, st["attention"], self.slot, step)
        resid, st = self.mamba_decoder(resid, ctx, st, step, extra=self.linear(t).astype(F32))
        return resid, {**st, "attention": kv}


def build_layers(cfg: HybridConfig, dtype, numerics: Numerics) -> list:
    """The layer list; hybrid layer j uses shared block j % num_mem_blocks (created on first use)."""
    n_hybrid = cfg.layer_types.count("hybrid")
    blocks: list[ZambaSharedBlock] = []
    layers, j = [], 0
    for kind in cfg.layer_types:
        if kind == "mamba":
            layers.append(ZambaMambaLayer(cfg, kind, dtype, numerics))
            continue
        block_id = j % cfg.num_mem_blocks
        if block_id == len(blocks):
            blocks.append(ZambaSharedBlock(cfg, dtype, numerics, block_id, n_hybrid))
        layers.append(ZambaHybridLayer(cfg, blocks[block_id], j, dtype, numerics))
        j += 1
    return layers
