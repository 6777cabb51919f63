"""Hybrid (Mamba-2 + attention) model configurations: any HF `config.json` of the supported
families, and presets with the published shapes.

One dataclass covers every family; `family` picks the layer structure and the checkpoint names
(exporter.hybrid). Per checkpoint layer, `layer_types` says what the layer mixes with:
"mamba" or "attention" (Bamba, Granite-4.0-H: every layer then has its feed-forward part), or
for Nemotron-H, whose layers are single blocks, also "mlp" and "moe"; Falcon-H1's layers are all
"parallel" (attention and Mamba-2 side by side, then an MLP); Zamba2's are "mamba" or "hybrid" (a
transformer block shared between layers feeds the layer's Mamba-2 input). mamba_ssm's own hybrid
checkpoints (attn_layer_idx) have "mamba" / "attention" layers, each with an MLP when
d_intermediate > 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from runtime.format.weightspec import json_float  # plain, "Infinity", or transformers 5's {"__float__": ...}

from exporter.config import ConfigError, Mamba2Config, json_number

FAMILIES = ("bamba", "nemotron_h", "granitemoehybrid", "falcon_h1", "zamba2", "mamba_ssm")
ARCHITECTURES = {
    "BambaForCausalLM": "bamba",
    "NemotronHForCausalLM": "nemotron_h",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
    "FalconH1ForCausalLM": "falcon_h1",
    "Zamba2ForCausalLM": "zamba2",
    "MambaLMHeadModel": "mamba_ssm",  # mamba_ssm's own config.json (attn_layer_idx / d_intermediate)
}
# Layer kinds that carry a Mamba-2 state / a KV cache ("parallel": Falcon-H1's attention and
# Mamba-2 side by side in one layer; "hybrid": Zamba2's shared transformer block, then Mamba-2).
MAMBA_KINDS = ("mamba", "parallel", "hybrid")
ATTENTION_KINDS = ("attention", "parallel", "hybrid")
_LEGACY_TYPES = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
                 "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
_NEMOTRON_PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


@dataclasses.dataclass(frozen=True)
class MambaMixerConfig(Mamba2Config):
    """Mamba2Config whose inner width may differ from expand * hidden_size (Nemotron-H:
    mamba_num_heads * mamba_head_dim). The Mixer reads everything through this config."""

    d_inner: int = 0  # 0: expand * hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.d_inner or int(self.expand * self.hidden_size)


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Hyper-parameters of one hybrid LM (field names follow the HF configs where they agree)."""

    family: str
    layer_types: tuple[str, ...]
    hidden_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # Mamba-2 layers
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_n_groups: int = 1
    mamba_d_state: int = 128
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # attention layers
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    attention_out_bias: bool | None = None  # None: attention_bias (mamba_ssm's MHA has its own flag)
    attention_conv: int = 0  # mamba_ssm's MHA: causal depthwise conv over q|k|v of this width (0: none)
    attention_scale: float = 0.0  # 0: head_dim ** -0.5
    rotary_dim: int = 0  # leading dims of each head rotated by RoPE; 0: no RoPE
    rope_theta: float = 10000.0
    # feed-forward: dense MLP (Bamba feed_forward, Nemotron "mlp", Granite shared_mlp)
    intermediate_size: int = 0
    mlp_act: str = "silu"  # "silu" (gated) or "relu2" (Nemotron-H, not gated)
    mlp_bias: bool = False
    # mixture of experts (Granite block_sparse_moe, Nemotron "moe")
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    moe_latent_size: int = 0  # Nemotron: experts run in a projected latent space (0: none)
    n_group: int = 1  # Nemotron router: expert groups, of which topk_group are searched
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Granite multipliers
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it
    # Falcon-H1 (muP multipliers; the Mamba-2 mixer's own variants)
    lm_head_multiplier: float = 1.0  # logits are multiplied by it
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # z, x, B, C, dt of in_proj's output
    mlp_multipliers: tuple[float, float] = (1.0, 1.0)  # gate (before the activation), down
    mamba_rms_norm: bool = True  # False: y * silu(z) with no gated norm
    mamba_norm_before_gate: bool = False  # True: norm(y) * silu(z); False: norm(y * silu(z))
    mamba_out_proj_bias: bool | None = None  # None: mamba_proj_bias (Falcon-H1: projectors_bias)
    mamba_norm_eps: float = 0.0  # the gated norm's eps; 0: norm_eps (Zamba2: 1e-5 whatever rms_norm_eps)
    # Zamba2: transformer blocks shared by the "hybrid" layers, attention over [h, embedding]
    attention_in_size: int = 0  # attention input width; 0: hidden_size (Zamba2: 2 * hidden_size)
    num_mem_blocks: int = 1  # distinct shared blocks, used in turn by the hybrid layers
    shared_adapter_rank: int = 0  # per-layer low-rank adapters on q/k/v (0: none; the MLP's are always on)
    adapter_rank: int = 128
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    name: str = "custom"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown hybrid family {self.family!r}; supported: {', '.join(FAMILIES)}")
        types = tuple(self.layer_types)
        allowed = {"nemotron_h": {"mamba", "attention", "mlp", "moe"}, "falcon_h1": {"parallel"},
                   "zamba2": {"mamba", "hybrid"}}.get(self.family, {"mamba", "attention"})
        bad = sorted(set(types) - allowed)
        if bad:
            raise ConfigError(f"{self.family}: unsupported layer types {bad}; allowed {sorted(allowed)}")
        object.__setattr__(self, "layer_types", types)
        for key in ("ssm_multipliers", "mlp_multipliers"):
            object.__setattr__(self, key, tuple(float(v) for v in getattr(self, key)))
        lo, hi = self.time_step_limit
        object.__setattr__(self, "time_step_limit", (float(lo), float(hi)))
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        if self.mamba_num_heads % self.mamba_n_groups:
            raise ConfigError(f"mamba_num_heads {self.mamba_num_heads} is not a multiple of "
                              f"mamba_n_groups {self.mamba_n_groups}")
        if self.has_moe and not 0 < self.experts_per_tok <= self.num_experts:
            raise ConfigError(f"experts_per_tok {self.experts_per_tok} must be in [1, num_experts "
                              f"{self.num_experts}]")
        if self.has_moe and self.family == "nemotron_h" and (
                self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group):
            raise ConfigError(f"n_routed_experts {self.num_experts}, n_group {self.n_group}, topk_group "
                              f"{self.topk_group}: experts must split into n_group groups, topk_group <= n_group")
        if len(self.ssm_multipliers) != 5 or len(self.mlp_multipliers) != 2:
            raise ConfigError("ssm_multipliers needs 5 values (z, x, B, C, dt), mlp_multipliers 2 (gate, down)")
        if self.mlp_act not in ("silu", "relu2", "gelu"):
            raise ConfigError(f"MLP activation {self.mlp_act!r} is not supported (silu, relu2, gelu)")

    # --- derived -----------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t in MAMBA_KINDS)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t in ATTENTION_KINDS)

    @property
    def has_moe(self) -> bool:
        if self.family == "nemotron_h":
            return "moe" in self.layer_types
        return self.family == "granitemoehybrid" and self.num_experts > 0

    @property
    def scale(self) -> float:
        return self.attention_scale or self.head_dim ** -0.5

    @property
    def mixer_config(self) -> MambaMixerConfig:
        """The config our Mamba-2 Mixer (exporter.model) is built from."""
        d_inner = self.mamba_num_heads * self.mamba_head_dim
        return MambaMixerConfig(
            hidden_size=self.hidden_size, num_hidden_layers=len(self.mamba_layers), vocab_size=self.vocab_size,
            state_size=self.mamba_d_state, head_dim=self.mamba_head_dim, num_heads=self.mamba_num_heads,
            n_groups=self.mamba_n_groups, conv_kernel=self.mamba_d_conv, chunk_size=self.mamba_chunk_size,
            layer_norm_epsilon=self.mamba_norm_eps or self.norm_eps, use_bias=self.mamba_proj_bias, use_conv_bias=self.mamba_conv_bias,
            tie_word_embeddings=self.tie_word_embeddings, time_step_limit=self.time_step_limit,
            d_inner=d_inner, expand=max(1, d_inner // self.hidden_size), name=f"{self.name}-mamba",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["ssm_multipliers"], d["mlp_multipliers"] = list(self.ssm_multipliers), list(self.mlp_multipliers)
        d["time_step_limit"] = [json_number(v) for v in self.time_step_limit]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HybridConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        for key in ("layer_types", "ssm_multipliers", "mlp_multipliers"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "time_step_limit" in kw:
            kw["time_step_limit"] = tuple(json_float(v) for v in kw["time_step_limit"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# HF config.json -> HybridConfig


def _first(v):
    return (v[0] if v else None) if isinstance(v, list) else v


def _rope(hf: dict, default_partial: float = 1.0) -> tuple[float, float]:
    """(theta, partial_rotary_factor) from transformers 5's rope_parameters or the older keys."""
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters {rp!r} is not an object")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"RoPE type {kind!r} is not supported (only 'default')")
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial)))
    return theta, partial


def _layer_types(values, where: str) -> tuple[str, ...]:
    try:
        return tuple(_LEGACY_TYPES[v] for v in values)
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: unknown layer types in {values!r}") from None


def _common(hf: dict, name: str) -> dict:
    return dict(
        hidden_size=int(hf.get("hidden_size", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first(hf.get("bos_token_id", 1)),
        eos_token_id=_first(hf.get("eos_token_id", 2)),
        pad_token_id=_first(hf.get("pad_token_id", 0)),
        time_step_limit=tuple(json_float(v) for v in hf.get("time_step_limit", (0.0, math.inf))),
        name=name,
    )


def _ibm_mamba(hf: dict, hidden: int, d_inner: int | None = None) -> dict:
    """The mamba_* keys shared by Bamba and Granite-4.0-H."""
    heads = int(hf.get("mamba_n_heads", 128))
    d_inner = d_inner or int(hf.get("mamba_expand", 2)) * hidden
    d_head = hf.get("mamba_d_head", "auto")
    return dict(
        mamba_num_heads=heads, mamba_head_dim=d_inner // heads if d_head in ("auto", None) else int(d_head),
        mamba_n_groups=int(hf.get("mamba_n_groups", 1)), mamba_d_state=int(hf.get("mamba_d_state", 256)),
        mamba_d_conv=int(hf.get("mamba_d_conv", 4)), mamba_chunk_size=int(hf.get("mamba_chunk_size", 256)),
        mamba_conv_bias=bool(hf.get("mamba_conv_bias", True)), mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
    )


def _bamba(hf: dict, name: str) -> HybridConfig:
    c = _common(hf, name)
    heads = int(hf.get("num_attention_heads", 32))
    head_dim = int(hf.get("head_dim") or c["hidden_size"] // heads)
    theta, _ = _rope(hf)
    n_layers = int(hf.get("num_hidden_layers", 32))
    attn = set(hf.get("attn_layer_indices") or [])
    return HybridConfig(
        family="bamba", layer_types=tuple("attention" if i in attn else "mamba" for i in range(n_layers)),
        vocab_size=int(hf.get("vocab_size", 128000)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim, attention_bias=bool(hf.get("attention_bias", False)),
        rotary_dim=int(head_dim * 0.5), rope_theta=theta,  # HF's Bamba always rotates half of each head
        intermediate_size=int(hf.get("intermediate_size", 14336)), mlp_bias=bool(hf.get("mlp_bias", False)),
        **_ibm_mamba(hf, c["hidden_size"]), **c,
    )


def _granite(hf: dict, name: str) -> HybridConfig:
    c = _common(hf, name)
    heads = int(hf.get("num_attention_heads", 32))
    head_dim = int(hf.get("head_dim") or c["hidden_size"] // heads)
    n_layers = int(hf.get("num_hidden_layers", 32))
    types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * n_layers
    rope = hf.get("position_embedding_type") == "rope"
    theta, partial = _rope(hf) if rope else (10000.0, 1.0)
    experts = int(hf.get("num_local_experts", 8) or 0)
    return HybridConfig(
        family="granitemoehybrid", layer_types=_layer_types(types, "granitemoehybrid layer_types"),
        vocab_size=int(hf.get("vocab_size", 32000)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim, attention_bias=bool(hf.get("attention_bias", False)),
        attention_scale=float(hf.get("attention_multiplier", 1.0)),
        rotary_dim=int(head_dim * partial) if rope else 0, rope_theta=theta,
        intermediate_size=int(hf.get("shared_intermediate_size", 1024)),
        num_experts=experts, experts_per_tok=int(hf.get("num_experts_per_tok", 2)) if experts else 0,
        moe_intermediate_size=int(hf.get("intermediate_size", 11008)) if experts else 0,
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
        **_ibm_mamba(hf, c["hidden_size"]), **{**c, "pad_token_id": _first(hf.get("pad_token_id"))},
    )


def _nemotron_h(hf: dict, name: str) -> HybridConfig:
    c = _common(hf, name)

    def get(key, legacy, default):  # NemotronHConfig still accepts the older mamba_* spellings
        return hf.get(key, hf.get(legacy, default))

    if hf.get("layers_block_type") is not None:
        types = _layer_types(hf["layers_block_type"], "nemotron_h layers_block_type")
    elif hf.get("hybrid_override_pattern"):
        try:
            types = tuple(_NEMOTRON_PATTERN[ch] for ch in hf["hybrid_override_pattern"])
        except KeyError:
            raise ConfigError(f"hybrid_override_pattern {hf['hybrid_override_pattern']!r} has an unknown "
                              f"symbol (known: {''.join(_NEMOTRON_PATTERN)})") from None
    else:
        types = ("mamba", "moe", "attention", "mlp")
    for key, want in (("mamba_hidden_act", "silu"),):
        if hf.get(key, want) != want:
            raise ConfigError(f"{key} {hf[key]!r} is not supported (only {want!r})")
    t_min = float(get("time_step_min", "mamba_dt_min", 0.001))
    experts = int(hf.get("n_routed_experts", 8))
    has_moe = "moe" in types
    latent = hf.get("moe_latent_size")
    c["time_step_limit"] = (t_min, math.inf)  # HF's NemotronHMamba2Mixer: dt clamped from below only
    return HybridConfig(
        family="nemotron_h", layer_types=types, vocab_size=int(hf.get("vocab_size", 131072)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mamba_num_heads=int(hf.get("mamba_num_heads", 128)), mamba_head_dim=int(hf.get("mamba_head_dim", 64)),
        mamba_n_groups=int(get("n_groups", "mamba_n_groups", 8)), mamba_d_state=int(hf.get("ssm_state_size", 128)),
        mamba_d_conv=int(get("conv_kernel", "mamba_d_conv", 4)), mamba_chunk_size=int(get("chunk_size", "mamba_chunk_size", 128)),
        mamba_conv_bias=bool(get("use_conv_bias", "mamba_conv_bias", True)), mamba_proj_bias=bool(hf.get("use_bias", False)),
        num_attention_heads=int(hf.get("num_attention_heads", 32)),
        num_key_value_heads=int(hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32)),
        head_dim=int(hf.get("head_dim", 128)), attention_bias=False,  # HF's NemotronHAttention: no biases
        intermediate_size=int(hf.get("intermediate_size", 21504)), mlp_act=hf.get("mlp_hidden_act", "relu2"),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        num_experts=experts if has_moe else 0, experts_per_tok=int(hf.get("num_experts_per_tok", 2)) if has_moe else 0,
        moe_intermediate_size=int(hf.get("moe_intermediate_size", 7688)) if has_moe else 0,
        shared_intermediate_size=int(hf.get("moe_shared_expert_intermediate_size", 7688)) if has_moe else 0,
        moe_latent_size=int(latent) if has_moe and latent else 0,
        n_group=int(hf.get("n_group", 1)), topk_group=int(hf.get("topk_group", 1)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        **c,
    )


def _falcon_h1(hf: dict, name: str) -> HybridConfig:
    c = _common(hf, name)
    hidden = c["hidden_size"]
    heads = int(hf.get("num_attention_heads", 32))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    theta, partial = _rope(hf)
    d_ssm = hf.get("mamba_d_ssm", 1024)
    mamba = _ibm_mamba(hf, hidden, int(d_ssm) if d_ssm else None)
    ssm_mult = hf.get("ssm_multipliers") or [1.0] * 5
    mlp_mult = hf.get("mlp_multipliers") or [1.0, 1.0]
    return HybridConfig(
        family="falcon_h1", layer_types=("parallel",) * int(hf.get("num_hidden_layers", 32)),
        vocab_size=int(hf.get("vocab_size", 128000)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim, attention_bias=bool(hf.get("attention_bias", False)),
        rotary_dim=head_dim, rope_theta=theta,  # HF's Falcon-H1 rotates whole heads
        intermediate_size=int(hf.get("intermediate_size", 14336)), mlp_bias=bool(hf.get("mlp_bias", False)),
        lm_head_multiplier=float(hf.get("lm_head_multiplier", 1.0)),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        key_multiplier=float(hf.get("key_multiplier", 1.0)),
        attention_in_multiplier=float(hf.get("attention_in_multiplier", 1.0)),
        attention_out_multiplier=float(hf.get("attention_out_multiplier", 1.0)),
        ssm_in_multiplier=float(hf.get("ssm_in_multiplier", 1.0)),
        ssm_out_multiplier=float(hf.get("ssm_out_multiplier", 1.0)),
        ssm_multipliers=tuple(float(v) for v in ssm_mult), mlp_multipliers=tuple(float(v) for v in mlp_mult),
        mamba_rms_norm=bool(hf.get("mamba_rms_norm", False)),
        mamba_norm_before_gate=bool(hf.get("mamba_norm_before_gate", True)),
        mamba_out_proj_bias=bool(hf.get("projectors_bias", False)),
        **mamba, **c,
    )


def _zamba2(hf: dict, name: str) -> HybridConfig:
    c = _common(hf, name)
    hidden = c["hidden_size"]
    heads = int(hf.get("num_attention_heads", 32))
    head_dim = 2 * hidden // heads  # attention runs on [h, embedding]: 2 * hidden wide
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is None:
        raise ConfigError("zamba2 config.json has no layers_block_type")
    kinds = {"mamba": "mamba", "linear_attention": "mamba", "hybrid": "hybrid"}
    try:
        types = tuple(kinds[t] for t in types)
    except (KeyError, TypeError):
        raise ConfigError(f"zamba2: unknown layer types in {types!r}") from None
    rope = bool(hf.get("use_mem_rope", False))
    theta, _ = _rope(hf) if rope else (10000.0, 1.0)
    n_heads = int(hf.get("n_mamba_heads", 8))
    d_inner = int(hf.get("mamba_expand", 2)) * hidden
    bias = bool(hf.get("add_bias_linear", False))
    c["time_step_limit"] = (float(hf.get("time_step_min", 0.001)), math.inf)  # HF's Zamba2MambaMixer
    c["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    return HybridConfig(
        family="zamba2", layer_types=types, vocab_size=int(hf.get("vocab_size", 32000)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        mamba_num_heads=n_heads, mamba_head_dim=d_inner // n_heads, mamba_n_groups=int(hf.get("mamba_ngroups", 1)),
        mamba_d_state=int(hf.get("mamba_d_state", 64)), mamba_d_conv=int(hf.get("mamba_d_conv", 4)),
        mamba_chunk_size=int(hf.get("chunk_size", 256)), mamba_conv_bias=True, mamba_proj_bias=bias,
        mamba_norm_eps=1e-5,
        num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim, attention_scale=(head_dim / 2) ** -0.5, attention_in_size=2 * hidden,
        rotary_dim=head_dim if rope else 0, rope_theta=theta,
        intermediate_size=int(hf.get("intermediate_size") or 4 * hidden), mlp_act=hf.get("hidden_act", "gelu"),
        mlp_bias=bias, num_mem_blocks=int(hf.get("num_mem_blocks", 1)),
        shared_adapter_rank=int(hf.get("adapter_rank", 128)) if hf.get("use_shared_attention_adapter") else 0,
        adapter_rank=int(hf.get("adapter_rank", 128)),
        **c,
    )


_PARSERS = {"bamba": _bamba, "nemotron_h": _nemotron_h, "granitemoehybrid": _granite, "falcon_h1": _falcon_h1,
            "zamba2": _zamba2}

# mamba_ssm's MHA arguments (attn_cfg) and what this model supports of them.
_ATTN_CFG_KEYS = frozenset({"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias",
                            "softmax_scale", "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base",
                            "rotary_emb_interleaved"})


def is_mamba_ssm_hybrid(d: dict) -> bool:
    """A mamba_ssm config.json with attention layers or MLPs (a pure one is a Mamba2Config)."""
    from exporter.config_files import is_mamba_ssm_config

    return is_mamba_ssm_config(d) and bool(d.get("attn_layer_idx") or d.get("d_intermediate"))


def from_mamba_ssm_hybrid(d: dict[str, Any], name: str = "custom") -> HybridConfig:
    """mamba_ssm's MambaLMHeadModel config with attn_layer_idx / attn_cfg / d_intermediate. The
    Mamba-2 part is read (and checked) by exporter.config_files, as for pure checkpoints."""
    from exporter.config_files import from_mamba_ssm_config

    m = from_mamba_ssm_config({**d, "attn_layer_idx": [], "d_intermediate": 0, "attn_cfg": {}}, name)
    attn_idx = d.get("attn_layer_idx") or []
    if not isinstance(attn_idx, list) or not all(isinstance(i, int) and 0 <= i < m.num_hidden_layers
                                                 for i in attn_idx):
        raise ConfigError(f"attn_layer_idx must list layer indices below n_layer {m.num_hidden_layers}, "
                          f"got {attn_idx!r}")
    a = d.get("attn_cfg") or {}
    extra = sorted(set(a) - _ATTN_CFG_KEYS)
    if extra:
        raise ConfigError(f"attn_cfg has keys {extra} this model does not know: refusing to guess what they change")
    if attn_idx:
        if not a.get("causal", False):
            raise ConfigError("attn_cfg.causal is not true: bidirectional attention cannot generate")
        if a.get("rotary_emb_interleaved", False):
            raise ConfigError("attn_cfg.rotary_emb_interleaved=true (GPT-J style RoPE) is not supported")
        if a.get("mlp_dim", 0):
            raise ConfigError("attn_cfg.mlp_dim > 0 (an MLP fused into the attention projections) is not supported")
        if "num_heads" not in a:
            raise ConfigError("attn_cfg lacks num_heads, which has no safe default: add it")
    d_model = m.hidden_size
    heads = int(a.get("num_heads", 1))
    head_dim = int(a.get("head_dim") or d_model // heads)
    d_inter = int(d.get("d_intermediate", 0) or 0)
    scale = a.get("softmax_scale")
    return HybridConfig(
        family="mamba_ssm", layer_types=tuple("attention" if i in attn_idx else "mamba"
                                              for i in range(m.num_hidden_layers)),
        hidden_size=d_model, vocab_size=m.vocab_size, norm_eps=1e-5, tie_word_embeddings=m.tie_word_embeddings,
        mamba_num_heads=m.num_heads, mamba_head_dim=m.head_dim, mamba_n_groups=m.n_groups,
        mamba_d_state=m.state_size, mamba_d_conv=m.conv_kernel, mamba_chunk_size=m.chunk_size,
        mamba_conv_bias=m.use_conv_bias, mamba_proj_bias=m.use_bias, time_step_limit=m.time_step_limit,
        num_attention_heads=heads, num_key_value_heads=int(a.get("num_heads_kv") or heads), head_dim=head_dim,
        attention_bias=bool(a.get("qkv_proj_bias", True)), attention_out_bias=bool(a.get("out_proj_bias", True)),
        attention_conv=int(a.get("d_conv", 0)), attention_scale=float(scale) if scale else 0.0,
        rotary_dim=int(a.get("rotary_emb_dim", 0)), rope_theta=float(a.get("rotary_emb_base", 10000.0)),
        intermediate_size=-(-d_inter // 128) * 128,  # GatedMLP rounds its width up to a multiple of 128
        bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id, pad_token_id=m.pad_token_id, name=name,
    )


def is_hybrid_config(hf: dict) -> bool:
    """Whether a config.json dict is one of the hybrid families (else: a pure Mamba-2 model)."""
    return hf.get("model_type") in _PARSERS or is_mamba_ssm_hybrid(hf)


def from_hf_config(hf: dict[str, Any], name: str = "custom") -> HybridConfig:
    """Map an HF config dict of a supported hybrid family onto HybridConfig."""
    kind = hf.get("model_type")
    if kind not in _PARSERS:
        raise ConfigError(f"config.json has model_type {kind!r}; hybrid families: {', '.join(_PARSERS)}")
    if kind != "zamba2" and hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu')")
    try:
        return _PARSERS[kind](hf, name)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"unsupported {kind} config: {e}") from None


def load_hybrid_config(model: str) -> HybridConfig:
    """A preset name, an HF checkpoint directory, or the path to its config.json."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} is not a JSON object")
    if is_mamba_ssm_hybrid(hf):
        return from_mamba_ssm_hybrid(hf, name=path.parent.name or "custom")
    return from_hf_config(hf, name=path.parent.name or "custom")


# ---------------------------------------------------------------------------------------------
# Presets: the published shapes (export without a checkpoint, state sizes, benchmarks). Values
# that change numerics but not shapes (Granite's multipliers, token ids) follow the published
# config.json where known; a checkpoint's own config.json always wins when exporting from it.


def _ids(layers: int, attention: tuple[int, ...]) -> tuple[str, ...]:
    return tuple("attention" if i in attention else "mamba" for i in range(layers))


def _pattern(p: str) -> tuple[str, ...]:
    return tuple(_NEMOTRON_PATTERN[ch] for ch in p)


_GRANITE_4_ATTN = (5, 15, 25, 35)  # Granite-4.0-H: 36 Mamba-2 + 4 attention layers, 9:1
_GRANITE = dict(family="granitemoehybrid", vocab_size=100352, norm_eps=1e-5, tie_word_embeddings=True,
                mamba_head_dim=64, mamba_d_state=128, mamba_n_groups=1, mamba_chunk_size=256,
                embedding_multiplier=12.0, residual_multiplier=0.22, attention_scale=0.0078125,
                bos_token_id=100257, eos_token_id=100257, pad_token_id=100256)
_NEMOTRON = dict(family="nemotron_h", vocab_size=131072, norm_eps=1e-5, head_dim=128, mamba_n_groups=8,
                 mamba_d_state=128, mamba_chunk_size=128, mlp_act="relu2", time_step_limit=(0.001, math.inf),
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)

_FALCON = dict(family="falcon_h1", norm_eps=1e-5, mamba_n_groups=1, mamba_rms_norm=False,
               mamba_norm_before_gate=False, mamba_out_proj_bias=False, bos_token_id=1, eos_token_id=11,
               pad_token_id=0)

PRESETS: dict[str, HybridConfig] = {
    c.name: c for c in (
        HybridConfig(name="bamba-9b", family="bamba", layer_types=_ids(32, (9, 18, 27)), hidden_size=4096,
                     vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rotary_dim=64, intermediate_size=14336, mamba_num_heads=128, mamba_head_dim=64,
                     mamba_d_state=128, mamba_n_groups=1, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        HybridConfig(name="nemotron-nano-9b-v2", layer_types=_pattern(
                         "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"),
                     hidden_size=4480, num_attention_heads=40, num_key_value_heads=8, intermediate_size=15680,
                     mamba_num_heads=128, mamba_head_dim=80, **_NEMOTRON),
        HybridConfig(name="nemotron-h-8b", layer_types=_pattern(
                         "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"),
                     hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=21504,
                     mamba_num_heads=128, mamba_head_dim=64, **_NEMOTRON),
        HybridConfig(name="granite-4.0-h-micro", layer_types=_ids(40, _GRANITE_4_ATTN), hidden_size=2048,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=128, intermediate_size=8192,
                     mamba_num_heads=64, logits_scaling=8.0, **_GRANITE),
        HybridConfig(name="granite-4.0-h-tiny", layer_types=_ids(40, _GRANITE_4_ATTN), hidden_size=1536,
                     num_attention_heads=12, num_key_value_heads=4, head_dim=128, intermediate_size=1024,
                     num_experts=64, experts_per_tok=6, moe_intermediate_size=512, mamba_num_heads=48,
                     logits_scaling=6.0, **_GRANITE),
        HybridConfig(name="granite-4.0-h-small", layer_types=_ids(40, _GRANITE_4_ATTN), hidden_size=4096,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=1536,
                     num_experts=72, experts_per_tok=10, moe_intermediate_size=768, mamba_num_heads=128,
                     logits_scaling=8.0, **_GRANITE),
        HybridConfig(name="falcon-h1-tiny-90m", layer_types=("parallel",) * 24, hidden_size=512, vocab_size=32768,
                     tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     rotary_dim=64, rope_theta=1e11, intermediate_size=768, mamba_num_heads=24, mamba_head_dim=32,
                     mamba_d_state=64, embedding_multiplier=0.11083984375, lm_head_multiplier=0.078125, **_FALCON),
        HybridConfig(name="falcon-h1-1.5b", layer_types=("parallel",) * 24, hidden_size=2048, vocab_size=65537,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=128, rotary_dim=128,
                     intermediate_size=4608, mamba_num_heads=48, mamba_head_dim=64, mamba_d_state=256, **_FALCON),
        HybridConfig(name="falcon-h1-7b", layer_types=("parallel",) * 44, hidden_size=3072, vocab_size=130048,
                     num_attention_heads=12, num_key_value_heads=2, head_dim=128, rotary_dim=128,
                     intermediate_size=12288, mamba_num_heads=24, mamba_head_dim=128, mamba_d_state=256,
                     mamba_chunk_size=128, **_FALCON),
        # HF's default Zamba2Config layout is the 2.7B's: 54 layers, 9 of them hybrid, 2 shared blocks
        HybridConfig(name="zamba2-2.7b", family="zamba2", layer_types=tuple(
                         "hybrid" if t else "mamba" for t in [0] + ([0] * 5 + [1]) * 7 + [0] * 4 + [1] + [0] * 3 + [1] + [0] * 2),
                     hidden_size=2560, vocab_size=32000, norm_eps=1e-5, tie_word_embeddings=True,
                     mamba_num_heads=80, mamba_head_dim=64, mamba_n_groups=1, mamba_d_state=64, mamba_conv_bias=True,
                     mamba_norm_eps=1e-5, time_step_limit=(0.001, math.inf), num_attention_heads=32,
                     num_key_value_heads=32, head_dim=160, attention_scale=80 ** -0.5, attention_in_size=5120,
                     intermediate_size=10240, mlp_act="gelu", num_mem_blocks=2, adapter_rank=128,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
    )
}
# state-spaces/mamba2attn-2.7b: mamba_ssm's own hybrid (6 attention layers of 64, an attention conv)
PRESETS["mamba2attn-2.7b"] = from_mamba_ssm_hybrid({
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
    "attn_layer_idx": [9, 18, 27, 36, 45, 56],
    "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 30, "out_proj_bias": False,
                 "qkv_proj_bias": False, "rotary_emb_dim": 64},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
    "tie_embeddings": True,
}, name="mamba2attn-2.7b")
