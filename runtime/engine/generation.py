"""Requests through prefill segments and decode blocks: the engine's generation loop.

A request row starts from a State (its own, a prefix-cache hit, or a fresh one), prefills the
tokens it brings in segments of at most the batch's segment length (each call continues from
the state the last one left), then decodes block by block with its own budget, sampling
settings, seed and stop ids. Rows never influence each other: a row's tokens are what it would
get alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from runtime.engine.requests import (RowSettings, bucket, check_new_tokens, check_prompt, check_prompts,
                                     check_stop_ids, pack, per_row)
from runtime.engine.rng import row_keys
from runtime.engine.state import State, take_row
from runtime.errors import RequestError


@dataclasses.dataclass
class Row:
    """One validated request row."""

    feed: list[int]  # tokens to prefill
    start: State | None  # the state it continues from (None: a fresh sequence)
    history: tuple[int, ...] | None  # every token of the sequence once fed (None: unknown)
    max_new: int
    stop: np.ndarray  # int32[S], -1 padded

    @property
    def start_tokens(self) -> int:
        return self.start.num_tokens if self.start is not None else 0


@dataclasses.dataclass
class Requests:
    rows: list[Row]
    settings: RowSettings  # n rows
    keys: np.ndarray  # uint32[n, 2]

    def __len__(self) -> int:
        return len(self.rows)


def _stop_lists(stop, n: int) -> list[list]:
    """`stop`: None, one list of ids for every row, or one list per row."""
    if stop is None:
        return [[] for _ in range(n)]
    if isinstance(stop, (Sequence, np.ndarray)) and not isinstance(stop, (str, bytes)) and len(stop) \
            and all(isinstance(s, (Sequence, np.ndarray)) and not isinstance(s, (str, bytes)) for s in stop):
        if len(stop) != n:
            raise RequestError(f"stop has {len(stop)} lists for {n} prompts: give one list, or one per prompt")
        return [list(s) for s in stop]
    return [stop] * n


def _states(model, states, n: int) -> list[State | None]:
    if states is None:
        return [None] * n
    if isinstance(states, State) or not isinstance(states, Sequence) or len(states) != n:
        raise RequestError(f"states must be a list with one State (or None) per prompt ({n})")
    for s in states:
        if s is not None and not isinstance(s, State):
            raise RequestError(f"states must hold State values or None, got {type(s).__name__}")
        if s is not None and s.artifact != model.artifact_id:
            raise RequestError("a state was made by another artifact: states only continue on the "
                               "artifact (and platform) that made them")
    if any(s is not None for s in states) and not model.convention.carries_state:
        raise RequestError("this artifact cannot continue from a state (semantics 1): re-export it "
                           "with this mamba2-aot")
    return list(states)


def validate(model, prompts, max_new_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             seed=0, stop=None, ignore_eos: bool = False, states=None, return_states: bool = False) -> Requests:
    """Check a request against the artifact's limits; RequestError names what is wrong."""
    limits = model.limits
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = prompts.tolist()
    n = len(prompts) if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)) else 0
    starts = _states(model, states, n) if n else []
    prompts = check_prompts(prompts, limits, allow_empty=[s is not None for s in starts])
    budgets = [check_new_tokens(m, limits) for m in per_row("max_new_tokens", max_new_tokens, n)]
    settings = RowSettings.build(n, temperature, top_k, top_p, min_p)
    keys = row_keys(seed, n)
    if not isinstance(ignore_eos, (bool, np.bool_)):
        raise RequestError(f"ignore_eos must be true or false, got {ignore_eos!r:.40}")
    if not isinstance(return_states, (bool, np.bool_)):
        raise RequestError(f"return_states must be true or false, got {return_states!r:.40}")
    if return_states and not model.convention.carries_state:
        raise RequestError("this artifact cannot return states (semantics 1): re-export it with this mamba2-aot")
    eos = model.eos_id
    rows = []
    slots = limits["max_stop_tokens"]
    for i, (prompt, start, extra) in enumerate(zip(prompts, starts, _stop_lists(stop, n))):
        check_stop_ids(extra, limits)  # the caller's own ids first: their count, their range
        ids = list(extra) + ([eos] if eos is not None and not ignore_eos and eos not in list(extra) else [])
        if len(ids) > slots:
            raise RequestError(f"{len(extra)} stop tokens plus the model's eos id, over the artifact's limit "
                               f"of {slots}: give at most {slots - 1}, or ignore_eos=True")
        history = tuple(prompt) if start is None else (start.tokens + tuple(prompt) if start.tokens is not None else None)
        row = Row(list(prompt), start, history, budgets[i], check_stop_ids(ids, limits))
        total = row.start_tokens + len(prompt) + row.max_new
        if limits["max_context"] is not None and total > limits["max_context"]:
            raise RequestError(f"prompt {i}: {row.start_tokens} tokens of state + {len(prompt)} prompt + "
                               f"{row.max_new} new tokens exceed the artifact's context of "
                               f"{limits['max_context']}: shorten it or re-export with a larger context")
        rows.append(row)
    model.convention.check_rows(settings, np.stack([r.stop for r in rows]), budgets, None)
    return Requests(rows, settings, keys)


def use_prefix_cache(model, rows: list[Row]) -> None:
    """Start each row from the longest cached state whose history its tokens extend."""
    cache = model.prefix_cache
    if cache is None:
        return
    for row in rows:
        if row.history is None:
            continue
        hit = cache.lookup(row.history)
        if hit is not None and len(hit.tokens) > row.start_tokens:
            row.start = hit
            row.feed = list(row.history[len(hit.tokens):])


def row_state(model, state, logits, i: int, num_tokens: int, history) -> State:
    """Row i of a batch (its state and logits [1, V]) as a State of `num_tokens` tokens."""
    return State(tuple(model.state_layout.take(state, i)), take_row(logits, i), num_tokens, model.artifact_id,
                 history)


def start_batch(model, rows: list[Row], B: int):
    """The batch the rows start from: (state of B rows, logits [B, V] or None when no row has a
    start state); rows beyond the first len(rows), and rows without a start, are fresh."""
    import jax.numpy as jnp

    if not model.convention.carries_state:
        return None, None
    state = model.state_layout.stack([r.start.leaves if r.start else None for r in rows], B)
    if not any(r.start is not None for r in rows):
        return state, None
    zero = jnp.zeros((1, model.limits["vocab_size"]), jnp.float32)
    return state, jnp.concatenate([r.start.logits if r.start else zero for r in rows] + [zero] * (B - len(rows)))


def ingest(model, rows: list[Row], B: int):
    """Prefill every row's feed (in segments) from its start: (logits [B, V], state of B rows).
    With a prefix cache, a snapshot is kept at every segment boundary inside a prompt."""
    import jax.numpy as jnp

    n = len(rows)
    state, logits = start_batch(model, rows, B)
    seg = model.segment_length(B)
    prompt_buckets = model.manifest.buckets.prompt
    pad = model.manifest.tokens.pad_id or 0
    pos = [0] * n
    first = True
    while True:
        rem = [len(r.feed) - p for r, p in zip(rows, pos)]
        if max(rem) <= 0:
            break
        T = bucket(min(max(rem), seg), prompt_buckets)
        tokens, lengths = pack([r.feed[p:p + T] for r, p in zip(rows, pos)], B, T, pad)
        if first:  # queue decode's compile beside prefill's
            model._prepare_buckets(B, T)
            first = False
        new_logits, state = model.prefill(tokens, lengths, state)
        logits = new_logits if logits is None else jnp.where(jnp.asarray(lengths)[:, None] > 0, new_logits, logits)
        pos = [p + int(k) for p, k in zip(pos, lengths)]
        if model.prefix_cache is not None:
            for i, r in enumerate(rows):
                if lengths[i] and pos[i] < len(r.feed) and r.history is not None:
                    done = len(r.history) - len(r.feed) + pos[i]
                    model.prefix_cache.insert(
                        row_state(model, state, logits, i, r.start_tokens + pos[i], r.history[:done]))
    return logits, state


def run(model, requests: Requests, block: int, want_states: bool) -> Iterator:
    """Prefill, then decode block by block; yields one Generation per decode call."""
    from runtime.engine.model import Generation

    rows = requests.rows
    use_prefix_cache(model, rows)
    n = len(rows)
    B = bucket(n, model.manifest.buckets.batch)
    logits, state = ingest(model, rows, B)
    keys = np.zeros((B, 2), np.uint32)  # [B, 2]; padding rows never draw
    keys[:n] = requests.keys
    settings = requests.settings.padded(B)
    stop = np.full((B, model.limits["max_stop_tokens"]), -1, np.int32)  # [B, S]
    stop[:n] = np.stack([r.stop for r in rows])
    remaining = np.zeros((B,), np.int64)
    remaining[:n] = [r.max_new for r in rows]
    done = np.zeros((B,), np.int64)
    finished = np.arange(B) >= n  # padding rows never run
    generated: list[list[int]] = [[] for _ in range(n)]
    while True:
        active = ~finished & (remaining > 0)
        budget = np.where(active, np.minimum(block, remaining), 0)
        out, counts, state, logits, finished_dev = model.decode(
            state, logits, finished, budget, done, keys, settings, stop)
        out, counts = np.asarray(out), np.asarray(counts)
        finished = np.asarray(finished_dev)
        remaining -= counts
        done += counts
        new = [out[i, :counts[i]].tolist() for i in range(n)]
        for g, t in zip(generated, new):
            g.extend(t)
        last = not (~finished[:n] & (remaining[:n] > 0)).any()
        states = _final_states(model, rows, state, logits, generated, want_states) if last else None
        yield Generation(new, finished[:n].tolist(), states)
        if last:
            return


def _final_states(model, rows, state, logits, generated, want: bool) -> list[State] | None:
    """Each row's State after prompt + new tokens; cached (when the history is known)."""
    if not model.convention.carries_state or (not want and model.prefix_cache is None):
        return None
    out = []
    for i, (r, new) in enumerate(zip(rows, generated)):
        history = None if r.history is None else r.history + tuple(new)
        s = row_state(model, state, logits, i, r.start_tokens + len(r.feed) + len(new), history)
        if model.prefix_cache is not None:
            model.prefix_cache.insert(s)
        out.append(s)
    return out if want else None


def collect(gens: Iterator, n: int) -> list:
    """Generations -> one Completion per row."""
    from runtime.engine.model import Completion

    tokens: list[list[int]] = [[] for _ in range(n)]
    finished, states = [False] * n, None
    for g in gens:
        for t, new in zip(tokens, g.tokens):
            t.extend(new)
        finished, states = g.finished, g.states
    return [Completion(t, "stop" if f else "length", None if states is None else states[i])
            for i, (t, f) in enumerate(zip(tokens, finished))]


def ingest_one(model, prompt, state: State | None) -> State:
    """The State after `prompt`, continuing from `state` (nothing generated)."""
    if not model.convention.carries_state:
        raise RequestError("this artifact cannot return states (semantics 1): re-export it with this mamba2-aot")
    (start,) = _states(model, [state], 1)
    prompt = check_prompt(0, prompt, model.limits, allow_empty=start is not None)
    history = tuple(prompt) if start is None else (start.tokens + tuple(prompt) if start.tokens is not None else None)
    row = Row(list(prompt), start, history, 0, np.zeros((0,), np.int32))
    use_prefix_cache(model, [row])
    B = bucket(1, model.manifest.buckets.batch)
    logits, st = ingest(model, [row], B)
    s = row_state(model, st, logits, 0, row.start_tokens + len(row.feed), history)
    if model.prefix_cache is not None:
        model.prefix_cache.insert(s)
    return s
