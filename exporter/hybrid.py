"""Hybrid Mamba-2 + attention language models (Bamba, Nemotron-H, Granite-4.0-H) in flax.nnx.

The Mamba-2 layers are exporter.model's Mixer; attention, MLP and MoE blocks come from
exporter.blocks. Parameter paths equal the families' checkpoint names (PyTorch (out, in) layout).

State (a dict of arrays, one batch dim each; all zeros = a fresh sequence; rows independent):
  "conv": [Lm, b, K-1, conv_dim] model dtype   the Mamba layers' conv windows
  "ssm":  [Lm, b, H, P, N] float32             their SSM states
  "k", "v": [La, b, c, G, D] model dtype       the attention layers' KV caches, capacity c
  "pos":  [b] int32                            tokens each row has seen (its next position)
(conv/ssm are absent without Mamba layers, k/v without attention layers.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from exporter.blocks import (
    KV_BLOCK, Attention, FusedGatedMLP, GatedMLP, GraniteMoE, NemotronMoE, PlainMLP, rope_tables,
)
from exporter.hybrid_config import HybridConfig
from exporter.model import Embedding, Linear, Mixer, RMSNorm, matvec
from exporter.ssd import ssd_chunked, ssd_step

F32 = jnp.float32


class Ctx(NamedTuple):
    """What every layer of one prefill or step shares."""

    pos: jax.Array  # [b] int32: tokens already in the state
    rope: tuple | None  # (cos, sin) [b, t, R] at the new tokens' positions, or None
    valid: jax.Array | None = None  # prefill: [b, t] bool
    lengths: jax.Array | None = None  # prefill: [b]
    active: jax.Array | None = None  # step: [b] bool


# ---------------------------------------------------------------------------------------------
# Mamba-2 layers continuing from a state (adapter over exporter.model.Mixer's parts)


def mamba_prefill(mixer: Mixer, h, valid, lengths, conv_state, ssm_state):
    """h [b, t, d] from conv_state [b, K-1, C] and ssm_state [b, H, P, N]: the conv window
    continues across the seam, padded steps get dt = 0. Returns (out, conv_state, ssm_state)."""
    K = mixer.cfg.conv_kernel
    z, xbc, dt = mixer._split(mixer.in_proj(h))
    t = xbc.shape[1]
    padded = jnp.concatenate([conv_state.astype(F32), xbc.astype(F32)], axis=1)  # [b, K-1+t, C]
    taps = mixer.conv1d.taps()  # [K, C]
    conv = jax.nn.silu(mixer.conv1d.add_bias(sum(padded[:, k:k + t] * taps[k] for k in range(K))))
    idx = lengths[:, None] + jnp.arange(K - 1)[None, :]  # [b, K-1]: each row's window at its end
    new_conv = jnp.take_along_axis(padded, idx[:, :, None], axis=1)
    x, B, C, dt, A = mixer._ssm_inputs(conv, dt)
    dt = jnp.where(valid[..., None], dt, 0.0)
    y, ssm_state = ssd_chunked(x, dt, A, B, C, mixer.cfg.chunk_size, initial_state=ssm_state)
    return mixer._output(y, x, z), new_conv.astype(conv_state.dtype), ssm_state


def mamba_step(mixer: Mixer, h, conv_state, ssm_state, active):
    """One token h [b, d]; inactive rows keep their state exactly (dt = 0, window kept)."""
    z, xbc, dt = mixer._split(mixer.in_proj(h))
    window = jnp.concatenate([conv_state.astype(F32), xbc.astype(F32)[:, None]], axis=1)  # [b, K, C]
    taps = mixer.conv1d.taps()
    conv = jax.nn.silu(mixer.conv1d.add_bias(sum(window[:, k] * taps[k] for k in range(taps.shape[0]))))
    x, B, C, dt, A = mixer._ssm_inputs(conv, dt)
    dt = jnp.where(active[:, None], dt, 0.0)
    y, ssm_state = ssd_step(ssm_state, x, dt, A, B, C)
    conv_state = jnp.where(active[:, None, None], window[:, 1:].astype(conv_state.dtype), conv_state)
    return mixer._output(y, x, z), conv_state, ssm_state


def _mix(kind: str, module, h, ctx: Ctx, st, step: bool):
    """Run a layer's mixer on normed h; st: (conv, ssm), (k, v) or None. Returns (out, st)."""
    if kind == "mamba":
        if step:
            out, conv, ssm = mamba_step(module, h, *st, ctx.active)
        else:
            out, conv, ssm = mamba_prefill(module, h, ctx.valid, ctx.lengths, *st)
        return out, (conv, ssm)
    if kind == "attention":
        if step:
            return module.step(h, ctx.rope, ctx.pos, ctx.active, st)
        return module(h, ctx.rope, ctx.pos, ctx.valid, ctx.lengths, st)
    return module(h), st  # mlp / moe: stateless


# ---------------------------------------------------------------------------------------------
# Layers, named as in each family's checkpoints


def _sequence_mixer(cfg: HybridConfig, kind: str, dtype, rowwise: bool):
    if kind == "mamba":
        return Mixer(cfg.mixer_config, dtype, rowwise)
    if kind == "attention":
        return Attention(cfg, dtype, rowwise)
    if kind == "mlp":
        return PlainMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.mlp_act, dtype, rowwise)
    return NemotronMoE(cfg, dtype, rowwise)


class BambaLayer(nnx.Module):
    """input_layernorm -> mamba | self_attn -> residual; pre_ff_layernorm -> feed_forward -> residual."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, rowwise: bool):
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.kind, self.dtype = kind, dtype
        self.input_layernorm = RMSNorm(d, eps, dtype)
        if kind == "mamba":
            self.mamba = _sequence_mixer(cfg, kind, dtype, rowwise)
        else:
            self.self_attn = _sequence_mixer(cfg, kind, dtype, rowwise)
        self.pre_ff_layernorm = RMSNorm(d, eps, dtype)
        self.feed_forward = GatedMLP(d, cfg.intermediate_size, cfg.mlp_bias, "silu", dtype, rowwise)

    def __call__(self, resid, ctx: Ctx, st, step: bool):
        mixer = self.mamba if self.kind == "mamba" else self.self_attn
        out, st = _mix(self.kind, mixer, self.input_layernorm(resid).astype(self.dtype), ctx, st, step)
        resid = resid + out.astype(F32)
        return resid + self.feed_forward(self.pre_ff_layernorm(resid).astype(self.dtype)).astype(F32), st


class GraniteLayer(nnx.Module):
    """Bamba's shape with Granite's residual multiplier and a shared_mlp (+ block_sparse_moe)."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, rowwise: bool):
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.kind, self.dtype, self.multiplier = kind, dtype, cfg.residual_multiplier
        self.input_layernorm = RMSNorm(d, eps, dtype)
        if kind == "mamba":
            self.mamba = _sequence_mixer(cfg, kind, dtype, rowwise)
        else:
            self.self_attn = _sequence_mixer(cfg, kind, dtype, rowwise)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype)
        self.shared_mlp = FusedGatedMLP(d, cfg.intermediate_size, "silu", dtype, rowwise)
        self.block_sparse_moe = GraniteMoE(cfg, dtype) if cfg.num_experts else None

    def __call__(self, resid, ctx: Ctx, st, step: bool):
        mixer = self.mamba if self.kind == "mamba" else self.self_attn
        out, st = _mix(self.kind, mixer, self.input_layernorm(resid).astype(self.dtype), ctx, st, step)
        resid = resid + out.astype(F32) * self.multiplier
        h = self.post_attention_layernorm(resid).astype(self.dtype)
        ff = self.shared_mlp(h).astype(F32)
        if self.block_sparse_moe is not None:
            ff = ff + self.block_sparse_moe(h).astype(F32)
        return resid + ff * self.multiplier, st


class NemotronLayer(nnx.Module):
    """norm -> mixer (Mamba-2, attention, MLP or MoE) -> residual."""

    def __init__(self, cfg: HybridConfig, kind: str, dtype, rowwise: bool):
        self.kind, self.dtype = kind, dtype
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.mixer = _sequence_mixer(cfg, kind, dtype, rowwise)

    def __call__(self, resid, ctx: Ctx, st, step: bool):
        out, st = _mix(self.kind, self.mixer, self.norm(resid).astype(self.dtype), ctx, st, step)
        return resid + out.astype(F32), st


# family -> (layer class, trunk attribute, embedding attribute, final norm attribute)
_LAYOUT = {
    "bamba": (BambaLayer, "model", "embed_tokens", "final_layernorm"),
    "granitemoehybrid": (GraniteLayer, "model", "embed_tokens", "norm"),
    "nemotron_h": (NemotronLayer, "backbone", "embeddings", "norm_f"),
}


class Trunk(nnx.Module):
    """Embedding, layers, final norm (under the family's names)."""

    def __init__(self, cfg: HybridConfig, dtype, rowwise: bool):
        layer_cls, _, embed, final = _LAYOUT[cfg.family]
        self.embed_name, self.final_name = embed, final
        setattr(self, embed, Embedding(cfg.vocab_size, cfg.hidden_size, dtype))
        self.layers = nnx.List([layer_cls(cfg, kind, dtype, rowwise) for kind in cfg.layer_types])
        setattr(self, final, RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype))

    @property
    def embedding(self) -> Embedding:
        return getattr(self, self.embed_name)

    @property
    def final_norm(self) -> RMSNorm:
        return getattr(self, self.final_name)


# ---------------------------------------------------------------------------------------------
# The LM


class HybridLM(nnx.Module):
    """prefill(state, tokens, lengths), step(tokens, carry, active), loop_carry / state_dict."""

    def __init__(self, cfg: HybridConfig, dtype=F32, rowwise_decode: bool = False):
        self.cfg, self.dtype, self.rowwise_decode = cfg, dtype, rowwise_decode
        self.trunk_name = _LAYOUT[cfg.family][1]
        setattr(self, self.trunk_name, Trunk(cfg, dtype, rowwise_decode))
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)

    @property
    def trunk(self) -> Trunk:
        return getattr(self, self.trunk_name)

    def logits(self, resid):
        """float32 logits from the residual stream [..., d]."""
        h = self.trunk.final_norm(resid).astype(self.dtype)
        w = (self.trunk.embedding.weight if self.lm_head is None else self.lm_head.weight)[...]
        if self.rowwise_decode and h.ndim == 2:
            out = matvec(h, w, out_dtype=F32)
        else:
            out = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=F32)
        return out / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else out

    def _embed(self, tokens):
        resid = self.trunk.embedding(tokens).astype(F32)
        m = self.cfg.embedding_multiplier
        return resid * m if m != 1.0 else resid

    def _rope(self, positions):
        c = self.cfg
        return rope_tables(positions, c.rotary_dim, c.rope_theta) if c.rotary_dim else None

    def _layer_states(self, state) -> list:
        """Per layer: (conv, ssm), (k, v) or None, from a state dict or a loop carry."""
        mi = ai = 0
        out = []
        for kind in self.cfg.layer_types:
            if kind == "mamba":
                out.append((state["conv"][mi], state["ssm"][mi]))
                mi += 1
            elif kind == "attention":
                out.append((state["k"][ai], state["v"][ai]))
                ai += 1
            else:
                out.append(None)
        return out

    def _collect(self, states: list, pos) -> dict:
        """Per-layer states back into carry form: {"conv": [..], "ssm": [..], "k": [..], "v": [..], "pos"}."""
        carry: dict = {"pos": pos}
        for kind, st in zip(self.cfg.layer_types, states):
            if kind in ("mamba", "attention"):
                a, b = ("conv", "ssm") if kind == "mamba" else ("k", "v")
                carry.setdefault(a, []).append(st[0])
                carry.setdefault(b, []).append(st[1])
        return carry

    def _run(self, state, tokens, lengths):
        """tokens [b, t]; lengths [b]. Returns (residual [b, t, d], new per-layer states)."""
        t = tokens.shape[1]
        valid = jnp.arange(t)[None, :] < lengths[:, None]  # [b, t]
        pos = state["pos"]
        ctx = Ctx(pos=pos, rope=self._rope(pos[:, None] + jnp.arange(t)[None, :]), valid=valid, lengths=lengths)
        resid = self._embed(jnp.where(valid, tokens, 0))  # [b, t, d]
        states = self._layer_states(state)
        for i, layer in enumerate(self.trunk.layers):
            resid, states[i] = layer(resid, ctx, states[i], False)
        return resid, states

    def prefill(self, state: dict, tokens, lengths):
        """Continue every row from `state` over tokens[i, :lengths[i]] (right-padded [b, t]).
        Returns (logits [b, V] at each row's last new token, state). lengths[i] = 0 leaves row i
        untouched (its logits are then meaningless)."""
        resid, states = self._run(state, tokens, lengths)
        last = jnp.clip(lengths - 1, 0, None)
        resid_last = jnp.take_along_axis(resid, last[:, None, None], axis=1)[:, 0]  # [b, d]
        return self.logits(resid_last), self.state_dict(self._collect(states, state["pos"] + lengths))

    def forward(self, tokens):
        """All-position logits [b, t, V] from a fresh state (tests)."""
        b, t = tokens.shape
        resid, _ = self._run(self.empty_state(b, t), tokens, jnp.full((b,), t, jnp.int32))
        return self.logits(resid)

    def loop_carry(self, state: dict) -> dict:
        """The decode loop's carry: one buffer per layer (updated in place inside a while_loop)."""
        return self._collect(self._layer_states(state), state["pos"])

    @staticmethod
    def state_dict(carry: dict) -> dict:
        return {k: (v if k == "pos" else jnp.stack(v)) for k, v in carry.items()}

    def step(self, tokens, carry: dict, active):
        """tokens [b] at positions carry["pos"] -> (logits [b, V], carry). Inactive rows are
        frozen: their state (and pos) is unchanged."""
        pos = carry["pos"]
        ctx = Ctx(pos=pos, rope=self._rope(pos[:, None]), active=active)
        resid = self._embed(tokens)  # [b, d]
        states = self._layer_states(carry)
        for i, layer in enumerate(self.trunk.layers):
            resid, states[i] = layer(resid, ctx, states[i], True)
        return self.logits(resid), self._collect(states, pos + active.astype(pos.dtype))

    def empty_state(self, batch: int, capacity: int) -> dict:
        return {k: jnp.zeros(s.shape, s.dtype) for k, s in state_shapes(self.cfg, batch, self.dtype, capacity).items()}


def kv_capacity(tokens: int) -> int:
    """The KV capacity that holds `tokens`: rounded up to a multiple of the key block."""
    return tokens if tokens <= KV_BLOCK else -(-tokens // KV_BLOCK) * KV_BLOCK


def state_shapes(cfg: HybridConfig, batch, dtype, capacity: int) -> dict[str, jax.ShapeDtypeStruct]:
    """{leaf: ShapeDtypeStruct} of the state; `batch` may be symbolic; capacity = kv_capacity(n)."""
    m = cfg.mixer_config
    Lm, La = len(cfg.mamba_layers), len(cfg.attention_layers)
    out = {}
    if Lm:
        out["conv"] = jax.ShapeDtypeStruct((Lm, batch, m.conv_kernel - 1, m.conv_dim), dtype)
        out["ssm"] = jax.ShapeDtypeStruct((Lm, batch, m.num_heads, m.head_dim, m.state_size), F32)
    if La:
        kv = (La, batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
        out["k"] = jax.ShapeDtypeStruct(kv, dtype)
        out["v"] = jax.ShapeDtypeStruct(kv, dtype)
    out["pos"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return out


def state_bytes(cfg: HybridConfig, dtype, tokens: int) -> int:
    """Bytes of state one sequence of `tokens` tokens needs (KV capacity = kv_capacity(tokens))."""
    shapes = state_shapes(cfg, 1, dtype, kv_capacity(max(tokens, 1)))
    return sum(s.size * jnp.dtype(s.dtype).itemsize for s in shapes.values())
