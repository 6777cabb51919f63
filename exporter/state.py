"""The O(1) recurrent state of a batch: a plain dict of arrays with every layer stacked on axis 0.

Exported functions take and return it as is (plain dicts serialize without model code). Its rules
(semantics version 2, relied on by the runtime): every leaf has one batch dimension (axis 1 here),
all zeros is a fresh sequence, and rows are independent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from exporter.config import Mamba2Config

BATCH_AXIS = 1  # of every leaf: [L, b, ...]


def state_shapes(cfg: Mamba2Config, batch, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """conv: the last conv_kernel - 1 conv inputs (model dtype); ssm: the SSM state (float32).
    `batch` may be symbolic."""
    L = cfg.num_hidden_layers
    return {
        "conv": jax.ShapeDtypeStruct((L, batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
        "ssm": jax.ShapeDtypeStruct((L, batch, cfg.num_heads, cfg.head_dim, cfg.state_size), jnp.float32),
    }


def empty_state(cfg: Mamba2Config, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """The state of `batch` fresh sequences: all zeros."""
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in state_shapes(cfg, batch, dtype).items()}


def state_bytes(cfg: Mamba2Config, dtype) -> int:
    """Bytes of state one sequence carries (any length)."""
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in state_shapes(cfg, 1, dtype).values())
