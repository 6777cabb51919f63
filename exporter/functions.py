"""The two functions every artifact holds, over plain dicts so they serialize without model code.

prefill(params, state, tokens[b, t], lengths[b]) -> (logits[b, V], state)
decode(params, state, logits[b, V], finished[b], budget[b], steps[b], keys[b, 2],
       temperature[b], top_k[b], top_p[b], min_p[b], stop_ids[b, S])
    -> (tokens[b, N], counts[b], state, logits[b, V], finished[b])

(semantics version 2: the state goes in and out of both, every control is per row; N is the
artifact's decode block, S its stop-id slots.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from runtime.format.manifest import Limits

from exporter.config import Mamba2Config
from exporter.decode_loop import Sampling, decode_loop
from exporter.numerics import Numerics, for_platform
from exporter.params import bind, param_shapes
from exporter.sampling import TOP_K_CAP
from exporter.state import state_shapes

SEMANTICS_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """The functions for one model, dtype, limits and target platform (which picks kernels)."""

    cfg: Mamba2Config
    dtype: jnp.dtype
    limits: Limits
    devices: int = 1  # > 1: tensor-parallel over a ("model", devices) mesh (exporter.sharding)
    platform: str = "cpu"
    top_k_cap: int = TOP_K_CAP  # 0: every top-k sorts (for consumers without lax.top_k's composite)

    @property
    def numerics(self) -> Numerics:
        return for_platform(self.platform, self.cfg.chunk_size, self.dtype)

    def model(self, params):
        """The nnx model over `params`, with this platform's numerics (same math everywhere)."""
        return bind(self.cfg, params, self.dtype, self.numerics)

    def prefill(self, params, state, tokens, lengths):
        return self.model(params).prefill(state, tokens, lengths)

    def decode(self, params, state, logits, finished, budget, steps, keys,
               temperature, top_k, top_p, min_p, stop_ids):
        sampling = Sampling(temperature, top_k, top_p, min_p)
        return decode_loop(self.model(params), state, logits, finished, budget, steps, keys,
                           sampling, stop_ids, capacity=self.limits.decode_block, top_k_cap=self.top_k_cap,
                           loops=self.numerics.decode_loops)

    # Argument specs, with symbolic batch `b` and prompt length `t` where given as strings.
    def prefill_args(self, b="b", t="t"):
        b, t = _dims(b, t)
        return (self.param_specs(), self.state_specs(b), _sds((b, t), jnp.int32), _sds((b,), jnp.int32))

    def decode_args(self, b="b"):
        (b,) = _dims(b)
        V, S = self.cfg.vocab_size, self.limits.max_stop_tokens
        f32, i32 = jnp.float32, jnp.int32
        return (self.param_specs(), self.state_specs(b), _sds((b, V), f32), _sds((b,), jnp.bool_),
                _sds((b,), i32), _sds((b,), i32), _sds((b, 2), jnp.uint32),
                _sds((b,), f32), _sds((b,), i32), _sds((b,), f32), _sds((b,), f32), _sds((b, S), i32))

    def param_specs(self):
        return param_shapes(self.cfg, self.dtype)

    def state_specs(self, b):
        return state_shapes(self.cfg, b, self.dtype)


ARG_NAMES = {
    "prefill": (("params", "state", "tokens", "lengths"), ("logits", "state")),
    "decode": (
        ("params", "state", "logits", "finished", "budget", "steps", "keys",
         "temperature", "top_k", "top_p", "min_p", "stop_ids"),
        ("tokens", "counts", "state", "logits", "finished"),
    ),
}


def _dims(*dims):
    """Concrete ints stay; strings become symbolic dims sharing one scope."""
    names = [d for d in dims if isinstance(d, str)]
    symbolic = dict(zip(names, jax.export.symbolic_shape(", ".join(names)))) if names else {}
    return tuple(symbolic.get(d, d) if isinstance(d, str) else d for d in dims)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)
