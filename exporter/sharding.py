"""Tensor-parallel shardings for an N-device artifact, left to XLA's SPMD partitioner (GSPMD).

`mamba2-aot export --devices N` lowers prefill and decode with `jax.jit(in_shardings=...,
out_shardings=...)` over a one-axis mesh ("model", N). No communication is written by hand:
the PartitionSpecs below say how each weight and cache array is laid out, and GSPMD inserts
whatever collectives the computation then needs.

Layout (heads split across devices):
  * in_proj.weight [z | xBC | dt rows, d] and its bias: output rows split;
  * conv1d.weight [conv_dim, 1, K] and its bias: channels split;
  * dt_bias, A_log, D [heads] and the gated norm weight [intermediate]: split;
  * out_proj.weight [d, intermediate]: input columns split (XLA all-reduces the partial sums);
  * embeddings.weight and lm_head.weight [vocab, d]: split over the vocabulary;
  * the block norms, norm_f and out_proj.bias: replicated (tiny);
  * state: each layer's ssm [b, heads, P, N] on the heads axis, conv [b, K-1, conv_dim] on channels.
A dimension that is not divisible by N falls back to replicated; the manifest then records
that tensor as replicated (all-null spec) and `ShardingPlan.fallbacks` says why.

Known cost of this version: the model keeps in_proj fused, so a contiguous split of its rows
does not line up with heads (device i holds a slice of [z | x B C | dt] that cuts across the
three parts), and B/C (shared by all heads) land on a few devices only. XLA reshards what the
split, conv and SSD need, which adds collectives per layer. Correctness and ~1/N weight memory
per device hold regardless. Future work: a head-aligned layout -- separate z / x / BC / dt
projections (or in_proj rows permuted so each device's block is [z_i | x_i | B C | dt_i], with
B/C replicated) -- would leave only the out_proj all-reduce and the vocab-parallel logits.

Export needs no devices: shardings are over an AbstractMesh, so an 8-device TPU artifact can be
exported on a laptop. The runtime (runtime.engine.placement) rebuilds a concrete mesh from the
manifest's `mesh` record and refuses a process whose device count differs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from exporter.state import state_shapes
from exporter.config import Mamba2Config
from exporter.params import param_shapes

AXIS = "model"

# (name pattern, which dim is split) -- first match wins; unmatched tensors are replicated.
_WEIGHT_RULES: tuple[tuple[re.Pattern, int], ...] = tuple((re.compile(p), d) for p, d in (
    (r"(^|\.)embeddings?\.weight$", 0),  # [vocab, d]
    (r"^lm_head\.weight$", 0),  # [vocab, d]
    (r"\.mixer\.in_proj\.(weight|bias)$", 0),  # [z | xBC | dt rows, d]
    (r"\.mixer\.conv1d\.(weight|bias)$", 0),  # [conv_dim, 1, K]
    (r"\.mixer\.(dt_bias|A_log|D)$", 0),  # [heads]
    (r"\.mixer\.norm\.weight$", 0),  # [intermediate]
    (r"\.mixer\.out_proj\.weight$", 1),  # [d, intermediate]: rows reduced across devices
))
# State leaves ("ssm.i", "conv.i"): the dim split (ssm: heads; conv: channels).
_CACHE_RULES = {"ssm": 1, "conv": 2}

Spec = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where every weight and cache array lives on a one-axis mesh of `devices` devices."""

    devices: int
    weights: dict[str, Spec]  # HF name -> one entry per dim: AXIS or None
    cache: dict[str, Spec]  # state leaf ("conv.i" / "ssm.i") -> spec
    fallbacks: tuple[str, ...]  # "name [shape]: dim k (n) not divisible by N", replicated instead

    def mesh(self) -> AbstractMesh:
        return abstract_mesh(self.devices)

    def manifest_record(self) -> dict[str, Any]:
        """The manifest's `mesh` object: axis names, shape, and PartitionSpecs as JSON lists."""
        return {
            "axis_names": [AXIS],
            "shape": [self.devices],
            "weight_shardings": {k: list(v) for k, v in self.weights.items()},
            "cache_shardings": {k: list(v) for k, v in self.cache.items()},
        }


def abstract_mesh(devices: int) -> AbstractMesh:
    """The export mesh: ("model", N), Auto axes (Explicit axes reject the embedding gather)."""
    return AbstractMesh((devices,), (AXIS,), axis_types=(AxisType.Auto,))


def _split(name: str, shape: tuple[int, ...], dim: int | None, n: int, fallbacks: list[str],
           shown: str | None = None) -> Spec:
    spec: list[str | None] = [None] * len(shape)
    if dim is None or n == 1:
        return tuple(spec)
    if shape[dim] % n:
        shown = shown or "[" + ", ".join(map(str, shape)) + "]"
        fallbacks.append(f"{name} {shown}: dim {dim} ({shape[dim]}) is not divisible by {n}")
        return tuple(spec)
    spec[dim] = AXIS
    return tuple(spec)


def weight_dim(name: str) -> int | None:
    """The dim of weight `name` that tensor parallelism splits, or None (replicated)."""
    for pattern, dim in _WEIGHT_RULES:
        if pattern.search(name):
            return dim
    return None


def plan(cfg: Mamba2Config, devices: int, dtype=jax.numpy.float32) -> ShardingPlan:
    if int(devices) != devices or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    fallbacks: list[str] = []
    weights = {name: _split(name, s.shape, weight_dim(name), devices, fallbacks)
               for name, s in param_shapes(cfg, dtype).items()}
    cache = {name: _split(f"state.{name}", s.shape, _CACHE_RULES[name.split(".")[0]], devices, fallbacks,
                          "[" + ", ".join(str(d) if i else "b" for i, d in enumerate(s.shape)) + "]")
             for name, s in state_shapes(cfg, 1, dtype).items()}  # dim 0 (batch) is never split
    return ShardingPlan(int(devices), weights, cache, tuple(fallbacks))


def fallback_summary(p: ShardingPlan) -> list[str]:
    """Fallbacks with layer indices folded (`layers.*`), one line per distinct tensor."""
    folded = (re.sub(r"^state\.(conv|ssm)\.\d+ ", r"state.\1.* ", re.sub(r"\.layers\.\d+\.", ".layers.*.", f))
              for f in p.fallbacks)
    return list(dict.fromkeys(folded))


def function_shardings(p: ShardingPlan, name: str) -> tuple[tuple, tuple]:
    """(in_shardings, out_shardings) for `jax.jit` of ModelFunctions.prefill / .decode.

    Weights and cache per the plan; tokens, lengths, logits, sampling scalars and every other
    small array replicated (logits stay whole: sampling sorts the full vocabulary)."""
    mesh = p.mesh()
    ns = lambda spec: NamedSharding(mesh, PartitionSpec(*spec))  # noqa: E731
    rep = NamedSharding(mesh, PartitionSpec())
    params = {k: ns(v) for k, v in p.weights.items()}
    cache = {k: ns(v) for k, v in p.cache.items()}
    if name == "prefill":  # (params, state, tokens, lengths) -> (logits, state)
        return (params, cache, rep, rep), (rep, cache)
    if name == "decode":  # (params, cache, logits, ...9 small) -> (tokens, counts, cache, logits, finished)
        return (params, cache) + (rep,) * 10, (rep, rep, cache, rep, rep)
    raise ValueError(f"unknown function {name!r}")
