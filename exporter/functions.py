"""The two functions every artifact holds, over plain dicts so they serialize without model code.

prefill(params, tokens[b, t], lengths[b]) -> (logits[b, V], cache)
decode(params, cache, logits[b, V], finished[b], budget[], start_step[], keys[b, 2],
       temperature[], top_k[], top_p[], min_p[], stop_ids[S])
    -> (tokens[b, capacity], counts[b], cache, logits[b, V], finished[b])
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from exporter.cache import Mamba2Cache, cache_shapes
from exporter.config import Mamba2Config
from exporter.decode_loop import Sampling, decode_loop
from exporter.params import bind, param_shapes


# SSD chunk on CPU: T=2048 prefill of 130m ran at 575 tok/s with 128, 472 with 256, 300 with 64
# (README, performance). Accelerators keep the model's own chunk (256).
CPU_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one artifact accepts; the decode loop's output buffer is `max_new_tokens` wide."""

    max_batch: int = 64
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_stop_tokens: int = 8


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """The functions for one model, dtype, limits and target platform (which picks kernels)."""

    cfg: Mamba2Config
    dtype: jnp.dtype
    limits: Limits
    devices: int = 1  # > 1: tensor-parallel over a ("model", devices) mesh (exporter.sharding)
    platform: str = "cpu"

    def model(self, params):
        """The nnx model over `params`, with this platform's kernel choices (same math everywhere)."""
        cfg = self.cfg
        if self.platform == "cpu" and cfg.chunk_size > CPU_CHUNK:
            cfg = dataclasses.replace(cfg, chunk_size=CPU_CHUNK)
        return bind(cfg, params, self.dtype, rowwise_decode=self.platform == "cpu")

    def prefill(self, params, tokens, lengths):
        logits, cache = self.model(params).prefill(tokens, lengths)
        return logits, cache.as_dict()

    def decode(self, params, cache, logits, finished, budget, start_step, keys,
               temperature, top_k, top_p, min_p, stop_ids):
        model = self.model(params)
        sampling = Sampling(temperature, top_k, top_p, min_p)
        tokens, counts, cache, logits, finished = decode_loop(
            model, Mamba2Cache.from_dict(cache), logits, finished, budget, start_step, keys,
            sampling, stop_ids, capacity=self.limits.max_new_tokens)
        return tokens, counts, cache.as_dict(), logits, finished

    # Argument specs, with symbolic batch `b` and prompt length `t` where given as strings.
    def prefill_args(self, b="b", t="t"):
        b, t = _dims(b, t)
        return (self.param_specs(), _sds((b, t), jnp.int32), _sds((b,), jnp.int32))

    def decode_args(self, b="b"):
        (b,) = _dims(b)
        V, S = self.cfg.vocab_size, self.limits.max_stop_tokens
        f32, i32 = jnp.float32, jnp.int32
        return (self.param_specs(), cache_shapes(self.cfg, b, self.dtype), _sds((b, V), f32),
                _sds((b,), jnp.bool_), _sds((), i32), _sds((), i32), _sds((b, 2), jnp.uint32),
                _sds((), f32), _sds((), i32), _sds((), f32), _sds((), f32), _sds((S,), i32))

    def param_specs(self):
        return param_shapes(self.cfg, self.dtype)


ARG_NAMES = {
    "prefill": (("params", "tokens", "lengths"), ("logits", "cache")),
    "decode": (
        ("params", "cache", "logits", "finished", "budget", "start_step", "keys",
         "temperature", "top_k", "top_p", "min_p", "stop_ids"),
        ("tokens", "counts", "cache", "logits", "finished"),
    ),
}


def _dims(*dims):
    """Concrete ints stay; strings become symbolic dims sharing one scope."""
    names = [d for d in dims if isinstance(d, str)]
    symbolic = dict(zip(names, jax.export.symbolic_shape(", ".join(names)))) if names else {}
    return tuple(symbolic.get(d, d) if isinstance(d, str) else d for d in dims)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)
