"""mamba_ssm-format checkpoints built in the tests, as the state-spaces repositories ship them.

A seeded HF `Mamba2ForCausalLM` (hf_reference) is renamed to mamba_ssm's parameter names,
`torch.save`d as `pytorch_model.bin` (or shards + index), with a mamba_ssm `config.json`
(unpadded vocab + pad_vocab_size_multiple). `mamba_ssm_shapes` writes down mamba_ssm's own
parameter shapes from its module definitions (Mamba2, Block, MixerModel, MambaLMHeadModel),
independently of the exporter, so presets can be compared with what a converted checkpoint holds.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

# The state-spaces/mamba2-* config.json files, as published (d_model, n_layer per size).
OFFICIAL_SIZES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}


def official_config(size: str) -> dict:
    d_model, n_layer = OFFICIAL_SIZES[size]
    return {
        "d_model": d_model, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": 50277,
        "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True,
    }


def mamba_ssm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{mamba_ssm state-dict name: shape} for a pure Mamba-2 config (mamba_ssm's defaults)."""
    ssm = config["ssm_cfg"]
    d, n_layer = config["d_model"], config["n_layer"]
    mult = config.get("pad_vocab_size_multiple", 8)
    vocab = -(-config["vocab_size"] // mult) * mult
    d_state, d_conv = ssm.get("d_state", 128), ssm.get("d_conv", 4)
    d_inner = ssm.get("expand", 2) * d
    ngroups, nheads = ssm.get("ngroups", 1), d_inner // ssm.get("headdim", 64)
    conv_dim = d_inner + 2 * ngroups * d_state
    out = {"backbone.embedding.weight": (vocab, d)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        out |= {
            p + "mixer.dt_bias": (nheads,), p + "mixer.A_log": (nheads,), p + "mixer.D": (nheads,),
            p + "mixer.in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d),
            p + "mixer.conv1d.weight": (conv_dim, 1, d_conv),
            p + "mixer.norm.weight": (d_inner,), p + "mixer.out_proj.weight": (d, d_inner),
            p + "norm.weight": (d,),
        }
        if ssm.get("conv_bias", True):
            out[p + "mixer.conv1d.bias"] = (conv_dim,)
        if ssm.get("bias", False):
            out[p + "mixer.in_proj.bias"] = (2 * d_inner + 2 * ngroups * d_state + nheads,)
            out[p + "mixer.out_proj.bias"] = (d,)
    out["backbone.norm_f.weight"] = (d,)
    out["lm_head.weight"] = (vocab, d)  # a tied model's state dict still lists it (shared storage)
    return out


def config_for(hf_config, vocab_size: int, multiple: int, **ssm_extra) -> dict:
    """The mamba_ssm config.json of an HF Mamba2Config whose vocab is `vocab_size` padded to `multiple`."""
    c = hf_config
    return {
        "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                    "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size,
                    "bias": c.use_bias, "conv_bias": c.use_conv_bias, **ssm_extra},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": multiple, "tie_embeddings": c.tie_word_embeddings,
    }


def state_dict(hf_model) -> collections.OrderedDict:
    """The HF model's state dict under mamba_ssm's names (a tied head keeps sharing the embedding)."""
    return collections.OrderedDict(
        ("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k, v)
        for k, v in hf_model.state_dict().items()
    )


def write_checkpoint(hf_model, directory: Path, vocab_size: int, multiple: int = 16, shards: int = 1) -> Path:
    """A mamba_ssm checkpoint directory: config.json + pytorch_model.bin (or `shards` files + index)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict(hf_model)
    if shards == 1:
        torch.save(sd, directory / "pytorch_model.bin")
    else:
        names = list(sd)
        weight_map = {}
        for s in range(shards):
            file = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            part = collections.OrderedDict((n, sd[n]) for n in names[s::shards])
            torch.save(part, directory / file)
            weight_map |= {n: file for n in part}
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config_for(hf_model.config, vocab_size, multiple)))
    return directory
