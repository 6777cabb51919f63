"""A loaded artifact with weights on the device: `generate`, `stream`, `complete`, no model code.

The runtime only knows the artifact's calling convention (runtime.engine.convention):
prefill(params, state, tokens, lengths) -> (logits, state) and decode(params, state, logits,
finished, budget, steps, keys, temperature, top_k, top_p, min_p, stop_ids) -> (tokens, counts,
state, logits, finished), every control per row. The state is a pytree the manifest describes
(runtime.engine.state): zeros are a fresh sequence, and one row of it is a `State` value.

Bucketing: prompts are right-padded to the smallest prompt bucket (powers of two) and the
batch to the smallest batch bucket; a prompt longer than the batch's segment (the largest
bucket whose batch x length fits `max_prefill_tokens`) is prefilled in segments that carry
the state. So a process compiles each function at most log2(max/min) + 1 times per axis, and
memory per call is bounded whatever the prompt length; every compile lands in the persistent
XLA cache.
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
from runtime.errors import ArtifactError, Mamba2AOTWarning, RequestError, WeightsError, describe
from runtime.format.compat import check_compatibility, current_platform
from runtime.format.integrity import read_verified
from runtime.format.manifest import Manifest, read_manifest
from runtime.engine.placement import from_manifest as placement_from_manifest
from runtime.engine.programs import Programs, solve_dims
from runtime.engine.convention import convention
from runtime.engine.memory import release_freed_memory
from runtime.engine.prefix_cache import PrefixCache
from runtime.engine.requests import RowSettings, SamplingParams, bucket, is_int
from runtime.engine.startup import gc_paused
from runtime.engine.state import State, StateLayout, read_state_file
from runtime.engine.weights import load_weights, parse_weight_spec, to_device


_FUNCTIONS = ("prefill", "decode")
RANDOM_WEIGHTS = "random"  # weights="random": seeded random weights, only when asked for


def _is_random(weights) -> bool:
    return isinstance(weights, str) and weights == RANDOM_WEIGHTS


@dataclasses.dataclass
class Generation:
    """One block of new tokens per prompt (only rows still running get tokens). `finished`: the
    row hit a stop token. The last block of a `return_states=True` call carries `states`."""

    tokens: list[list[int]]
    finished: list[bool]
    states: list[State] | None = None


@dataclasses.dataclass
class Completion:
    """A prompt's new tokens, why generation ended ("stop": a stop token, "length": the budget),
    and its final State (prompt + new tokens) when asked for."""

    tokens: list[int]
    finish_reason: str
    state: State | None = None


class LoadedModel:
    """An artifact's compiled functions for this backend plus weights placed on the device."""

    def __init__(self, artifact_dir, weights: str | Path | None = None, seed: int = 0,
                 use_compile_cache: bool = True, prepare: Sequence[tuple[int, int]] = (),
                 prefix_cache_mb: float = 0):
        self.path = Path(artifact_dir)
        self.manifest: Manifest = read_manifest(self.path)
        self.convention = convention(self.manifest.semantics_version)
        self.state_layout: StateLayout | None = (
            StateLayout.from_function(self.manifest.functions["prefill"]) if self.convention.carries_state else None)
        if not isinstance(prefix_cache_mb, (int, float)) or isinstance(prefix_cache_mb, bool) or prefix_cache_mb < 0:
            raise RequestError(f"prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r:.40}")
        if prefix_cache_mb and not self.convention.carries_state:
            raise RequestError("this artifact cannot continue from a state (semantics 1), so it has no "
                               "prefix cache: re-export it with this mamba2-aot")
        #: the exact prefix-state cache (None: off); its `stats` count lookups, hits, tokens skipped
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20))) if prefix_cache_mb else None
        self.platform = current_platform()
        # Things to know that do not stop the load: also raised as Mamba2AOTWarning (a RuntimeWarning).
        self.warnings: list[str] = []
        # jax window, calling convention, platform (raises); past its expiry date: a warning
        for message in check_compatibility(self.manifest, self.platform):
            self._warn(message)
        # Each module read once: the bytes checked against the manifest are the bytes deserialized.
        self._modules = {name: read_verified(self.path, self.manifest, fn.files[self.platform])
                         for name, fn in self.manifest.functions.items() if name in _FUNCTIONS}
        if weights is None:
            raise WeightsError('no weights given (weights= / --weights): pass a checkpoint (an HF directory, a '
                               '.safetensors file or an orbax checkpoint), or "random" for seeded random '
                               "weights, whose outputs are meaningless")
        spec = parse_weight_spec(self.manifest.weights)
        # A multi-device artifact (manifest mesh): exactly that many devices, weights sharded.
        self.placement = placement_from_manifest(self.manifest, spec)
        cached = use_compile_cache and compile_cache.enable(warn=self._warn) is not None
        self._programs: Programs | None = None
        self._ran: set = set()  # programs that have run once (runtime.engine.memory)
        key = compile_cache.artifact_key(
            {fn.files[self.platform]: self.manifest.files[fn.files[self.platform]].sha256
             for fn in self.manifest.functions.values()}, self.platform)
        self.artifact_id = key  # States remember it: one artifact's state never runs on another
        if self.placement is None:
            self._programs = Programs(self.manifest.functions, self._deserialize, key if cached else None,
                                      warn=self._warn)
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
        if _is_random(weights):
            compile_meanwhile()
            from runtime.tools.random_init import random_weights  # the one use of runtime.tools

            arrays = random_weights(spec, seed)
            self.weights_source = f"seeded random weights (seed {seed})"
            self._warn(f"using seeded random weights (seed {seed}), as asked: the outputs are meaningless")
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

    def _warn(self, message: str) -> None:
        """Record `message` in `warnings` and raise it as a Mamba2AOTWarning (from any thread)."""
        self.warnings.append(message)
        warnings.warn(message, Mamba2AOTWarning, stacklevel=4)

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
        if name not in self._modules:
            raise ArtifactError(f"artifact has no function {name!r}: re-export it")
        rel = self.manifest.functions[name].files[self.platform]
        try:
            exported = jax.export.deserialize(bytearray(self._modules[name]))
            _parse_stablehlo(exported, rel)  # jax defers this to the first call: fail at load instead
        except ArtifactError:
            raise
        except Exception as e:  # a corrupt module that still matched its digest
            raise ArtifactError(f"cannot deserialize {rel} ({describe(e)}): "
                                "re-export or re-copy the artifact") from e
        return exported

    def segment_length(self, B: int) -> int:
        """The longest prefill call for a batch bucket B: the largest prompt bucket with B x T
        within max_prefill_tokens (never below the smallest bucket)."""
        fits = [T for T in self.manifest.buckets.prompt if B * T <= self.manifest.limits.max_prefill_tokens]
        return fits[-1] if fits else self.manifest.buckets.prompt[0]

    def _buckets_for(self, batch: int, prompt_tokens: int) -> tuple[int, int]:
        """(batch bucket, prompt bucket) of a request size, checked against the limits."""
        lim = self.manifest.limits
        for what, n, most in (("batch", batch, lim.max_batch), ("prompt_tokens", prompt_tokens, lim.max_prompt_tokens)):
            if not is_int(n) or not 1 <= n <= most:
                raise RequestError(f"prepare: {what} must be an integer in [1, {most}], got {n!r}")
        B = bucket(int(batch), self.manifest.buckets.batch)
        return B, bucket(min(int(prompt_tokens), self.segment_length(B)), self.manifest.buckets.prompt)

    def programs(self) -> list[dict]:
        """The compiled programs asked for so far (given to `prepare`, remembered from the
        previous process, or used), each {"function", "dims", "state": "queued" | "compiling" |
        "ready"}; [] for a multi-device artifact (compiled on first call by jax.jit)."""
        return [] if self._programs is None else self._programs.status()

    def prepare(self, batch: int = 1, prompt_tokens: int = 1) -> None:
        """Compile prefill and decode for requests of this size in the background (returns at once);
        the first such request then finds them ready. No-op for multi-device artifacts."""
        self._prepare_buckets(*self._buckets_for(batch, prompt_tokens))

    def compile_buckets(self, prefill: Sequence[tuple[int, int]] = (), decode: Sequence[int] = (),
                        wait: bool = True) -> None:
        """Compile prefill for each exact (batch bucket, prompt bucket) and decode for each batch
        bucket (or load them from the persistent cache). All are queued for the compile worker;
        with wait=True this returns once every one is ready, compiling queued ones itself
        meanwhile. A server calls it before it answers ready. No-op for multi-device artifacts
        (they compile on first use)."""
        if self._programs is None:
            return
        fns = self.manifest.functions
        jobs = [("prefill", solve_dims(fns["prefill"], {"tokens": (B, T)})) for B, T in prefill]
        jobs += [("decode", solve_dims(fns["decode"], {"finished": (B,)})) for B in decode]
        for name, dims in jobs:
            self._programs.prepare(name, dims)
        for name, dims in jobs if wait else ():
            self._programs.get(name, dims)

    def _prepare_buckets(self, B: int, T: int) -> None:
        if self._programs is not None:
            fns = self.manifest.functions
            self._programs.prepare("prefill", solve_dims(fns["prefill"], {"tokens": (B, T)}))
            self._programs.prepare("decode", solve_dims(fns["decode"], {"finished": (B,)}))

    def _call(self, name: str, shapes: dict, *args):
        if self._programs is None:
            return self._fns[name](*args)
        dims = solve_dims(self.manifest.functions[name], shapes)
        key = (name, tuple(sorted(dims.items())))
        out = self._programs.get(name, dims)(*args)
        if key not in self._ran:  # a program's first run leaves one-off buffers in glibc's arenas
            self._ran.add(key)
            jax.block_until_ready(out)
            release_freed_memory()
        return out

    # -- raw calls (shapes already bucketed) --------------------------------------------------
    def empty_state(self, batch: int):
        """The state of `batch` fresh sequences (all zeros), on the device."""
        return self.state_layout.zeros(batch)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, state=None):
        """tokens int32[B, T], lengths int32[B] -> (logits [B, V], state): each row continues from
        its row of `state` (default: fresh) over its first lengths[i] tokens; a row of length 0
        keeps its state."""
        if state is None and self.convention.carries_state:
            state = self.empty_state(np.shape(tokens)[0])
        return self.convention.prefill(self._call, self.params, state, tokens, lengths)

    def decode(self, state, logits, finished, budget, steps, keys, sampling, stop_ids):
        """One decode call: (tokens [B, N], counts [B], state, logits [B, V], finished [B]).

        budget, steps: per row [B] (or one int for all rows); sampling: RowSettings of B rows (or
        one SamplingParams); stop_ids: int32[B, S] (or [S] for all rows)."""
        B = np.shape(finished)[0]
        rows = lambda v: np.broadcast_to(np.asarray(v, np.int32), (B,)).copy()  # noqa: E731
        if isinstance(sampling, SamplingParams):
            sampling = RowSettings.build(B, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        stop_ids = np.asarray(stop_ids, np.int32)
        if stop_ids.ndim == 1:
            stop_ids = np.broadcast_to(stop_ids, (B, stop_ids.shape[0])).copy()
        return self.convention.decode(self._call, self.params, state, logits, np.asarray(finished, bool),
                                      rows(budget), rows(steps), keys, sampling, stop_ids)

    # -- generation (runtime.engine.generation) ----------------------------------------------
    def stream(self, prompts, max_new_tokens=64, *, block: int = 16, **kw) -> Iterator[Generation]:
        """Yields the new tokens block by block: one device call per block of up to `block` tokens.

        prompts: token-id lists (an empty one continues from its state). max_new_tokens: one
        count, or one per prompt. Sampling (temperature, top_k, top_p, min_p): one value or one
        per prompt. seed: an int (row i: fold_in(key(seed), i)) or one per prompt. stop: extra
        stop ids (one list, or one list per prompt); the model's eos id always stops a row unless
        ignore_eos=True. states: None or one State (or None) per prompt to continue from.
        return_states=True: the last Generation carries each row's final State."""
        from runtime.engine.generation import run, validate

        return run(self, validate(self, prompts, max_new_tokens, **kw), _check_block(block),
                   kw.get("return_states", False))

    def generate(self, prompts, max_new_tokens=64, **kw) -> list[list[int]]:
        """New tokens per prompt (stop token included when hit); the whole budget in as few
        device calls as the decode block allows. Arguments as `stream`."""
        return [c.tokens for c in self.complete(prompts, max_new_tokens, **kw)]

    def complete(self, prompts, max_new_tokens=64, *, block: int | None = None, **kw) -> list[Completion]:
        """One Completion per prompt: its new tokens, why it ended ("stop" | "length") and, with
        return_states=True, its final State. Arguments as `stream`."""
        from runtime.engine.generation import collect, run, validate

        requests = validate(self, prompts, max_new_tokens, **kw)
        block = self.manifest.limits.decode_block if block is None else _check_block(block)
        return collect(run(self, requests, block, kw.get("return_states", False)), len(requests))

    def prefill_state(self, prompt, state: State | None = None) -> State:
        """The State after `prompt` (continuing from `state`), with nothing generated."""
        from runtime.engine.generation import ingest_one

        return ingest_one(self, prompt, state)

    def load_state(self, path) -> State:
        """A State written by `State.save`, checked to come from this artifact."""
        return read_state_file(path, self.artifact_id, self.state_layout)


def _check_block(block) -> int:
    if not is_int(block) or block < 1:
        raise RequestError(f"block must be a positive integer, got {block!r:.40}")
    return int(block)


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
                        "re-export or re-copy the artifact") from error


def load(artifact_dir, weights: str | Path | None = None, seed: int = 0, **kw) -> LoadedModel:
    """Load an artifact and its weights: an HF checkpoint directory, a .safetensors file or an
    orbax checkpoint; or weights="random": seeded random weights (`seed`) per the artifact's
    weight specification, with a warning. No weights is a WeightsError.

    prepare=[(batch, prompt_tokens), ...] compiles for those request sizes while the weights
    load; the sizes the previous process used with this artifact are prepared anyway (when
    the compile cache is on). prefix_cache_mb=M keeps up to M MiB of state snapshots keyed by
    token history (LoadedModel.prefix_cache): a request extending a cached history prefills
    only the rest."""
    with gc_paused():
        return LoadedModel(artifact_dir, weights, seed, **kw)
