"""The server's settings (`mamba2-aot serve` flags), checked against the artifact's manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from runtime.errors import Mamba2AOTError


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    artifact: Path
    weights: Path | str | None = None  # a checkpoint, or "random" (seeded random weights, announced)
    tokenizer: Path | None = None  # a tokenizer.json or a directory holding one
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 8  # the decode batch: sequences in flight at once (a batch bucket)
    block: int = 16  # tokens per decode call: the streaming granularity and the admission period
    max_queue: int = 256  # sequences that may wait for a slot; beyond: 429
    prefill_chunk: int = 1024  # tokens (batch x length) of one admission prefill call
    prefix_cache_mb: float = 0  # 0: off
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1 routes when set
    model_name: str | None = None  # the `model` clients name (default: the artifact's directory name)
    max_body_bytes: int = 16 << 20  # larger request bodies: 413
    request_timeout: float | None = 600.0  # seconds from arrival to the last token (None: none)
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    seed: int = 0  # --weights random only

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.artifact).resolve().name

    def check(self, manifest) -> None:
        """Refuse settings the artifact cannot run (one line naming the flag and the fix)."""
        lim, buckets = manifest.limits, manifest.buckets
        if manifest.semantics_version < 2:
            raise Mamba2AOTError("serve needs per-row decode controls and states (semantics 2): re-export "
                                 "the artifact with this mamba2-aot")
        if self.slots not in buckets.batch:
            raise Mamba2AOTError(f"--slots {self.slots}: must be one of the artifact's batch buckets "
                                 f"({', '.join(map(str, buckets.batch))}); re-export with --max-batch for more")
        if not 1 <= self.block <= lim.decode_block:
            raise Mamba2AOTError(f"--block {self.block}: must be in [1, {lim.decode_block}] (the artifact's "
                                 "decode block); re-export with --decode-block for larger blocks")
        if self.max_queue < 0:
            raise Mamba2AOTError(f"--max-queue {self.max_queue}: must be >= 0")
        if self.prefill_chunk < buckets.prompt[0]:
            raise Mamba2AOTError(f"--prefill-chunk {self.prefill_chunk}: must be at least the artifact's "
                                 f"smallest prompt bucket ({buckets.prompt[0]})")
        if self.prefix_cache_mb < 0:
            raise Mamba2AOTError(f"--prefix-cache-mb {self.prefix_cache_mb}: must be >= 0")
        if self.max_body_bytes < 1024:
            raise Mamba2AOTError(f"--max-body-bytes {self.max_body_bytes}: must be at least 1024")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise Mamba2AOTError(f"--request-timeout {self.request_timeout}: must be > 0")
        if self.drain_timeout < 0:
            raise Mamba2AOTError(f"--drain-timeout {self.drain_timeout}: must be >= 0")
