"""The layers of each hybrid family, named as in its checkpoints.

Every layer is called as layer(resid, ctx, st, step) -> (resid, st): resid [b, t, d] (prefill)
or [b, d] (step), float32; st a dict holding the layer's own state, "mamba": (conv, ssm) and/or
"attention": (k, v). The residual stream stays float32; blocks run in the model dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from exporter.blocks import (
    Attention, FusedGatedMLP, GatedMLP, GraniteMoE, MambaSSMAttention, MambaSSMMLP, NemotronMoE, PlainMLP,
)
from exporter.hybrid_config import HybridConfig
from exporter.model import Linear, Mixer, RMSNorm
from exporter.numerics import Numerics

F32 = jnp.float32


class Ctx(NamedTuple):
    """What every layer of one prefill or step shares."""

    pos: jax.Array  # [b] int32: tokens already in the state
    rope: tuple | None  # (cos, sin) [b, t, R] at the new tokens' positions, or None
    valid: jax.Array | None = None  # prefill: [b, t] bool
    lengths: jax.Array | None = None  # prefill: [b]
    active: jax.Array | None = None  # step: [b] bool
    emb: jax.Array | None = None  # the embeddings [b, t, d] / [b, d] float32 (Zamba2's blocks read them)


# ---------------------------------------------------------------------------------------------
# Running a layer's sequence mixers on its own state


def run_mamba(mixer: Mixer, h, ctx: Ctx, st: tuple, step: bool):
    """exporter.model's Mixer continuing from st = (conv [b, K-1, C], ssm [b, H, P, N])."""
    if step:
        out, conv, ssm = mixer.step(h, *st, ctx.active)
    else:
        out, conv, ssm = mixer(h, ctx.valid, ctx.lengths, *st)
    return out, (conv, ssm)


def run_attention(attn: Attention, h, ctx: Ctx, st: tuple, step: bool, adapter: int | None = None):
    """An attention block over its KV cache st = (k, v) [b, c, G, D] (adapter: Zamba2's slot)."""
    if step:
        return attn.step(h, ctx.rope, ctx.pos, ctx.active, st, adapter)
    return attn(h, ctx.rope, ctx.pos, ctx.valid, ctx.lengths, st, adapter)


def _run(kind: str, module, h, ctx: Ctx, st: dict, step: bool):
    """A sequence mixer of `kind` on normed h, updating its entry of st (copied)."""
    st = dict(st)
    if kind == "mamba":
        out, st["mamba"] = run_mamba(module, h, ctx, st["mamba"], step)
    elif kind == "attention":
        out, st["attention"] = run_attention(module, h, ctx, st["attention"], step)
    else:  # mlp / moe: stateless
        out = module(h)
    return out, st


# ---------------------------------------------------------------------------------------------
# Bamba, Granite-4.0-H, Nemotron-H


def _sequence_mixer(cfg: HybridConfig, kind: str, dtype, numerics: Numerics):
    if kind == "mamba":
        return Mixer(cfg.mixer_config, dtype, numerics)
    if kind == "attention":
        return Attention(cfg, dtype, numerics)
    if kind == "mlp":
        return PlainMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.mlp_act, dtype, numerics)
    return NemotronMoE(cfg, dtype, numerics)


class BambaLayer(nnx.Module):
    """input_layernorm -> mamba | self_attn -> residual; pre_ff_layernorm -> feed_forward -> residual."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, numerics: Numerics):
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.kind, self.dtype = kind, dtype
        self.input_layernorm = RMSNorm(d, eps, dtype)
        if kind == "mamba":
            self.mamba = _sequence_mixer(cfg, kind, dtype, numerics)
        else:
            self.self_attn = _sequence_mixer(cfg, kind, dtype, numerics)
        self.pre_ff_layernorm = RMSNorm(d, eps, dtype)
        self.feed_forward = GatedMLP(d, cfg.intermediate_size, cfg.mlp_bias, "silu", dtype, numerics)

    def __call__(self, resid, ctx: Ctx, st: dict, step: bool):
        mixer = self.mamba if self.kind == "mamba" else self.self_attn
        out, st = _run(self.kind, mixer, self.input_layernorm(resid).astype(self.dtype), ctx, st, step)
        resid = resid + out.astype(F32)
        return resid + self.feed_forward(self.pre_ff_layernorm(resid).astype(self.dtype)).astype(F32), st


class GraniteLayer(nnx.Module):
    """Bamba's shape with Granite's residual multiplier and a shared_mlp (+ block_sparse_moe)."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, numerics: Numerics):
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.kind, self.dtype, self.multiplier = kind, dtype, cfg.residual_multiplier
        self.input_layernorm = RMSNorm(d, eps, dtype)
        if kind == "mamba":
            self.mamba = _sequence_mixer(cfg, kind, dtype, numerics)
        else:
            self.self_attn = _sequence_mixer(cfg, kind, dtype, numerics)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype)
        self.shared_mlp = FusedGatedMLP(d, cfg.intermediate_size, "silu", dtype, numerics)
        self.block_sparse_moe = GraniteMoE(cfg, dtype, numerics) if cfg.num_experts else None

    def __call__(self, resid, ctx: Ctx, st: dict, step: bool):
        mixer = self.mamba if self.kind == "mamba" else self.self_attn
        out, st = _run(self.kind, mixer, self.input_layernorm(resid).astype(self.dtype), ctx, st, step)
        resid = resid + out.astype(F32) * self.multiplier
        h = self.post_attention_layernorm(resid).astype(self.dtype)
        ff = self.shared_mlp(h).astype(F32)
        if self.block_sparse_moe is not None:
            ff = ff + self.block_sparse_moe(h).astype(F32)
        return resid + ff * self.multiplier, st


class NemotronLayer(nnx.Module):
    """norm -> mixer (Mamba-2, attention, MLP or MoE) -> residual."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, numerics: Numerics):
        self.kind, self.dtype = kind, dtype
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.mixer = _sequence_mixer(cfg, kind, dtype, numerics)

    def __call__(self, resid, ctx: Ctx, st: dict, step: bool):
        out, st = _run(self.kind, self.mixer, self.norm(resid).astype(self.dtype), ctx, st, step)
        return resid + out.astype(F32), st


# ---------------------------------------------------------------------------------------------
# Falcon-H1


class FalconMixer(Mixer):
    """Falcon-H1's Mamba-2 mixer: in_proj's output scaled per section by muP multipliers (z, x,
    B, C, dt), an optional gated norm (or y * silu(z)), norm-before-gate, its own out_proj bias."""

    def __init__(self, cfg: HybridConfig, dtype, numerics: Numerics):
        m = cfg.mixer_config
        super().__init__(m, dtype, numerics)
        if cfg.mamba_out_proj_bias is not None:
            self.out_proj = Linear(m.intermediate_size, m.hidden_size, cfg.mamba_out_proj_bias, dtype, numerics)
        self.norm = RMSNorm(m.intermediate_size, m.layer_norm_epsilon, dtype, groups=m.n_groups) \
            if cfg.mamba_rms_norm else None
        self.norm_before_gate = cfg.mamba_norm_before_gate
        I, G = m.intermediate_size, m.n_groups * m.state_size  # noqa: E741
        self.mup_sections = tuple(zip((I, I, G, G, m.num_heads), cfg.ssm_multipliers))  # static

    def _split(self, zxbcdt):
        """in_proj's output [..., 2I + 2G + H] scaled section by section (z, x, B, C, dt)."""
        mup = np.concatenate([np.full(n, v, np.float32) for n, v in self.mup_sections])
        return super()._split(zxbcdt * jnp.asarray(mup, zxbcdt.dtype))

    def _output(self, y, x, z):
        y = (y + x * self.D[...].astype(F32)[:, None]).reshape(*y.shape[:-2], -1)
        gate = jax.nn.silu(z.astype(F32))
        if self.norm is None:
            y = y * gate
        elif self.norm_before_gate:
            y = self.norm(y) * gate
        else:
            y = self.norm(y, gate=z)
        return self.out_proj(y.astype(self.out_proj.weight.dtype))


class FalconLayer(nnx.Module):
    """input_layernorm -> (mamba * ssm_out + self_attn(h * attn_in) * attn_out) -> residual;
    pre_ff_layernorm -> feed_forward (muP multipliers) -> residual."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, numerics: Numerics):
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.kind, self.dtype, self.cfg = kind, dtype, cfg
        self.input_layernorm = RMSNorm(d, eps, dtype)
        self.mamba = FalconMixer(cfg, dtype, numerics)
        self.self_attn = Attention(cfg, dtype, numerics)
        self.pre_ff_layernorm = RMSNorm(d, eps, dtype)
        gate_m, down_m = cfg.mlp_multipliers
        self.feed_forward = GatedMLP(d, cfg.intermediate_size, cfg.mlp_bias, "silu", dtype, numerics,
                                     gate_multiplier=gate_m, down_multiplier=down_m)

    def __call__(self, resid, ctx: Ctx, st: dict, step: bool):
        c = self.cfg
        h = self.input_layernorm(resid)  # float32
        m_out, mamba_st = run_mamba(self.mamba, (h * c.ssm_in_multiplier).astype(self.dtype), ctx, st["mamba"], step)
        a_out, attn_st = run_attention(self.self_attn, (h * c.attention_in_multiplier).astype(self.dtype), ctx,
                                       st["attention"], step)
        resid = resid + (m_out.astype(F32) * c.ssm_out_multiplier + a_out.astype(F32) * c.attention_out_multiplier)
        resid = resid + self.feed_forward(self.pre_ff_layernorm(resid).astype(self.dtype)).astype(F32)
        return resid, {"mamba": mamba_st, "attention": attn_st}


# ---------------------------------------------------------------------------------------------
# mamba_ssm's own hybrids (MambaLMHeadModel with attn_layer_idx / d_intermediate)


class MambaSSMLayer(nnx.Module):
    """norm -> mixer (Mamba2 or MHA) -> residual; with d_intermediate: norm2 -> mlp -> residual."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, numerics: Numerics):
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.kind, self.dtype = kind, dtype
        self.norm = RMSNorm(d, eps, dtype)
        self.mixer = Mixer(cfg.mixer_config, dtype, numerics) if kind == "mamba" else MambaSSMAttention(cfg, dtype, numerics)
        self.norm2 = RMSNorm(d, eps, dtype) if cfg.intermediate_size else None
        self.mlp = MambaSSMMLP(d, cfg.intermediate_size, dtype, numerics) if cfg.intermediate_size else None

    def __call__(self, resid, ctx: Ctx, st: dict, step: bool):
        h = self.norm(resid).astype(self.dtype)
        st = dict(st)
        if self.kind == "mamba":
            out, st["mamba"] = run_mamba(self.mixer, h, ctx, st["mamba"], step)
        else:
            call, rows = (self.mixer.step, (ctx.active,)) if step else (self.mixer, (ctx.valid, ctx.lengths))
            out, st["attention"], window = call(h, ctx.rope, ctx.pos, *rows, st["attention"], st.get("attn_conv"))
            if window is not None:
                st["attn_conv"] = window
        resid = resid + out.astype(F32)
        if self.mlp is not None:
            resid = resid + self.mlp(self.norm2(resid).astype(self.dtype)).astype(F32)
        return resid, st


LAYER_CLASSES = {
    "bamba": BambaLayer, "granitemoehybrid": GraniteLayer, "nemotron_h": NemotronLayer, "falcon_h1": FalconLayer,
    "mamba_ssm": MambaSSMLayer,
}


def build_layers(cfg: HybridConfig, dtype, numerics: Numerics) -> list:
    """The model's layers, one per entry of cfg.layer_types."""
    if cfg.family == "zamba2":
        from exporter.zamba2 import build_layers as zamba2_layers  # it builds on this module

        return zamba2_layers(cfg, dtype, numerics)
    cls = LAYER_CLASSES[cfg.family]
    return [cls(cfg, kind, dtype, numerics) for kind in cfg.layer_types]
