"""The whole decode loop as one `lax.while_loop` on the device: no host round trip per token."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from exporter.sampling import TOP_K_CAP, greedy, needs_sort, sample, step_keys


class Sampling(NamedTuple):
    """Per-row sampling settings [b]: temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off."""

    temperature: jax.Array  # f32[b]
    top_k: jax.Array  # i32[b]
    top_p: jax.Array  # f32[b]
    min_p: jax.Array  # f32[b]


def decode_loop(
    model,  # the decode-loop protocol: loop_carry, state_dict, step (exporter.model.Mamba2LM)
    state: dict,
    logits: jax.Array,  # [b, V] f32: next-token logits (from prefill or the previous call)
    finished: jax.Array,  # bool[b]: rows that already stopped emit nothing and stay frozen
    budget: jax.Array,  # i32[b]: tokens each row may make in this call (clipped to capacity)
    steps: jax.Array,  # i32[b]: tokens each row made before this call (its rng position)
    keys: jax.Array,  # u32[b, 2]: one threefry key per row
    sampling: Sampling,
    stop_ids: jax.Array,  # i32[b, S], -1 = unused slot
    capacity: int,
    top_k_cap: int = TOP_K_CAP,
    loops: int = 2,
):
    """Generate up to budget[i] tokens for row i. Returns (tokens [b, capacity], counts [b],
    state, logits [b, V], finished [b]). Row i's new tokens are tokens[i, :counts[i]], stop token
    included. A row is active while it has not finished and has budget left; inactive rows are
    frozen (state and logits unchanged), and the loop exits once no row is active.

    Greedy-only calls do no sampling work. loops=2: two loops, the choice made once per call
    (on GPU a per-iteration predicate costs a host sync); loops=1: one loop whose step makes the
    choice (cheap on the host, and the model's step is compiled once). The sampler's sort/no-sort
    path is decided once per call either way.
    """
    b = logits.shape[0]
    budget = jnp.clip(budget, 0, capacity)
    out = jnp.zeros((b, capacity), jnp.int32)  # [b, capacity]
    counts = jnp.zeros((b,), jnp.int32)

    def make_loop(choose):
        def cond(c):
            i, _, _, _, _, finished = c
            return (i < capacity) & jnp.any(~finished & (i < budget))

        def body(c):
            i, out, counts, carry, logits, finished = c
            active = ~finished & (i < budget)  # an active row has made exactly i tokens here
            tok = choose(logits, i)  # [b]
            out = jax.lax.dynamic_update_slice(out, jnp.where(active, tok, 0)[:, None], (0, i))
            counts = counts + active.astype(jnp.int32)
            finished = finished | (active & jnp.any(tok[:, None] == stop_ids, axis=-1))
            new_logits, carry = model.step(tok, carry, active)
            logits = jnp.where(active[:, None], new_logits, logits)
            return i + 1, out, counts, carry, logits, finished

        def run(init):
            return jax.lax.while_loop(cond, body, init)

        return run

    sort, any_top_k = needs_sort(sampling.top_k, sampling.top_p, top_k_cap), jnp.any(sampling.top_k > 0)

    def sampled(logits, i):
        return sample(logits, step_keys(keys, steps + i), *sampling, sort, any_top_k, top_k_cap)

    init = (jnp.int32(0), out, counts, model.loop_carry(state), logits, finished)
    any_sampled = jnp.any((sampling.temperature > 0) & ~finished & (budget > 0))
    if loops == 1:
        choose = lambda logits, i: jax.lax.cond(any_sampled, sampled, lambda lg, _: greedy(lg), logits, i)  # noqa: E731
        _, out, counts, carry, logits, finished = make_loop(choose)(init)
    else:
        _, out, counts, carry, logits, finished = jax.lax.cond(
            any_sampled, make_loop(sampled), make_loop(lambda logits, i: greedy(logits)), init)
    return out, counts, model.state_dict(carry), logits, finished
