"""PyTorch references for the hybrid families: seeded tiny HF models saved as real checkpoints,
HF forward and greedy generation. Imported lazily (torch) by tests/test_hybrid_*.py.

Weights are spread (N(0, 0.2) linears, random norms and biases, SSM parameters in their usual
ranges) so greedy choices have clear margins; routers get larger weights so top-k choices are
far from ties.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import transformers

torch.set_num_threads(1)  # tiny models; see hf_reference.py

# Tiny shapes shared by the families: hidden 64, 8 Mamba heads of 16 (2 groups), state 16,
# chunk 16 (prompts of 20-50 tokens cross chunk boundaries), 4 query heads of 16 over 2 KV heads.
_MAMBA_IBM = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4,
                  mamba_expand=2, mamba_chunk_size=16, mamba_conv_bias=True, mamba_proj_bias=False)
_COMMON = dict(vocab_size=200, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY = {
    # 4 layers, attention at 1 and 3 (partial RoPE: half of each head)
    "bamba": dict(model_type="bamba", num_hidden_layers=4, attn_layer_indices=[1, 3], intermediate_size=96,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, **_MAMBA_IBM, **_COMMON),
    # M, attention, MLP, MoE (4 experts, top-2, 2 groups), M
    "nemotron_h": dict(model_type="nemotron_h", layers_block_type=["linear_attention", "full_attention", "mlp",
                                                                   "moe", "linear_attention"],
                       head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
                       ssm_state_size=16, conv_kernel=4, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1,
                       routed_scaling_factor=1.5, time_step_min=1e-6, tie_word_embeddings=False, **_COMMON),
    # dense: shared MLP only; RoPE; Granite's multipliers
    "granite_dense": dict(model_type="granitemoehybrid", num_hidden_layers=4,
                          layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=0,
                          shared_intermediate_size=80, intermediate_size=32, position_embedding_type="rope",
                          embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                          logits_scaling=2.0, tie_word_embeddings=True, **_MAMBA_IBM, **_COMMON),
    # MoE: 4 experts, top-2, plus the shared MLP; no RoPE (as Granite-4.0-H)
    "granite_moe": dict(model_type="granitemoehybrid", num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=48,
                        position_embedding_type=None, embedding_multiplier=2.0, residual_multiplier=0.7,
                        attention_multiplier=0.25, logits_scaling=1.5, tie_word_embeddings=False,
                        **_MAMBA_IBM, **_COMMON),
    # every layer: attention and Mamba-2 side by side; muP multipliers; gated norm after the gate
    "falcon_h1": dict(model_type="falcon_h1", num_hidden_layers=3, head_dim=16, intermediate_size=96,
                      mamba_d_ssm=128, rms_norm_eps=1e-5, tie_word_embeddings=False, mamba_rms_norm=True,
                      mamba_norm_before_gate=True, projectors_bias=True, lm_head_multiplier=0.7,
                      embedding_multiplier=1.3, key_multiplier=0.8, attention_in_multiplier=1.1,
                      attention_out_multiplier=0.9, ssm_in_multiplier=1.2, ssm_out_multiplier=0.8,
                      ssm_multipliers=[0.9, 1.1, 1.2, 0.8, 1.3], mlp_multipliers=[1.2, 0.9],
                      **_MAMBA_IBM, **_COMMON),
    # 6 layers, 3 hybrid sharing 2 transformer blocks (block 0 used twice), q/k/v adapters, RoPE
    "zamba2": dict(model_type="zamba2", num_hidden_layers=6,
                   layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
                   n_mamba_heads=8, mamba_d_state=16, mamba_ngroups=2, mamba_expand=2, chunk_size=16,
                   num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
                   intermediate_size=96, hidden_act="gelu", time_step_min=1e-6, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, **{**_COMMON, "num_key_value_heads": 4}),  # MHA, as Zamba2's
}
# Variants, checked on logits: every bias flag on; Nemotron 3's latent-space experts (1 group).
TINY["bamba_bias"] = {**TINY["bamba"], "attention_bias": True, "mlp_bias": True, "mamba_proj_bias": True,
                      "mamba_conv_bias": False}
TINY["falcon_nonorm"] = {**TINY["falcon_h1"], "mamba_rms_norm": False, "projectors_bias": False}
TINY["falcon_gate_first"] = {**TINY["falcon_h1"], "mamba_norm_before_gate": False}
TINY["nemotron_latent"] = {**TINY["nemotron_h"], "moe_latent_size": 24, "n_group": 1, "topk_group": 1,
                           "norm_topk_prob": False, "mlp_bias": True}

# Zamba2's shared blocks have no residual inside and feed every hybrid layer: with N(0, 0.2)
# weights its fp32 forward (HF's and ours alike) is ~7e-5 off float64; 0.1 keeps it near 1e-6.
WEIGHT_STD = {"zamba2": 0.1}

_CLASSES = {
    "bamba": ("BambaConfig", "BambaForCausalLM"),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM"),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM"),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM"),
}


def hf_config(name: str, **overrides: Any):
    kw = {**TINY[name], **overrides}
    cfg_cls, _ = _CLASSES[kw.pop("model_type")]
    return getattr(transformers, cfg_cls)(**kw)


@torch.no_grad()
def make_hf_model(name: str, seed: int = 0, weight_std: float | None = None, **overrides: Any):
    """A seeded random fp32 HF model of the tiny `name` config, eval mode, eager attention."""
    weight_std = WEIGHT_STD.get(name, 0.2) if weight_std is None else weight_std
    torch.manual_seed(seed)
    cfg = hf_config(name, **overrides)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, _CLASSES[cfg.model_type][1])(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    state = dict(model.named_parameters())
    state.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    for name_, p in state.items():
        leaf = name_.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.log(uniform(p.shape, 1.0, 16.0)))
        elif leaf == "dt_bias":
            dt = torch.exp(uniform(p.shape, math.log(1e-3), math.log(0.1)))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "D":
            p.copy_(uniform(p.shape, 0.5, 1.5))
        elif "norm" in name_ and leaf == "weight":
            p.copy_(1.0 + normal(p.shape, 0.1))
        elif "conv1d" in name_ and leaf == "weight":
            p.copy_(uniform(p.shape, -0.5, 0.5))
        elif leaf == "bias" or leaf == "e_score_correction_bias":
            p.copy_(normal(p.shape, 0.1))
        elif "router" in name_ or name_.endswith("gate.weight"):
            p.copy_(normal(p.shape, 1.0))
        else:
            p.copy_(normal(p.shape, weight_std))
    return model


def save_checkpoint(model, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _ids(tokens) -> torch.Tensor:
    arr = np.asarray(tokens, dtype=np.int64)
    return torch.from_numpy(arr[None] if arr.ndim == 1 else arr)


@torch.no_grad()
def hf_logits(model, tokens) -> np.ndarray:
    """All-position logits [b, t, V] of a full forward (no cache)."""
    return model(_ids(tokens), use_cache=False).logits.float().numpy()


@torch.no_grad()
def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """HF generate(do_sample=False) of one prompt: (new tokens, per-step logits [n, V])."""
    ids = _ids(prompt)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
        min_new_tokens=0, eos_token_id=None, pad_token_id=0, use_cache=True,
        return_dict_in_generate=True, output_logits=True,
    )
    new = out.sequences[0, ids.shape[1]:].tolist()
    assert len(new) == max_new_tokens, "HF generate stopped early"
    return new, torch.cat([lg.float() for lg in out.logits], dim=0).numpy()
