"""Config files onto Mamba2Config: HF `config.json`, mamba_ssm `config.json`, mistral `params.json`.

Each format is read by its own key names. A key that defines the model's shape and has no
default shared by every Mamba-2 implementation is required; a missing one is refused by name,
never filled with another model's value. Keys that change the computation in ways this model
does not implement are refused, never ignored.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from exporter.config import ConfigError, Mamba2Config, pad_vocab
from runtime.format.weightspec import json_float as _number  # plain, "Infinity", or transformers 5's {"__float__": ...}

# Keys that describe a file, not the model: accepted and ignored in every format.
_METADATA_KEYS = frozenset({"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"})

# GPT-NeoX's tokenizer (50277 tokens) is the one every state-spaces LM uses; its only special
# token, <|endoftext|>, is id 0 (bos, eos and pad alike).
_GPT_NEOX_VOCAB = 50277
# mistral's tokenizers (Codestral-Mamba's v3 included): <unk> 0, <s> 1, </s> 2.
_MISTRAL_BOS, _MISTRAL_EOS = 1, 2

HYBRID_REFUSAL = ("hybrid mamba_ssm checkpoints are not supported yet: {what}; only pure Mamba-2 "
                  "models (every layer a Mamba-2 mixer, no MLP) convert and export")


def refuse_hybrid(attn_layer_idx: list, d_intermediate: int) -> None:
    """The one place that turns hybrid layouts away (lift it here once hybrids are supported)."""
    if attn_layer_idx:
        raise ConfigError(HYBRID_REFUSAL.format(what=f"attention layers at {attn_layer_idx} (attn_layer_idx)"))
    if d_intermediate:
        raise ConfigError(HYBRID_REFUSAL.format(what=f"an MLP of width {d_intermediate} after each mixer "
                                                     "(d_intermediate)"))


# ---------------------------------------------------------------------------------------------
# Typed reads: a wrong type or value names the key.


def _int(d: Mapping, key: str, default: Any = ..., *, prefix: str = "", minimum: int = 1) -> int:
    if key not in d:
        if default is ...:
            raise ConfigError(f"config lacks {prefix}{key}, which has no safe default: add it")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{prefix}{key} must be an integer >= {minimum}, got {v!r}")
    return v


def _bool(d: Mapping, key: str, default: Any = ..., *, prefix: str = "") -> bool:
    if key not in d:
        if default is ...:
            raise ConfigError(f"config lacks {prefix}{key}, which has no safe default: add it")
        return default
    v = d[key]
    if not isinstance(v, bool):
        raise ConfigError(f"{prefix}{key} must be true or false, got {v!r}")
    return v


def _float(d: Mapping, key: str, default: float, *, prefix: str = "") -> float:
    if key not in d:
        return default
    try:
        v = _number(d[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix}{key} must be a number, got {d[key]!r}") from None
    if math.isnan(v):
        raise ConfigError(f"{prefix}{key} must be a number, got NaN")
    return v


def _pair(d: Mapping, key: str, default: tuple[float, float], *, prefix: str = "") -> tuple[float, float]:
    if key not in d:
        return default
    v = d[key]
    try:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError(v)
        lo, hi = (_number(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix}{key} must be a pair of numbers, got {v!r}") from None
    if not lo <= hi:
        raise ConfigError(f"{prefix}{key} must be [low, high] with low <= high, got {v!r}")
    return lo, hi


def _token_id(d: Mapping, key: str) -> int | None:
    """HF token ids: an int, null, or a list (several eos ids: the first is kept); absent = null."""
    v = d.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{key} must be a non-negative integer or null, got {d[key]!r}")
    return v


def _unknown(d: Mapping, known, what: str, *, prefix: str = "") -> None:
    extra = sorted(k for k in d if k not in known and k not in _METADATA_KEYS)
    if extra:
        raise ConfigError(f"{what} has key{'s' if len(extra) > 1 else ''} "
                          f"{', '.join(prefix + k for k in extra)}, which this converter does not know: "
                          "refusing to guess what it changes")


def _residual_fp32(value: bool, key: str) -> None:
    if not value:
        raise ConfigError(f"{key}=false is not supported: this model keeps the residual stream in float32 "
                          "(every published Mamba-2 checkpoint sets it to true)")


def _build(name: str, **kw) -> Mamba2Config:
    try:
        return Mamba2Config(name=name, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"unsupported Mamba2 config: {e}") from None


# ---------------------------------------------------------------------------------------------
# HF transformers' Mamba2Config (`model_type: mamba2`).

# Every Mamba-2 implementation (mamba_ssm's Mamba2 module, HF's Mamba2Config) defaults these alike.
_HF_UNIVERSAL = {
    "state_size": 128, "head_dim": 64, "expand": 2, "conv_kernel": 4, "chunk_size": 256,
    "use_bias": False, "use_conv_bias": True, "residual_in_fp32": True,
}


def from_hf_config(hf: Mapping[str, Any], name: str = "custom") -> Mamba2Config:
    """An HF `Mamba2Config` dict (config.json). hidden_size, num_hidden_layers, vocab_size, n_groups
    and tie_word_embeddings are required (HF's defaults for them are Codestral-7B's)."""
    if hf.get("model_type", "mamba2") != "mamba2":
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}, expected 'mamba2'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu')")
    if not _bool(hf, "rms_norm", True):
        raise ConfigError("rms_norm=false is not supported")
    if _bool(hf, "norm_before_gate", False):
        raise ConfigError("norm_before_gate=true is not supported (the gated norm is norm(y * silu(z)))")
    _residual_fp32(_bool(hf, "residual_in_fp32", True), "residual_in_fp32")
    ints = {k: _int(hf, k, _HF_UNIVERSAL.get(k, ...))
            for k in ("hidden_size", "num_hidden_layers", "vocab_size", "n_groups", "state_size", "head_dim",
                      "expand", "conv_kernel", "chunk_size")}
    return _build(
        name, **ints,
        num_heads=_int(hf, "num_heads", 0, minimum=0),  # 0: derived from expand * hidden / head_dim
        tie_word_embeddings=_bool(hf, "tie_word_embeddings"),
        use_bias=_bool(hf, "use_bias", False), use_conv_bias=_bool(hf, "use_conv_bias", True),
        layer_norm_epsilon=_float(hf, "layer_norm_epsilon", 1e-5),
        time_step_limit=_pair(hf, "time_step_limit", (0.0, math.inf)),
        time_step_min=_float(hf, "time_step_min", 0.001), time_step_max=_float(hf, "time_step_max", 0.1),
        bos_token_id=_token_id(hf, "bos_token_id"), eos_token_id=_token_id(hf, "eos_token_id"),
        pad_token_id=_token_id(hf, "pad_token_id"),
    )


def to_hf_config(cfg: Mamba2Config) -> dict[str, Any]:
    """`cfg` as an HF Mamba2Config dict (what transformers' Mamba2ForCausalLM loads)."""
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
        "state_size": cfg.state_size, "head_dim": cfg.head_dim, "num_heads": cfg.num_heads,
        "expand": cfg.expand, "n_groups": cfg.n_groups, "conv_kernel": cfg.conv_kernel,
        "chunk_size": cfg.chunk_size, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "use_bias": cfg.use_bias, "use_conv_bias": cfg.use_conv_bias, "residual_in_fp32": cfg.residual_in_fp32,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rms_norm": True, "norm_before_gate": False,
        "hidden_act": "silu", "time_step_limit": list(cfg.time_step_limit),  # json writes inf as Infinity
        "time_step_min": cfg.time_step_min, "time_step_max": cfg.time_step_max,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }


# ---------------------------------------------------------------------------------------------
# mamba_ssm's MambaConfig (state-spaces/mamba2-*): model keys + ssm_cfg for the Mamba2 mixer.

_MAMBA_SSM_KEYS = frozenset({
    "d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
    "pad_vocab_size_multiple", "tie_embeddings", "attn_layer_idx", "attn_cfg", "d_intermediate",
})
# Mamba2 module arguments that only shape initialisation or kernel choice (no effect on inference).
_SSM_INERT = frozenset({"A_init_range", "dt_init_floor", "conv_init", "use_mem_eff_path", "sequence_parallel"})
_SSM_KEYS = frozenset({
    "layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "d_ssm", "D_has_hdim",
    "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_limit", "bias", "conv_bias",
}) | _SSM_INERT


def is_mamba_ssm_config(d: Mapping) -> bool:
    return "model_type" not in d and ("d_model" in d or "ssm_cfg" in d or "n_layer" in d)


def from_mamba_ssm_config(d: Mapping[str, Any], name: str = "custom",
                          token_ids: tuple[int | None, int | None, int | None] | None = None) -> Mamba2Config:
    """A mamba_ssm MambaConfig dict; absent keys take mamba_ssm's own defaults, except d_model,
    n_layer and vocab_size (its defaults are one model's) and ssm_cfg.layer (its default is Mamba-1).
    `token_ids` (bos, eos, pad) default to GPT-NeoX's for its 50277-token vocabulary, else none."""
    _unknown(d, _MAMBA_SSM_KEYS, "the mamba_ssm config")
    attn = d.get("attn_layer_idx", [])
    if not isinstance(attn, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in attn):
        raise ConfigError(f"attn_layer_idx must be a list of layer indices, got {attn!r}")
    refuse_hybrid(attn, _int(d, "d_intermediate", 0, minimum=0))
    if not _bool(d, "rms_norm", True):
        raise ConfigError("rms_norm=false (LayerNorm blocks) is not supported: Mamba-2 uses RMSNorm")
    _residual_fp32(_bool(d, "residual_in_fp32", True), "residual_in_fp32")
    _bool(d, "fused_add_norm", True)  # a kernel fusion: same result either way
    ssm = d.get("ssm_cfg")
    if not isinstance(ssm, dict):
        raise ConfigError("config lacks ssm_cfg (with layer: Mamba2); without it mamba_ssm builds Mamba-1 "
                          "layers, which this model is not" if ssm is None else
                          f"ssm_cfg must be an object, got {ssm!r}")
    kw = _mamba2_mixer(ssm, _int(d, "d_model"))
    vocab = _int(d, "vocab_size")
    if token_ids is None:
        token_ids = (0, 0, 0) if vocab == _GPT_NEOX_VOCAB else (None, None, None)
    bos, eos, pad = token_ids
    return _build(
        name, hidden_size=_int(d, "d_model"), num_hidden_layers=_int(d, "n_layer"),
        vocab_size=pad_vocab(vocab, _int(d, "pad_vocab_size_multiple", 8)),
        tie_word_embeddings=_bool(d, "tie_embeddings", True), layer_norm_epsilon=1e-5,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **kw,
    )


def _mamba2_mixer(ssm: Mapping, d_model: int) -> dict[str, Any]:
    """ssm_cfg -> Mamba2Config fields, with the Mamba2 module's defaults."""
    p = "ssm_cfg."
    _unknown(ssm, _SSM_KEYS, "ssm_cfg", prefix=p)
    layer = ssm.get("layer")
    if layer != "Mamba2":
        raise ConfigError("ssm_cfg lacks layer: Mamba2 (mamba_ssm's default is Mamba-1); only Mamba-2 "
                          "checkpoints are supported" if layer is None else
                          f"ssm_cfg.layer is {layer!r}: only Mamba-2 checkpoints (layer: Mamba2) are supported")
    expand = _int(ssm, "expand", 2, prefix=p)
    headdim = _int(ssm, "headdim", 64, prefix=p)
    d_ssm = ssm.get("d_ssm")
    if d_ssm is not None and d_ssm != expand * d_model:
        raise ConfigError(f"ssm_cfg.d_ssm={d_ssm!r} (an SSM on part of the {expand * d_model} channels, a gated "
                          "MLP on the rest) is not supported")
    for key, value, why in (("D_has_hdim", False, "a D per channel"), ("rmsnorm", True, "no gated norm"),
                            ("norm_before_gate", False, "norm before the gate")):
        if _bool(ssm, key, value, prefix=p) != value:
            raise ConfigError(f"ssm_cfg.{key}={str(not value).lower()} ({why}) is not supported")
    return dict(
        state_size=_int(ssm, "d_state", 128, prefix=p), conv_kernel=_int(ssm, "d_conv", 4, prefix=p),
        expand=expand, head_dim=headdim, n_groups=_int(ssm, "ngroups", 1, prefix=p),
        chunk_size=_int(ssm, "chunk_size", 256, prefix=p),
        use_bias=_bool(ssm, "bias", False, prefix=p), use_conv_bias=_bool(ssm, "conv_bias", True, prefix=p),
        time_step_limit=_pair(ssm, "dt_limit", (0.0, math.inf), prefix=p),
        time_step_min=_float(ssm, "dt_min", 0.001, prefix=p), time_step_max=_float(ssm, "dt_max", 0.1, prefix=p),
    )


# ---------------------------------------------------------------------------------------------
# mistral's params.json (Codestral-Mamba): every MambaArgs field is required; the rest is mamba_ssm's.

_MISTRAL_KEYS = ("dim", "n_layers", "vocab_size", "n_groups", "rms_norm", "residual_in_fp32", "fused_add_norm",
                 "pad_vocab_size_multiple", "tie_embeddings")


def from_mistral_params(d: Mapping[str, Any], name: str = "custom") -> Mamba2Config:
    """mistral-inference's MambaArgs (params.json), built as mistral builds it: a mamba_ssm config
    with ssm_cfg {ngroups, layer: Mamba2}; token ids are mistral's (<s> 1, </s> 2)."""
    if d.get("model_type", "mamba") != "mamba":
        raise ConfigError(f"params.json has model_type {d.get('model_type')!r}, expected 'mamba'")
    _unknown(d, {*_MISTRAL_KEYS, "model_type"}, "params.json")
    missing = [k for k in _MISTRAL_KEYS if k not in d]
    if missing:
        raise ConfigError(f"params.json lacks {', '.join(missing)}, which mistral's format requires: add it")
    mamba_ssm = {
        "d_model": d["dim"], "n_layer": d["n_layers"], "vocab_size": d["vocab_size"],
        "ssm_cfg": {"ngroups": d["n_groups"], "layer": "Mamba2"},
        **{k: d[k] for k in _MISTRAL_KEYS[4:]},
    }
    return from_mamba_ssm_config(mamba_ssm, name, token_ids=(_MISTRAL_BOS, _MISTRAL_EOS, None))


def config_from_dict(d: Mapping[str, Any], name: str, filename: str = "config.json") -> Mamba2Config:
    """Recognise the format of a config dict and map it; anything else is refused."""
    if filename == "params.json":
        return from_mistral_params(d, name)
    if is_mamba_ssm_config(d):
        return from_mamba_ssm_config(d, name)
    if d.get("model_type") is not None or "hidden_size" in d:
        return from_hf_config(d, name)
    raise ConfigError(f"{filename} is neither an HF Mamba2 config (model_type: mamba2) nor a mamba_ssm one "
                      "(d_model, n_layer, ssm_cfg)")
