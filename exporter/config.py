"""Model configuration: the five mamba_ssm presets; config files are read by exporter.config_files."""

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
        d["time_step_limit"] = [json_number(v) for v in self.time_step_limit]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Mamba2Config":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if "time_step_limit" in kw:
            kw["time_step_limit"] = tuple(float(v) for v in kw["time_step_limit"])
        return cls(**kw)


def json_number(v: float) -> float | str:
    """A float as the manifest's JSON writes it: non-finite values spelled "Infinity" / "-Infinity"."""
    return v if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")


def pad_vocab(n: int, multiple: int) -> int:
    """mamba_ssm's embedding size: the vocabulary rounded up to a multiple."""
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
    name: Mamba2Config(hidden_size=d, num_hidden_layers=n, vocab_size=pad_vocab(50277, 16), name=name)
    for name, (d, n) in _PRESET_SHAPES.items()
}


def load_config(model: str) -> Mamba2Config:
    """A preset name, a checkpoint directory, or a path to its config file: an HF or mamba_ssm
    `config.json`, or mistral's `params.json` (read when a directory has no config.json)."""
    from exporter.config_files import config_from_dict

    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json" if (path / "config.json").is_file() or not (path / "params.json").is_file() \
            else path / "params.json"
    if not path.is_file():
        if path.suffix == ".json" or Path(model).exists() or "/" in model:
            raise ConfigError(f"no config.json at {path}")
        raise ConfigError(f"unknown model {model!r}: use one of {', '.join(PRESETS)} or a checkpoint directory")
    try:
        d = json.loads(path.read_text())  # Python's json reads HF's `Infinity`
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a JSON object")
    try:
        return config_from_dict(d, name=path.parent.name or "custom", filename=path.name)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
