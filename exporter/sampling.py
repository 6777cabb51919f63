"""Token choice inside the decode loop: greedy, temperature, top-k, top-p and min-p, per row.

Settings are per-row traced arrays, so one exported loop serves every mix of settings. Filters
follow HF's order and semantics: temperature, then top-k (every token tied with the k-th best is
kept, as HF's `scores < topk[..., -1]` test does), then top-p on the distribution renormalised
over the top-k survivors (a token is kept while the mass strictly above it is < top_p; the best
token always survives), then min-p (kept when its probability is at least min_p times the top
probability; renormalisation cancels in that ratio, so it is a plain logit threshold).

Cost: only top-p < 1 (or a top-k beyond TOP_K_CAP) sorts the vocabulary; top-k uses `lax.top_k`
with a static cap, min-p a threshold, plain temperature goes straight to the categorical draw.
Each path yields the same keep-mask in vocabulary order and every row draws from it with its own
key, so a row's token never depends on which path its batch took (rows are independent).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

TOP_K_CAP = 64  # top_k up to this runs through lax.top_k; a larger one takes the sorting path
# (0 turns lax.top_k off: its `chlo.top_k` composite is newer than TF 2.21's StableHLO reader, so
# the SavedModel export sorts for every top-k; the tokens are the same.)
RNG_IMPL = "threefry2x32"  # pinned: never the process default


def step_keys(keys: jax.Array, steps: jax.Array) -> jax.Array:
    """keys uint32[b, 2] (one threefry key per row), steps int32[b] -> typed keys [b] for each
    row's generation step. Derived from (row key, the row's own step) only, so blocks, batch
    composition and backend never change which random numbers a row sees."""
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k, impl=RNG_IMPL), s))(
        keys, steps)


def greedy(logits: jax.Array) -> jax.Array:
    """logits [b, V] -> int32[b]: the most likely token (the first on ties)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _top_k_floor(scaled, top_k, cap: int = TOP_K_CAP):
    """[b, 1]: the k-th largest value per row via lax.top_k (k <= cap), -inf where top_k <= 0."""
    cap = min(cap, scaled.shape[-1])
    best, _ = jax.lax.top_k(scaled, cap)  # [b, cap], descending
    kth = jnp.take_along_axis(best, jnp.clip(top_k - 1, 0, cap - 1)[:, None], axis=-1)
    return jnp.where(top_k[:, None] > 0, kth, -jnp.inf)


def _keep_unsorted(scaled, top_k, top_p, min_p, any_top_k, cap: int = TOP_K_CAP):
    """Keep-mask [b, V] for rows without top-p (and top_k <= cap): two thresholds, no sort."""
    none = jnp.full((scaled.shape[0], 1), -jnp.inf)
    floor = jax.lax.cond(any_top_k, functools.partial(_top_k_floor, cap=cap), lambda s, k: none,
                         scaled, top_k) if cap > 0 else none
    min_p_floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]  # log 0 = -inf
    return scaled >= jnp.maximum(floor, min_p_floor)


def _keep_sorted(scaled, top_k, top_p, min_p, any_top_k, cap: int = TOP_K_CAP):
    """Keep-mask [b, V] through a full sort (top-p, or top_k beyond the cap)."""
    b, V = scaled.shape
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [b, V] token ids by falling value
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [b, V] descending
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)
    keep = (top_k[:, None] <= 0) | (ranked >= kth)
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)  # renormalised over top-k
    above = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep &= (top_p[:, None] >= 1.0) | (above < top_p[:, None])  # top_p = 1: exact bypass
    keep &= ranked >= ranked[:, :1] + jnp.log(min_p)[:, None]
    keep = keep.at[:, 0].set(True)  # the best token always survives
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, V), bool).at[rows, order].set(keep)  # back to vocabulary order


def sample(logits, keys, temperature, top_k, top_p, min_p, needs_sort, any_top_k, cap: int = TOP_K_CAP):
    """logits [b, V] f32, keys [b] typed keys, per-row settings [b] -> int32[b].

    temperature 0 means greedy for that row. needs_sort / any_top_k: loop-invariant bool scalars
    (any row with top_p < 1 or top_k > cap / any row with top_k > 0), decided once per call; cap:
    the static lax.top_k cap (0: always sort for top-k)."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]  # temperature, once
    keep = jax.lax.cond(needs_sort, functools.partial(_keep_sorted, cap=cap), functools.partial(_keep_unsorted, cap=cap),
                        scaled, top_k, top_p, min_p, any_top_k)
    drawn = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, scaled, -jnp.inf)).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy(logits))


def needs_sort(top_k, top_p, cap: int = TOP_K_CAP) -> jax.Array:
    """Whether any row needs the sorting path (top-p below 1, or top-k beyond the cap)."""
    return jnp.any((top_p < 1.0) | (top_k > cap))
