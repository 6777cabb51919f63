"""The O(1) state, carried (semantics version 2): frozen rows, masked padding, prefill from a
state, per-row decode controls, prompts of any length in segments, states as values, and the
exact prefix-state cache. References: the live model run alone, in one piece."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime
from exporter.artifact import write_artifact
from exporter.functions import ModelFunctions
from exporter.memory import prefill_activation_bytes
from exporter.state import empty_state, stack_layers
from fixtures_artifacts import (PROMPTS, TINY_CFG, aot_cache_env, last_json, run_cli, run_python,  # noqa: F401
                                subprocess_env, tiny)
from runtime.engine.requests import RowSettings
from runtime.engine.state import State
from runtime.errors import RequestError
from runtime.format.manifest import Limits

V = TINY_CFG.vocab_size
EOS = TINY_CFG.eos_token_id
# Long prompts: segments of at most 64 tokens for one row (B x T <= 256), decode blocks of 16.
LONG_LIMITS = Limits(max_batch=8, max_prompt_tokens=200_000, max_new_tokens=64, max_stop_tokens=4,
                     decode_block=16, max_prefill_tokens=256)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def long_art(tmp_path_factory, tiny):
    """The tiny model exported with long-prompt limits (same weights as `tiny`)."""
    path = tmp_path_factory.mktemp("long") / "art"
    write_artifact(ModelFunctions(TINY_CFG, jnp.float32, LONG_LIMITS), ["cpu"], path, force=False,
                   prefill_segment=64)
    return path


@pytest.fixture(scope="module")
def long_model(long_art, tiny):
    return runtime.load(long_art, tiny.weights)


def live_prefill_alone(tiny, tokens):
    """The live model, one row, one prefill call from a fresh state: (logits [V], {"conv", "ssm"}
    stacked over layers, row 0)."""
    logits, state = tiny.live_prefill(tiny.params, empty_state(TINY_CFG, 1),
                                      np.asarray([tokens], np.int32), np.asarray([len(tokens)], np.int32))
    return np.asarray(logits[0]), {k: np.asarray(v[:, 0]) for k, v in stack_layers(state).items()}


def leaves(model, state: State) -> dict:
    """A State's arrays as {"conv", "ssm"} stacked over layers (its one row)."""
    return {k: np.asarray(v[:, 0]) for k, v in stack_layers(model.state_layout.nest(state.leaves)).items()}


# ------------------------------------------------------------------ correctness of the functions


def test_a_row_that_stops_early_is_frozen(tiny):
    """Its returned state is prefill of (prompt + its generated tokens) alone, though the other
    rows kept decoding after it stopped."""
    model = tiny.model
    free = model.generate(PROMPTS, 32, ignore_eos=True)
    stop = next(t for t in free[0][2:] if all(t not in r for r in free[1:]))  # row 0 only
    out = model.complete(PROMPTS, 32, stop=[stop], ignore_eos=True, return_states=True)
    assert out[0].finish_reason == "stop" and out[0].tokens[-1] == stop and len(out[0].tokens) < 32
    assert [c.finish_reason for c in out[1:]] == ["length", "length"]
    logits, want = live_prefill_alone(tiny, PROMPTS[0] + out[0].tokens)
    got = leaves(model, out[0].state)
    assert rel(got["ssm"], want["ssm"]) < 1e-4 and rel(got["conv"], want["conv"]) < 1e-5
    assert rel(out[0].state.logits[0], logits) < 1e-4
    assert out[0].state.num_tokens == len(PROMPTS[0]) + len(out[0].tokens)


@pytest.mark.parametrize("pad", ["vocab_size", "garbage"])
def test_padding_never_touches_anything(tiny, pad):
    """Out-of-range pad ids or garbage in the padded tail: the same logits and state, bit for bit,
    as pad id 0 (an unmasked out-of-range id would be NaN through the embedding)."""
    rng = np.random.default_rng(1)
    lengths = np.array([16, 9, 1, 4], np.int32)
    clean = rng.integers(0, V, (4, 16)).astype(np.int32)
    clean[np.arange(16)[None, :] >= lengths[:, None]] = 0
    dirty = clean.copy()
    tail = np.arange(16)[None, :] >= lengths[:, None]
    dirty[tail] = V if pad == "vocab_size" else rng.integers(-2**30, 2**30, tail.sum())
    start = empty_state(TINY_CFG, 4)
    for prefill in (tiny.live_prefill, lambda p, s, t, n: tiny.model.prefill(t, n, s)):
        a_logits, a_state = prefill(tiny.params, start, clean, lengths)
        b_logits, b_state = prefill(tiny.params, start, dirty, lengths)
        assert np.isfinite(np.asarray(b_logits)).all()
        assert np.array_equal(np.asarray(a_logits), np.asarray(b_logits))
        for k in a_state:
            assert np.array_equal(np.asarray(a_state[k]), np.asarray(b_state[k])), k


def test_prefill_from_a_state_equals_prefill_of_the_concatenation(tiny):
    rng = np.random.default_rng(2)
    full = rng.integers(0, V, 40).tolist()
    for cut in (1, 3, 8, 13, 39):  # inside the conv window, on and off the chunk grid (8)
        _, mid = tiny.live_prefill(tiny.params, empty_state(TINY_CFG, 1), np.asarray([full[:cut]], np.int32),
                                   np.asarray([cut], np.int32))
        rest = full[cut:]
        logits, state = tiny.live_prefill(tiny.params, mid, np.asarray([rest], np.int32),
                                          np.asarray([len(rest)], np.int32))
        want_logits, want = live_prefill_alone(tiny, full)
        state = stack_layers(state)
        assert rel(logits[0], want_logits) < 1e-4, cut
        assert rel(state["ssm"][:, 0], want["ssm"]) < 1e-4 and rel(state["conv"][:, 0], want["conv"]) < 1e-5
    # Through the runtime: greedy continuations equal.
    whole = tiny.model.generate([full], 24, ignore_eos=True)
    head = tiny.model.prefill_state(full[:13])
    assert tiny.model.generate([full[13:]], 24, ignore_eos=True, states=[head]) == whole


def test_a_length_zero_row_keeps_its_state(tiny):
    model = tiny.model
    s = model.prefill_state(PROMPTS[1])
    tokens = np.zeros((4, 16), np.int32)
    tokens[1, :5] = PROMPTS[0]
    lengths = np.array([0, 5, 0, 0], np.int32)
    batch = model.state_layout.stack([s.leaves, None], 4)
    _, out = model.prefill(tokens, lengths, batch)
    for before, after in zip(s.leaves, model.state_layout.take(out, 0)):
        assert np.array_equal(np.asarray(before), np.asarray(after))


# ------------------------------------------------------------------ per-row decode controls


MIXED = dict(temperature=[0.9, 0.0, 1.3], top_k=[0, 0, 7], top_p=[1.0, 1.0, 0.8], min_p=[0.05, 0.0, 0.0],
             seed=[11, 12, 13], max_new_tokens=[32, 20, 9], stop=[[], [], [5]])


def test_rows_depend_only_on_their_own_prompt_settings_and_seed(tiny):
    batch = tiny.model.complete(PROMPTS, **MIXED)
    for i, prompt in enumerate(PROMPTS):
        alone = tiny.model.complete([prompt], **{k: [v[i]] for k, v in MIXED.items()})[0]
        assert alone.tokens == batch[i].tokens and alone.finish_reason == batch[i].finish_reason, i
    assert len(batch[1].tokens) <= 20 and len(batch[2].tokens) <= 9
    # Another batch composition: the row's neighbours change (a greedy one and a sampled one).
    other = tiny.model.complete([PROMPTS[0], [44, 45], PROMPTS[2]], temperature=[0.9, 0.0, 1.3],
                                top_k=[0, 0, 7], top_p=[1.0, 1.0, 0.8], min_p=[0.05, 0.0, 0.0],
                                seed=[11, 99, 13], max_new_tokens=[32, 3, 9], stop=[[], [], [5]])
    assert other[0].tokens == batch[0].tokens and other[2].tokens == batch[2].tokens


def test_streaming_blocks_and_per_row_budgets(tiny):
    kw = {k: v for k, v in MIXED.items() if k != "max_new_tokens"}
    whole = tiny.model.generate(PROMPTS, [32, 20, 9], **kw)
    blocks = list(tiny.model.stream(PROMPTS, [32, 20, 9], block=5, **kw))
    assert [sum((b.tokens[i] for b in blocks), []) for i in range(3)] == whole
    assert all(len(r) <= 5 for b in blocks for r in b.tokens)


def test_stop_defaults_to_eos_and_ignore_eos(tiny):
    model = tiny.model
    prompts = np.random.default_rng(6).integers(1, V, (8, 5)).tolist()  # greedy runs that meet eos
    free = model.generate(prompts, 32, ignore_eos=True)
    default = model.generate(prompts, 32)
    assert sum(EOS in f for f in free) >= 2
    for f, d in zip(free, default):
        assert d == (f[: f.index(EOS) + 1] if EOS in f else f)
    # Extra stop ids add to eos; ignore_eos drops only eos.
    extra = [next(t for t in f if t != EOS) for f in free]
    both = model.generate(prompts, 32, stop=[[x] for x in extra])
    only = model.generate(prompts, 32, stop=[[x] for x in extra], ignore_eos=True)
    for f, b, o, x in zip(free, both, only, extra):
        assert o == f[: f.index(x) + 1]
        cut = min(f.index(x), f.index(EOS) if EOS in f else 32)
        assert b == f[: cut + 1]


def test_numpy_integers_count_like_ints(tiny):
    model = tiny.model
    assert model.generate(PROMPTS, np.int64(32)) == model.generate(PROMPTS, 32)
    blocks = list(model.stream(PROMPTS, np.int32(12), block=np.int64(4), ignore_eos=True))
    assert len(blocks) == 3
    assert model.generate([np.array(PROMPTS[0], np.int64)], np.uint8(5), ignore_eos=True) == \
        model.generate([PROMPTS[0]], 5, ignore_eos=True)


def test_bad_per_row_settings_are_clear_errors(tiny):
    for kw, match in [
        (dict(temperature=[0.5, 0.5]), "temperature has 2 values for 3 prompts"),
        (dict(top_p=[1.0, 0.0, 1.0]), "top_p must be in"),
        (dict(max_new_tokens=[1, 2]), "max_new_tokens has 2 values"),
        (dict(stop=[[1], [2]]), "stop has 2 lists for 3 prompts"),
        (dict(ignore_eos="yes"), "ignore_eos must be"),
        (dict(states=[None]), "one State"),
        (dict(temperature="hot"), "temperature must be a number"),
    ]:
        kw.setdefault("max_new_tokens", 4)
        with pytest.raises(RequestError, match=match):
            tiny.model.generate(PROMPTS, **kw)


# ------------------------------------------------------------------ states as values


def test_states_continue_copy_save_and_refuse_strangers(tiny, long_model, tmp_path):
    model = tiny.model
    turn1 = model.complete([PROMPTS[1]], 12, ignore_eos=True, return_states=True)[0]
    s = turn1.state
    assert s.num_tokens == len(PROMPTS[1]) + 12 and s.tokens == tuple(PROMPTS[1] + turn1.tokens)
    assert s.nbytes == model.state_layout.bytes_per_sequence + V * 4
    # Continue with an empty prompt: the state's logits give the next token.
    cont = model.generate([[]], 8, states=[s], ignore_eos=True)[0]
    assert model.generate([PROMPTS[1]], 20, ignore_eos=True)[0] == turn1.tokens + cont
    # A copy continues the same way; the original is untouched by use.
    c = s.copy()
    assert model.generate([[7, 8]], 8, states=[c], ignore_eos=True) == \
        model.generate([[7, 8]], 8, states=[s], ignore_eos=True)
    # Saved and loaded: the same continuation.
    path = s.save(tmp_path / "s.safetensors")
    back = model.load_state(path)
    assert back.num_tokens == s.num_tokens and back.tokens == s.tokens
    assert model.generate([[7, 8]], 8, states=[back], ignore_eos=True) == \
        model.generate([[7, 8]], 8, states=[s], ignore_eos=True)
    # Another artifact refuses it, in memory and on disk.
    with pytest.raises(RequestError, match="another artifact"):
        long_model.generate([[1]], 2, states=[s])
    with pytest.raises(RequestError, match="another artifact"):
        long_model.load_state(path)
    (tmp_path / "junk").write_bytes(b"not a state")
    with pytest.raises(RequestError, match="cannot read a state"):
        model.load_state(tmp_path / "junk")


# ------------------------------------------------------------------ prompts of any length


def test_long_prompts_are_prefilled_in_segments(long_model, tiny):
    m = long_model.manifest
    assert m.buckets.prompt[-1] == 64 and long_model.segment_length(1) == 64 and long_model.segment_length(8) == 32
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, V, n).tolist() for n in (300, 65, 7)]  # 5 segments, 2, 1 (ragged)
    got = long_model.complete(prompts, 6, ignore_eos=True, return_states=True)
    for p, c in zip(prompts, got):
        logits, want = live_prefill_alone(tiny, p)  # one call, no segments
        assert c.tokens[0] == int(np.argmax(logits))
        assert rel(leaves(long_model, c.state)["ssm"], live_prefill_alone(tiny, p + c.tokens)[1]["ssm"]) < 1e-4


_LONG_RSS = """
import json, resource, sys
import numpy as np
import runtime
model = runtime.load(sys.argv[1], sys.argv[2])
rng = np.random.default_rng(0)
out = {}
for n in (20_000, 100_000):
    tokens = model.generate([rng.integers(0, 96, n).tolist()], 4, ignore_eos=True)
    out[n] = {"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "tokens": len(tokens[0])}
print(json.dumps(out))
"""


def test_a_100k_token_prompt_in_bounded_memory(long_art, tiny):
    r = run_python(_LONG_RSS, long_art, tiny.weights, env=subprocess_env(tiny.cache_dir), timeout=600)
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["100000"]["tokens"] == out["20000"]["tokens"] == 4
    growth_mib = (out["100000"]["rss_kib"] - out["20000"]["rss_kib"]) / 1024
    assert growth_mib < 48, growth_mib  # five times the prompt, peak memory nearly flat


def test_memory_bound_covers_xla_own_analysis():
    """The manifest's prefill bound is at least what XLA allocates for the largest call."""
    fns = ModelFunctions(TINY_CFG, jnp.float32, LONG_LIMITS)
    for B, T in ((1, 64), (4, 64), (8, 32)):
        compiled = jax.jit(fns.prefill).lower(*fns.prefill_args(B, T)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp <= prefill_activation_bytes(TINY_CFG, jnp.float32, B * T, fns.numerics.chunk_size, B)


# ------------------------------------------------------------------ the prefix cache


def test_prefix_cache_hits_anywhere_and_changes_nothing(long_art, tiny):
    cached = runtime.load(long_art, tiny.weights, prefix_cache_mb=8)
    plain = runtime.load(long_art, tiny.weights)
    rng = np.random.default_rng(5)
    history: list[int] = []
    ends = []  # the history length at the end of each turn
    for turn in range(4):
        history += rng.integers(0, V, 37 + turn).tolist()  # user text: off any grid
        a = cached.complete([history], 9, ignore_eos=True)[0].tokens
        b = plain.complete([history], 9, ignore_eos=True)[0].tokens
        assert a == b, turn
        history += a
        ends.append(len(history))
    stats = cached.prefix_cache.stats
    assert stats.lookups == 4 and stats.hits == 3  # turns 2-4 continue from the previous turn's end
    assert stats.tokens_skipped == sum(ends[:3])
    # A long prompt leaves snapshots at its segment boundaries: a later prompt sharing its first
    # 130 tokens starts from the boundary at 128.
    long = rng.integers(0, V, 200).tolist()
    cached.generate([long], 2, ignore_eos=True)
    before = stats.tokens_skipped
    fork = long[:130] + [1, 2, 3]
    assert cached.generate([fork], 5, ignore_eos=True) == plain.generate([fork], 5, ignore_eos=True)
    assert stats.tokens_skipped - before == 128
    # Sampled requests agree too (the cached state carries the same distribution).
    kw = dict(temperature=0.8, seed=3, ignore_eos=True)
    assert cached.generate([history + [4]], 9, **kw) == plain.generate([history + [4]], 9, **kw)


def test_prefix_cache_is_bounded_in_bytes(long_art, tiny):
    per = runtime.load(long_art, tiny.weights).state_layout.bytes_per_sequence + V * 4
    model = runtime.load(long_art, tiny.weights, prefix_cache_mb=2.5 * per / (1 << 20))
    ends = [[i + 1] * 5 + model.generate([[i + 1] * 5], 2, ignore_eos=True)[0] for i in range(5)]
    cache = model.prefix_cache
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes and cache.stats.evictions == 3
    assert cache.lookup(ends[4] + [0]) is not None and cache.lookup(ends[3]) is not None  # the most recent
    assert cache.lookup(ends[0] + [0]) is None


# ------------------------------------------------------------------ the manifest says it


def test_manifest_and_inspect_state_the_semantics_and_memory(long_art):
    code, out = _inspect(long_art)
    assert code == 0
    assert "semantics" in out and "version 2" in out
    assert "per sequence whatever its length" in out and "no request allocates more than" in out
    info = json.loads(_inspect(long_art, "--json")[1])
    assert info["semantics_version"] == 2 and info["limits"]["decode_block"] == 16
    # 2 layers x (conv window 3 x 160 channels + SSM state 8 heads x 16 x 16), float32, one leaf each
    assert info["memory"]["state_bytes_per_sequence"] == 2 * (3 * 160 + 8 * 16 * 16) * 4
    assert info["model"]["numerics"]["cpu"]["chunk_size"] == 8


def _inspect(path, *args):
    r = run_cli("inspect", path, *args, env=subprocess_env(None))
    return r.returncode, r.stdout


def test_rows_scatter_into_slots(tiny):
    """Continuous batching's primitive: rows of one batch written into chosen slots of another."""
    layout = tiny.model.state_layout
    a = tiny.model.prefill_state(PROMPTS[0])
    b = tiny.model.prefill_state(PROMPTS[1])
    slots = layout.stack([None, None, None, None], 4)
    rows = layout.stack([a.leaves, b.leaves], 2)
    slots = layout.put(slots, rows, [3, 1])
    got = [layout.take(slots, i) for i in range(4)]
    for leaf_a, leaf_b, g1, g3, g0 in zip(a.leaves, b.leaves, got[1], got[3], got[0]):
        assert np.array_equal(np.asarray(g3), np.asarray(leaf_a)) and np.array_equal(np.asarray(g1), np.asarray(leaf_b))
        assert not np.asarray(g0).any()
