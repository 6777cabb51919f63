"""Continuous batching (runtime.serve.scheduler) without HTTP: every sequence equals its solo
run whatever runs beside it, long prompts go in chunk by chunk between decode blocks,
cancellation and timeouts free slots, failures stay with their sequences, the queue is bounded.
The reference is `model.generate` on the same artifact, one request alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import runtime
from fixtures_artifacts import aot_cache_env  # noqa: F401
from fixtures_serve import CHUNK, SEGMENT, SLOTS, Proxy, serve_art  # noqa: F401
from runtime.engine.generation import validate
from runtime.serve.scheduler import QueueFull, Scheduler, Sequence

V = 96


@pytest.fixture(scope="module")
def model(serve_art):
    return runtime.load(serve_art.path, serve_art.weights)


class Seen:
    """One sequence's updates, collected on the scheduler thread."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finish = self.error = None
        self.updates = 0
        self.done = threading.Event()

    def __call__(self, update) -> None:
        self.tokens += update.tokens
        self.updates += 1
        if update.finish_reason or update.error:
            self.finish, self.error = update.finish_reason, update.error
            self.done.set()


def sequences(model, prompt, n=1, max_new=8, **kw) -> tuple[list[Sequence], list[Seen]]:
    """A request's choices as the server builds them: validate([prompt] * n, ...)."""
    req = validate(model, [prompt] * n, max_new, **kw)
    seen = [Seen() for _ in range(n)]
    s = req.settings
    seqs = [Sequence(row, (float(s.temperature[j]), int(s.top_k[j]), float(s.top_p[j]), float(s.min_p[j])),
                     req.keys[j], seen[j]) for j, row in enumerate(req.rows)]
    return seqs, seen


@pytest.fixture
def scheduler(model):
    made = []

    def make(m=None, slots=SLOTS, block=2, chunk=CHUNK, max_queue=64, start=True):
        s = Scheduler(m or model, slots, block, chunk, max_queue)
        if start:
            s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
        assert s._thread is None or not s._thread.is_alive()


def wait(seen: list[Seen], timeout: float = 60) -> None:
    for s in seen:
        assert s.done.wait(timeout), "a sequence did not finish"


def mixed_requests(rng) -> list[tuple[list[int], int, int, dict]]:
    """(prompt, n, max_new, settings): lengths across chunks and segments, every sampler."""
    settings = [dict(), dict(temperature=0.8, seed=11), dict(temperature=1.0, top_k=5, seed=12),
                dict(temperature=0.7, top_p=0.9, seed=13), dict(temperature=1.2, min_p=0.1, seed=14),
                dict(stop=[int(rng.integers(1, V))]), dict(ignore_eos=True), dict(temperature=0.9, seed=2**40 + 5)]
    out = []
    for i in range(20):
        length = int(rng.choice([1, 5, 17, 33, 70, 150]))
        prompt = rng.integers(1, V, length).tolist()
        out.append((prompt, int(rng.choice([1, 1, 2])), int(rng.integers(1, 40)), settings[i % len(settings)]))
    return out


def test_concurrent_sequences_equal_their_solo_runs(model, scheduler):
    rng = np.random.default_rng(0)
    requests = mixed_requests(rng)
    sched = scheduler()
    all_seen = []
    for i, (prompt, n, max_new, kw) in enumerate(requests):
        seqs, seen = sequences(model, prompt, n, max_new, **kw)
        sched.submit(seqs)
        all_seen.append(seen)
        if i == 10:  # the rest join while the first ones decode
            all_seen[0][0].done.wait(30)
    for (prompt, n, max_new, kw), seen in zip(requests, all_seen):
        wait(seen)
        solo = model.complete([prompt] * n, max_new, **kw)
        assert [s.tokens for s in seen] == [c.tokens for c in solo], (prompt, n, max_new, kw)
        assert [s.finish for s in seen] == [c.finish_reason for c in solo]
    assert sched.busy == 0 and sched.queued == 0 and sched.idle()


def test_a_long_prompt_goes_in_chunk_by_chunk_between_decode_blocks(model, scheduler):
    sched = scheduler(block=1)
    runner, r_seen = sequences(model, [1, 2, 3], 1, 2000, ignore_eos=True)
    sched.submit(runner)
    while r_seen[0].updates < 3:
        threading.Event().wait(0.001)
    long_prompt = np.random.default_rng(1).integers(1, V, 200).tolist()
    seqs, seen = sequences(model, long_prompt, 1, 4, ignore_eos=True)
    before = r_seen[0].updates
    sched.submit(seqs)
    seen[0].done.wait(30)
    during = r_seen[0].updates - before
    sched.cancel(runner[0])
    # 200 tokens in calls of SEGMENT (alone, B x T within CHUNK): a block after each call.
    assert during >= -(-200 // SEGMENT) - 1, during
    assert seen[0].tokens == model.generate([long_prompt], 4, ignore_eos=True)[0]


def test_cancel_frees_the_slot_before_the_next_block(model, scheduler):
    sched = scheduler(slots=1)
    seqs, seen = sequences(model, [4, 5], 1, 8000, ignore_eos=True)
    sched.submit(seqs)
    while not seen[0].updates:
        threading.Event().wait(0.001)
    nxt, nxt_seen = sequences(model, [6, 7], 1, 5)
    sched.submit(nxt)  # queued behind the long one (one slot)
    sched.cancel(seqs[0])
    wait(nxt_seen)
    assert not seen[0].done.is_set() and len(seen[0].tokens) < 8000  # no update after the cancel
    assert nxt_seen[0].tokens == model.generate([[6, 7]], 5)[0]
    assert sched.busy == 0


def test_timeouts_free_slots_and_queue_places(model, scheduler):
    sched = scheduler(slots=1)
    running, r_seen = sequences(model, [4, 5], 1, 8000, ignore_eos=True)
    queued, q_seen = sequences(model, [6], 1, 4)
    sched.submit(running + queued)
    while not r_seen[0].updates:
        threading.Event().wait(0.001)
    running[0].deadline = queued[0].deadline = 0.0  # long past, both: one in its slot, one waiting
    wait(r_seen + q_seen)
    assert r_seen[0].error == q_seen[0].error == "timeout"
    assert sched.busy == 0 and sched.queued == 0


def test_an_internal_error_fails_only_the_sequences_it_touched(model, scheduler):
    proxy = Proxy(model)
    proxy.fail_prefill = lambda tokens: bool((np.asarray(tokens) == 95).any())
    sched = scheduler(proxy)
    bad, bad_seen = sequences(model, [95, 1], 1, 4)
    sched.submit(bad)
    wait(bad_seen)
    assert bad_seen[0].error == "internal" and sched.busy == 0
    good, good_seen = sequences(model, [1, 2, 3], 2, 6, temperature=0.9, seed=3)
    sched.submit(good)
    wait(good_seen)
    assert [s.tokens for s in good_seen] == model.generate([[1, 2, 3]] * 2, 6, temperature=0.9, seed=3)
    # A decode failure ends the sequences decoding then; the next ones run normally.
    fail = iter([True])
    proxy.fail_decode = lambda: next(fail, False)
    hit, hit_seen = sequences(model, [9], 1, 6)
    sched.submit(hit)
    wait(hit_seen)
    assert hit_seen[0].error == "internal"
    after, after_seen = sequences(model, [9], 1, 6)
    sched.submit(after)
    wait(after_seen)
    assert after_seen[0].tokens == model.generate([[9]], 6)[0] and sched.busy == 0
    # A failure that also loses the slots' buffers (as a donated call would): a fresh pool.
    def lose():
        sched.pool.logits.delete()
        return True
    failures = iter([lose])
    proxy.fail_decode = lambda: next(failures, lambda: False)()
    lost, lost_seen = sequences(model, [9], 1, 6)
    sched.submit(lost)
    wait(lost_seen)
    assert lost_seen[0].error == "internal"
    again, again_seen = sequences(model, [8, 7], 1, 6, temperature=0.6, seed=1)
    sched.submit(again)
    wait(again_seen)
    assert again_seen[0].tokens == model.generate([[8, 7]], 6, temperature=0.6, seed=1)[0]
    assert sched.pool.intact()


def test_the_queue_is_bounded(model, scheduler):
    sched = scheduler(slots=2, max_queue=2, start=False)  # nothing is admitted: all wait
    sched.submit(sequences(model, [1], 3)[0])  # 2 into free slots, 1 waits
    sched.submit(sequences(model, [2], 1)[0])  # 2 wait
    with pytest.raises(QueueFull):
        sched.submit(sequences(model, [3], 1)[0])
    assert sched.queued == 4


def test_busy_slots_are_kept_low_so_the_batch_shrinks(model, scheduler):
    proxy = Proxy(model)
    sched = scheduler(proxy, slots=4, block=1)
    long = [sequences(model, [i + 1], 1, 8000, ignore_eos=True) for i in range(3)]
    for seqs, _ in long:
        sched.submit(seqs)
    for _, seen in long:
        while not seen[0].updates:
            threading.Event().wait(0.001)
    sched.cancel(long[0][0][0])
    sched.cancel(long[1][0][0])
    keep, keep_seen = long[2]
    while sched.busy > 1:
        threading.Event().wait(0.001)
    proxy.decode_batches.clear()
    while len(proxy.decode_batches) < 3:
        threading.Event().wait(0.001)
    assert keep[0].slot == 0 and set(proxy.decode_batches) == {1}  # moved from slot 2: batch 1, not 4
    sched.cancel(keep[0])
    while sched.busy:
        threading.Event().wait(0.001)
    # Its tokens so far are still those it makes alone (the state moved with it).
    got = keep_seen[0].tokens
    assert got == model.generate([[3]], len(got), ignore_eos=True)[0]


def test_finished_states_go_to_the_prefix_cache(serve_art, scheduler, model):
    cached = runtime.load(serve_art.path, serve_art.weights, prefix_cache_mb=4)
    sched = scheduler(cached)
    prompt = np.random.default_rng(2).integers(1, V, 45).tolist()
    first, seen = sequences(cached, prompt, 1, 7, ignore_eos=True)
    sched.submit(first)
    wait(seen)
    follow = prompt + seen[0].tokens + [5, 6]
    second, seen2 = sequences(cached, follow, 1, 7, temperature=0.8, seed=4)
    sched.submit(second)
    wait(seen2)
    stats = cached.prefix_cache.stats
    assert stats.hits == 1 and stats.tokens_skipped == len(prompt) + 7
    assert seen2[0].tokens == model.generate([follow], 7, temperature=0.8, seed=4)[0]
