"""Sampling inside the decode loop: greedy, temperature, top-k, top-p, min-p and seeds.

Two levels: `exporter.sampling.sample` jitted on random logits (many keys per row, hypothesis
over settings), and end to end through the exported artifact, one decode call per token so the
logits each token was drawn from can be checked (`fixtures_artifacts.step_by_step`).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.sampling import RNG_IMPL, TOP_K_CAP, needs_sort, sample
from fixtures_artifacts import (PROMPTS, aot_cache_env, last_json, run_python, step_by_step,  # noqa: F401
                                subprocess_env, tiny)

ROWS, DRAWS, V = 4, 256, 64  # live checks: ROWS logit rows, each sampled with DRAWS keys
HYP = settings(max_examples=12, deadline=None, derandomize=True)
_sample = jax.jit(sample)


def draw(logits: np.ndarray, seed: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
         draws: int = DRAWS) -> np.ndarray:
    """tokens [rows, draws]: each logit row sampled with `draws` different keys (one jitted call).
    Settings: one value for every row, or one per row."""
    rows = logits.shape[0]
    tiled = np.repeat(np.asarray(logits, np.float32), draws, axis=0)  # [rows * draws, V]
    keys = jax.random.split(jax.random.key(seed, impl=RNG_IMPL), rows * draws)
    per = lambda v, dt: np.repeat(np.broadcast_to(np.asarray(v, dt), (rows,)), draws)  # noqa: E731
    t, k, p, m = per(temperature, np.float32), per(top_k, np.int32), per(top_p, np.float32), per(min_p, np.float32)
    out = _sample(tiled, keys, t, k, p, m, needs_sort(k, p), np.any(k > 0))
    return np.asarray(out).reshape(rows, draws)


def random_logits(seed: int, scales=(1.0, 1.0, 1.0, 1.0), vocab: int = V) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((len(scales), vocab)) * np.asarray(scales)[:, None]).astype(np.float32)


def probs(logits, temperature=1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def top_k_sets(logits, k) -> list[set[int]]:
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in np.asarray(logits)]


def nucleus_sets(logits, p, temperature=1.0, slack=1e-4) -> list[set[int]]:
    """Per row, the smallest set of most likely tokens whose mass reaches p (the token that
    crosses p included); `slack` forgives float32 rounding at the boundary."""
    out = []
    for row in probs(logits, temperature):
        order = np.argsort(-row, kind="stable")
        above = np.cumsum(row[order]) - row[order]  # mass strictly above each token
        out.append(set(order[above < p + slack].tolist()))
    return out


def min_p_sets(logits, min_p, temperature=1.0, slack=1e-5) -> list[set[int]]:
    pr = probs(logits, temperature)
    return [set(np.nonzero(row >= min_p * row.max() * (1 - slack))[0].tolist()) for row in pr]


def assert_within(tokens: np.ndarray, allowed: list[set[int]]):
    for r, (row, ok) in enumerate(zip(tokens, allowed)):
        outside = sorted(set(row.tolist()) - ok)
        assert not outside, f"row {r}: tokens {outside} outside the allowed {sorted(ok)}"


def reference(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The target distribution [V] of one row, written from HF's warpers (float64): temperature,
    top-k (every token tied with the k-th kept), top-p on the renormalised distribution (kept
    while the mass above is < top_p), min-p relative to the top probability, renormalised."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k > 0:
        keep &= z >= np.sort(z)[::-1][min(top_k, z.size) - 1]
    if top_p < 1.0:
        p = np.where(keep, np.exp(z - z.max()), 0.0)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[above < top_p]] = True
        nucleus[order[0]] = True
        keep &= nucleus
    if min_p > 0.0:
        keep &= z >= z[keep].max() + np.log(min_p)
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


# chi-squared critical values at significance 1e-4 (so a correct sampler never fails at these
# fixed seeds by chance; a wrong distribution with this many draws exceeds them many times over)
def chi2_critical(df: int) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(1 - 1e-4, df))


N_CHI = 40_000  # draws per distribution check
CHI_V = 12  # a small vocabulary: every kept token gets hundreds of expected draws


def assert_distribution(tokens: np.ndarray, target: np.ndarray):
    """The draws' frequencies match `target`: never a token of probability 0, and chi-squared over
    the others below the 1e-4 critical value."""
    counts = np.bincount(tokens, minlength=target.size)
    assert not counts[target == 0].any(), f"drew tokens {np.nonzero(counts * (target == 0))[0]} of probability 0"
    support = target > 0
    expected = target[support] * tokens.size
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert stat < chi2_critical(df), f"chi2 {stat:.1f} over {df} dof (critical {chi2_critical(df):.1f})"


# ------------------------------------------------------------------ live: distributions (chi-squared)

ROW = random_logits(2024, scales=(1.5,), vocab=CHI_V)[0]  # one fixed row, no ties


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0),  # plain
    (0.5, 0, 1.0, 0.0),  # temperature, applied once (twice would sharpen to softmax(z / 0.25))
    (2.0, 0, 1.0, 0.0),
    (1.0, 4, 1.0, 0.0),  # top-k through lax.top_k
    (1.3, 0, 0.7, 0.0),  # top-p (the sorting path)
    (0.8, 0, 1.0, 0.2),  # min-p as a logit threshold
    (1.0, 6, 0.8, 0.1),  # all three, in HF's order
], ids=["plain", "t0.5", "t2", "top_k", "top_p", "min_p", "all"])
def test_draws_follow_the_renormalised_target(temperature, top_k, top_p, min_p):
    target = reference(ROW, temperature, top_k, top_p, min_p)
    tokens = draw(ROW[None], 7, temperature, top_k, top_p, min_p, draws=N_CHI)[0]
    assert_distribution(tokens, target)
    if temperature != 1.0:  # the same draws are far from the distribution with temperature squared
        twice = reference(ROW, temperature ** 2, top_k, top_p, min_p)
        with pytest.raises(AssertionError):
            assert_distribution(tokens, twice)


def test_top_k_keeps_every_token_tied_at_the_kth_place():
    row = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.5, -1.0, 2.0], np.float32)  # four tied at 2nd place
    tokens = draw(row[None], 3, 1.0, top_k=2, draws=N_CHI)[0]
    target = reference(row, top_k=2)
    assert set(np.nonzero(target)[0]) == {0, 2, 3, 4, 7}  # as HF's `scores < topk[..., -1]` keeps
    assert_distribution(tokens, target)
    # The sorting path (top_k beyond the lax.top_k cap, or any top-p) keeps the same tokens.
    sorted_path = draw(row[None], 3, 1.0, top_k=2, top_p=0.999999, draws=N_CHI)[0]
    assert_distribution(sorted_path, reference(row, top_k=2, top_p=0.999999))


def test_top_p_one_is_an_exact_bypass():
    """top_p = 1 keeps the whole tail, even where a float32 cumsum reaches 1.0 before its end."""
    row = np.concatenate([[20.0], np.full(2000, -5.0)]).astype(np.float32)  # tail mass ~2.8e-8 each
    tokens = draw(row[None], 5, 1.0, top_p=1.0, draws=4096)[0]
    out = draw(np.tile(row, (1, 1)), 5, 1.0, draws=4096)[0]
    assert np.array_equal(tokens, out)
    big = np.concatenate([[0.0], np.full(500, -3.0)]).astype(np.float32)  # tail holds most mass
    assert (draw(big[None], 9, 1.0, top_p=1.0, draws=4096)[0] > 0).mean() > 0.9


def test_each_path_gives_a_row_the_same_token():
    """A row's token never depends on which sampler path its batch took: rows without top-p draw
    the same with or without a top-p row beside them (the sorting path for the whole batch)."""
    logits = random_logits(17, scales=(1.0, 2.0, 0.5, 3.0))
    alone = draw(logits[:3], 11, [0.9, 1.2, 1.0], top_k=[0, 5, 3], min_p=[0.0, 0.05, 0.1])
    with_sort = draw(logits, 11, [0.9, 1.2, 1.0, 1.0], top_k=[0, 5, 3, 0], top_p=[1.0, 1.0, 1.0, 0.5],
                     min_p=[0.0, 0.05, 0.1, 0.0])
    assert np.array_equal(alone, with_sort[:3])
    beyond_cap = draw(logits, 11, 1.0, top_k=[2, 2, 2, TOP_K_CAP + 1])  # also the sorting path
    assert np.array_equal(beyond_cap[:3], draw(logits[:3], 11, 1.0, top_k=2))


@HYP
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 24), temperature=st.floats(0.2, 4.0))
def test_top_k_never_leaves_the_top_k(seed, k, temperature):
    logits = random_logits(seed, scales=(0.3, 1.0, 3.0, 10.0))
    assert_within(draw(logits, seed, temperature, top_k=k), top_k_sets(logits, k))


@HYP
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 0.99), temperature=st.floats(0.3, 3.0))
def test_top_p_stays_in_the_nucleus(seed, p, temperature):
    logits = random_logits(seed, scales=(0.3, 1.0, 2.0, 5.0))
    assert_within(draw(logits, seed, temperature, top_p=p), nucleus_sets(logits, p, temperature))


@HYP
@given(seed=st.integers(0, 2**31 - 1), min_p=st.floats(0.01, 0.9), temperature=st.floats(0.3, 3.0))
def test_min_p_is_relative_to_each_rows_own_top_token(seed, min_p, temperature):
    # Rows of very different sharpness: a batch-wide max would over-filter the flat rows.
    logits = random_logits(seed, scales=(0.05, 0.5, 2.0, 8.0))
    assert_within(draw(logits, seed, temperature, min_p=min_p), min_p_sets(logits, min_p, temperature))


def test_greedy_and_vanishing_temperature_are_argmax():
    logits = random_logits(11, scales=(0.1, 1.0, 3.0, 30.0))
    argmax = logits.argmax(-1)[:, None]
    for temperature in (0.0, 1e-6):
        for top_k, top_p, min_p in ((0, 1.0, 0.0), (3, 0.5, 0.2)):
            t = draw(logits, 5, temperature, top_k, top_p, min_p)
            assert (t == argmax).all(), (temperature, top_k, top_p, min_p)


def test_same_key_same_token_different_keys_spread():
    logits = random_logits(3)
    a, b = draw(logits, 42), draw(logits, 42)
    assert np.array_equal(a, b)
    c = draw(logits, 43)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------ end to end through the artifact


@pytest.mark.parametrize("settings_", [
    dict(temperature=1.5, top_k=4),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=2.0, min_p=0.3),
    dict(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05),
], ids=["top_k", "top_p", "min_p", "all"])
def test_artifact_tokens_respect_filters(tiny, settings_):
    steps = 24
    toks, seen = step_by_step(tiny.model, PROMPTS, steps, seed=9, **settings_)
    assert (toks >= 0).all()
    temperature = settings_["temperature"]
    k, p, min_p = settings_.get("top_k", 0), settings_.get("top_p", 1.0), settings_.get("min_p", 0.0)
    for i in range(steps):
        logits = seen[:, i] / temperature
        allowed = [set(range(tiny.cfg.vocab_size))] * len(PROMPTS)
        if k:
            allowed = [a & b for a, b in zip(allowed, top_k_sets(logits, k))]
            masked = np.full_like(logits, -np.inf)
            for r, keep in enumerate(top_k_sets(logits, k)):
                masked[r, list(keep)] = logits[r, list(keep)]
            logits = masked
        allowed = [a & b & c for a, b, c in zip(allowed, nucleus_sets(logits, p), min_p_sets(logits, min_p))]
        assert_within(toks[:, i:i + 1], allowed)
    # Sampling, not greedy: some token is not the argmax of its logits.
    assert (toks != seen.argmax(-1)).any()
    # One token per call gives the same tokens as the whole loop in one call.
    assert tiny.model.generate(PROMPTS, steps, seed=9, ignore_eos=True, **settings_) == toks.tolist()


def test_artifact_temperature_to_zero_is_greedy(tiny):
    greedy = tiny.model.generate(PROMPTS, 32)
    assert tiny.model.generate(PROMPTS, 32, temperature=1e-6, seed=3) == greedy
    assert tiny.model.generate(PROMPTS, 32, temperature=0.0, seed=4, top_k=5, top_p=0.5) == greedy
    assert tiny.live_generate(PROMPTS, 32) == greedy
    assert tiny.model.generate(PROMPTS, 32, temperature=1.0, seed=3) != greedy


def test_seeds_reproduce_and_differ(tiny):
    kw = dict(temperature=1.0, top_p=0.95)
    a = tiny.model.generate(PROMPTS, 32, seed=123, **kw)
    assert tiny.model.generate(PROMPTS, 32, seed=123, **kw) == a
    b = tiny.model.generate(PROMPTS, 32, seed=124, **kw)
    assert all(x != y for x, y in zip(a, b))
    # An int seed gives every row its own stream: identical prompts still differ.
    same = tiny.model.generate([PROMPTS[0]] * 3, 32, seed=123, **kw)
    assert same[0] != same[1] and same[1] != same[2] and same[0] != same[2]


def test_seeds_beyond_32_bits_are_distinct_streams(tiny):
    kw = dict(temperature=1.0, ignore_eos=True)
    seeds = [7, 7 + 2**32, 7 + 2**40, 2**64 - 1]
    runs = [tiny.model.generate([PROMPTS[1]], 32, seed=s, **kw)[0] for s in seeds]
    assert len({tuple(r) for r in runs}) == len(seeds)
    from runtime.errors import RequestError

    for bad in (-1, 2**64, 1.5, "7", True):
        with pytest.raises(RequestError, match="seed"):
            tiny.model.generate([PROMPTS[1]], 4, seed=bad, **kw)


_OTHER_PROCESS = """
import json, sys
from runtime.engine.model import load
model = load(sys.argv[1], sys.argv[2])
kw = json.loads(sys.argv[3])
print(json.dumps(model.generate(**kw)))
"""


def test_same_seed_same_tokens_in_another_process(tiny):
    kw = dict(prompts=PROMPTS, max_new_tokens=32, temperature=0.9, top_k=20, seed=77)
    r = run_python(_OTHER_PROCESS, tiny.path, tiny.weights, json.dumps(kw), env=subprocess_env(tiny.cache_dir))
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout) == tiny.model.generate(**kw)


def test_per_row_seeds_do_not_depend_on_the_batch(tiny):
    kw = dict(temperature=1.2, top_k=30, min_p=0.02)
    seeds = [5, 1000, 31337]
    batch = tiny.model.generate(PROMPTS, 32, seed=seeds, **kw)
    # Each row alone (batch bucket 1, another compiled shape) with its own seed.
    for prompt, seed, row in zip(PROMPTS, seeds, batch):
        assert tiny.model.generate([prompt], 32, seed=[seed], **kw) == [row]
    # Reordered batch: rows follow their seeds, not their positions.
    order = [2, 0, 1]
    shuffled = tiny.model.generate([PROMPTS[i] for i in order], 32, seed=[seeds[i] for i in order], **kw)
    assert shuffled == [batch[i] for i in order]
    # The same seed on every row of identical prompts: identical rows.
    twins = tiny.model.generate([PROMPTS[1]] * 3, 32, seed=[seeds[1]] * 3, **kw)
    assert twins == [batch[1]] * 3
