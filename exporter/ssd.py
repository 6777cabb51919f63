"""State space duality (SSD): the chunked prefill scan and the O(1) recurrent step.

Notation (as in mamba_ssm's ssd_minimal): b batch, t time, c chunk index, l and s positions
inside a chunk, g group, r head within its group (heads h = g * r), p head_dim, n state_size.
Inputs and the state are float32; how each platform runs the float32 contractions (precision,
segment-sum formulation) is chosen in exporter.numerics and passed in here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def segsum(a: jax.Array, method: str = "matmul") -> jax.Array:
    """Stable segment sums: out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, else -inf.

    a: [..., T] -> [..., T, T]. Each entry is a sum of the terms themselves, never a difference
    of two long cumulative sums, so strongly decaying heads lose no precision.
    method "matmul": a triangular matmul, incl @ (a * strictly_lower), O(T^3) but what XLA CPU
    runs fastest; "cumsum": a cumsum down the masked [T, T] matrix, O(T^2) (accelerators).
    """
    T = a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((T, T), bool), k=-1)  # [k, j]: k > j
    terms = jnp.where(strictly_lower, a[..., :, None], 0.0)  # [..., k, j] = a[k] where k > j
    if method == "matmul":
        inclusive = jnp.tril(jnp.ones((T, T), a.dtype))  # [i, k]: k <= i
        sums = jnp.matmul(inclusive, terms, precision=HIGHEST)
    elif method == "cumsum":
        sums = jnp.cumsum(terms, axis=-2)
    else:
        raise ValueError(f"unknown segment-sum method {method!r}")
    return jnp.where(jnp.tril(jnp.ones((T, T), bool)), sums, -jnp.inf)


def ssd_chunked(
    x: jax.Array,  # [b, t, h, p] inputs (not yet multiplied by dt); 0 at padded positions
    dt: jax.Array,  # [b, t, h] step sizes; 0 at padded positions
    A: jax.Array,  # [h] negative decay rates
    B: jax.Array,  # [b, t, g, n]
    C: jax.Array,  # [b, t, g, n]
    chunk: int,
    initial_state: jax.Array,  # [b, h, p, n] float32: the state before position 0
    segment_sum: str = "matmul",
    state_precision=None,  # lax.Precision of contractions that build, pass or read the state
    intra_precision=None,  # lax.Precision of the intra-chunk [l, s] product
) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD scan. Returns y [b, t, h, p] (no D skip) and the final state [b, h, p, n].

    Any t works: the sequence is zero-padded to a multiple of `chunk`, and padded steps have
    dt = 0, so they neither decay nor feed the state. Inside, arrays are head-major
    ([b, c, g, r, l, ...]) so every contraction is a batched matmul over leading dims.
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    n_chunks = (t + chunk - 1) // chunk
    pad = n_chunks * chunk - t
    sp, ip = state_precision, intra_precision

    def chunked(a):  # [b, t, ...] -> [b, c, l, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, n_chunks, chunk, *a.shape[2:])

    xc = chunked(x * dt[..., None]).reshape(b, n_chunks, chunk, g, r, p)
    xc = jnp.transpose(xc, (0, 1, 3, 4, 2, 5))  # [b, c, g, r, l, p]
    Bc = jnp.swapaxes(chunked(B), 2, 3)  # [b, c, g, l, n]
    Cc = jnp.swapaxes(chunked(C), 2, 3)  # [b, c, g, l, n]
    a = chunked((dt * A).reshape(b, t, g, r))  # [b, c, l, g, r]
    a = jnp.moveaxis(a, 2, -1)  # [b, c, g, r, l]
    a_cum = jnp.cumsum(a, axis=-1)  # [b, c, g, r, l]

    # 1. Within each chunk: a masked, decayed attention-like product.
    decay = jnp.exp(segsum(a, segment_sum))  # [b, c, g, r, l, s]
    scores = jnp.einsum("bcgln,bcgsn->bcgls", Cc, Bc, precision=ip)  # [b, c, g, l, s]
    y = jnp.einsum("bcgrls,bcgrsp->bcgrlp", scores[:, :, :, None] * decay, xc, precision=ip)

    # 2. The state each chunk produces on its own, decayed to the chunk's end (decay's last row).
    to_end = decay[..., -1, :]  # [b, c, g, r, l]
    chunk_states = jnp.einsum("bcgln,bcgrlp->bcgrpn", Bc, xc * to_end[..., None], precision=sp)

    # 3. Across chunks: each chunk's starting state from all earlier ones and the initial state.
    init = initial_state.astype(jnp.float32).reshape(b, 1, g, r, p, n)
    states = jnp.concatenate([init, chunk_states], axis=1)  # [b, c+1, g, r, p, n]
    chunk_decay = jnp.pad(a_cum[..., -1], [(0, 0), (1, 0), (0, 0), (0, 0)])  # [b, c+1, g, r]
    across = jnp.exp(segsum(jnp.moveaxis(chunk_decay, 1, -1), segment_sum))  # [b, g, r, c+1(z), c+1]
    states = jnp.einsum("bgrzc,bcgrpn->bzgrpn", across, states, precision=sp)  # [b, c+1, g, r, p, n]
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. Each chunk's starting state read out through C, decayed to each position.
    y_off = jnp.einsum("bcgln,bcgrpn->bcgrlp", Cc, start_states, precision=sp)
    y = y + y_off * jnp.exp(a_cum)[..., None]  # [b, c, g, r, l, p]

    y = jnp.transpose(y, (0, 1, 4, 2, 3, 5)).reshape(b, n_chunks * chunk, h, p)[:, :t]
    return y, final_state.reshape(b, h, p, n)


def ssd_step(
    state: jax.Array,  # [b, h, p, n] float32
    x: jax.Array,  # [b, h, p]
    dt: jax.Array,  # [b, h]; 0 for a frozen row (its state is returned unchanged)
    A: jax.Array,  # [h]
    B: jax.Array,  # [b, g, n]
    C: jax.Array,  # [b, g, n]
    precision=None,
) -> tuple[jax.Array, jax.Array]:
    """One recurrent step: state <- exp(dt A) state + dt x B^T; y = state C. Returns (y [b,h,p], state).

    dt = 0 gives decay exp(0) = 1 and input 0: the state comes back bit for bit, with no extra
    pass over it (how the decode loop freezes finished rows)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    r = h // g
    Bh = jnp.repeat(B, r, axis=1)  # [b, h, n]: each head reads its group's B
    decay = jnp.exp(dt * A)  # [b, h]
    # Elementwise in the state's own shape: XLA then updates the loop-carried state in place
    # (a reshape to [b, g, r, p, n] cost a full state copy per layer per token).
    state = state * decay[:, :, None, None] + (x * dt[..., None])[..., None] * Bh[:, :, None, :]
    # Readout as a batched matvec over each group's heads (a reshape of the state is free here):
    # written as multiply + reduce, XLA CPU sent it to a fusion ~8x slower than this dot.
    y = jnp.einsum("bgkn,bgn->bgk", state.reshape(b, g, r * p, n), C, precision=precision)  # [b, g, r*p]
    return y.reshape(b, h, p), state
