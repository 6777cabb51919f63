"""Validation of generation requests against an artifact's limits, and their padding into buckets.

Every count accepts Python and numpy integers alike; every per-row setting accepts one value for
all rows or a list with one value per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from numbers import Integral

import numpy as np

from runtime.errors import RequestError


def is_int(v) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(v, Integral) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0, top_p 1.0 and min_p 0.0 switch their filter off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def check(self) -> None:
        temperature, top_k, top_p, min_p = (
            _real(name, getattr(self, name)) for name in ("temperature", "top_k", "top_p", "min_p"))
        if not np.isfinite(temperature) or temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not np.isfinite(top_k) or int(top_k) != top_k or not 0 <= top_k < 2**31:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= min_p < 1.0):
            raise RequestError(f"min_p must be in [0, 1), got {self.min_p}")


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """Per-row sampling settings as the decode function takes them (arrays of n rows)."""

    temperature: np.ndarray  # f32[n]
    top_k: np.ndarray  # i32[n]
    top_p: np.ndarray  # f32[n]
    min_p: np.ndarray  # f32[n]

    @classmethod
    def build(cls, n: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> "RowSettings":
        """Each setting: one value for every row, or a list of n; checked as SamplingParams."""
        cols = {name: per_row(name, value, n) for name, value in
                (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p))}
        for i in range(n):
            SamplingParams(*(cols[k][i] for k in ("temperature", "top_k", "top_p", "min_p"))).check()
        return cls(np.asarray(cols["temperature"], np.float32), np.asarray(cols["top_k"], np.int32),
                   np.asarray(cols["top_p"], np.float32), np.asarray(cols["min_p"], np.float32))

    def padded(self, rows: int) -> "RowSettings":
        """The settings for `rows` >= n rows (padding rows greedy, filters off)."""
        n = len(self.temperature)
        fill = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        return RowSettings(**{k: np.concatenate([getattr(self, k), np.full(rows - n, v, getattr(self, k).dtype)])
                              for k, v in fill.items()})

    def uniform(self) -> bool:
        return all(len(set(getattr(self, k).tolist())) <= 1 for k in ("temperature", "top_k", "top_p", "min_p"))


def per_row(name: str, value, n: int) -> list:
    """`value` for each of n rows: a scalar repeated (its own check judges it), or a list of n."""
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        values = list(value)
        if len(values) != n:
            raise RequestError(f"{name} has {len(values)} values for {n} prompts: give one, or one per prompt")
        return values
    return [value] * n


def _real(name: str, value) -> float:
    """`value` as a float, or RequestError naming the parameter (strings, None, bools, ...)."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise RequestError(f"{name} must be a number, got {value!r:.60}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{name} must be a number, got {value!r:.60}") from None


def check_prompt(i: int, p, limits: dict, allow_empty: bool = False) -> list[int]:
    """One prompt: a list of token ids inside the vocabulary and the per-request limit."""
    if isinstance(p, (str, bytes)):
        raise RequestError(f"prompt {i} is not a list of integer token ids")
    try:
        row = [int(t) for t in p]
        integral = all(int(t) == t for t in p)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"prompt {i} is not a list of integer token ids") from None
    if not integral or any(isinstance(t, bool) for t in p):
        raise RequestError(f"prompt {i} has non-integer token ids")
    if not row and not allow_empty:
        raise RequestError(f"prompt {i} is empty: give at least one token")
    if len(row) > limits["max_prompt_tokens"]:
        raise RequestError(f"prompt {i} has {len(row)} tokens, over the artifact's limit of "
                           f"{limits['max_prompt_tokens']}: re-export with --max-prompt-tokens")
    vocab = limits["vocab_size"]
    bad = [t for t in row if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    return row


def check_prompts(prompts, limits: dict, allow_empty: Sequence[bool] | None = None) -> list[list[int]]:
    """A non-empty ragged list of token-id lists inside the artifact's limits (a row may be empty
    where allow_empty says so: it continues from a state)."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:  # a rectangular batch
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise RequestError("prompts must be a non-empty list of token-id lists")
    if len(prompts) > limits["max_batch"]:
        raise RequestError(f"batch of {len(prompts)} prompts is over the artifact's limit of "
                           f"{limits['max_batch']}: split it or re-export with --max-batch")
    return [check_prompt(i, p, limits, bool(allow_empty and allow_empty[i])) for i, p in enumerate(prompts)]


def check_new_tokens(n, limits: dict, what: str = "max_new_tokens") -> int:
    cap = limits["max_new_tokens"]
    if not is_int(n) or not 1 <= int(n) <= cap:
        raise RequestError(f"{what} must be in [1, {cap}] (the artifact's cap), got {n!r:.40}")
    return int(n)


def check_stop_ids(stop, limits: dict) -> np.ndarray:
    """Stop ids padded with -1 to the artifact's fixed number of slots: int32[S]."""
    if stop is None:
        stop = []
    if isinstance(stop, (str, bytes)) or not isinstance(stop, (Sequence, np.ndarray)) \
            or not all(is_int(s) for s in stop):
        raise RequestError(f"stop must be a list of integer token ids, got {stop!r:.60}")
    stop = [int(s) for s in stop]
    slots = limits["max_stop_tokens"]
    if len(stop) > slots:
        raise RequestError(f"{len(stop)} stop tokens, over the artifact's limit of {slots}")
    bad = [s for s in stop if not 0 <= s < limits["vocab_size"]]
    if bad:
        raise RequestError(f"stop token {bad[0]} is outside the vocabulary [0, {limits['vocab_size']})")
    return np.array(stop + [-1] * (slots - len(stop)), np.int32)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (requests were checked against the limits first)."""
    for b in buckets:
        if b >= n:
            return b
    return n


def pack(chunks: list[list[int]], B: int, T: int, pad: int = 0):
    """Each row's tokens for one prefill call (at most T each), right-padded:
    (tokens int32[B, T], lengths int32[B]); rows beyond len(chunks) have length 0."""
    tokens = np.full((B, T), pad, np.int32)  # [B, T]
    lengths = np.zeros((B,), np.int32)
    for i, chunk in enumerate(chunks):
        tokens[i, :len(chunk)] = chunk
        lengths[i] = len(chunk)
    return tokens, lengths


def pad_batch(prompts: list[list[int]], buckets: dict, pad_id: int = 0):
    """Right-pad into tokens int32[B, T] and lengths int32[B] (padding rows have length 0)."""
    B = bucket(len(prompts), buckets["batch"])
    return pack(prompts, B, bucket(max(len(p) for p in prompts), buckets["prompt"]), pad_id)
