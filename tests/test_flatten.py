"""Exported modules are flattened (private functions inlined, shape arithmetic folded) and
compute exactly what jax's own export computes."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from exporter import flatten
from exporter.state import empty_state
from fixtures_artifacts import aot_cache_env, tiny  # noqa: F401
from runtime.format.manifest import read_manifest


def _text(exported) -> str:
    return exported.mlir_module()


def _calls(text: str) -> int:
    return len(re.findall(r"(?<!custom_)call @", text))


def _unflattened(fns, name):
    return jax.export.export(jax.jit(getattr(fns, name)), platforms=("cpu",))(*getattr(fns, f"{name}_args")())


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_artifact_modules_are_flat(tiny, name):
    rel = read_manifest(tiny.path).functions[name].files["cpu"]
    exported = jax.export.deserialize(bytearray((tiny.path / rel).read_bytes()))
    text = _text(exported)
    assert _calls(text) == 0
    # Besides main, only functions a composite op names as its decomposition (chlo.top_k) remain.
    others = re.findall(r"func\.func private @([\w.$-]+)", text)
    assert text.count("func.func") == 1 + len(others)
    assert all(re.search(rf"decomposition = @{re.escape(f)}\b", text) for f in others), others
    plain = _text(_unflattened(tiny.fns, name))
    assert _calls(plain) > 10  # what flattening removed
    assert len(text) < len(plain)


@pytest.mark.parametrize("t", [5, 16, 24])  # below, at and across multiples of the chunk (8)
def test_flattened_prefill_equals_jax_export_bit_for_bit(tiny, t):
    plain = _unflattened(tiny.fns, "prefill")
    flat = flatten.flatten_exported(plain)
    assert flat.in_avals == plain.in_avals and flat.out_avals == plain.out_avals
    rng = np.random.default_rng(t)
    tokens = rng.integers(0, tiny.cfg.vocab_size, (2, t)).astype(np.int32)
    lengths = np.array([t, max(1, t - 3)], np.int32)
    fresh = empty_state(tiny.cfg, 2)
    want = plain.call(tiny.params, fresh, tokens, lengths)
    got = flat.call(tiny.params, fresh, tokens, lengths)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flattened_decode_equals_jax_export_bit_for_bit(tiny):
    plain = _unflattened(tiny.fns, "decode")
    flat = flatten.flatten_exported(plain)
    logits, cache = tiny.live_prefill(tiny.params, empty_state(tiny.cfg, 2),
                                      np.array([[3, 9, 27, 81]] * 2, np.int32), np.array([4, 2], np.int32))
    for top_k, top_p in ((20, 1.0), (20, 0.9)):  # the no-sort and the sorting sampler paths
        args = (tiny.params, cache, logits, np.zeros(2, bool), np.array([6, 4], np.int32), np.zeros(2, np.int32),
                np.array([[1, 2], [3, 4]], np.uint32), np.array([0.8, 0.0], np.float32),
                np.full(2, top_k, np.int32), np.full(2, top_p, np.float32), np.zeros(2, np.float32),
                np.full((2, tiny.fns.limits.max_stop_tokens), -1, np.int32))
        for a, b in zip(jax.tree.leaves(plain.call(*args)), jax.tree.leaves(flat.call(*args))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_module_that_cannot_be_flattened_is_kept_with_a_warning(tiny, monkeypatch):
    plain = _unflattened(tiny.fns, "decode")

    def broken(serialized):
        raise AttributeError("module 'jaxlib' has no attribute 'inlined_func_call'")

    monkeypatch.setattr(flatten, "flatten_module", broken)
    with pytest.warns(RuntimeWarning, match="left unflattened .*inlined_func_call"):
        assert flatten.flatten_exported(plain) is plain
