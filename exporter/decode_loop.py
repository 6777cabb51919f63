"""The whole decode loop as one `lax.while_loop` on the device: no host round trip per token."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from exporter.cache import Mamba2Cache
from exporter.model import Mamba2LM
from exporter.sampling import sample, step_keys


class Sampling(NamedTuple):
    """Traced sampling settings (scalars): temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off."""

    temperature: jax.Array  # f32[]
    top_k: jax.Array  # i32[]
    top_p: jax.Array  # f32[]
    min_p: jax.Array  # f32[]


def decode_loop(
    model: Mamba2LM,
    cache: Mamba2Cache,
    logits: jax.Array,  # [b, V] f32: next-token logits (from prefill or the previous block)
    finished: jax.Array,  # bool[b]: rows that already stopped emit nothing
    budget: jax.Array,  # i32[]: tokens to generate in this call, at most `capacity`
    start_step: jax.Array,  # i32[]: tokens each row generated before this call (for its rng)
    keys: jax.Array,  # u32[b, 2]: one threefry key per row
    sampling: Sampling,
    stop_ids: jax.Array,  # i32[S], -1 = unused slot
    capacity: int,
):
    """Generate up to `budget` tokens per row. Returns (tokens [b, capacity], counts [b], cache,
    logits [b, V], finished [b]). Row i's new tokens are tokens[i, :counts[i]], stop token
    included; the loop exits early once every row has finished."""
    b = logits.shape[0]
    budget = jnp.clip(budget, 0, capacity)
    out = jnp.zeros((b, capacity), jnp.int32)  # [b, capacity]
    counts = jnp.zeros((b,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, _, finished = carry
        return (i < budget) & ~jnp.all(finished)

    def body(carry):
        i, out, counts, convs, ssms, logits, finished = carry
        tok = sample(logits, step_keys(keys, start_step + i), *sampling)  # [b]
        active = ~finished
        out = jax.lax.dynamic_update_slice(out, jnp.where(active, tok, 0)[:, None], (0, i))
        counts = counts + active.astype(jnp.int32)
        finished = finished | (active & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1))
        logits, convs, ssms = model.step_layers(tok, convs, ssms)
        return i + 1, out, counts, convs, ssms, logits, finished

    # The loop carries one buffer per layer (updated in place); [L, ...] only at the boundary.
    init = (jnp.int32(0), out, counts, list(cache.conv), list(cache.ssm), logits, finished)
    _, out, counts, convs, ssms, logits, finished = jax.lax.while_loop(cond, body, init)
    cache = Mamba2Cache(conv=jnp.stack(convs), ssm=jnp.stack(ssms))
    return out, counts, cache, logits, finished
