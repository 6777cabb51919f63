"""Config files: mamba_ssm, HF and mistral configs are mapped by their own keys; a config that is
neither, lacks a key with no safe default, or asks for something this model does not compute is
refused by name, never completed with another model's values."""

from __future__ import annotations

import copy
import json
import math

import pytest

import mamba_ssm_format as ssm
from exporter.config import PRESETS, ConfigError, load_config
from exporter.config_files import config_from_dict
from test_errors_cli import cli, error_line

OFFICIAL = ssm.official_config("130m")
HF = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 200, "n_groups": 2,
      "tie_word_embeddings": True, "state_size": 16, "head_dim": 16}
MISTRAL = {"dim": 4096, "n_layers": 64, "vocab_size": 32768, "n_groups": 8, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": False, "model_type": "mamba"}


def _edited(base: dict, edit) -> dict:
    d = copy.deepcopy(base)
    edit(d)
    return d


def _pop(key):
    return lambda d: d.pop(key)


def _ssm(**kw):
    return lambda d: d["ssm_cfg"].update(kw)


def _set(**kw):
    return lambda d: d.update(kw)


MAMBA_SSM_REFUSED = {
    "no-d_model": (_pop("d_model"), ["lacks d_model", "no safe default"]),
    "no-n_layer": (_pop("n_layer"), ["lacks n_layer"]),
    "no-vocab_size": (_pop("vocab_size"), ["lacks vocab_size"]),
    "no-ssm_cfg": (_pop("ssm_cfg"), ["lacks ssm_cfg", "Mamba-1"]),
    "no-layer": (lambda d: d["ssm_cfg"].pop("layer"), ["ssm_cfg lacks layer: Mamba2", "Mamba-1"]),
    "mamba1": (_ssm(layer="Mamba1"), ["ssm_cfg.layer is 'Mamba1'", "only Mamba-2"]),
    "attention": (_set(attn_layer_idx=[3, 9], attn_cfg={"num_heads": 8}),
                  ["hybrid mamba_ssm checkpoints are not supported yet", "attn_layer_idx", "[3, 9]"]),
    "mlp": (_set(d_intermediate=1536), ["hybrid mamba_ssm checkpoints are not supported yet", "d_intermediate"]),
    "residual-bf16": (_set(residual_in_fp32=False), ["residual_in_fp32=false is not supported"]),
    "layernorm": (_set(rms_norm=False), ["rms_norm=false"]),
    "D_has_hdim": (_ssm(D_has_hdim=True), ["ssm_cfg.D_has_hdim=true", "not supported"]),
    "no-gated-norm": (_ssm(rmsnorm=False), ["ssm_cfg.rmsnorm=false", "not supported"]),
    "norm_before_gate": (_ssm(norm_before_gate=True), ["ssm_cfg.norm_before_gate=true"]),
    "d_ssm": (_ssm(d_ssm=512), ["ssm_cfg.d_ssm=512", "not supported"]),
    "unknown-key": (_set(norm_epsilon=1e-6), ["norm_epsilon", "does not know"]),
    "unknown-ssm-key": (_ssm(dt_rank="auto"), ["ssm_cfg.dt_rank", "does not know"]),
    "string-int": (_set(d_model="768"), ["d_model must be an integer", "'768'"]),
    "bool-int": (_set(n_layer=True), ["n_layer must be an integer"]),
    "zero-groups": (_ssm(ngroups=0), ["ssm_cfg.ngroups must be an integer >= 1"]),
    "string-bool": (_set(tie_embeddings="yes"), ["tie_embeddings must be true or false"]),
    "dt_limit": (_ssm(dt_limit=[0.0]), ["ssm_cfg.dt_limit must be a pair of numbers"]),
    "dt_limit-order": (_ssm(dt_limit=[1.0, 0.5]), ["ssm_cfg.dt_limit must be [low, high]"]),
    "groups-vs-heads": (_ssm(ngroups=5), ["not a multiple of n_groups 5"]),
    "headdim": (_ssm(headdim=100), ["must equal expand * hidden_size"]),
    "attn-not-list": (_set(attn_layer_idx=3), ["attn_layer_idx must be a list"]),
    "ssm_cfg-not-object": (_set(ssm_cfg=["Mamba2"]), ["ssm_cfg must be an object"]),
}


@pytest.mark.parametrize("case", list(MAMBA_SSM_REFUSED))
def test_mamba_ssm_config_refused(case, tmp_path):
    edit, needles = MAMBA_SSM_REFUSED[case]
    (tmp_path / "config.json").write_text(json.dumps(_edited(OFFICIAL, edit)))
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_mamba_ssm_defaults_are_mamba_ssms():
    """Absent keys take mamba_ssm's values (MambaConfig, Mamba2): not HF's, not any preset's."""
    cfg = config_from_dict({"d_model": 256, "n_layer": 3, "vocab_size": 1000, "ssm_cfg": {"layer": "Mamba2"}}, "x")
    assert (cfg.state_size, cfg.conv_kernel, cfg.expand, cfg.head_dim, cfg.n_groups, cfg.chunk_size) == (128, 4, 2, 64, 1, 256)
    assert cfg.vocab_size == 1000 and cfg.tie_word_embeddings  # pad_vocab_size_multiple 8, tied
    assert (cfg.use_bias, cfg.use_conv_bias, cfg.time_step_limit) == (False, True, (0.0, math.inf))
    assert (cfg.bos_token_id, cfg.eos_token_id) == (None, None)  # not GPT-NeoX's vocabulary
    gpt_neox = config_from_dict({**OFFICIAL, "vocab_size": 50277, "pad_vocab_size_multiple": 8}, "x")
    assert gpt_neox.vocab_size == 50280 and gpt_neox.eos_token_id == 0


def test_mamba_ssm_config_maps_every_ssm_key():
    cfg = config_from_dict(_edited(OFFICIAL, _ssm(
        d_state=64, d_conv=3, expand=4, headdim=32, ngroups=4, chunk_size=128, bias=True, conv_bias=False,
        dt_min=0.01, dt_max=0.2, dt_limit=[0.001, "Infinity"], A_init_range=[1, 16], dt_init_floor=1e-4,
        use_mem_eff_path=False, D_has_hdim=False, rmsnorm=True, norm_before_gate=False, d_ssm=3072)), "x")
    assert (cfg.state_size, cfg.conv_kernel, cfg.expand, cfg.head_dim, cfg.n_groups, cfg.chunk_size) == (64, 3, 4, 32, 4, 128)
    assert (cfg.use_bias, cfg.use_conv_bias, cfg.num_heads) == (True, False, 96)
    assert (cfg.time_step_min, cfg.time_step_max, cfg.time_step_limit) == (0.01, 0.2, (0.001, math.inf))


HF_REFUSED = {
    "no-hidden_size": (_pop("hidden_size"), ["lacks hidden_size"]),
    "no-num_hidden_layers": (_pop("num_hidden_layers"), ["lacks num_hidden_layers"]),
    "no-vocab_size": (_pop("vocab_size"), ["lacks vocab_size"]),
    "no-n_groups": (_pop("n_groups"), ["lacks n_groups"]),
    "no-tie": (_pop("tie_word_embeddings"), ["lacks tie_word_embeddings"]),
    "residual-bf16": (_set(residual_in_fp32=False), ["residual_in_fp32=false is not supported"]),
    "norm_before_gate": (_set(norm_before_gate=True), ["norm_before_gate=true is not supported"]),
    "gelu": (_set(hidden_act="gelu"), ["hidden_act 'gelu'"]),
    "model_type": (_set(model_type="mamba"), ["model_type 'mamba'", "expected 'mamba2'"]),
    "eos-type": (_set(eos_token_id="2"), ["eos_token_id must be"]),
    "float-int": (_set(hidden_size=64.0), ["hidden_size must be an integer"]),
}


@pytest.mark.parametrize("case", list(HF_REFUSED))
def test_hf_config_refused(case):
    edit, needles = HF_REFUSED[case]
    with pytest.raises(ConfigError) as e:
        config_from_dict(_edited(HF, edit), "x")
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_hf_config_never_takes_codestral_defaults():
    """Only keys every Mamba-2 implementation defaults alike are filled; token ids stay unset."""
    cfg = config_from_dict(HF, "x")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.n_groups) == (64, 2, 200, 2)
    assert cfg.num_heads == 8  # derived from expand * hidden_size / head_dim, not HF's 128
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, None, None)
    assert cfg.conv_kernel == 4 and cfg.chunk_size == 256 and cfg.time_step_limit == (0.0, math.inf)
    tagged = config_from_dict({**HF, "time_step_limit": [0.0, {"__float__": "Infinity"}], "eos_token_id": [5, 6]}, "x")
    assert tagged.time_step_limit == (0.0, math.inf) and tagged.eos_token_id == 5


@pytest.mark.parametrize("d, needles", [
    ({}, ["neither an HF Mamba2 config", "nor a mamba_ssm one"]),
    ({"n_embd": 768, "n_layer_x": 2}, ["neither"]),
], ids=["empty", "gpt2-like"])
def test_neither_format_refused(d, needles):
    with pytest.raises(ConfigError) as e:
        config_from_dict(d, "x")
    assert all(n in str(e.value) for n in needles)


@pytest.mark.parametrize("edit, needles", [
    (_pop("n_groups"), ["params.json lacks n_groups", "mistral's format requires"]),
    (_set(model_type="transformer"), ["model_type 'transformer'", "expected 'mamba'"]),
    (_set(head_dim=128), ["params.json has key head_dim", "does not know"]),
    (_set(residual_in_fp32=False), ["residual_in_fp32=false"]),
], ids=["no-n_groups", "transformer", "unknown-key", "residual"])
def test_mistral_params_refused(edit, needles, tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(_edited(MISTRAL, edit)))
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_mistral_params_token_ids():
    cfg = config_from_dict(MISTRAL, "codestral", filename="params.json")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, None)
    assert (cfg.hidden_size, cfg.n_groups, cfg.num_heads, cfg.vocab_size) == (4096, 8, 128, 32768)


def test_official_config_dir_exports_the_preset(tmp_path):
    """The issue's case: a state-spaces config.json used to be read through HF's key names."""
    (tmp_path / "config.json").write_text(json.dumps(ssm.official_config("1.3b")))
    cfg = load_config(str(tmp_path))
    assert cfg.to_dict() | {"name": "1.3b"} == PRESETS["1.3b"].to_dict()


def test_export_refuses_a_noncausal_hybrid_config_in_one_line(tmp_path, capfd):
    """mamba_ssm hybrids export (exporter.hybrid_config); an attn_cfg without causal: true is
    mamba_ssm's bidirectional MHA, which cannot generate: refused in one line."""
    d = tmp_path / "mamba2attn"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**OFFICIAL, "attn_layer_idx": [9, 18], "attn_cfg": {"num_heads": 30}}))
    code, _, err = cli(capfd, "export", "--model", d, "--out", tmp_path / "art")
    error_line(code, err, "attn_cfg.causal is not true")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("case", ["no-d_model", "mamba1", "residual-bf16", "unknown-ssm-key"])
def test_convert_refuses_a_bad_config_in_one_line(case, tmp_path, capfd):
    edit, needles = MAMBA_SSM_REFUSED[case]
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_edited(OFFICIAL, edit)))
    (d / "pytorch_model.bin").write_bytes(b"never opened: the config is refused first")
    code, _, err = cli(capfd, "convert-checkpoint", d, tmp_path / "out")
    error_line(code, err, str(d / "config.json"), *needles)
    assert not (tmp_path / "out").exists()
