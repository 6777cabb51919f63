"""Hybrid Mamba-2 + attention LMs (Bamba, Nemotron-H, Granite-4.0-H, Falcon-H1, Zamba2) in flax.nnx.

The layers (exporter.hybrid_layers) reuse exporter.model's Mamba-2 Mixer and exporter.blocks'
attention, MLP and MoE. Parameter paths equal the families' checkpoint names (PyTorch (out, in)
layout).

State (a dict of arrays, one batch dim each; all zeros = a fresh sequence; rows independent):
  "conv": [Lm, b, K-1, conv_dim] model dtype   the Mamba layers' conv windows
  "ssm":  [Lm, b, H, P, N] float32             their SSM states
  "k", "v": [La, b, c, G, D] model dtype       the attention layers' KV caches, capacity c
  "attn_conv": [La, b, K-1, qkv] model dtype   mamba_ssm's attention conv windows (when it has one)
  "pos":  [b] int32                            tokens each row has seen (its next position)
(conv/ssm are absent without Mamba layers, k/v without attention layers.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from exporter.blocks import KV_BLOCK, rope_tables
from exporter.hybrid_config import ATTENTION_KINDS, MAMBA_KINDS, HybridConfig
from exporter.hybrid_layers import Ctx, build_layers
from exporter.model import Embedding, Linear, RMSNorm, matvec
from exporter.numerics import Numerics, reference

F32 = jnp.float32


# family -> (trunk attribute, embedding attribute, final norm attribute)
_LAYOUT = {
    "bamba": ("model", "embed_tokens", "final_layernorm"),
    "granitemoehybrid": ("model", "embed_tokens", "norm"),
    "nemotron_h": ("backbone", "embeddings", "norm_f"),
    "falcon_h1": ("model", "embed_tokens", "final_layernorm"),
    "zamba2": ("model", "embed_tokens", "final_layernorm"),
    "mamba_ssm": ("backbone", "embedding", "norm_f"),
}


class Trunk(nnx.Module):
    """Embedding, layers, final norm (under the family's names)."""

    def __init__(self, cfg: HybridConfig, dtype, numerics: Numerics):
        _, embed, final = _LAYOUT[cfg.family]
        self.embed_name, self.final_name = embed, final
        setattr(self, embed, Embedding(cfg.vocab_size, cfg.hidden_size, dtype))
        self.layers = nnx.List(build_layers(cfg, dtype, numerics))
        setattr(self, final, RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype))

    @property
    def token_embedding(self) -> Embedding:
        return getattr(self, self.embed_name)

    @property
    def final_norm(self) -> RMSNorm:
        return getattr(self, self.final_name)


# ---------------------------------------------------------------------------------------------
# The LM


class HybridLM(nnx.Module):
    """prefill(state, tokens, lengths), step(tokens, carry, active), loop_carry / state_dict."""

    def __init__(self, cfg: HybridConfig, dtype=F32, numerics: Numerics | None = None):
        """numerics: per-platform kernel choices (exporter.numerics); default: the reference."""
        self.cfg, self.dtype = cfg, dtype
        self.numerics = numerics or reference(cfg.mamba_chunk_size)
        self.trunk_name = _LAYOUT[cfg.family][0]
        setattr(self, self.trunk_name, Trunk(cfg, dtype, self.numerics))
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, self.numerics))

    @property
    def trunk(self) -> Trunk:
        return getattr(self, self.trunk_name)

    def logits(self, resid):
        """float32 logits from the residual stream [..., d]."""
        h = self.trunk.final_norm(resid).astype(self.dtype)
        w = (self.trunk.token_embedding.weight if self.lm_head is None else self.lm_head.weight)[...]
        precision = self.numerics.precision("matmul")
        if self.numerics.decode_matvec == "rowwise" and h.ndim == 2:
            out = matvec(h, w, out_dtype=F32, precision=precision)
        else:
            out = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=F32, precision=precision)
        if self.cfg.lm_head_multiplier != 1.0:  # Falcon-H1
            out = out * self.cfg.lm_head_multiplier
        return out / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else out

    def _embed(self, tokens):
        resid = self.trunk.token_embedding(tokens).astype(F32)
        m = self.cfg.embedding_multiplier
        return resid * m if m != 1.0 else resid

    def _rope(self, positions):
        c = self.cfg
        return rope_tables(positions, c.rotary_dim, c.rope_theta) if c.rotary_dim else None

    def _layer_states(self, state) -> list[dict]:
        """Per layer {"mamba": (conv, ssm), "attention": (k, v)} (what it has), from a state dict
        or a loop carry."""
        mi = ai = 0
        out = []
        for kind in self.cfg.layer_types:
            st = {}
            if kind in MAMBA_KINDS:
                st["mamba"] = (state["conv"][mi], state["ssm"][mi])
                mi += 1
            if kind in ATTENTION_KINDS:
                st["attention"] = (state["k"][ai], state["v"][ai])
                if "attn_conv" in state:
                    st["attn_conv"] = state["attn_conv"][ai]
                ai += 1
            out.append(st)
        return out

    @staticmethod
    def _collect(states: list[dict], pos) -> dict:
        """Per-layer states back into carry form: {"conv": [..], "ssm": [..], "k": [..], "v": [..], "pos"}."""
        carry: dict = {"pos": pos}
        for st in states:
            for group, (a, b) in (("mamba", ("conv", "ssm")), ("attention", ("k", "v"))):
                if group in st:
                    carry.setdefault(a, []).append(st[group][0])
                    carry.setdefault(b, []).append(st[group][1])
            if "attn_conv" in st:
                carry.setdefault("attn_conv", []).append(st["attn_conv"])
        return carry

    def _run(self, state, tokens, lengths):
        """tokens [b, t]; lengths [b]. Returns (residual [b, t, d], new per-layer states)."""
        t = tokens.shape[1]
        valid = jnp.arange(t)[None, :] < lengths[:, None]  # [b, t]
        pos = state["pos"]
        resid = self._embed(jnp.where(valid, tokens, 0))  # [b, t, d]
        ctx = Ctx(pos=pos, rope=self._rope(pos[:, None] + jnp.arange(t)[None, :]), valid=valid, lengths=lengths,
                  emb=resid)
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
        resid = self._embed(tokens)  # [b, d]
        ctx = Ctx(pos=pos, rope=self._rope(pos[:, None]), active=active, emb=resid)
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
        if cfg.attention_conv:
            qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
            out["attn_conv"] = jax.ShapeDtypeStruct((La, batch, cfg.attention_conv - 1, qkv), dtype)
    out["pos"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return out


def state_bytes(cfg: HybridConfig, dtype, tokens: int) -> int:
    """Bytes of state one sequence of `tokens` tokens needs (KV capacity = kv_capacity(tokens))."""
    shapes = state_shapes(cfg, 1, dtype, kv_capacity(max(tokens, 1)))
    return sum(s.size * jnp.dtype(s.dtype).itemsize for s in shapes.values())


def state_summary(cfg: HybridConfig, dtype, capacity: int) -> dict:
    """What a sequence's state costs, as plain numbers for the manifest (`inspect` shows them):
    fixed bytes (Mamba conv windows + SSM states + attention conv windows + pos), KV bytes per
    token of context, and the total at this artifact's KV capacity and at common lengths."""
    shapes = state_shapes(cfg, 1, dtype, capacity)
    size = {k: s.size * jnp.dtype(s.dtype).itemsize for k, s in shapes.items()}
    kv = size.get("k", 0) + size.get("v", 0)
    per_token = kv // capacity if capacity else 0
    fixed = sum(size.values()) - kv
    at = {f"{n // 1024}k": fixed + per_token * kv_capacity(n) for n in (1024, 8192, 32768, 131072)}
    return {
        "bytes_fixed": fixed, "bytes_per_token": per_token, "kv_capacity": capacity,
        "bytes_per_sequence": fixed + per_token * capacity, "bytes_at_context": at,
        "layers": {"mamba": len(cfg.mamba_layers), "attention": len(cfg.attention_layers),
                   "total": cfg.num_hidden_layers},
    }
