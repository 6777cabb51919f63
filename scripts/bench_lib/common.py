"""Timing, statistics, progress lines and the model's byte and FLOP accounting."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable

# Wall clock of the orchestrating process's start, inherited by the workers so that every
# progress line shows time since the benchmark began.
_T0 = float(os.environ.get("MAMBA2_BENCH_T0", time.time()))


def log(msg: str, who: str = "bench") -> None:
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    print(f"[{stamp} +{now - _T0:7.1f}s] {who}: {msg}", flush=True)


def stats(times: list[float]) -> dict:
    """Raw seconds plus their median, min and max."""
    return {"times_s": [round(t, 6) for t in times], "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times)}


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """`fn` (which must block until its work is done) run `warmup` times, then timed `repeats`
    times with time.perf_counter(). Returns stats() plus the first warm-up call's seconds."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        if first is None:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    out = stats(times)
    out["warmup_s"] = first
    return out


def prompt_tokens(vocab: int, batch: int, length: int, seed: int):
    """The same seeded random prompt ids for every system (ids 1..vocab-1; 0 is pad/eos)."""
    import numpy as np

    rng = np.random.default_rng([seed, batch, length])
    return rng.integers(1, vocab, size=(batch, length), dtype=np.int64).astype(np.int32)


def model_accounting(cfg: dict) -> dict:
    """Parameter counts and the bytes a decode step must move (float32 weights and state)."""
    d, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    inter = cfg["expand"] * d
    heads, hd, N, G, K = cfg["num_heads"], cfg["head_dim"], cfg["state_size"], cfg["n_groups"], cfg["conv_kernel"]
    conv_dim = inter + 2 * G * N
    in_proj = inter + conv_dim + heads
    per_layer = (
        d  # block norm
        + in_proj * d + (in_proj if cfg["use_bias"] else 0)
        + conv_dim * K + (conv_dim if cfg["use_conv_bias"] else 0)
        + 3 * heads  # dt_bias, A_log, D
        + inter  # gated norm
        + d * inter + (d if cfg["use_bias"] else 0)
    )
    embedding = V * d
    lm_head = 0 if cfg["tie_word_embeddings"] else V * d
    total = embedding + lm_head + L * per_layer + d  # + norm_f
    # Matmul weights a prefill token multiplies through (the lm_head runs on the last token only).
    gemm_per_token = L * (in_proj * d + d * inter)
    ssm_bytes = L * heads * hd * N * 4
    conv_bytes = L * (K - 1) * conv_dim * 4
    return {
        "params_total": total,
        "params_embedding": embedding,
        "params_non_embedding": total - embedding - lm_head,
        "weight_bytes": 4 * total,
        "state_bytes_per_row": ssm_bytes + conv_bytes,
        "state_ssm_bytes_per_row": ssm_bytes,
        "state_conv_bytes_per_row": conv_bytes,
        "gemm_weights_per_token": gemm_per_token,
    }


def decode_ceiling_tok_s(acct: dict, batch: int, bandwidth_gb_s: float) -> float:
    """Tokens/s if a decode step only streamed the weights once and each row's state in and out."""
    step_bytes = acct["weight_bytes"] + batch * acct["state_bytes_per_row"] * 2
    return batch / (step_bytes / (bandwidth_gb_s * 1e9))


def prefill_ceiling_tok_s(acct: dict, gemm_gflop_s: float) -> float:
    """Tokens/s if prefill ran at the GEMM peak: 2 x non-embedding params FLOPs per token."""
    return gemm_gflop_s * 1e9 / (2 * acct["params_non_embedding"])


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def eprint(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def versions(dists: tuple[str, ...]) -> dict:
    """Installed versions of `dists` (None when absent) and the repository's git commit."""
    import subprocess
    from importlib import metadata
    from pathlib import Path

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def token_clock():
    """A transformers streamer that timestamps every `put`: first the prompt, then each new token
    as `generate` emits it (`.t`, perf_counter seconds)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    return Clock()
