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

from exporter.sampling import sample
from fixtures_artifacts import (PROMPTS, aot_cache_env, last_json, run_python, step_by_step,  # noqa: F401
                                subprocess_env, tiny)

ROWS, DRAWS, V = 4, 256, 64  # live checks: ROWS logit rows, each sampled with DRAWS keys
HYP = settings(max_examples=12, deadline=None, derandomize=True)
_sample = jax.jit(sample)


def draw(logits: np.ndarray, seed: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """tokens [rows, DRAWS]: each logit row sampled with DRAWS different keys (one jitted call)."""
    rows = logits.shape[0]
    tiled = np.repeat(np.asarray(logits, np.float32), DRAWS, axis=0)  # [rows * DRAWS, V]
    keys = jax.random.split(jax.random.key(seed), rows * DRAWS)
    out = _sample(tiled, keys, np.float32(temperature), np.int32(top_k), np.float32(top_p), np.float32(min_p))
    return np.asarray(out).reshape(rows, DRAWS)


def random_logits(seed: int, scales=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((len(scales), V)) * np.asarray(scales)[:, None]).astype(np.float32)


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


# ------------------------------------------------------------------ live: one sampling step


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


@HYP
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 40), p=st.floats(0.1, 0.99), min_p=st.floats(0.0, 0.5))
def test_filters_combine_in_hf_order(seed, k, p, min_p):
    """top-k first; then top-p and min-p on the distribution renormalised over the top k."""
    logits = random_logits(seed, scales=(0.5, 1.0, 2.0, 4.0))
    masked = np.full_like(logits, -np.inf)
    for r, keep in enumerate(top_k_sets(logits, k)):
        masked[r, list(keep)] = logits[r, list(keep)]
    allowed = [a & b & c for a, b, c in zip(top_k_sets(logits, k), nucleus_sets(masked, p),
                                            min_p_sets(masked, min_p))]
    assert_within(draw(logits, seed, 1.0, top_k=k, top_p=p, min_p=min_p), allowed)


def test_filters_keep_the_allowed_set_alive():
    """Not over-filtering: with many draws each row shows several of its allowed tokens."""
    flat, sharp = 0.05, 6.0
    logits = random_logits(7, scales=(flat, 1.0, 1.0, sharp))
    t = draw(logits, 1, top_k=5)
    assert all(len(set(row)) == 5 for row in t[:3].tolist())  # 256 draws cover all 5
    t = draw(logits, 2, min_p=0.5)
    # The flat row (probabilities within ~10% of each other) keeps almost every token; a min-p
    # against the batch's sharpest row would leave it only its argmax.
    assert len(set(t[0].tolist())) > V // 2
    assert len(set(t[3].tolist())) <= 3
    t = draw(logits, 3, top_p=0.5)
    assert len(set(t[0].tolist())) >= V // 4


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
    assert tiny.model.generate(PROMPTS, steps, seed=9, **settings_) == toks.tolist()


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
    assert same[0] != same[1] != same[2]


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
