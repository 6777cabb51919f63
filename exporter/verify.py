"""Compare an artifact's compiled functions with the live JAX model on the same inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from runtime.engine.model import LoadedModel
from runtime.engine.requests import RowSettings, check_stop_ids, pad_batch

from exporter.config import Mamba2Config
from exporter.functions import ModelFunctions

# Max relative difference allowed (max |a - b| / max |b|): compiled and live run the same HLO,
# so float32 differs only by compiler scheduling; bfloat16 gets bf16's resolution.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclasses.dataclass
class VerifyReport:
    prompt_lengths: list[int]
    steps: int
    logits_max_abs: float
    logits_max_rel: float
    tokens_agree: bool
    first_disagreement: int | None
    cache_max_abs: float
    cache_max_rel: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return (self.tokens_agree and self.logits_max_rel <= self.tolerance
                and self.cache_max_rel <= self.tolerance)


def live_functions(loaded: LoadedModel) -> ModelFunctions:
    m = loaded.manifest
    if m.semantics_version != 2:
        from runtime.errors import ArtifactError

        raise ArtifactError("verify compares semantics-2 artifacts with the live model: re-export this one")
    return ModelFunctions(Mamba2Config.from_dict(m.model["config"]), jnp.dtype(m.dtype), m.limits,
                          platform=loaded.platform)


def _diff(a, b) -> tuple[float, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    abs_ = float(np.max(np.abs(a - b))) if a.size else 0.0
    return abs_, abs_ / max(float(np.max(np.abs(b))), 1e-30)


def verify(loaded: LoadedModel, steps: int = 64, seed: int = 0) -> VerifyReport:
    """Ragged random prompts through both paths: prefill logits, `steps` greedy tokens, final cache."""
    fns = live_functions(loaded)
    limits = loaded.limits
    rng = np.random.default_rng(seed)
    # A ragged batch whose longest prompt crosses an SSD chunk boundary on cpu (chunk 128).
    lengths = sorted({1, 7, min(139, limits["max_prompt_tokens"], loaded.buckets["prompt"][-1])})
    lengths = lengths[: limits["max_batch"]]
    prompts = [rng.integers(0, limits["vocab_size"], n).tolist() for n in lengths]
    tokens, lens = pad_batch(prompts, loaded.buckets)
    B = tokens.shape[0]
    steps = max(1, min(steps, limits["decode_block"]))
    greedy = RowSettings.build(B)
    finished = np.arange(B) >= len(prompts)
    keys = np.zeros((B, 2), np.uint32)
    stop = np.tile(check_stop_ids(None, limits), (B, 1))  # [B, S]
    budget, zero = np.full((B,), steps, np.int32), np.zeros((B,), np.int32)

    logits_a, state_a = loaded.prefill(tokens, lens)
    out_a = loaded.decode(state_a, logits_a, finished, budget, zero, keys, greedy, stop)

    params = loaded.params
    logits_b, state_b = jax.jit(fns.prefill)(params, loaded.empty_state(B), tokens, lens)
    out_b = jax.jit(fns.decode)(params, state_b, logits_b, finished, budget, zero, keys, greedy.temperature,
                                greedy.top_k, greedy.top_p, greedy.min_p, stop)

    n = len(prompts)
    la_abs, la_rel = _diff(logits_a[:n], logits_b[:n])
    toks_a, toks_b = np.asarray(out_a[0])[:n, :steps], np.asarray(out_b[0])[:n, :steps]
    disagree = np.nonzero((toks_a != toks_b).any(axis=0))[0]
    layout = loaded.state_layout  # the prompts' rows of every state leaf, along its batch axis
    rows = lambda a, leaf: np.take(np.asarray(a), np.arange(n), axis=leaf.axis)  # noqa: E731
    cache_diffs = [_diff(rows(a, leaf), rows(b, leaf))
                   for leaf, a, b in zip(layout.leaves, layout.flat(out_a[2]), layout.flat(out_b[2]))]
    return VerifyReport(
        prompt_lengths=lengths, steps=steps, logits_max_abs=la_abs, logits_max_rel=la_rel,
        tokens_agree=disagree.size == 0,
        first_disagreement=int(disagree[0]) if disagree.size else None,
        cache_max_abs=max(d[0] for d in cache_diffs), cache_max_rel=max(d[1] for d in cache_diffs),
        tolerance=TOLERANCE.get(loaded.manifest.dtype, 1e-4))
