"""A loaded artifact with weights on the device: `generate` and `stream`, no model code.

The runtime only knows the artifact's calling convention: prefill(params, tokens, lengths) ->
(logits, state) and decode(params, state, logits, finished, budget, start_step, keys,
temperature, top_k, top_p, min_p, stop_ids) -> (tokens, counts, state, logits, finished). The
state is an opaque pytree handed from one call to the next.

Bucketing: prompts are right-padded to the smallest prompt bucket (powers of two) and the
batch to the smallest batch bucket, so a process compiles each function at most
log2(max/min) + 1 times per axis; every compile lands in the persistent XLA cache.
Single-device artifacts compile through runtime.engine.programs: sizes given to `prepare` (and those
the previous process used) compile in a worker thread while the weights load; a request of a
new size queues its decode before prefill compiles, so the two compile side by side.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from runtime.engine import compile_cache
from runtime.format.compat import check_compatibility, current_platform
from runtime.errors import ArtifactError, RequestError
from runtime.format.integrity import safe_member, verify_files
from runtime.format.manifest import Manifest, read_manifest
from runtime.engine.placement import from_manifest as placement_from_manifest
from runtime.engine.programs import Programs, solve_dims
from runtime.engine.requests import (SamplingParams, bucket, check_new_tokens, check_prompts, check_stop_ids,
                              pad_batch)
from runtime.engine.rng import row_keys
from runtime.engine.startup import gc_paused
from runtime.engine.weights import load_weights, parse_weight_spec, to_device


_FUNCTIONS = ("prefill", "decode")


@dataclasses.dataclass
class Generation:
    """One block of new tokens per prompt (only rows still running get tokens)."""

    tokens: list[list[int]]
    finished: list[bool]


class LoadedModel:
    """An artifact's compiled functions for this backend plus weights placed on the device."""

    def __init__(self, artifact_dir, weights: str | Path | None = None, seed: int = 0,
                 use_compile_cache: bool = True, prepare: Sequence[tuple[int, int]] = ()):
        self.path = Path(artifact_dir)
        self.manifest: Manifest = read_manifest(self.path)
        self.platform = current_platform()
        # jax window, calling convention, platform (raises); past its expiry date: a warning
        self.warnings: list[str] = check_compatibility(self.manifest, self.platform)
        for message in self.warnings:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        files = {name: fn.files[self.platform] for name, fn in self.manifest.functions.items()}
        verify_files(self.path, self.manifest, list(files.values()))
        spec = parse_weight_spec(self.manifest.weights)
        # A multi-device artifact (manifest mesh): exactly that many devices, weights sharded.
        self.placement = placement_from_manifest(self.manifest, spec)
        cached = use_compile_cache and compile_cache.enable() is not None
        self._programs: Programs | None = None
        if self.placement is None:
            key = compile_cache.artifact_key(
                {rel: self.manifest.files[rel].sha256 for rel in files.values()}, self.platform)
            self._programs = Programs(self.manifest.functions, self._deserialize, key if cached else None)
        buckets = []
        for size in prepare:  # checked now: a bad size fails before any work
            if not isinstance(size, (tuple, list)) or len(size) != 2:
                raise RequestError(f"prepare: each entry must be (batch, prompt_tokens), got {size!r}")
            buckets.append(self._buckets_for(*size))

        def compile_meanwhile():
            """Once the weights are known to fit: modules parsed here (a corrupt one fails the
            load), then compiled in the worker while the weights' data is read."""
            if self._programs is not None:
                for name in _FUNCTIONS:
                    self._programs.exported(name)
                for B, T in buckets:
                    self._prepare_buckets(B, T)
                self._programs.prepare_remembered()

        try:
            self._load(weights, spec, seed, compile_meanwhile)
        except BaseException:
            if self._programs is not None:
                self._programs.close()
            raise

    def _load(self, weights, spec, seed: int, compile_meanwhile) -> None:
        """Weights (checked against the spec before any device work) onto the device."""
        if weights is None:
            compile_meanwhile()
            from runtime.tools.random_init import random_weights

            arrays = random_weights(spec, seed)
            self.weights_source = f"seeded random weights (seed {seed})"
        elif self.placement is not None:
            arrays = self.placement.load_weights(weights, spec)
            self.weights_source = str(weights)
        else:
            arrays = load_weights(weights, spec, on_checked=compile_meanwhile)
            self.weights_source = str(weights)
        if self._programs is not None:  # compile_meanwhile has run: both modules are checked
            self._fns = {}
            self.params = to_device(arrays, consume=True)
        else:
            self._fns = {name: self.placement.jit(self._deserialize(name)) for name in _FUNCTIONS}
            self.params = self.placement.place(arrays)

    @property
    def limits(self) -> dict:
        return dataclasses.asdict(self.manifest.limits)

    @property
    def buckets(self) -> dict:
        return dataclasses.asdict(self.manifest.buckets)

    @property
    def eos_id(self) -> int | None:
        return self.manifest.tokens.eos_id

    def _deserialize(self, name: str):
        """The function's jax.export module, parsed now: a corrupt module fails here, on the
        calling thread (the parse captures fd 2, so never in the compile worker)."""
        if name not in self.manifest.functions:
            raise ArtifactError(f"artifact has no function {name!r}: re-export it")
        rel = self.manifest.functions[name].files[self.platform]
        try:
            exported = jax.export.deserialize(bytearray(safe_member(self.path, rel).read_bytes()))
            _parse_stablehlo(exported, rel)  # jax defers this to the first call: fail at load instead
        except ArtifactError:
            raise
        except Exception as e:  # a corrupt module that still matched its digest
            detail = " ".join(str(e).split())[:300]
            raise ArtifactError(f"cannot deserialize {rel} ({type(e).__name__}: {detail}): "
                                "re-export or re-copy the artifact") from None
        return exported

    def _buckets_for(self, batch: int, prompt_tokens: int) -> tuple[int, int]:
        """(batch bucket, prompt bucket) of a request size, checked against the limits."""
        lim = self.manifest.limits
        for what, n, most in (("batch", batch, lim.max_batch), ("prompt_tokens", prompt_tokens, lim.max_prompt_tokens)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= most:
                raise RequestError(f"prepare: {what} must be an integer in [1, {most}], got {n!r}")
        return bucket(int(batch), self.manifest.buckets.batch), bucket(int(prompt_tokens), self.manifest.buckets.prompt)

    def prepare(self, batch: int = 1, prompt_tokens: int = 1) -> None:
        """Compile prefill and decode for requests of this size in the background (returns at once);
        the first such request then finds them ready. No-op for multi-device artifacts."""
        self._prepare_buckets(*self._buckets_for(batch, prompt_tokens))

    def _prepare_buckets(self, B: int, T: int) -> None:
        if self._programs is not None:
            fns = self.manifest.functions
            self._programs.prepare("prefill", solve_dims(fns["prefill"], {"tokens": (B, T)}))
            self._programs.prepare("decode", solve_dims(fns["decode"], {"finished": (B,)}))

    def _call(self, name: str, shapes: dict, *args):
        if self._programs is None:
            return self._fns[name](*args)
        dims = solve_dims(self.manifest.functions[name], shapes)
        return self._programs.get(name, dims)(*args)

    # -- raw calls ---------------------------------------------------------------------------
    def prefill(self, tokens: np.ndarray, lengths: np.ndarray):
        """tokens int32[B, T], lengths int32[B] (already bucketed) -> (logits [B, V], state)."""
        return self._call("prefill", {"tokens": np.shape(tokens)}, self.params, tokens, lengths)

    def decode(self, state, logits, finished, budget, start_step, keys, sampling: SamplingParams,
               stop_ids):
        f32, i32 = np.float32, np.int32
        return self._call(
            "decode", {"finished": np.shape(finished)},
            self.params, state, logits, finished, i32(budget), i32(start_step), keys,
            f32(sampling.temperature), i32(sampling.top_k), f32(sampling.top_p),
            f32(sampling.min_p), stop_ids)

    # -- generation --------------------------------------------------------------------------
    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
               block: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, seed: int | Sequence[int] = 0,
               stop: Sequence[int] | None = None) -> Iterator[Generation]:
        """Yields the new tokens block by block: one device call per block of up to `block` tokens."""
        prompts = check_prompts(prompts, self.limits)
        max_new_tokens = check_new_tokens(max_new_tokens, self.limits)
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
            raise RequestError(f"block must be a positive integer, got {block!r}")
        sampling = SamplingParams(temperature, top_k, top_p, min_p)
        sampling.check()
        stop_ids = check_stop_ids(stop, self.limits)
        n = len(prompts)
        tokens, lengths = pad_batch(prompts, self.buckets, self.manifest.tokens.pad_id or 0)
        B = tokens.shape[0]
        keys = np.zeros((B, 2), np.uint32)
        keys[:n] = row_keys(seed, n)
        finished = np.arange(B) >= n  # padding rows never run
        self._prepare_buckets(B, tokens.shape[1])  # not compiled yet: decode compiles while prefill does
        logits, state = self.prefill(tokens, lengths)
        done = 0
        while done < max_new_tokens and not finished[:n].all():
            budget = min(block, max_new_tokens - done)
            out, counts, state, logits, finished_dev = self.decode(
                state, logits, finished, budget, done, keys, sampling, stop_ids)
            out, counts = np.asarray(out), np.asarray(counts)
            finished = np.asarray(finished_dev)
            done += budget
            yield Generation([out[i, : counts[i]].tolist() for i in range(n)], finished[:n].tolist())

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, **kw) -> list[list[int]]:
        """New tokens per prompt (stop token included when hit), in one device call for the loop."""
        kw.setdefault("block", int(max_new_tokens) if isinstance(max_new_tokens, int) and max_new_tokens > 0 else 1)
        rows: list[list[int]] | None = None
        for gen in self.stream(prompts, max_new_tokens, **kw):
            rows = gen.tokens if rows is None else [a + b for a, b in zip(rows, gen.tokens)]
        return rows if rows is not None else [[] for _ in prompts]


def _parse_stablehlo(exported, rel: str) -> None:
    """Parse the module's StableHLO bytecode now, so that a corrupt module fails at load time.

    MLIR prints its parse diagnostics straight to file descriptor 2; they are captured and put
    into the raised exception's message instead of leaking onto the user's terminal. Runs on
    the main thread only (fd 2 is process-wide).
    """
    import os
    import sys
    import tempfile

    from jax.interpreters import mlir

    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            with mlir.make_ir_context():
                exported.mlir_module(serialized=False)
            return
        except Exception as e:  # noqa: BLE001 - re-raised below with MLIR's own diagnostic
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        diagnostics = [line.split("error:", 1)[1].strip()
                       for line in captured.read(1 << 16).decode("utf-8", "replace").splitlines()
                       if "error:" in line]
    detail = " ".join(f"{error}".split())[:200] + (f"; {diagnostics[0][:200]}" if diagnostics else "")
    raise ArtifactError(f"cannot deserialize {rel} ({type(error).__name__}: {detail}): "
                        "re-export or re-copy the artifact")


def load(artifact_dir, weights: str | Path | None = None, seed: int = 0, **kw) -> LoadedModel:
    """Load an artifact and its weights (HF checkpoint dir, .safetensors file, orbax checkpoint);
    with no weights, seeded random weights per the artifact's weight specification.

    prepare=[(batch, prompt_tokens), ...] compiles for those request sizes while the weights
    load; the sizes the previous process used with this artifact are prepared anyway (when
    the compile cache is on)."""
    with gc_paused():
        return LoadedModel(artifact_dir, weights, seed, **kw)
