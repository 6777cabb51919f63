"""uvicorn around the app, with a drain on SIGTERM (and SIGINT).

The first signal drains: /health and new requests answer 503 (the socket stays open, so a load
balancer sees it), requests in flight go on, and the server exits 0 once none is left or the
drain time is up (then the rest end with an error). A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time

import uvicorn

from runtime.errors import Mamba2AOTError

log = logging.getLogger("mamba2_aot.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service, drain_timeout: float):
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's: it would re-raise the signal after shutting down (exit status 143).
        if self.drain_deadline is None and sig in (signal.SIGTERM, signal.SIGINT):
            self.drain_deadline = time.monotonic() + self.drain_timeout
            self.service.drain()
            log.info("draining: no new requests; %d in flight, up to %gs", len(self.service.exchanges),
                     self.drain_timeout)
        else:
            self.service.abort("the server stopped")
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.service.status == "failed":
            self.should_exit = True
        elif self.drain_deadline is not None and not self.should_exit:
            if self.service.idle():
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline:
                log.warning("drain time is up: ending %d requests", len(self.service.exchanges))
                self.service.abort("the server is shutting down")
                self.drain_deadline = float("inf")  # exits once the aborted requests have answered
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); one-line error when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise Mamba2AOTError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def configure_logging(level: str) -> None:
    """One format for our lines and uvicorn's, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("mamba2_aot", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def run(app, service, host: str, port: int, drain_timeout: float, log_level: str = "info") -> None:
    """Serve until drained or stopped; raises the load error (one line) if the model failed."""
    configure_logging(log_level)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on http://%s:%d (loading %s)", shown, bound, service.config.artifact)
    config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(5.0, drain_timeout))
    server = DrainingServer(config, service, drain_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if service.status == "failed":
        raise Mamba2AOTError(service.error)
    log.info("stopped")
