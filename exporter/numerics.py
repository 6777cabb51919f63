"""Per-platform numerics: the SSD chunk, the segment-sum formulation and matmul precisions.

The math is the same everywhere; what differs is how each backend runs float32 contractions.
At DEFAULT precision TPUs multiply float32 through one bf16 pass and Ampere/Hopper GPUs through
TF32 (10-bit mantissa), which is not what a float32 SSM state needs. So the choice is made on
purpose per platform and recorded in the manifest (model.numerics.<platform>):

- cpu: float32 is exact at any precision setting; chunk 128 (T=2048 prefill of 130m: 575 tok/s
  vs 472 at 256); segment sums as a triangular matmul (as fast as a cumsum, stable). One decode
  loop whose step chooses greedy or sampling per iteration: a conditional is cheap on the host,
  and two loops compiled the 24-layer step twice (cold compile 17.5 -> 10.3 s, -45 MiB resident).
- cuda/rocm: the model's chunk (256); every SSD contraction at HIGHEST (true float32, no TF32);
  the projections too when the model is float32 (a float32 export promises float32 results);
  segment sums as a masked cumsum (O(T^2); the matmul is O(T^3), 4x the chunk's main product).
- tpu: the model's chunk; the state contractions (chunk states, inter-chunk passing, readout of
  the carried state) at HIGHEST (6 bf16 passes), the intra-chunk product at HIGH (3 passes, ~16
  mantissa bits, its terms never accumulate across chunks); masked-cumsum segment sums.
- accelerators run two decode loops (greedy, sampling) chosen once per call: a per-iteration
  predicate would cost a device-to-host sync there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CPU_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class Numerics:
    chunk_size: int
    segment_sum: str  # "matmul" (triangular matmul) | "cumsum" (masked cumsum)
    state_precision: str  # "default" | "high" | "highest": contractions that build or read the state
    intra_precision: str  # the intra-chunk [l, s] product
    matmul_precision: str  # projections and lm_head
    decode_matvec: str  # "rowwise" (one pass over each weight row for all batch rows, cpu) | "dot"
    decode_loops: int = 2  # 1: one loop choosing greedy/sampling per step (cpu); 2: a loop each

    def precision(self, which: str):
        return _PRECISION[getattr(self, f"{which}_precision")]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PRECISION = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}


def for_platform(platform: str, chunk_size: int, dtype) -> Numerics:
    """The numerics a model with SSD chunk `chunk_size` and weights `dtype` runs with on `platform`."""
    f32 = jnp.dtype(dtype) == jnp.float32
    if platform == "cpu":
        return Numerics(min(chunk_size, CPU_CHUNK), "matmul", "default", "default", "default", "rowwise", 1)
    if platform in ("cuda", "rocm"):
        return Numerics(chunk_size, "cumsum", "highest", "highest", "highest" if f32 else "default", "dot")
    if platform == "tpu":
        return Numerics(chunk_size, "cumsum", "highest", "high", "highest" if f32 else "default", "dot")
    raise ValueError(f"unknown platform {platform!r}")


def reference(chunk_size: int) -> Numerics:
    """Live models outside an export (tests, tools): the model's chunk, plain dots, and HIGHEST
    precision (exact float32 wherever this runs)."""
    return Numerics(chunk_size, "matmul", "highest", "highest", "highest", "dot")
