"""The decode batch on the device: N slots, each holding one sequence's state row and logits.

Rows come in from admission (States: a prompt's end after prefill, or a prefix-cache hit) and are
scattered into their slots in place (the slot buffers are donated); a finished sequence's final
State is read out of its slot. One decode call runs the first B slots, B the smallest batch
bucket that covers every busy slot (the scheduler keeps busy slots low), so a lone request
decodes at batch 1 as it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from runtime.engine.generation import row_state
from runtime.engine.requests import RowSettings
from runtime.engine.state import State


def _put_rows_impl(slots, rows, dest):
    """slots [N, V] with rows[j] at dest[j] (rows has exactly len(dest) rows)."""
    return slots.at[dest].set(rows.astype(slots.dtype))


_put_rows = jax.jit(_put_rows_impl, donate_argnums=0)


class SlotPool:
    """N slots on the device: `state` (every leaf with batch dimension N) and `logits` [N, V]."""

    def __init__(self, model, n: int):
        self.model = model
        self.n = n
        self.layout = model.state_layout
        spec = {t.name: t for t in model.manifest.functions["decode"].inputs}["logits"]
        self.state = self.layout.zeros(n)
        self.logits = jnp.zeros((n, model.limits["vocab_size"]), spec.dtype)  # [N, V]

    def write(self, states: Sequence[State], dest: Sequence[int]) -> None:
        """State j into slot dest[j], in place."""
        rows = self.layout.stack([s.leaves for s in states], len(states))
        idx = jnp.asarray(np.asarray(dest, np.int32))
        self.state = self.layout.put(self.state, rows, dest)
        self.logits = _put_rows(self.logits, jnp.concatenate([s.logits for s in states]), idx)

    def read(self, slot: int, history: tuple[int, ...]) -> State:
        """The State in `slot` after `history` (device copies: the slot may be reused at once)."""
        return row_state(self.model, self.state, self.logits, slot, len(history), history)

    def move(self, src: int, dst: int) -> None:
        """Copy slot src into slot dst."""
        self.write([row_state(self.model, self.state, self.logits, src, 0, None)], [dst])

    def decode(self, B: int, finished: np.ndarray, budget: np.ndarray, steps: np.ndarray, keys: np.ndarray,
               settings: RowSettings, stop_ids: np.ndarray):
        """One decode call over slots [0, B) (host arrays of B rows): (tokens [B, K], counts [B],
        finished [B]) as numpy; the slots' state and logits advance in place."""
        if B == self.n:
            state, logits = self.state, self.logits
        else:
            state = self.layout.nest([jax.lax.slice_in_dim(a, 0, B, axis=leaf.axis)
                                      for leaf, a in zip(self.layout.leaves, self.layout.flat(self.state))])
            logits = self.logits[:B]
        out, counts, state, logits, fin = self.model.decode(state, logits, finished, budget, steps, keys,
                                                            settings, stop_ids)
        if B == self.n:
            self.state, self.logits = state, logits
        else:
            self.state = self.layout.put(self.state, state, range(B))
            self.logits = _put_rows(self.logits, logits, jnp.arange(B, dtype=jnp.int32))
        return np.asarray(out), np.asarray(counts), np.asarray(fin)

    def intact(self) -> bool:
        """False when a failed call left donated (deleted) buffers behind: the pool is unusable."""
        return not any(a.is_deleted() for a in [*self.layout.flat(self.state), self.logits])

    def warm(self) -> None:
        """Compile the scatter programs for every row count (the slots hold zeros: nothing changes)."""
        for k in range(1, self.n + 1):
            self.state = self.layout.put(self.state, self.layout.zeros(k), range(k))
            self.logits = _put_rows(self.logits, jnp.zeros((k, self.logits.shape[1]), self.logits.dtype),
                                    jnp.arange(k, dtype=jnp.int32))
        jax.block_until_ready((self.state, self.logits))
