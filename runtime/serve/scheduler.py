"""Continuous batching over state slots: one thread, no HTTP, no model code.

Each turn of the loop:
  1. free the slots of cancelled and timed-out sequences (a sequence that got past its prompt
     leaves its final State in the prefix cache, history = prompt + every token it decoded);
  2. admit queued sequences into free slots (lowest first), each starting from the longest
     prefix-cache hit for its prompt;
  3. one admission prefill call: every admitted sequence whose prompt is not fully in advances by
     up to T tokens (B x T within --prefill-chunk), so a long prompt goes in chunk by chunk
     between decode blocks while the running sequences keep decoding; sequences whose prompt is
     in are written into their slots;
  4. one decode block of up to K tokens (--block) for every decoding slot, each with its own
     budget, step count, key, sampling settings and stop ids (other slots frozen), on the smallest
     batch bucket that covers them (busy slots are kept low); a block of one token while a
     sequence waits for its first;
  5. hand each sequence its new tokens and free the slots of finished ones.
Rows never influence each other, so a sequence's tokens are those it gets alone.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from runtime.engine.generation import Row, row_state, start_batch, use_prefix_cache, validate
from runtime.engine.requests import RowSettings, bucket, pack
from runtime.serve.slots import SlotPool

log = logging.getLogger("mamba2_aot.serve")


@dataclasses.dataclass
class Update:
    """What one turn did for a sequence: its new tokens, and how it ended (if it did)."""

    tokens: list[int]
    finish_reason: str | None = None  # "stop" (a stop id) | "length" (its budget)
    error: str | None = None  # "timeout" | "aborted" | "internal": ended without finishing
    message: str = ""


class QueueFull(Exception):
    """More sequences would wait for a slot than --max-queue allows."""


class Sequence:
    """One choice of one prompt: an engine Row (prompt, budget, stop ids) with its sampling
    settings and key. `emit(update)` is called on the scheduler thread."""

    def __init__(self, row: Row, sampling: tuple[float, int, float, float], key: np.ndarray,
                 emit: Callable[[Update], None], deadline: float | None = None):
        self.row = row
        self.prompt: tuple[int, ...] = tuple(row.history)
        self.sampling = sampling  # (temperature, top_k, top_p, min_p)
        self.key = np.asarray(key, np.uint32)  # [2]
        self.emit = emit
        self.deadline = deadline  # time.monotonic() limit, or None
        self.slot: int | None = None
        self.phase = "queued"  # -> "prefill" -> "decode" -> "done"
        self.generated: list[int] = []
        self.cacheable = True  # looks up and leaves its final State in the prefix cache


class Scheduler:
    """A fixed pool of `slots` sequences decoding together, fed from a FIFO queue."""

    def __init__(self, model, slots: int, block: int, prefill_chunk: int = 1024, max_queue: int = 256):
        self.model = model
        self.n = slots
        self.block = block
        self.max_queue = max_queue
        buckets = model.manifest.buckets
        self._batch_buckets = [b for b in buckets.batch if b <= slots]
        self._prompt_buckets = list(buckets.prompt)
        self._tcap = {B: self._chunk_length(B, prefill_chunk) for B in self._batch_buckets}
        self._pad = model.manifest.tokens.pad_id or 0
        self._snapshot_every = model.segment_length(1)
        self.pool = SlotPool(model, slots)
        S = model.limits["max_stop_tokens"]
        # Per-slot decode controls (host side; a free slot is finished with budget 0: frozen).
        self._remaining = np.zeros((slots,), np.int64)
        self._done = np.zeros((slots,), np.int64)  # tokens made so far: the step count of its keys
        self._keys = np.zeros((slots, 2), np.uint32)
        self._temperature = np.zeros((slots,), np.float32)
        self._top_k = np.zeros((slots,), np.int32)
        self._top_p = np.ones((slots,), np.float32)
        self._min_p = np.zeros((slots,), np.float32)
        self._stop = np.full((slots, S), -1, np.int32)
        self._occupant: list[Sequence | None] = [None] * slots
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._prefilling: list[Sequence] = []  # admitted, prompt not fully in (admission order)
        self._cond = threading.Condition()
        self._queue: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[Sequence] = set()
        self._abort: str | None = None
        self._stopping = False
        self._busy = 0
        self._thread: threading.Thread | None = None

    # -- shapes the loop uses (compiled before the server says it is ready) -------------------
    def _chunk_length(self, B: int, chunk: int) -> int:
        """The longest prefill call for a cohort of B rows: a prompt bucket within the batch's
        segment with B x T <= chunk (never below the smallest bucket)."""
        seg = self.model.segment_length(B)
        fits = [T for T in self._prompt_buckets if T <= seg and B * T <= chunk]
        return fits[-1] if fits else self._prompt_buckets[0]

    def prefill_shapes(self) -> list[tuple[int, int]]:
        return [(B, T) for B in self._batch_buckets for T in self._prompt_buckets if T <= self._tcap[B]]

    def decode_batches(self) -> list[int]:
        return list(self._batch_buckets)

    def warm_up(self) -> None:
        """Before serving (the loop not started): 1, 2, ..., N one-token sequences at a time
        through validation, admission and a decode block, so the small array programs those
        paths use (one per row count or batch bucket) compile now rather than on the first
        requests. Leaves the slots empty and the prefix cache untouched."""
        for count in range(1, self.n + 1):
            req = validate(self.model, [[self._pad]] * count, 1, temperature=1.0, seed=0, ignore_eos=True)
            seqs = []
            for row, key in zip(req.rows, req.keys):
                seq = Sequence(row, (1.0, 0, 1.0, 0.0), key, lambda update: None)
                seq.cacheable = False
                seqs.append(seq)
            with self._cond:
                self._queue.extend(seqs)
                admitted = self._take_queue()
            self._turn(None, [], set(), admitted)

    # -- called from other threads -----------------------------------------------------------
    @property
    def busy(self) -> int:
        """Slots held by a sequence (prefilling or decoding)."""
        return self._busy

    @property
    def queued(self) -> int:
        return len(self._queue)

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._busy == 0

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when more than max_queue would wait."""
        with self._cond:
            waiting = len(self._queue) + len(seqs) - (self.n - self._busy)
            if waiting > self.max_queue:
                raise QueueFull(f"{len(self._queue)} sequences wait for {self.n} slots")
            self._queue.extend(seqs)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence: its slot is free before the next decode block; no more updates."""
        with self._cond:
            if seq.phase == "queued" and seq in self._queue:
                self._queue.remove(seq)
                seq.phase = "done"
            elif seq.phase != "done":
                self._cancelled.add(seq)
                self._cond.notify()

    def abort_all(self, message: str) -> None:
        """End every queued and running sequence with an "aborted" update."""
        with self._cond:
            self._abort = message
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mamba2-aot-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop (sequences still there are aborted) and join its thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._abort or self._cancelled or self._prefilling
                           or (self._queue and self._free) or self._decoding()):
                    self._cond.wait()
                if self._stopping:
                    break
                abort, self._abort = self._abort, None
                cancelled, self._cancelled = self._cancelled, set()
                expired = self._expire_queued(time.monotonic())
                admitted = self._take_queue()
                dropped = list(self._queue) if abort else []
                if abort:
                    self._queue.clear()
            for seq in expired:
                self._emit(seq, Update([], error="timeout", message="the request timed out in the queue"))
            try:
                self._turn(abort, dropped, cancelled, admitted)
            except Exception:  # noqa: BLE001 - a bug must not stop the server: fail what is in flight
                log.exception("scheduler turn failed; ending the sequences in flight")
                self._fail_all("internal", "internal error while generating")
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for seq in left:
            self._emit(seq, Update([], error="aborted", message="the server stopped"))
        self._fail_all("aborted", "the server stopped")

    def _decoding(self) -> bool:
        return any(s is not None and s.phase == "decode" for s in self._occupant)

    def _turn(self, abort: str | None, dropped: list[Sequence], cancelled: set[Sequence],
              admitted: list[Sequence]) -> None:
        if abort:
            for seq in dropped:
                seq.phase = "done"
                self._emit(seq, Update([], error="aborted", message=abort))
            self._fail_all("aborted", abort)
            return
        for seq in cancelled:
            if seq.slot is not None:
                self._release(seq)
        now = time.monotonic()
        for seq in [s for s in self._occupant if s is not None and s.deadline is not None and s.deadline < now]:
            self._release(seq, Update([], error="timeout", message="the request timed out"), keep_state=False)
        self._admit(admitted)
        if self._prefilling:
            cohort = list(self._prefilling)
            try:
                self._prefill(cohort)
            except Exception:  # noqa: BLE001 - fail these sequences only
                log.exception("admission prefill failed")
                for seq in cohort:
                    if seq.slot is not None:
                        self._release(seq, Update([], error="internal", message="internal error in prefill"),
                                      keep_state=False)
                self._check_pool()
        self._compact()
        if self._decoding():
            self._decode()

    def _expire_queued(self, now: float) -> list[Sequence]:
        """(Lock held.) Queued sequences past their deadline, taken out of the queue."""
        expired = [s for s in self._queue if s.deadline is not None and s.deadline < now]
        for seq in expired:
            self._queue.remove(seq)
            seq.phase = "done"
        return expired

    def _take_queue(self) -> list[Sequence]:
        """(Lock held.) Queued sequences into free slots, lowest slot first."""
        out = []
        while self._queue and self._free:
            seq = self._queue.popleft()
            seq.slot = heapq.heappop(self._free)
            seq.phase = "prefill"
            self._occupant[seq.slot] = seq
            self._busy += 1
            out.append(seq)
        return out

    def _admit(self, admitted: list[Sequence]) -> None:
        """Set each admitted slot's controls; a prompt fully in the prefix cache goes straight in."""
        ready = []
        for seq in admitted:
            i = seq.slot
            self._remaining[i] = seq.row.max_new
            self._done[i] = 0
            self._keys[i] = seq.key
            self._temperature[i], self._top_k[i], self._top_p[i], self._min_p[i] = seq.sampling
            self._stop[i] = seq.row.stop
            if seq.cacheable:
                use_prefix_cache(self.model, [seq.row])
            (self._prefilling if seq.row.feed else ready).append(seq)
        self._enter(ready)

    def _prefill(self, cohort: list[Sequence]) -> None:
        """One prefill call: each cohort row advances by up to T tokens of its prompt."""
        B = bucket(len(cohort), self._batch_buckets)
        rows = [s.row for s in cohort]
        T = bucket(min(max(len(r.feed) for r in rows), self._tcap[B]), self._prompt_buckets)
        state, _ = start_batch(self.model, rows, B)
        tokens, lengths = pack([r.feed[:T] for r in rows], B, T, self._pad)  # [B, T], [B]
        logits, state = self.model.prefill(tokens, lengths, state)  # [B, V], B rows
        cache, every = self.model.prefix_cache, self._snapshot_every
        ready = []
        for i, seq in enumerate(cohort):
            r, k = seq.row, int(lengths[i])
            before, now = r.start_tokens, r.start_tokens + k
            r.feed = r.feed[k:]
            r.start = row_state(self.model, state, logits, i, now, seq.prompt[:now])
            if not r.feed:
                ready.append(seq)
            elif cache is not None and before // every != now // every:
                cache.insert(r.start)  # a snapshot inside a long prompt, as the engine keeps one
        self._prefilling = [s for s in self._prefilling if s.row.feed]
        self._enter(ready)

    def _enter(self, ready: list[Sequence]) -> None:
        """Sequences whose prompt is in: their start State into their slots; they decode next."""
        if not ready:
            return
        self.pool.write([s.row.start for s in ready], [s.slot for s in ready])
        for seq in ready:
            seq.row.start = None
            seq.phase = "decode"

    def _compact(self) -> None:
        """Move sequences out of high slots into free low ones so the decode batch stays the
        smallest bucket that holds them all."""
        busy = [i for i, s in enumerate(self._occupant) if s is not None]
        if not busy:
            return
        need = bucket(len(busy), self._batch_buckets)
        for src in sorted((i for i in busy if i >= need), reverse=True):
            dst = heapq.heappop(self._free)
            seq = self._occupant[src]
            if seq.phase == "decode":
                self.pool.move(src, dst)
            for a in (self._remaining, self._done, self._keys, self._temperature, self._top_k, self._top_p,
                      self._min_p, self._stop):
                a[dst] = a[src]
            self._occupant[dst], self._occupant[src] = seq, None
            seq.slot = dst
            self._clear(src)
            heapq.heappush(self._free, src)

    def _decode(self) -> None:
        active = [i for i, s in enumerate(self._occupant) if s is not None and s.phase == "decode"]
        B = bucket(max(active) + 1, self._batch_buckets)
        finished = np.ones((B,), bool)
        finished[active] = False
        budget = np.zeros((B,), np.int32)
        # A sequence that has no token yet gets its first one right after its prefill: the whole
        # batch runs a one-token block, then full blocks again (time to first token = prefill + 1 step).
        fresh = any(self._done[i] == 0 for i in active)
        budget[active] = np.minimum(1 if fresh else self.block, self._remaining[active])
        settings = RowSettings(self._temperature[:B].copy(), self._top_k[:B].copy(), self._top_p[:B].copy(),
                               self._min_p[:B].copy())
        try:
            out, counts, fin = self.pool.decode(B, finished, budget, self._done[:B].astype(np.int32),
                                                self._keys[:B].copy(), settings, self._stop[:B].copy())
        except Exception:  # noqa: BLE001 - fail the decoding sequences only
            log.exception("decode block failed")
            for i in active:
                self._release(self._occupant[i], Update([], error="internal", message="internal error in decode"),
                              keep_state=False)
            self._check_pool()
            return
        for i in active:
            seq, c = self._occupant[i], int(counts[i])
            new = out[i, :c].tolist()
            seq.generated.extend(new)
            self._done[i] += c
            self._remaining[i] -= c
            reason = "stop" if fin[i] else "length" if self._remaining[i] <= 0 else None
            if reason is None:
                self._emit(seq, Update(new))
            else:
                self._release(seq, Update(new, reason))

    # -- slots -------------------------------------------------------------------------------
    def _release(self, seq: Sequence, update: Update | None = None, keep_state: bool = True) -> None:
        """Free the sequence's slot (its final State into the prefix cache), then send `update`."""
        i = seq.slot
        cache = self.model.prefix_cache
        if keep_state and seq.cacheable and cache is not None and seq.phase == "decode":
            cache.insert(self.pool.read(i, seq.prompt + tuple(seq.generated)))
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        self._occupant[i] = None
        self._clear(i)
        seq.slot, seq.phase, seq.row.start = None, "done", None
        with self._cond:
            heapq.heappush(self._free, i)
            self._busy -= 1
        if update is not None:
            self._emit(seq, update)

    def _clear(self, i: int) -> None:
        self._remaining[i] = self._done[i] = 0
        self._keys[i] = 0
        self._temperature[i], self._top_k[i], self._top_p[i], self._min_p[i] = 0.0, 0, 1.0, 0.0
        self._stop[i] = -1

    def _check_pool(self) -> None:
        """After a failed call: if it left the slots' buffers deleted, end every sequence in a
        slot and start a fresh pool."""
        if not self.pool.intact():
            self._fail_all("internal", "internal error: the decode batch was lost")

    def _fail_all(self, error: str, message: str) -> None:
        """End every sequence holding a slot (after a failure that may have touched the pool)."""
        for seq in [s for s in self._occupant if s is not None]:
            self._release(seq, Update([], error=error, message=message), keep_state=False)
        self._prefilling.clear()
        if error == "internal":
            self.pool = SlotPool(self.model, self.n)  # its buffers may have been donated mid-call

    @staticmethod
    def _emit(seq: Sequence, update: Update) -> None:
        try:
            seq.emit(update)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the loop
            log.exception("delivering an update failed")
