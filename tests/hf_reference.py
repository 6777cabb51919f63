"""The PyTorch reference: seeded random HF `Mamba2ForCausalLM` checkpoints and HF greedy decoding.

Tests build tiny HF models with *spread* random weights (so greedy choices have clear logit
margins instead of near-ties), save them as real HF checkpoints (`config.json` +
`model.safetensors`) and load those directories into our JAX model. Imported lazily by the
fixtures in `conftest.py`, so test files that never touch torch do not pay for importing it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM

# One intra-op thread: these models are tiny, and with 2 threads torch's conv1d/matmul thread
# pool spin-waits (measured: a 64-token generate takes 0.13 s CPU with 1 thread, 2 s with 2 on
# a loaded 2-core box). JAX compiles in parallel to this anyway.
torch.set_num_threads(1)

# Tiny shapes: 8 heads of 16 over an intermediate size of 128; chunk 16 so 20-50 token prompts
# cross chunk boundaries.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    vocab_size=200,
    state_size=16,
    head_dim=16,
    num_heads=8,
    expand=2,
    n_groups=1,
    conv_kernel=4,
    chunk_size=16,
    tie_word_embeddings=True,
    use_bias=False,
    use_conv_bias=True,
    residual_in_fp32=True,
    time_step_limit=(0.0, math.inf),
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def hf_config(**overrides: Any) -> HFMamba2Config:
    kw = {**TINY, **overrides}
    if "num_heads" not in overrides:  # keep num_heads * head_dim == expand * hidden_size
        kw["num_heads"] = kw["expand"] * kw["hidden_size"] // kw["head_dim"]
    return HFMamba2Config(**kw)


@torch.no_grad()
def make_hf_model(seed: int = 0, weight_std: float = 0.2, **overrides: Any) -> Mamba2ForCausalLM:
    """A seeded random fp32 HF Mamba2ForCausalLM in eval mode.

    Every Linear and the embedding get N(0, weight_std): with hidden 64 that gives logits of
    std ~ weight_std * 8, so top-2 gaps are usually far above fp32 noise. The SSM parameters
    stay in their usual ranges (A in [1, 16], dt in [1e-3, 0.1] through dt_bias, D around 1),
    and norm weights / biases are random too so that a mis-wired one cannot go unnoticed.
    """
    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    model = Mamba2ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("mixer.A_log"):
            p.copy_(torch.log(uniform(p.shape, 1.0, 16.0)))
        elif name.endswith("mixer.dt_bias"):
            dt = torch.exp(uniform(p.shape, math.log(1e-3), math.log(0.1)))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        elif name.endswith("mixer.D"):
            p.copy_(uniform(p.shape, 0.5, 1.5))
        elif "norm" in name and leaf == "weight":  # block norm, gated mixer norm, norm_f
            p.copy_(1.0 + normal(p.shape, 0.1))
        elif "conv1d" in name and leaf == "weight":
            p.copy_(uniform(p.shape, -0.5, 0.5))
        elif leaf == "bias":
            p.copy_(normal(p.shape, 0.1))
        else:  # embeddings, in_proj, out_proj, lm_head
            p.copy_(normal(p.shape, weight_std))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    return model


def save_checkpoint(model: Mamba2ForCausalLM, path: str | Path) -> Path:
    """`save_pretrained` as safetensors: a real HF checkpoint directory."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return path


def _ids(tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
    arr = np.asarray(tokens, dtype=np.int64)
    return torch.from_numpy(arr[None] if arr.ndim == 1 else arr)


@torch.no_grad()
def hf_forward(model: Mamba2ForCausalLM, tokens) -> tuple[np.ndarray, list[np.ndarray]]:
    """(all-position logits [b, t, V], per-layer output residuals [L] x [b, t, d]).

    HF's `hidden_states` holds each layer's output residual and then norm_f's output as the
    last entry (there is no embedding entry in Mamba2Model), so the residuals are [:-1].
    """
    out = model(_ids(tokens), output_hidden_states=True, use_cache=False)
    hidden = [h.float().numpy() for h in out.hidden_states[:-1]]
    assert len(hidden) == model.config.num_hidden_layers
    return out.logits.float().numpy(), hidden


@torch.no_grad()
def hf_greedy(model: Mamba2ForCausalLM, prompt: Sequence[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """HF `generate(do_sample=False)`: (new tokens, per-step logits [n, V]); never stops at EOS."""
    ids = _ids(prompt)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, ids.shape[1]:].tolist()
    assert len(new) == max_new_tokens, "HF generate stopped early"
    logits = torch.cat([lg.float() for lg in out.logits], dim=0).numpy()
    return new, logits


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """Gap between the largest and second largest logit along the last axis."""
    part = np.partition(logits, -2, axis=-1)
    return part[..., -1] - part[..., -2]
