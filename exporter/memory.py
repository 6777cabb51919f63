"""How much memory one prefill call's temporaries take: the bound `inspect` states."""

from __future__ import annotations

import jax.numpy as jnp

from exporter.config import Mamba2Config
from exporter.state import state_bytes


def prefill_activation_bytes(cfg: Mamba2Config, dtype, tokens: int, chunk: int, batch: int) -> int:
    """An upper bound on the temporaries of one prefill call of `batch` rows over `tokens` =
    batch x length positions.

    Per layer the largest live arrays are the intra-chunk decay and its product with the
    scores, [tokens, heads, chunk] float32 each, beside the in_proj output and a few [tokens,
    d]-sized streams; layers run one after another, so one layer's set bounds that part. The
    layers' new states are all alive until they are stacked into the output: one batch of state
    (checked against XLA's own memory analysis in tests/test_state.py).
    """
    f32 = 4
    item = jnp.dtype(dtype).itemsize
    per_token = (3 * cfg.num_heads * chunk * f32  # decay, scores * decay, segment sums
                 + cfg.in_proj_size * (f32 + item)  # in_proj output and its float32 copy
                 + 2 * cfg.conv_dim * f32  # conv output, x * dt
                 + 3 * cfg.intermediate_size * f32  # y, gated norm, out_proj input
                 + 4 * cfg.hidden_size * f32)  # residual stream, norms
    # +10% and 64 KiB for what the per-token terms leave out (segment-sum masks, logits, XLA's
    # own scratch): measured 1.06-1.35x XLA's figure for 130m and the tests' tiny models.
    return int(1.1 * (tokens * per_token + batch * state_bytes(cfg, dtype))) + (1 << 16)
