"""Hybrid models (Bamba, Nemotron-H, Granite-4.0-H dense and MoE, Falcon-H1, Zamba2) against HF
transformers' PyTorch references, fp32, token for token.

Each reference is a seeded tiny HF model saved with `save_pretrained` and loaded into our model
from that directory. Chunk size 16, so prompts of 17-40 tokens cross chunk boundaries; the KV
capacity (160) spans five 32-key blocks, so attention runs its blockwise online softmax.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from exporter.hybrid_params import weight_spec
from hybrid_fixtures import (  # noqa: F401  (hybrid_case is a fixture)
    LENGTHS, LOGITS_RTOL, PAD_T, hybrid_case, prompts, rel_diff, right_pad, row_of,
)

MIN_GAP = 1e-4  # smallest HF top-2 gap on a compared greedy path
NEW_TOKENS = 64
FAMILIES = ["bamba", "nemotron_h", "granite_dense", "granite_moe", "falcon_h1", "zamba2"]


@pytest.fixture(params=FAMILIES)
def case(request, hybrid_case):
    return hybrid_case(request.param)


def test_config_and_names_match_checkpoint(case):
    """The parsed config agrees with HF's; our parameters are exactly the checkpoint's tensors
    (Nemotron-H's per-expert tensors through stacked sources)."""
    from safetensors import safe_open

    hf = case.hf.config
    assert case.cfg.num_hidden_layers == hf.num_hidden_layers
    kinds = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp", "moe": "moe",
             "hybrid": "parallel" if case.cfg.family == "falcon_h1" else "hybrid"}  # HF's names -> ours
    assert case.cfg.layer_types == tuple(kinds[t] for t in hf.layer_types)
    with safe_open(str(case.path / "model.safetensors"), "np") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    spec = weight_spec(case.cfg)
    taken = {}
    for t in spec["tensors"]:
        if "stack" in t and t["sources"][0] not in stored:
            for j, entry in enumerate(t["stack"]):
                assert stored[entry[0]] == tuple(t["shape"][1:]), entry[0]
                taken[entry[0]] = True
        else:
            assert stored[t["sources"][0]] == tuple(t["shape"]), t["name"]
            taken[t["sources"][0]] = True
    assert set(stored) - set(taken) <= set(spec["ignore"])
    assert set(taken) <= set(stored)


def test_logits_match_hf(case):
    """All-position logits of a full forward, and prefill's last-token logits of a ragged batch."""
    import hybrid_reference as ref

    rows = prompts(LENGTHS, case.cfg.vocab_size, seed=1)
    theirs = [ref.hf_logits(case.hf, row)[0] for row in rows]  # [t, V] each
    ours = case.runner.forward([rows[0]])[0]
    assert rel_diff(ours, theirs[0]) < LOGITS_RTOL
    logits, _ = case.runner.prefill(case.runner.empty(len(rows)), *right_pad(rows, PAD_T))
    for i in range(len(rows)):
        assert rel_diff(logits[i], theirs[i][-1]) < LOGITS_RTOL, f"row {i}"


@pytest.mark.parametrize("name", ["bamba_bias", "nemotron_latent", "falcon_nonorm", "falcon_gate_first"])
def test_variant_logits_match_hf(hybrid_case, name):
    """Bias flags (attention, MLP, Mamba projections; no conv bias), latent-space experts, and
    Falcon-H1 without the gated norm / with the gate before the norm."""
    import hybrid_reference as ref

    c = hybrid_case(name, seed=5)
    rows = prompts(LENGTHS, c.cfg.vocab_size, seed=5)
    logits, _ = c.runner.prefill(c.runner.empty(len(rows)), *right_pad(rows, PAD_T))
    for i, row in enumerate(rows):
        assert rel_diff(logits[i], ref.hf_logits(c.hf, row)[0, -1]) < LOGITS_RTOL, f"row {i}"


def test_nemotron_time_step_floor_prefill(hybrid_case):
    """Nemotron-H clamps dt from below at time_step_min in its chunked scan (HF's decode step does
    not, so only prefill is compared, as for Mamba-2's time_step_limit)."""
    import hybrid_reference as ref

    c = hybrid_case("nemotron_h", seed=0, time_step_min=0.05)
    assert c.cfg.time_step_limit == (0.05, float("inf"))
    rows = prompts(LENGTHS, c.cfg.vocab_size, seed=6)
    logits, _ = c.runner.prefill(c.runner.empty(len(rows)), *right_pad(rows, PAD_T))
    free = hybrid_case("nemotron_h")  # the same weights, floor 1e-6
    unclamped, _ = free.runner.prefill(free.runner.empty(len(rows)), *right_pad(rows, PAD_T))
    for i, row in enumerate(rows):
        theirs = ref.hf_logits(c.hf, row)[0, -1]
        assert rel_diff(logits[i], theirs) < LOGITS_RTOL, f"row {i}"
        assert rel_diff(unclamped[i], theirs) > 1e-3, "the floor must bind for this to test anything"


def test_greedy_ragged_batch_matches_generate(case):
    """64 greedy tokens per row of a ragged batch (prefill + on-device steps) equal HF generate
    run on each prompt alone, with the per-step logits."""
    import hybrid_reference as ref

    rows = prompts(LENGTHS, case.cfg.vocab_size, seed=2)
    tokens, lengths = right_pad(rows, PAD_T)
    logits, state = case.runner.prefill(case.runner.empty(len(rows)), tokens, lengths)
    ours, our_logits, state = case.runner.greedy(logits, state, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(state["pos"]), lengths + NEW_TOKENS - 1)
    for i, row in enumerate(rows):
        theirs, their_logits = ref.hf_greedy(case.hf, row, NEW_TOKENS)
        assert ref_gap(their_logits) > MIN_GAP, "near-tie on HF's path: pick another seed"
        diff = next((j for j, (a, b) in enumerate(zip(ours[i], theirs)) if a != b), None)
        assert diff is None, f"row {i} diverged at token {diff}: {ours[i].tolist()} vs {theirs}"
        assert rel_diff(our_logits[i], their_logits) < LOGITS_RTOL, f"row {i}"


def ref_gap(logits) -> float:
    part = np.partition(logits, -2, axis=-1)
    return float((part[..., -1] - part[..., -2]).min())


def test_prefill_continues_from_state(case):
    """prefill(a) then prefill(b) from the state == prefill(a + b): logits, state, and the greedy
    continuation. Rows split at different points (mid-chunk, on a chunk boundary, and one with
    nothing left, whose state the second prefill must leave bit-for-bit untouched)."""
    r = case.runner
    rows = prompts(LENGTHS, case.cfg.vocab_size, seed=3)
    cuts = [9, 16, 5]
    full_logits, full_state = r.prefill(r.empty(3), *right_pad(rows, PAD_T))
    mid_logits, mid = r.prefill(r.empty(3), *right_pad([row[:c] for row, c in zip(rows, cuts)], 24))
    logits, state = r.prefill(mid, *right_pad([row[c:] for row, c in zip(rows, cuts)], 24))
    for k in mid:
        np.testing.assert_array_equal(np.asarray(row_of(state[k], k, 2)), np.asarray(row_of(mid[k], k, 2)), err_msg=k)
    logits = logits.at[2].set(mid_logits[2])  # row 2 got no new tokens: its logits are the first call's
    assert rel_diff(logits, full_logits) < LOGITS_RTOL
    np.testing.assert_array_equal(np.asarray(state["pos"]), np.asarray(full_state["pos"]))
    for k in full_state:
        assert rel_diff(state[k], full_state[k]) < LOGITS_RTOL, k
    ours, _, _ = r.greedy(logits, state, 16)
    full, _, _ = r.greedy(full_logits, full_state, 16)
    np.testing.assert_array_equal(ours, full)


def test_inactive_row_is_frozen(case):
    """A step with active=[True, False, True]: row 1's state is bit-for-bit unchanged, and the
    active rows get exactly what an all-active step gives them."""
    r = case.runner
    rows = prompts(LENGTHS, case.cfg.vocab_size, seed=4)
    logits, state = r.prefill(r.empty(3), *right_pad(rows, PAD_T))
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    step_logits, after = r.step(nxt, state, [True, False, True])
    all_logits, everyone = r.step(nxt, state)
    for k in state:
        np.testing.assert_array_equal(np.asarray(row_of(after[k], k, 1)), np.asarray(row_of(state[k], k, 1)), err_msg=k)
        for i in (0, 2):
            np.testing.assert_array_equal(np.asarray(row_of(after[k], k, i)), np.asarray(row_of(everyone[k], k, i)),
                                          err_msg=k)
    np.testing.assert_array_equal(np.asarray(step_logits)[[0, 2]], np.asarray(all_logits)[[0, 2]])
