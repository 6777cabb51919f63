"""Hybrid model pieces on their own: blockwise attention and tiled MoE against plain references,
configs, presets and state sizes, and bfloat16 mode against fp32 (no torch needed except bf16)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exporter import blocks
from exporter.blocks import attend, kv_block, routed_experts
from exporter.config import ConfigError
from exporter.hybrid import kv_capacity, state_bytes, state_shapes
from exporter.hybrid_config import PRESETS, HybridConfig, from_hf_config
from exporter.hybrid_params import count_params, param_shapes, weight_spec
from hybrid_fixtures import HybridRunner, hybrid_case, prompts, rel_diff, right_pad  # noqa: F401  (fixture)


@pytest.mark.parametrize("c", [96, 100])
def test_attend_matches_dense_softmax(monkeypatch, c):
    """Blockwise online softmax over a cache of 3 blocks of 32 keys (96), or 100 keys (the last
    block read as the final 32 keys with the 28 already counted masked) equals a dense masked
    softmax, for ragged rows (their own cached counts), GQA (4 query heads over 2 KV heads)."""
    monkeypatch.setattr(blocks, "KV_BLOCK", 32)
    rng = np.random.default_rng(0)
    b, t, H, G, D = 3, 5, 4, 2, 8
    assert kv_block(c) == 32
    q = rng.standard_normal((b, t, H, D)).astype(np.float32)
    k = rng.standard_normal((b, c, G, D)).astype(np.float32)
    v = rng.standard_normal((b, c, G, D)).astype(np.float32)
    pos = np.array([0, 40, c - t])  # tokens cached before these queries
    q_pos = pos[:, None] + np.arange(t)[None, :]
    n_keys = int((pos + t).max())
    ours = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos), n_keys, 0.3))

    kk, vv = np.repeat(k, H // G, axis=2), np.repeat(v, H // G, axis=2)  # [b, c, H, D]
    s = np.einsum("bthd,bshd->bhts", q, kk) * 0.3
    visible = np.arange(c)[None, None, :] <= q_pos[:, :, None]  # [b, t, c]
    s = np.where(visible[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, vv)
    np.testing.assert_allclose(ours, want, rtol=2e-5, atol=2e-6)


def test_attend_skips_blocks_past_the_context(monkeypatch):
    """Key blocks past n_keys are never read: NaNs there change nothing (cost follows the context,
    not the capacity)."""
    monkeypatch.setattr(blocks, "KV_BLOCK", 32)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 1, 2, 4)), jnp.float32)
    k = rng.standard_normal((1, 96, 2, 4)).astype(np.float32)  # 3 blocks of 32
    v = rng.standard_normal((1, 96, 2, 4)).astype(np.float32)
    a = attend(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray([[20]]), 21, 0.5)
    k[:, 32:], v[:, 32:] = np.nan, np.nan
    b = attend(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray([[20]]), 21, 0.5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("tile", [1, 4])
def test_routed_experts_match_dense_mixture(tile):
    """Expert-sorted tiles give sum_j w[n, j] f(x[n], idx[n, j]) exactly as a dense loop does, with
    some experts unused and others chosen by most tokens."""
    rng = np.random.default_rng(2)
    N, d, E, k = 13, 6, 5, 2
    x = rng.standard_normal((N, d)).astype(np.float32)
    W = rng.standard_normal((E, d, d)).astype(np.float32)
    idx = np.stack([rng.choice([0, 1, 3], size=2, replace=False) for _ in range(N)])  # 2 and 4 unused
    w = rng.random((N, k)).astype(np.float32)

    def expert(xs, e):
        return jnp.tanh(xs @ jnp.asarray(W)[e])

    ours = np.asarray(routed_experts(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), E, expert, d, tile))
    want = sum(w[:, j, None] * np.tanh(np.einsum("nd,nde->ne", x, W[idx[:, j]])) for j in range(k))
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)


def test_presets_and_state_bytes():
    """Every preset builds, round-trips through to_dict (the manifest form), and its state for a
    sequence of n tokens is the Mamba layers' fixed conv + SSM state (+ attention conv windows)
    plus 2 x K/V per cached token."""
    for name, cfg in PRESETS.items():
        assert HybridConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
        m = cfg.mixer_config
        Lm, La = len(cfg.mamba_layers), len(cfg.attention_layers)
        fixed = Lm * ((m.conv_kernel - 1) * m.conv_dim * 2 + m.num_heads * m.head_dim * m.state_size * 4) + 4
        if cfg.attention_conv:  # mamba_ssm's attention conv window over q | k | v
            qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
            fixed += La * (cfg.attention_conv - 1) * qkv * 2
        per_token = La * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
        for n in (1, 300, 4096):
            assert state_bytes(cfg, jnp.bfloat16, n) == fixed + per_token * kv_capacity(n), (name, n)
    assert kv_capacity(300) == 512 and kv_capacity(100) == 100


def test_published_parameter_counts():
    """The presets' shapes give the published sizes (model cards: 9.8B, 9B, 8B, 3B, 7B, 32B, 1.5B, 7B,
    2.7B, 90M, 2.7B), so the layouts and widths are the real ones."""
    billions = {"bamba-9b": 9.78, "nemotron-nano-9b-v2": 8.89, "nemotron-h-8b": 8.10, "granite-4.0-h-micro": 3.19,
                "granite-4.0-h-tiny": 6.94, "granite-4.0-h-small": 32.2, "falcon-h1-1.5b": 1.55,
                "falcon-h1-7b": 7.59, "zamba2-2.7b": 2.66, "falcon-h1-tiny-90m": 0.091, "mamba2attn-2.7b": 2.70}
    assert set(billions) == set(PRESETS)
    for name, want in billions.items():
        assert count_params(PRESETS[name]) / 1e9 == pytest.approx(want, rel=0.01), name


def test_state_shapes_have_one_batch_dim():
    b = jax.export.symbolic_shape("b")[0]
    for cfg in PRESETS.values():
        for leaf, s in state_shapes(cfg, b, jnp.bfloat16, 512).items():
            assert sum(isinstance(d, type(b)) for d in s.shape) == 1, leaf


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        from_hf_config({"model_type": "llama"})
    with pytest.raises(ConfigError, match="unknown symbol"):
        from_hf_config({"model_type": "nemotron_h", "hybrid_override_pattern": "M*X"})
    with pytest.raises(ConfigError, match="RoPE type 'yarn'"):
        from_hf_config({"model_type": "bamba", "attn_layer_indices": [1], "rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(ConfigError, match="MLP activation"):
        from_hf_config({"model_type": "nemotron_h", "mlp_hidden_act": "gelu_new"})


def test_weight_spec_stacks_nemotron_experts():
    cfg = from_hf_config({"model_type": "nemotron_h", "hybrid_override_pattern": "ME", "hidden_size": 64,
                          "vocab_size": 100, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2,
                          "n_routed_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                          "moe_shared_expert_intermediate_size": 8})
    spec = {t["name"]: t for t in weight_spec(cfg)["tensors"]}
    up = spec["backbone.layers.1.mixer.experts.up_proj"]
    assert up["shape"] == [3, 8, 64]
    assert up["sources"] == ["backbone.layers.1.mixer.experts.up_proj", "model.layers.1.mixer.experts.up_proj"]
    assert up["stack"][2] == ["backbone.layers.1.mixer.experts.2.up_proj.weight",
                              "model.layers.1.mixer.experts.2.up_proj.weight"]
    assert spec["backbone.layers.1.mixer.gate.weight"]["dtype"] == "float32"  # router kept fp32
    shapes = param_shapes(cfg, jnp.bfloat16)
    assert shapes["backbone.layers.1.mixer.gate.e_score_correction_bias"].dtype == jnp.float32
    assert shapes["backbone.layers.1.mixer.experts.down_proj"].dtype == jnp.bfloat16
    assert math.prod(up["shape"]) == 3 * 8 * 64


# ---------------------------------------------------------------------------------------------
# bfloat16 mode (as tests/test_model.py for Mamba-2): weights, activations and KV cache in bf16,
# SSM state, residual stream, norms and softmax in fp32.
BF16_LOGITS_RTOL = 5e-2
BF16_MIN_AGREEMENT = 0.9


# Granite (RoPE attention, Granite's multipliers) and Falcon-H1 (parallel attention + Mamba-2), both
# with attention: the KV cache is bf16. MoE models are left out: a top-k router near-tie (Granite's
# tiny MoE: a gap of 0.003 on router logits of ~20, below bf16's resolution) legitimately routes a
# token elsewhere in bf16, and its logits jump (12% in prefill; 77% at one Nemotron-H decode step).
@pytest.mark.parametrize("name", ["granite_dense", "falcon_h1"])
def test_bfloat16_mode(hybrid_case, fast_jit, name):
    from exporter.hybrid_params import load_hybrid

    fp32 = hybrid_case(name).runner
    _, model = load_hybrid(str(hybrid_case(name).path), dtype=jnp.bfloat16)
    bf16 = HybridRunner(model, fast_jit)
    rows = prompts([33, 20], model.cfg.vocab_size, seed=11)
    tokens, lengths = right_pad(rows, 48)
    logits, state = bf16.prefill(bf16.empty(2), tokens, lengths)
    kinds = {k.split(".")[0]: v.dtype for k, v in state.items()}
    assert logits.dtype == jnp.float32 and kinds["ssm"] == jnp.float32
    assert kinds["conv"] == kinds["k"] == kinds["v"] == jnp.bfloat16
    ref_logits, ref_state = fp32.prefill(fp32.empty(2), tokens, lengths)
    assert rel_diff(logits, ref_logits) < BF16_LOGITS_RTOL
    ssm = sorted(k for k in state if k.startswith("ssm."))  # all layers' SSM states, relative to their max
    assert rel_diff(np.stack([state[k] for k in ssm]), np.stack([ref_state[k] for k in ssm])) < BF16_LOGITS_RTOL

    # teacher-forced on fp32's greedy path: argmaxes mostly agree, disagreements are near-ties
    ref_tokens, ref_step_logits, _ = fp32.greedy(ref_logits, ref_state, 32)
    out = []
    for j in range(32):
        out.append(np.asarray(logits))
        if j + 1 < 32:
            logits, state = bf16.step(ref_tokens[:, j], state)
    choice = np.stack(out, 1).argmax(-1)
    assert np.mean(choice == ref_tokens) >= BF16_MIN_AGREEMENT
    scale = np.abs(ref_step_logits).max()
    for i, j in zip(*np.nonzero(choice != ref_tokens)):
        row = ref_step_logits[i, j]
        assert row.max() - row[choice[i, j]] < 2 * BF16_LOGITS_RTOL * scale


def test_stacked_sources_load_whole_or_by_slices(tmp_path):
    """A stacked tensor (Nemotron-H's experts) loads from per-expert checkpoint tensors, or whole
    under its own name; a missing slice is named in the one-line error."""
    from safetensors.numpy import save_file

    from exporter.loading import load_params
    from runtime.errors import WeightsError

    cfg = from_hf_config({"model_type": "nemotron_h", "hybrid_override_pattern": "ME", "hidden_size": 64,
                          "vocab_size": 100, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2,
                          "n_routed_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                          "moe_shared_expert_intermediate_size": 8, "tie_word_embeddings": False})
    ours = {k: np.asarray(v) for k, v in load_params(cfg, None, seed=1).items()}
    per_expert = {}
    for name, v in ours.items():
        if ".experts." in name:
            for j in range(3):
                per_expert[f"{name}.{j}.weight".replace(f"experts.{name.rsplit('.', 1)[1]}.{j}",
                                                         f"experts.{j}.{name.rsplit('.', 1)[1]}")] = v[j]
        else:
            per_expert[name] = v
    (tmp_path / "a").mkdir()
    save_file(per_expert, str(tmp_path / "a" / "model.safetensors"))
    got = load_params(cfg, str(tmp_path / "a"))
    for name, v in ours.items():
        np.testing.assert_array_equal(np.asarray(got[name]), v, err_msg=name)
    (tmp_path / "b").mkdir()  # whole, under our own names (as convert-weights writes them)
    save_file(ours, str(tmp_path / "b" / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(load_params(cfg, str(tmp_path / "b"))[
        "backbone.layers.1.mixer.experts.down_proj"]), ours["backbone.layers.1.mixer.experts.down_proj"])
    del per_expert["backbone.layers.1.mixer.experts.2.up_proj.weight"]
    (tmp_path / "c").mkdir()
    save_file(per_expert, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(WeightsError, match="experts.2.up_proj.weight"):
        load_params(cfg, str(tmp_path / "c"))
