"""The O(1) recurrent cache: a registered pytree with every layer stacked on axis 0."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from exporter.config import Mamba2Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mamba2Cache:
    """conv: the last conv_kernel - 1 conv inputs; ssm: the SSM state, always float32."""

    conv: jax.Array  # [L, b, conv_kernel - 1, conv_dim], model dtype
    ssm: jax.Array  # [L, b, num_heads, head_dim, state_size], float32

    def as_dict(self) -> dict[str, jax.Array]:
        """The plain-dict form exported functions take and return (serializable without this class)."""
        return {"conv": self.conv, "ssm": self.ssm}

    @classmethod
    def from_dict(cls, d: dict[str, jax.Array]) -> "Mamba2Cache":
        return cls(conv=d["conv"], ssm=d["ssm"])


def cache_shapes(cfg: Mamba2Config, batch, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the cache arrays; `batch` may be symbolic."""
    L = cfg.num_hidden_layers
    return {
        "conv": jax.ShapeDtypeStruct((L, batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
        "ssm": jax.ShapeDtypeStruct((L, batch, cfg.num_heads, cfg.head_dim, cfg.state_size), jnp.float32),
    }


def empty_cache(cfg: Mamba2Config, batch: int, dtype=jnp.float32) -> Mamba2Cache:
    shapes = cache_shapes(cfg, batch, dtype)
    return Mamba2Cache(**{k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()})
