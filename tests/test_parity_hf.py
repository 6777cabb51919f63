"""Parity with HF transformers' PyTorch Mamba2ForCausalLM, token for token (fp32).

Each reference is a seeded random HF model saved with `save_pretrained` and loaded into our
model from that directory (see `hf_checkpoint` in conftest.py). Tiny shapes with chunk_size 16,
so the prompt lengths below sit before, on and after chunk boundaries.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import hf_reference as ref
from exporter.config import load_config
from exporter.loading import load_model
from exporter.params import param_shapes

LOGITS_RTOL = 1e-4  # max |ours - HF| / max |HF logit|
HIDDEN_RTOL = 1e-5  # per layer: max |ours - HF| / max |HF residual|; measured ~1e-6
MIN_GAP = 1e-4  # smallest HF top-2 logit gap on a greedy path for the comparison to be meaningful
NEW_TOKENS = 64


def rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(1000 + seed).integers(0, vocab, length).tolist()


def test_checkpoint_config_roundtrip(tiny_hf, tiny_hf_groups, tiny_hf_untied):
    for ck in (tiny_hf, tiny_hf_groups, tiny_hf_untied):
        hf = ck.hf_model.config
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "head_dim",
                    "num_heads", "n_groups", "chunk_size", "conv_kernel", "tie_word_embeddings",
                    "use_bias", "use_conv_bias"):
            assert getattr(ck.cfg, key) == getattr(hf, key), key
        assert ck.cfg.time_step_limit == (0.0, math.inf)


def test_load_config_transformers5_float_tags(tmp_path, tiny_hf):
    """transformers>=5 `save_pretrained` writes `"time_step_limit": [0.0, {"__float__": "Infinity"}]`
    (its JSON-safe spelling of inf); a checkpoint saved that way must load."""
    tiny_hf.hf_model.config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["time_step_limit"][1] == {"__float__": "Infinity"}, "transformers changed its format"
    cfg = load_config(str(tmp_path))
    assert cfg.time_step_limit == (0.0, math.inf)
    assert cfg.hidden_size == tiny_hf.cfg.hidden_size


def test_checkpoint_names_match_param_shapes(tiny_hf, tiny_hf_untied):
    """Our parameter names and shapes are exactly HF's checkpoint tensors (tied: no lm_head)."""
    from safetensors.numpy import load_file

    for ck in (tiny_hf, tiny_hf_untied):
        stored = {k: v.shape for k, v in load_file(str(ck.path / "model.safetensors")).items()}
        ours = {k: tuple(s.shape) for k, s in param_shapes(ck.cfg).items()}
        assert ours == stored
        assert ("lm_head.weight" in ours) == (not ck.cfg.tie_word_embeddings)


def test_load_model_defaults_weights_to_checkpoint_dir(tiny_hf):
    """`load_model(dir)` with no `weights` reads the directory's own weights (its docstring:
    "weights default to it if a dir"), not seeded random ones."""
    _, model = load_model(str(tiny_hf.path))
    want = tiny_hf.hf_model.backbone.embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.backbone.embeddings.weight[...]), want)


@pytest.mark.parametrize("length", [16, 40])
def test_logits_and_hidden_states(tiny_hf, length):
    """All-position logits, the per-layer residual stream, and prefill's last-token logits."""
    tokens = prompt(length, tiny_hf.cfg.vocab_size, seed=length)
    hf_logits, hf_hidden = ref.hf_forward(tiny_hf.hf_model, tokens)

    logits, hidden, _ = tiny_hf.runner.forward(tokens)
    assert len(hidden) == len(hf_hidden) == tiny_hf.cfg.num_hidden_layers
    for i, (ours, theirs) in enumerate(zip(hidden, hf_hidden)):
        assert rel_diff(ours, theirs) < HIDDEN_RTOL, f"layer {i}"
    assert rel_diff(logits, hf_logits) < LOGITS_RTOL

    last, _ = tiny_hf.runner.prefill(tokens)
    assert rel_diff(last[0], hf_logits[0, -1]) < LOGITS_RTOL


def _check_greedy(ck, length: int, seed: int):
    tokens = prompt(length, ck.cfg.vocab_size, seed)
    hf_tokens, hf_logits = ref.hf_greedy(ck.hf_model, tokens, NEW_TOKENS)
    # The comparison is only meaningful if HF's choices are not near-ties (seeded weights are
    # spread for that); a failure here calls for another seed, not a model fix.
    assert ref.top2_gap(hf_logits).min() > MIN_GAP
    ours, our_logits = ck.runner.greedy(tokens, NEW_TOKENS)
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, hf_tokens)) if a != b), None)
    assert first_diff is None, f"diverged at new token {first_diff}: ours {ours} vs HF {hf_tokens}"
    assert rel_diff(our_logits, hf_logits) < LOGITS_RTOL


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40])
def test_greedy_matches_generate(tiny_hf, length):
    """prefill + argmax/step for 64 tokens equals HF generate(do_sample=False), step logits too."""
    _check_greedy(tiny_hf, length, seed=length)


@pytest.mark.parametrize("length", [17, 40])
def test_greedy_n_groups_2(tiny_hf_groups, length):
    assert tiny_hf_groups.cfg.n_groups == 2 and tiny_hf_groups.cfg.use_bias
    _check_greedy(tiny_hf_groups, length, seed=100 + length)


@pytest.mark.parametrize("length", [17, 40])
def test_greedy_untied_head(tiny_hf_untied, length):
    assert not tiny_hf_untied.cfg.tie_word_embeddings
    assert tiny_hf_untied.model.lm_head is not None
    _check_greedy(tiny_hf_untied, length, seed=200 + length)


def test_hidden_states_n_groups_2(tiny_hf_groups):
    tokens = prompt(40, tiny_hf_groups.cfg.vocab_size, seed=7)
    hf_logits, hf_hidden = ref.hf_forward(tiny_hf_groups.hf_model, tokens)
    logits, hidden, _ = tiny_hf_groups.runner.forward(tokens)
    for i, (ours, theirs) in enumerate(zip(hidden, hf_hidden)):
        assert rel_diff(ours, theirs) < HIDDEN_RTOL, f"layer {i}"
    assert rel_diff(logits, hf_logits) < LOGITS_RTOL


def test_time_step_limit_prefill(hf_checkpoint, tiny_hf):
    """A non-default time_step_limit clamps dt after softplus. Only prefill logits are compared:
    HF applies the limit in its chunked scan but its decode step (`mamba2_selective_state_update`)
    ignores `dt_limit`, so HF's own greedy decoding is inconsistent under a non-default limit."""
    limit = (0.01, 0.2)
    ck = hf_checkpoint("dt-limit", seed=0, time_step_limit=limit)  # same weights as tiny_hf
    assert ck.cfg.time_step_limit == limit
    tokens = prompt(40, ck.cfg.vocab_size, seed=3)
    hf_logits, _ = ref.hf_forward(ck.hf_model, tokens)
    ours, _ = ck.runner.prefill(tokens)
    assert rel_diff(ours[0], hf_logits[0, -1]) < LOGITS_RTOL
    # The limit must actually bind for this to test anything.
    unlimited, _ = tiny_hf.runner.prefill(tokens)
    assert rel_diff(unlimited[0], hf_logits[0, -1]) > 1e-2
