"""State space duality (SSD): the chunked prefill scan and the O(1) recurrent step.

Notation (as in mamba_ssm's ssd_minimal): b batch, t time, c chunk index, l and s positions
inside a chunk, g group, r head within its group (heads h = g * r), p head_dim, n state_size.
Everything here runs in float32 whatever the model's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segsum(a: jax.Array) -> jax.Array:
    """Stable segment sums: out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, else -inf.

    a: [..., T] -> [..., T, T]. Sums masked terms with one cumsum instead of subtracting two
    cumsums, so long chunks of strongly decaying heads lose no precision.
    """
    T = a.shape[-1]
    x = jnp.broadcast_to(a[..., :, None], (*a.shape, T))  # [..., T(i), T(j)] = a[i]
    strictly_lower = jnp.tril(jnp.ones((T, T), dtype=bool), k=-1)
    x = jnp.where(strictly_lower, x, 0.0)
    sums = jnp.cumsum(x, axis=-2)  # [..., i, j] = sum_{j < k <= i} a[k]
    lower = jnp.tril(jnp.ones((T, T), dtype=bool), k=0)
    return jnp.where(lower, sums, -jnp.inf)


def ssd_chunked(
    x: jax.Array,  # [b, t, h, p] inputs (not yet multiplied by dt)
    dt: jax.Array,  # [b, t, h] step sizes; 0 at padded positions
    A: jax.Array,  # [h] negative decay rates
    B: jax.Array,  # [b, t, g, n]
    C: jax.Array,  # [b, t, g, n]
    chunk: int,
    initial_state: jax.Array | None = None,  # [b, h, p, n]
) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD scan. Returns y [b, t, h, p] (no D skip) and the final state [b, h, p, n].

    Any t works: the sequence is zero-padded to a multiple of `chunk`, and padded steps have
    dt = 0, so they neither decay nor feed the state.
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    n_chunks = (t + chunk - 1) // chunk
    pad = n_chunks * chunk - t

    def chunked(a):  # [b, t, ...] -> [b, c, l, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, n_chunks, chunk, *a.shape[2:])

    xdt = (x * dt[..., None]).reshape(b, t, g, r, p)
    xc = chunked(xdt)  # [b, c, l, g, r, p]
    Bc, Cc = chunked(B), chunked(C)  # [b, c, l, g, n]
    a = chunked((dt * A).reshape(b, t, g, r))  # [b, c, l, g, r]
    a = jnp.moveaxis(a, 2, -1)  # [b, c, g, r, l]
    a_cum = jnp.cumsum(a, axis=-1)  # [b, c, g, r, l]

    # 1. Within each chunk: a masked, decayed attention-like product.
    decay = jnp.exp(segsum(a))  # [b, c, g, r, l, s]
    scores = jnp.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # [b, c, g, l, s]
    y_diag = jnp.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, xc)

    # 2. The state each chunk produces on its own, decayed to the chunk's end.
    to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # [b, c, g, r, l]
    chunk_states = jnp.einsum("bclgn,bclgrp->bcgrpn", Bc, xc * jnp.moveaxis(to_end, -1, 2)[..., None])

    # 3. Across chunks: each chunk's starting state from all earlier ones (and the initial state).
    if initial_state is None:
        init = jnp.zeros((b, 1, g, r, p, n), jnp.float32)
    else:
        init = initial_state.reshape(b, 1, g, r, p, n).astype(jnp.float32)
    states = jnp.concatenate([init, chunk_states], axis=1)  # [b, c+1, g, r, p, n]
    chunk_decay = jnp.pad(a_cum[..., -1], [(0, 0), (1, 0), (0, 0), (0, 0)])  # [b, c+1, g, r]
    across = jnp.exp(segsum(jnp.moveaxis(chunk_decay, 1, -1)))  # [b, g, r, c+1(z), c+1]
    states = jnp.einsum("bgrzc,bcgrpn->bzgrpn", across, states)  # [b, c+1, g, r, p, n]
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. Each chunk's starting state read out through C, decayed to each position.
    y_off = jnp.einsum("bclgn,bcgrpn->bclgrp", Cc, start_states)
    y_off = y_off * jnp.moveaxis(jnp.exp(a_cum), -1, 2)[..., None]

    y = (y_diag + y_off).reshape(b, n_chunks * chunk, h, p)[:, :t]
    return y, final_state.reshape(b, h, p, n)


def ssd_step(
    state: jax.Array,  # [b, h, p, n] float32
    x: jax.Array,  # [b, h, p]
    dt: jax.Array,  # [b, h]
    A: jax.Array,  # [h]
    B: jax.Array,  # [b, g, n]
    C: jax.Array,  # [b, g, n]
) -> tuple[jax.Array, jax.Array]:
    """One recurrent step: state <- exp(dt A) state + dt x B^T; y = state C. Returns (y [b,h,p], state)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    r = h // g
    decay = jnp.exp(dt * A)  # [b, h]
    xdt = (x * dt[..., None]).reshape(b, g, r, p, 1)
    # Broadcast products, not einsum: XLA CPU turns these tiny batched dots into slow loops at b > 1.
    state = state.reshape(b, g, r, p, n) * decay.reshape(b, g, r, 1, 1) + xdt * B[:, :, None, None, :]
    y = jnp.sum(state * C[:, :, None, None, :], axis=-1)  # [b, g, r, p]
    return y.reshape(b, h, p), state.reshape(b, h, p, n)
