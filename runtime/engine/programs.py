"""An artifact's functions compiled per concrete shape, ahead of use in a worker thread.

Each function is a jax.export module with symbolic dimensions (the manifest names them, e.g.
`b`, `t`); it is compiled once per set of dimension values (a bucket). `Programs` compiles on
first use, or earlier through `prepare`, in a worker thread, so that XLA's work (lowering,
shape refinement, compiling or loading from the persistent cache) overlaps with reading the
weights. The shapes a process used are remembered next to the compile cache
(`compile_cache.remember_shapes`); the next process that loads the same artifact prepares
them while it loads: that is the warm start.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future

import jax
import jax.numpy as jnp

from runtime.engine import compile_cache
from runtime.engine.memory import release_freed_memory
from runtime.errors import ArtifactError
from runtime.format.manifest import FunctionSpec

Dims = tuple[tuple[str, int], ...]  # sorted (symbol, value) pairs: one compiled program each


def solve_dims(spec: FunctionSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Values of the symbolic dimensions from the concrete shapes of some named inputs."""
    dims: dict[str, int] = {}
    by_name = {t.name: t for t in spec.inputs}
    for name, shape in shapes.items():
        if name not in by_name:
            raise ArtifactError(f"the manifest's function has no input {name!r}: re-export the artifact")
        declared = by_name[name].shape
        if len(declared) != len(shape):
            raise ArtifactError(f"input {name} has rank {len(declared)} in the manifest, got shape {tuple(shape)}")
        for d, n in zip(declared, shape):
            if isinstance(d, str):
                dims[d] = int(n)
    return dims


class Programs:
    """Compiled executables of an artifact's functions, keyed by (function, dimension values).

    One worker thread compiles what `prepare` queued, in order. A caller that needs a program
    that is not ready does not sit idle: it compiles that program itself if it is still
    queued, else the next queued one, and only then waits for the worker (on a 2-core machine
    the first prefill call compiles decode while the worker finishes prefill).
    """

    def __init__(self, functions: Mapping[str, FunctionSpec], load_exported: Callable[[str], object],
                 hints_key: str | None = None, warn: compile_cache.Warn = lambda message: None,
                 compile_program: Callable[[str, dict[str, int]], object] | None = None):
        """load_exported(name) -> jax.export.Exported (raising ArtifactError when corrupt);
        hints_key: where this artifact's used shapes are remembered (None: nowhere); warn:
        what compiling through the persistent cache has to say (a repaired entry, ...);
        compile_program(name, dims) -> the program (default: the module lowered and compiled
        for those dimension values)."""
        self._specs = dict(functions)
        self._load_exported = load_exported
        self._hints_key = hints_key
        self._warn = warn
        self._compile = compile_program or self._compile_module
        self._lock = threading.RLock()
        self._pending: collections.deque[tuple[str, Dims]] = collections.deque()  # not started yet
        self._worker: threading.Thread | None = None  # alive while anything is queued
        self._closed = False
        self._exported: dict[str, Future] = {}
        self._compiled: dict[tuple[str, Dims], Future] = {}
        self._used: list[tuple[str, Dims]] = []

    def close(self) -> None:
        """Drop queued work (a failed load); a compile already running finishes on its own."""
        with self._lock:
            self._closed = True
            while self._pending:
                self._compiled.pop(self._pending.popleft()).cancel()

    # -- modules -----------------------------------------------------------------------------
    def exported(self, name: str):
        """The function's module, loaded (and checked) on the calling thread the first time: the
        worker only ever compiles modules that have passed, and never runs the loader itself."""
        with self._lock:
            fut = self._exported.get(name)
            mine = fut is None
            if mine:
                fut = self._exported[name] = Future()
        if mine:
            try:
                fut.set_result(self._load_exported(name))
            except BaseException as e:
                fut.set_exception(e)
                raise
        return fut.result()

    # -- compiled programs --------------------------------------------------------------------
    def prepare(self, name: str, dims: Mapping[str, int]) -> None:
        """Compile `name` for these dimension values in the background (no-op if already there)."""
        key = (name, _key(dims))
        self.exported(name)  # here, before the worker compiles it
        with self._lock:
            if key in self._compiled or self._closed:
                return
            self._compiled[key] = Future()
            self._pending.append(key)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="mamba2-aot-compile")
                self._worker.start()

    def prepare_remembered(self) -> None:
        """Prepare the shapes the previous process with this artifact used (the warm start)."""
        if self._hints_key is None:
            return
        order = list(self._specs)  # the manifest's order: prefill, the first call, before decode
        entries = [(e.get("function"), e.get("dims")) for e in compile_cache.remembered_shapes(self._hints_key)]
        entries = [(n, d) for n, d in entries if n in self._specs and isinstance(d, dict) and self._valid(n, d)]
        for name, dims in sorted(entries, key=lambda e: order.index(e[0])):
            self.prepare(name, dims)

    def get(self, name: str, dims: Mapping[str, int]):
        """The compiled program: ready, or compiled here (helping with queued work while the
        worker finishes it). A failed compile raises here; the next call tries again."""
        key = (name, _key(dims))
        with self._lock:
            if key not in self._used:
                self._used.insert(0, key)
                self._remember()
            fut = self._compiled.get(key)
            mine = fut is None
            if mine:  # never prepared: compiled here and now
                fut = self._compiled[key] = Future()
        if mine:
            self._run(key)
        while not fut.done():
            with self._lock:
                job = key if key in self._pending else self._pending[0] if self._pending else None
                if job is not None:
                    self._pending.remove(job)
            if job is None:
                break  # the worker has it: wait
            self._run(job)
        return fut.result()

    def _work(self) -> None:
        """The worker: compiles queued jobs in order, and ends when none are left, or when the
        interpreter is exiting (queued work is speculative: an exit never waits for it)."""
        while True:
            with self._lock:
                if not self._pending or self._closed or not threading.main_thread().is_alive():
                    self._worker = None
                    return
                key = self._pending.popleft()
            self._run(key)

    def _run(self, key: tuple[str, Dims]) -> None:
        """Compile one taken job into its future; a failure is forgotten so that it is retried."""
        with self._lock:
            fut = self._compiled[key]
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(self._compile(key[0], dict(key[1])))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(e)
            with self._lock:
                if self._compiled.get(key) is fut:
                    del self._compiled[key]

    def status(self) -> list[dict]:
        """Every program asked for, in that order: {"function", "dims", "state"} with state
        "queued", "compiling" or "ready" (a failed compile is forgotten: asked for again, it retries)."""
        with self._lock:
            items = list(self._compiled.items())
            pending = set(self._pending)
        out = []
        for (name, dims), fut in items:
            if fut.cancelled() or (fut.done() and fut.exception() is not None):
                continue  # dropped, or failed (being forgotten)
            state = "queued" if (name, dims) in pending else "ready" if fut.done() else "compiling"
            out.append({"function": name, "dims": dict(dims), "state": state})
        return out

    def _compile_module(self, name: str, dims: dict[str, int]):
        exported = self.exported(name)
        leaves = [jax.ShapeDtypeStruct(tuple(dims[d] if isinstance(d, str) else d for d in t.shape),
                                       jnp.dtype(t.dtype)) for t in self._specs[name].inputs]
        if len(leaves) != len(exported.in_avals):
            raise ArtifactError(f"function {name}: the manifest lists {len(leaves)} inputs but the module "
                                f"takes {len(exported.in_avals)}: re-export the artifact")
        args, kwargs = jax.tree.unflatten(exported.in_tree, leaves)
        compiled = compile_cache.compile_lowered(jax.jit(exported.call).lower(*args, **kwargs), self._warn)
        release_freed_memory()  # what lowering and compiling freed (130m: peak RSS -20..50 MiB)
        return compiled

    def _valid(self, name: str, dims: dict) -> bool:
        symbols = {d for t in self._specs[name].inputs for d in t.shape if isinstance(d, str)}
        return set(dims) == symbols and all(isinstance(v, int) and 0 < v <= 1 << 20 for v in dims.values())

    def _remember(self) -> None:
        if self._hints_key is not None:
            compile_cache.remember_shapes(
                self._hints_key, [{"function": n, "dims": dict(d)} for n, d in self._used])


def _key(dims: Mapping[str, int]) -> Dims:
    return tuple(sorted((str(k), int(v)) for k, v in dims.items()))
