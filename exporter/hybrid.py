"""Hybrid Mamba-2 + attention LMs (Bamba, Nemotron-H, Granite-4.0-H, Falcon-H1, Zamba2) in flax.nnx.

The layers (exporter.hybrid_layers) reuse exporter.model's Mamba-2 Mixer and exporter.blocks'
attention, MLP and MoE. Parameter paths equal the families' checkpoint names (PyTorch (out, in)
layout).

State (a dict of arrays, one leaf per layer as exporter.state's, batch on axis 0; all zeros = a
fresh sequence; rows independent), for layer i of the checkpoint:
  "conv.i": [b, K-1, conv_dim] model dtype   a Mamba-2 layer's conv window
  "ssm.i":  [b, H, P, N] float32             its SSM state
  "k.i", "v.i": [b, c, G, D] model dtype     an attention layer's KV cache, capacity c
  "attn_conv.i": [b, K-1, qkv] model dtype   mamba_ssm's attention conv window (when it has one)
  "pos":  [b] int32                          tokens each row has seen (its next position)
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
from exporter.state import conv_key, ssm_key

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
        """Per layer {"mamba": (conv, ssm), "attention": (k, v), "attn_conv": window} (what it
        has), from a state dict or a loop carry."""
        out = []
        for i, kind in enumerate(self.cfg.layer_types):
            st = {}
            if kind in MAMBA_KINDS:
                st["mamba"] = (state[conv_key(i)], state[ssm_key(i)])
            if kind in ATTENTION_KINDS:
                st["attention"] = (state[f"k.{i}"], state[f"v.{i}"])
                if f"attn_conv.{i}" in state:
                    st["attn_conv"] = state[f"attn_conv.{i}"]
            out.append(st)
        return out

    @staticmethod
    def _collect(states: list[dict], pos) -> dict:
        """Per-layer states back into the flat state dict."""
        out: dict = {}
        for i, st in enumerate(states):
            if "mamba" in st:
                out[conv_key(i)], out[ssm_key(i)] = st["mamba"]
            if "attention" in st:
                out[f"k.{i}"], out[f"v.{i}"] = st["attention"]
            if "attn_conv" in st:
                out[f"attn_conv.{i}"] = st["attn_conv"]
        out["pos"] = pos
        return out

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
        return self.logits(resid_last), self._collect(states, state["pos"] + lengths)

    def forward(self, tokens):
        """All-position logits [b, t, V] from a fresh state (tests)."""
        b, t = tokens.shape
        resid, _ = self._run(self.empty_state(b, t), tokens, jnp.full((b,), t, jnp.int32))
        return self.logits(resid)

    def loop_carry(self, state: dict) -> dict:
        """The state as the decode loop carries it: already one buffer per layer, updated in place."""
        return dict(state)

    @staticmethod
    def state_dict(carry: dict) -> dict:
        return dict(carry)

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
    """{leaf: ShapeDtypeStruct} of the state (one leaf per layer and kind, in layer order; module
    docstring); `batch` may be symbolic; capacity = kv_capacity(n)."""
    m = cfg.mixer_config
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    out = {}
    for i, kind in enumerate(cfg.layer_types):
        if kind in MAMBA_KINDS:
            out[conv_key(i)] = jax.ShapeDtypeStruct((batch, m.conv_kernel - 1, m.conv_dim), dtype)
            out[ssm_key(i)] = jax.ShapeDtypeStruct((batch, m.num_heads, m.head_dim, m.state_size), F32)
        if kind in ATTENTION_KINDS:
            kv = (batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
            out[f"k.{i}"] = jax.ShapeDtypeStruct(kv, dtype)
            out[f"v.{i}"] = jax.ShapeDtypeStruct(kv, dtype)
            if cfg.attention_conv:
                out[f"attn_conv.{i}"] = jax.ShapeDtypeStruct((batch, cfg.attention_conv - 1, qkv), dtype)
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
    kv = sum(n for k, n in size.items() if k.split(".")[0] in ("k", "v"))
    per_token = kv // capacity if capacity else 0
    fixed = sum(size.values()) - kv
    at = {f"{n // 1024}k": fixed + per_token * kv_capacity(n) for n in (1024, 8192, 32768, 131072)}
    return {
        "bytes_fixed": fixed, "bytes_per_token": per_token, "kv_capacity": capacity,
        "bytes_per_sequence": fixed + per_token * capacity, "bytes_at_context": at,
        "layers": {"mamba": len(cfg.mamba_layers), "attention": len(cfg.attention_layers),
                   "total": cfg.num_hidden_layers},
    }
