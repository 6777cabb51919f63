"""mamba_ssm's own hybrid checkpoints (MambaLMHeadModel with attn_layer_idx / attn_cfg /
d_intermediate), in mamba_ssm's config.json and tensor names.

mamba_ssm itself needs CUDA kernels, so the reference is HF's BambaForCausalLM, which computes the
same function: pre-norm Mamba-2 / attention layers, each followed by a pre-norm gated SiLU MLP,
RoPE on half of each head. A seeded HF Bamba model's weights are rewritten into a mamba_ssm
checkpoint (q|k|v fused into in_proj, fc1 = [up | gate]); without an MLP (d_intermediate 0) the
Bamba reference's MLPs are zeroed. mamba_ssm's attention conv (attn_cfg.d_conv, which Bamba
lacks) is checked layer by layer against numpy and for decode == prefill consistency.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from exporter.hybrid_config import from_mamba_ssm_hybrid, load_hybrid_config
from exporter.hybrid_params import bind, load_hybrid
from exporter.loading import load_params
from hybrid_fixtures import (  # noqa: F401  (hybrid_case is a fixture)
    LENGTHS, LOGITS_RTOL, PAD_T, HybridRunner, prompts, rel_diff, right_pad,
)

ATTN = [1, 3]
BAMBA = dict(num_hidden_layers=4, attn_layer_indices=ATTN, attention_bias=True, tie_word_embeddings=True,
             intermediate_size=128)


def mamba_ssm_config(d_intermediate: int, d_conv: int = 0) -> dict:
    return {
        "d_model": 64, "d_intermediate": d_intermediate, "n_layer": 4, "vocab_size": 200,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16},
        "attn_layer_idx": ATTN,
        "attn_cfg": {"causal": True, "num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "rotary_emb_dim": 8,
                     "qkv_proj_bias": True, "out_proj_bias": True, "d_conv": d_conv},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }


def write_mamba_ssm_checkpoint(hf, path, with_mlp: bool):
    """HF Bamba weights under mamba_ssm's names and layout."""
    from safetensors.numpy import save_file

    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    out = {"backbone.embedding.weight": sd["model.embed_tokens.weight"],
           "backbone.norm_f.weight": sd["model.final_layernorm.weight"]}
    for i in range(4):
        src, dst = f"model.layers.{i}.", f"backbone.layers.{i}."
        out[dst + "norm.weight"] = sd[src + "input_layernorm.weight"]
        if i in ATTN:
            a = src + "self_attn."
            for kind in ("weight", "bias"):
                out[dst + f"mixer.in_proj.{kind}"] = np.concatenate([sd[a + f"{p}_proj.{kind}"] for p in "qkv"])
                out[dst + f"mixer.out_proj.{kind}"] = sd[a + f"o_proj.{kind}"]
        else:
            for k, v in sd.items():
                if k.startswith(src + "mamba."):
                    out[dst + "mixer." + k[len(src + "mamba."):]] = v
        if with_mlp:
            f = src + "feed_forward."
            out[dst + "norm2.weight"] = sd[src + "pre_ff_layernorm.weight"]
            out[dst + "mlp.fc1.weight"] = np.concatenate([sd[f + "up_proj.weight"], sd[f + "gate_proj.weight"]])
            out[dst + "mlp.fc2.weight"] = sd[f + "down_proj.weight"]
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(mamba_ssm_config(128 if with_mlp else 0)))
    return path


@pytest.fixture(scope="module", params=["mlp", "no_mlp"])
def ssm_case(request, tmp_path_factory, fast_jit):
    import torch

    import hybrid_reference as ref

    with_mlp = request.param == "mlp"
    hf = ref.make_hf_model("bamba", seed=7, **BAMBA)
    if not with_mlp:
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.feed_forward.down_proj.weight.zero_()
    path = write_mamba_ssm_checkpoint(hf, tmp_path_factory.mktemp("mamba-ssm") / "ckpt", with_mlp)
    cfg, model = load_hybrid(str(path))
    return hf, cfg, HybridRunner(model, fast_jit)


def test_config_reads_mamba_ssm_keys(ssm_case):
    hf, cfg, _ = ssm_case
    assert cfg.family == "mamba_ssm" and cfg.layer_types == ("mamba", "attention", "mamba", "attention")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rotary_dim) == (4, 2, 16, 8)
    assert cfg.intermediate_size in (0, 128) and cfg.tie_word_embeddings


def test_logits_and_greedy_match_hf_bamba(ssm_case):
    """Last-token logits of a ragged batch, and 64 greedy tokens per row equal to HF generate."""
    import hybrid_reference as ref

    hf, cfg, runner = ssm_case
    rows = prompts(LENGTHS, cfg.vocab_size, seed=9)
    logits, state = runner.prefill(runner.empty(3), *right_pad(rows, PAD_T))
    ours, our_logits, _ = runner.greedy(logits, state, 64)
    for i, row in enumerate(rows):
        assert rel_diff(logits[i], ref.hf_logits(hf, row)[0, -1]) < LOGITS_RTOL, f"row {i}"
        theirs, their_logits = ref.hf_greedy(hf, row, 64)
        assert ours[i].tolist() == theirs, f"row {i}"
        assert rel_diff(our_logits[i], their_logits) < LOGITS_RTOL


def test_refusals_name_the_key():
    from exporter.config import ConfigError

    base = mamba_ssm_config(0)
    for change, match in ((("causal", False), "causal"), (("rotary_emb_interleaved", True), "interleaved"),
                          (("mlp_dim", 256), "mlp_dim"), (("window_size", 8), "window_size")):
        bad = {**base, "attn_cfg": {**base["attn_cfg"], change[0]: change[1]}}
        with pytest.raises(ConfigError, match=match):
            from_mamba_ssm_hybrid(bad)


def test_mamba2attn_preset_matches_its_config():
    """state-spaces/mamba2attn-2.7b's published config.json maps onto the preset."""
    published = {"d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277,
                 "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [9, 18, 27, 36, 45, 56],
                 "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 30, "out_proj_bias": False,
                              "qkv_proj_bias": False, "rotary_emb_dim": 64},
                 "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                 "tie_embeddings": True}
    assert from_mamba_ssm_hybrid(published, name="mamba2attn-2.7b") == load_hybrid_config("mamba2attn-2.7b")


# ---------------------------------------------------------------------------------------------
# The attention conv (attn_cfg.d_conv), which no HF model has.


def _conv_model(tmp_path):
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(mamba_ssm_config(128, d_conv=4)))
    cfg = load_hybrid_config(str(tmp_path))
    params = load_params(cfg, None, seed=3)
    params = {k: (v * 10 if k.endswith("conv1d.weight") else v) for k, v in params.items()}  # spread init
    return cfg, params


def test_attention_conv_layer_matches_numpy(tmp_path):
    """One MHA layer with its conv: in_proj -> causal depthwise conv (+bias, no activation) ->
    split -> half RoPE -> causal GQA softmax -> out_proj, against a direct numpy computation."""
    cfg, params = _conv_model(tmp_path)
    model = bind(cfg, params)
    attn = model.trunk.layers[1].mixer
    rng = np.random.default_rng(0)
    t, H, G, D, R = 11, 4, 2, 16, 8
    x = rng.standard_normal((1, t, 64)).astype(np.float32)
    state = model.empty_state(1, 32)
    rope = model._rope(jnp.arange(t)[None])
    out, _, window = attn(jnp.asarray(x), rope, state["pos"], jnp.ones((1, t), bool), jnp.asarray([t]),
                          (state["k.1"], state["v.1"]), state["attn_conv.1"])

    p = {k.rsplit("mixer.", 1)[1]: np.asarray(v, np.float64) for k, v in params.items()
         if k.startswith("backbone.layers.1.mixer.")}
    qkv = x[0] @ p["in_proj.weight"].T + p["in_proj.bias"]  # [t, C]
    w = p["conv1d.weight"][:, 0, :]  # [C, K]
    padded = np.concatenate([np.zeros((3, qkv.shape[1])), qkv])
    conv = np.stack([(padded[j:j + 4] * w.T).sum(0) for j in range(t)]) + p["conv1d.bias"]
    q, k, v = conv[:, :H * D].reshape(t, H, D), conv[:, H * D:(H + G) * D].reshape(t, G, D), conv[:, (H + G) * D:]
    v = v.reshape(t, G, D)
    inv = 1.0 / (10000.0 ** (np.arange(0, R, 2) / R))
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rot(a):
        r = a[..., :R]
        half = np.concatenate([-r[..., R // 2:], r[..., :R // 2]], -1)
        return np.concatenate([r * cos[:, None] + half * sin[:, None], a[..., R:]], -1)

    q, k = rot(q), rot(k)
    k, v = np.repeat(k, H // G, 1), np.repeat(v, H // G, 1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    want = np.einsum("hts,shd->thd", a, v).reshape(t, H * D) @ p["out_proj.weight"].T + p["out_proj.bias"]
    assert rel_diff(out[0], want) < 1e-5
    np.testing.assert_allclose(np.asarray(window[0]), qkv[-3:], rtol=1e-5, atol=1e-5)  # the last 3 inputs


def test_attention_conv_decode_equals_prefill(tmp_path, fast_jit):
    """With the attention conv, each greedy step's logits equal a fresh prefill of the same tokens,
    and a prefill continued from a state across the seam: the conv window carries over."""
    cfg, params = _conv_model(tmp_path)
    runner = HybridRunner(bind(cfg, params), fast_jit, capacity=64)
    rows = prompts([9, 20], cfg.vocab_size, seed=4)
    logits, state = runner.prefill(runner.empty(2), *right_pad(rows, 32))
    toks, step_logits, _ = runner.greedy(logits, state, 12)
    full = [row + toks[i, :-1].tolist() for i, row in enumerate(rows)]
    for j in (1, 5, 11):
        prefix = [f[:len(r) + j] for r, f in zip(rows, full)]
        lg, _ = runner.prefill(runner.empty(2), *right_pad(prefix, 32))
        assert rel_diff(lg, step_logits[:, j]) < 1e-5, j
    _, mid = runner.prefill(runner.empty(2), *right_pad([f[:5] for f in full], 32))
    lg, _ = runner.prefill(mid, *right_pad([f[5:len(r) + 11] for r, f in zip(rows, full)], 32))
    assert rel_diff(lg, step_logits[:, 11]) < 1e-5


# ---------------------------------------------------------------------------------------------
# As the state-spaces repositories ship them: a pickled pytorch_model.bin, converted.


def test_pickled_hybrid_checkpoint_converts_and_gives_hf_tokens(tmp_path, capfd, fast_jit):
    """mamba2attn's layout as shipped (torch.save of the state dict, the tied head sharing the
    embedding's storage): `convert-checkpoint` writes its tensors, bit for bit and under their own
    names, to safetensors beside the unchanged config.json; the converted directory loads, and its
    greedy tokens equal HF Bamba's."""
    import collections

    import torch
    from safetensors.numpy import load_file

    import hybrid_reference as ref
    from test_errors_cli import cli

    hf = ref.make_hf_model("bamba", seed=7, **BAMBA)
    stored = write_mamba_ssm_checkpoint(hf, tmp_path / "stored", with_mlp=True)
    tensors = load_file(str(stored / "model.safetensors"))
    sd = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in tensors.items())
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # mamba_ssm ties by sharing the tensor
    src = tmp_path / "mamba2attn"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text((stored / "config.json").read_text())

    code, out, err = cli(capfd, "convert-checkpoint", src, tmp_path / "out")
    assert code == 0, err
    assert "converted mamba_ssm hybrid checkpoint" in out and "4 layers (2 Mamba-2, 2 attention)" in out
    assert "tied head" in out and f"{len(tensors)} tensors" in out
    converted = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert converted.keys() == tensors.keys()
    for name, value in tensors.items():
        assert converted[name].dtype == value.dtype and np.array_equal(converted[name], value), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    cfg, model = load_hybrid(str(tmp_path / "out"))
    runner = HybridRunner(model, fast_jit)
    row = prompts([21], cfg.vocab_size, seed=5)[0]
    logits, state = runner.prefill(runner.empty(1), *right_pad([row], PAD_T))
    ours, _, _ = runner.greedy(logits, state, 16)
    assert ours[0].tolist() == ref.hf_greedy(hf, row, 16)[0]


def test_pickled_hybrid_checkpoint_that_disagrees_is_refused(tmp_path, capfd):
    """A tensor missing from the pickle: one line naming it, nothing written."""
    import torch
    from safetensors.numpy import load_file

    import hybrid_reference as ref
    from test_errors_cli import cli, error_line

    stored = write_mamba_ssm_checkpoint(ref.make_hf_model("bamba", seed=7, **BAMBA), tmp_path / "stored", True)
    sd = {k: torch.from_numpy(v.copy()) for k, v in load_file(str(stored / "model.safetensors")).items()
          if k != "backbone.layers.2.mlp.fc2.weight"}
    src = tmp_path / "src"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text((stored / "config.json").read_text())
    code, _, err = cli(capfd, "convert-checkpoint", src, tmp_path / "out")
    error_line(code, err, "backbone.layers.2.mlp.fc2.weight is missing", "2 Mamba-2, 2 attention")
    assert not (tmp_path / "out").exists()


def test_hybrid_safetensors_checkpoint_needs_no_conversion(tmp_path, capfd):
    import hybrid_reference as ref
    from test_errors_cli import cli, error_line

    stored = write_mamba_ssm_checkpoint(ref.make_hf_model("bamba", seed=7, **BAMBA), tmp_path / "stored", True)
    code, _, err = cli(capfd, "convert-checkpoint", stored, tmp_path / "out")
    error_line(code, err, "already a mamba_ssm hybrid's safetensors checkpoint", "use it as it is")
    assert not (tmp_path / "out").exists()
