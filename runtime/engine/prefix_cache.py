"""An exact prefix-state cache: an LRU of state snapshots keyed by their token histories.

A request whose tokens extend a cached history starts from that state and prefills only the
rest, at any token position (a snapshot is taken wherever a request ends and at every prefill
segment boundary of a long prompt, not on a block grid). A recurrent state cannot be rewound,
so a hit needs the whole cached history to be a prefix of the request. Bounded in bytes; the
least recently used snapshots go first.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence

from runtime.engine.state import State


@dataclasses.dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    tokens_skipped: int = 0
    inserts: int = 0
    evictions: int = 0


class PrefixCache:
    """LRU of States keyed by token history, at most `max_bytes` of them. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.stats = CacheStats()
        self._entries: collections.OrderedDict[tuple[int, ...], State] = collections.OrderedDict()
        self._lengths: collections.Counter[int] = collections.Counter()  # history length -> entries
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, tokens: Sequence[int]) -> State | None:
        """The state of the longest cached history that is a prefix of `tokens` (None: a miss)."""
        tokens = tuple(tokens)
        with self._lock:
            self.stats.lookups += 1
            for n in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
                state = self._entries.get(tokens[:n])
                if state is not None:
                    self._entries.move_to_end(tokens[:n])
                    self.stats.hits += 1
                    self.stats.tokens_skipped += n
                    return state
        return None

    def insert(self, state: State) -> None:
        """Remember a state under its token history (states without one are not cacheable)."""
        if state.tokens is None or not state.tokens or state.nbytes > self.max_bytes:
            return
        key = state.tokens
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = state
            self._lengths[len(key)] += 1
            self._bytes += state.nbytes
            self.stats.inserts += 1
            while self._bytes > self.max_bytes:
                old_key, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self._lengths[len(old_key)] -= 1
                if not self._lengths[len(old_key)]:
                    del self._lengths[len(old_key)]
                self.stats.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self._bytes = 0
