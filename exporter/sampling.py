"""Token choice inside the decode loop: greedy, temperature, top-k, top-p and min-p.

Settings are traced scalars, so one exported loop serves every setting. Filters follow HF's
order (temperature, then top-k, then top-p and min-p on the renormalised distribution).
min-p keeps tokens whose probability is at least min_p times the row's own top probability.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
    """keys uint32[b, 2] (one threefry key per row) -> per-row keys for generation step `step`.

    Derived from (row seed, absolute step) only, so blocks, batch composition and backend
    never change which random numbers a row sees.
    """
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), step))(keys)


def filtered_logits(logits, temperature, top_k, top_p, min_p):
    """logits [b, V] float32 -> (order [b, V] token ids by falling logit, masked sorted logits [b, V])."""
    V = logits.shape[-1]
    scaled = logits / temperature
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [b, V]
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [b, V], descending
    rank = jnp.arange(V)[None, :]
    keep = (top_k <= 0) | (rank < top_k)
    ranked = jnp.where(keep, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)  # renormalised over the top-k survivors
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = keep & (before < top_p) & (probs >= min_p * probs[:, :1])
    keep = keep.at[:, 0].set(True)  # the most likely token always survives
    return order, jnp.where(keep, ranked, -jnp.inf)


def sample(logits, keys, temperature, top_k, top_p, min_p):
    """logits [b, V], keys [b] typed keys -> tokens int32[b]. temperature 0 means greedy."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        order, masked = filtered_logits(logits, temperature, top_k, top_p, min_p)
        pos = jax.vmap(jax.random.categorical)(keys, masked)  # [b] index into `order`
        return jnp.take_along_axis(order, pos[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, None)
