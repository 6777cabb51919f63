"""Model configuration: the five mamba_ssm presets and any HF Mamba2 `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model name or config file that cannot be turned into a Mamba2Config."""


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Hyper-parameters of a Mamba-2 language model (names follow HF's Mamba2Config)."""

    hidden_size: int = 768
    num_hidden_layers: int = 24
    vocab_size: int = 50288
    state_size: int = 128
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    num_heads: int = 0  # 0: derived as expand * hidden_size // head_dim
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0
    name: str = "custom"

    def __post_init__(self):
        if self.num_heads == 0:
            object.__setattr__(self, "num_heads", self.intermediate_size // self.head_dim)
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ConfigError(
                f"num_heads * head_dim = {self.num_heads * self.head_dim} must equal "
                f"expand * hidden_size = {self.intermediate_size}"
            )
        if self.num_heads % self.n_groups:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of n_groups {self.n_groups}")
        lo, hi = self.time_step_limit
        object.__setattr__(self, "time_step_limit", (float(lo), float(hi)))

    @property
    def intermediate_size(self) -> int:
        return int(self.expand * self.hidden_size)

    @property
    def conv_dim(self) -> int:
        """Channels through the causal conv: x, then B and C for every group."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """in_proj output: z (gate), xBC (conv input), dt (one per head)."""
        return self.intermediate_size + self.conv_dim + self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_step_limit"] = [_json_float(v) for v in self.time_step_limit]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Mamba2Config":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if "time_step_limit" in kw:
            kw["time_step_limit"] = tuple(float(v) for v in kw["time_step_limit"])
        return cls(**kw)


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")


def _hf_float(v) -> float:
    """A number from config.json: plain, `Infinity`, or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def _pad_vocab(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


# mamba_ssm's published Mamba-2 sizes: (d_model, n_layer); vocab 50277 padded to 16.
_PRESET_SHAPES = {
    "130m": (768, 24),
    "370m": (1024, 48),
    "780m": (1536, 48),
    "1.3b": (2048, 48),
    "2.7b": (2560, 64),
}
PRESETS: dict[str, Mamba2Config] = {
    name: Mamba2Config(hidden_size=d, num_hidden_layers=n, vocab_size=_pad_vocab(50277), name=name)
    for name, (d, n) in _PRESET_SHAPES.items()
}

# HF Mamba2Config keys we read, and the HF defaults used when a key is absent.
_HF_DEFAULTS = {
    "vocab_size": 32768, "hidden_size": 4096, "state_size": 128, "num_hidden_layers": 64,
    "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "n_groups": 8, "use_bias": False,
    "use_conv_bias": True, "residual_in_fp32": True, "chunk_size": 256, "tie_word_embeddings": False,
    "head_dim": 64, "num_heads": 128, "time_step_limit": (0.0, math.inf), "time_step_min": 0.001,
    "time_step_max": 0.1, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}


def from_hf_config(hf: dict[str, Any], name: str = "custom") -> Mamba2Config:
    """Map an HF `Mamba2Config` dict (as in `config.json`) onto ours."""
    if hf.get("model_type", "mamba2") != "mamba2":
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}, expected 'mamba2'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu')")
    if not hf.get("rms_norm", True):
        raise ConfigError("rms_norm=false is not supported")
    kw = {k: hf.get(k, default) for k, default in _HF_DEFAULTS.items()}
    try:
        kw["time_step_limit"] = tuple(_hf_float(v) for v in kw["time_step_limit"])
    except (TypeError, ValueError):
        raise ConfigError(f"time_step_limit {kw['time_step_limit']!r} is not a pair of numbers") from None
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(kw[k], list):  # HF allows several eos ids; keep the first
            kw[k] = kw[k][0] if kw[k] else None
    try:
        return Mamba2Config(name=name, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"unsupported Mamba2 config: {e}") from None


def load_config(model: str) -> Mamba2Config:
    """A preset name, a HF checkpoint directory, or a path to its `config.json`."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if path.suffix == ".json" or Path(model).exists() or "/" in model:
            raise ConfigError(f"no config.json at {path}")
        raise ConfigError(f"unknown model {model!r}: use one of {', '.join(PRESETS)} or a HF checkpoint directory")
    try:
        hf = json.loads(path.read_text())  # Python's json reads HF's `Infinity`
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return from_hf_config(hf, name=path.parent.name or "custom")
