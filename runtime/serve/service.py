"""What the app serves from: the model, its scheduler and the server's state.

loading (weights, then every program the scheduler will call compiled or loaded from the
persistent cache) -> ready -> draining (SIGTERM: no new requests, in-flight ones finish) ->
stopped; or failed (the load raised: the server exits with its one-line error).
"""

from __future__ import annotations

import logging
import threading
import time

from runtime.errors import Mamba2AOTError
from runtime.serve.config import ServeConfig
from runtime.serve.metrics import Metrics
from runtime.serve.schemas import Limits

log = logging.getLogger("mamba2_aot.serve")


class Service:
    def __init__(self, config: ServeConfig, manifest, text=None):
        """manifest: the artifact's (read before loading); text: a TextModel or None."""
        self.config = config
        self.manifest = manifest
        self.text = text
        lim = manifest.limits
        self.limits = Limits(vocab_size=lim.vocab_size, max_new_tokens=lim.max_new_tokens,
                             max_prompt_tokens=lim.max_prompt_tokens, max_batch=lim.max_batch,
                             max_stop_tokens=lim.max_stop_tokens, max_sequences=config.slots + config.max_queue,
                             has_tokenizer=text is not None)
        self.status = "loading"  # -> "ready" -> "draining"; or "failed"
        self.error: str | None = None
        self.model = None
        self.scheduler = None
        self.metrics = Metrics(self)
        self.exchanges: set = set()  # requests being answered
        self._stopping = threading.Event()
        self._loader: threading.Thread | None = None

    # -- loading -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load in a thread (the HTTP server answers 503 meanwhile); no-op once started or ready."""
        if self._loader is None and self.status == "loading":
            self._loader = threading.Thread(target=self._load, name="mamba2-aot-load")
            self._loader.start()

    def _load(self) -> None:
        t0 = time.monotonic()
        try:
            import runtime

            c = self.config
            # Its warnings (random weights, an expired artifact, the compile cache) are raised as
            # Mamba2AOTWarning: the CLI prints each as a `warning:` line.
            model = runtime.load(c.artifact, c.weights, seed=c.seed, prefix_cache_mb=c.prefix_cache_mb)
            self.use(model)
        except Mamba2AOTError as e:
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 - reported as one line; the server exits
            log.exception("loading failed")
            self._fail(f"internal error while loading: {type(e).__name__}: {e}")
        else:
            if self.status == "ready":
                log.info("ready in %.1fs: %s", time.monotonic() - t0, self.describe())

    def use(self, model) -> None:
        """Serve `model`: build the scheduler, compile every shape it calls, start it, go ready."""
        from runtime.serve.scheduler import Scheduler

        c = self.config
        scheduler = Scheduler(model, c.slots, c.block, c.prefill_chunk, c.max_queue)
        shapes, batches = scheduler.prefill_shapes(), scheduler.decode_batches()
        model.compile_buckets(shapes, batches, wait=False)  # the compile worker starts on them
        for B in batches:
            if self._stopping.is_set():
                return
            model.compile_buckets(decode=[B])
        for shape in shapes:
            if self._stopping.is_set():
                return
            model.compile_buckets(prefill=[shape])
        scheduler.pool.warm()
        scheduler.warm_up()
        self.model, self.scheduler = model, scheduler
        scheduler.start()
        if self.status == "loading":
            self.status = "ready"

    def describe(self) -> str:
        c, s = self.config, self.scheduler
        return (f"model {c.served_name!r}, {c.slots} slots, block {c.block}, prefill shapes "
                f"{len(s.prefill_shapes())}, prefix cache {c.prefix_cache_mb:g} MiB")

    def _fail(self, message: str) -> None:
        """The server exits with this message (`error: ...`, status 2)."""
        self.error = message
        self.status = "failed"

    # -- stopping ----------------------------------------------------------------------------
    def drain(self) -> None:
        """Refuse new requests (503); in-flight ones go on."""
        if self.status in ("loading", "ready"):
            self.status = "draining"

    def idle(self) -> bool:
        return not self.exchanges

    def abort(self, message: str) -> None:
        if self.scheduler is not None:
            self.scheduler.abort_all(message)

    def shutdown(self) -> None:
        """Stop loading (after the compile in progress), stop the scheduler, join the threads."""
        self._stopping.set()
        if self._loader is not None:
            self._loader.join()
        if self.scheduler is not None:
            self.scheduler.stop()
