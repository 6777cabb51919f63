"""Validation of generation requests against an artifact's limits, and their padding into buckets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from runtime.errors import RequestError


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


def _real(name: str, value) -> float:
    """`value` as a float, or RequestError naming the parameter (strings, None, ...)."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{name} must be a number, got {value!r:.60}") from None


def check_prompts(prompts, limits: dict) -> list[list[int]]:
    """A non-empty ragged list of non-empty token-id lists, inside the artifact's limits."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:  # a rectangular batch
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise RequestError("prompts must be a non-empty list of token-id lists")
    if len(prompts) > limits["max_batch"]:
        raise RequestError(f"batch of {len(prompts)} prompts is over the artifact's limit of "
                           f"{limits['max_batch']}: split it or re-export with --max-batch")
    vocab = limits["vocab_size"]
    out = []
    for i, p in enumerate(prompts):
        try:
            row = [int(t) for t in p]
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"prompt {i} is not a list of integer token ids") from None
        if any(int(t) != t for t in p):
            raise RequestError(f"prompt {i} has non-integer token ids")
        if not row:
            raise RequestError(f"prompt {i} is empty: give at least one token")
        if len(row) > limits["max_prompt_tokens"]:
            raise RequestError(f"prompt {i} has {len(row)} tokens, over the artifact's limit of "
                               f"{limits['max_prompt_tokens']}: re-export with --max-prompt-tokens")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        out.append(row)
    return out


def check_new_tokens(n, limits: dict) -> int:
    cap = limits["max_new_tokens"]
    try:
        ok = not isinstance(n, bool) and int(n) == n and 1 <= n <= cap
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise RequestError(f"max_new_tokens must be in [1, {cap}] (the artifact's cap), got {n}")
    return int(n)


def check_stop_ids(stop, limits: dict) -> np.ndarray:
    """Stop ids padded with -1 to the artifact's fixed number of slots."""
    try:
        stop = [] if stop is None else [int(s) for s in stop]
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"stop must be a list of integer token ids, got {stop!r:.60}") from None
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


def pad_batch(prompts: list[list[int]], buckets: dict, pad_id: int = 0):
    """Right-pad into tokens int32[B, T] and lengths int32[B] (padding rows have length 0)."""
    B = bucket(len(prompts), buckets["batch"])
    T = bucket(max(len(p) for p in prompts), buckets["prompt"])
    tokens = np.full((B, T), pad_id, np.int32)  # [B, T]
    lengths = np.zeros((B,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    return tokens, lengths
