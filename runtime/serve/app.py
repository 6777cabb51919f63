"""The FastAPI app: OpenAI's routes on a Service.

  GET  /health                200 when ready; 503 while loading, draining or failed
  GET  /v1/models             the served model
  POST /v1/completions        prompt: text, token ids, or a batch of either
  POST /v1/chat/completions   where the tokenizer has a chat template
  GET  /metrics               Prometheus

/v1 routes need `Authorization: Bearer KEY` when the server has an API key. Every error is in
OpenAI's shape; a client error is never a 500, and an internal error fails its own request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.serve import schemas
from runtime.serve.errors import ApiError
from runtime.serve.exchange import Exchange
from runtime.serve.metrics import CONTENT_TYPE

log = logging.getLogger("mamba2_aot.serve")

_UNAVAILABLE = {"loading": ("the model is loading: retry when GET /health answers 200", "loading"),
                "draining": ("the server is shutting down", "draining"),
                "failed": ("the model failed to load", "load_failed")}


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(service) -> FastAPI:
    """The app for `service` (a runtime.serve.service.Service); its lifespan starts the loading
    and, at shutdown, stops the scheduler."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await run_in_threadpool(service.shutdown)

    app = FastAPI(title="mamba2-aot", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    config = service.config

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error(ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None,
                               headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return _error(ApiError(500, "internal error", code="internal_error"))

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_serving() -> None:
        if service.status != "ready":
            message, code = _UNAVAILABLE[service.status]
            raise ApiError(503, message, code=code, headers={"Retry-After": "1"})

    async def read_json(request: Request) -> dict:
        limit = config.max_body_bytes
        too_big = ApiError(413, f"the request body is over the server's limit of {limit} bytes",
                           code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if not isinstance(value, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return value

    @app.get("/health")
    async def health():
        if service.status == "ready":
            return {"status": "ok"}
        message, code = _UNAVAILABLE[service.status]
        return _error(ApiError(503, message, code=code))

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        check_serving()
        return {"object": "list", "data": [{
            "id": config.served_name, "object": "model", "created": int(time.time()), "owned_by": "mamba2-aot",
            "max_model_len": service.manifest.limits.max_context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    async def generate(request: Request, kind: str):
        exchange = Exchange(service, kind, time.monotonic())
        try:
            check_key(request)
            check_serving()
            params = schemas.parse(await read_json(request), kind, config.served_name, service.limits)
            await run_in_threadpool(exchange.prepare, params)
            exchange.submit()
        except ApiError as e:
            exchange.finish(e.status)
            raise
        except Exception:
            log.exception("request %s failed before it ran", exchange.id)
            exchange.finish(500)
            raise ApiError(500, "internal error", code="internal_error") from None
        if params.stream:
            return StreamingResponse(_stream(exchange), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _answer(exchange, request)

    return app


async def _stream(exchange: Exchange):
    """The SSE body; a client that goes away (this generator is cancelled) cancels the request."""
    try:
        async for line in exchange.events():
            yield line
    except Exception:
        log.exception("request %s failed while streaming", exchange.id)
        exchange.finish(500)
        yield "data: " + json.dumps(ApiError(500, "internal error", code="internal_error").body()) + "\n\n"
    finally:
        if exchange.status is None:
            exchange.cancel()
            exchange.finish(499)


async def _answer(exchange: Exchange, request: Request):
    """The whole response; a client that disconnects first cancels the request."""
    result = asyncio.ensure_future(exchange.body())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            exchange.cancel()
            exchange.finish(499)
    if exchange.status == 499:
        return Response(status_code=499)
    try:
        body = result.result()
    except ApiError as e:
        exchange.finish(e.status)
        raise
    except Exception:
        log.exception("request %s failed", exchange.id)
        exchange.cancel()
        exchange.finish(500)
        raise ApiError(500, "internal error", code="internal_error") from None
    exchange.finish(200)
    return JSONResponse(body)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
