"""The FastAPI application: create_app(), its lifespan, error handlers and middleware, and `dide-serve`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import onnxruntime
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.preprocess import ImageError, TextError
from export.search import BadQuery
from service.batcher import Overloaded
from service.engine import Engine, ImageNotFound, SearchNotAvailable, TaskNotLoaded
from service.errors import ApiError, error_response, validation_message
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import install_openapi
from service.routes import router
from service.settings import Settings, get_settings
from service.space import NameTaken

log = logging.getLogger(__name__)

ExceptionHandler = Callable[[Request, Exception], Awaitable[JSONResponse]]

# Probes and scrapes are never cut short by the request deadline (they do not touch the models).
UNTIMED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


def _version() -> str:
    try:
        return importlib.metadata.version("dide-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class BodyTooLarge(Exception):
    """The streamed body passed DIDE_MAX_BODY_BYTES (raised from receive(), answered 413)."""


async def _send_error(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"code": code, "message": message}, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a declared Content-Length over the limit before reading a byte, and for a streamed
    (chunked) body as soon as the bytes received pass it, so a huge body is never held in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "bad_request", "the Content-Length header is not a number")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, "payload_too_large", self._message(declared))
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._message(received, "at least "))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int, qualifier: str = "") -> str:
        return f"the body is {qualifier}{size} bytes, over the limit of {self.max_bytes} bytes"


class DeadlineMiddleware:
    """503 `deadline_exceeded` for a request still unanswered after DIDE_REQUEST_TIMEOUT_S."""

    def __init__(self, app: ASGIApp, timeout_s: float, retry_after_s: int) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.retry_after = str(retry_after_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTIMED_PATHS:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, receive, tracking)
        except TimeoutError:
            if started:
                log.warning("%s passed its %.1f s deadline while sending its response", scope["path"], self.timeout_s)
                return
            await _send_error(
                send,
                503,
                "deadline_exceeded",
                f"the request was not answered within {self.timeout_s:g} s; retry later",
                {"Retry-After": self.retry_after},
            )


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    retry = {"Retry-After": str(settings.retry_after_s)}

    def handle(status: int, code: str, headers: dict[str, str] | None = None) -> ExceptionHandler:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return error_response(status, code, str(exc), headers)

        return handler

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", validation_message(list(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message, dict(exc.headers or {}) or None)

    async def client_gone(request: Request, exc: Exception) -> JSONResponse:
        # Nobody is left to answer; 499 (nginx's "client closed request") keeps it out of the 5xx error rate.
        log.info("%s %s: the client closed the connection before its body was read", request.method, request.url.path)
        return error_response(499, "client_closed_request", "the client closed the connection")

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error; it has been logged")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ImageError, handle(422, "invalid_image"))
    app.add_exception_handler(TextError, handle(422, "invalid_text"))
    app.add_exception_handler(ImageNotFound, handle(404, "image_not_found"))
    app.add_exception_handler(TaskNotLoaded, handle(404, "task_not_loaded"))
    app.add_exception_handler(SearchNotAvailable, handle(404, "search_unavailable"))
    app.add_exception_handler(BadQuery, handle(422, "invalid_query"))
    app.add_exception_handler(NameTaken, handle(409, "name_taken"))
    app.add_exception_handler(Overloaded, handle(503, "overloaded", retry))
    app.add_exception_handler(BodyTooLarge, handle(413, "payload_too_large"))
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, internal)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service: bundles and stores are loaded, and every session warmed, in the lifespan."""
    settings = settings or get_settings()
    metrics = Metrics()

    engine = Engine(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "starting: %d bundle(s), store %s, batching %s, %d API key(s)",
            len(settings.bundles),
            settings.store,
            "on" if settings.batching else "off",
            len(settings.api_keys),
        )
        await asyncio.to_thread(engine.load)
        await engine.start()
        metrics.build_info.labels(
            version=_version(),
            provider=engine.provider,
            model_ids=",".join(f"{task}={m.space.model_id}" for task, m in sorted(engine.models.items())),
            onnxruntime=onnxruntime.__version__,
        ).set(1)
        log.info("ready: %s on %s", ", ".join(sorted(engine.models)), engine.provider)
        try:
            yield
        finally:
            await engine.stop()
            log.info("stopped")

    # /docs and /redoc load Swagger UI and ReDoc from this service (under /static-offline-docs), not a CDN:
    # the docs work on a machine with no internet access.
    app = FastAPIOffline(
        title="DiDE inference service",
        version=_version(),
        description=(
            "Visual question answering, visual entailment and visual reasoning with a distilled dual encoder "
            "over cached image embeddings. Errors are JSON `{code, message}`."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.include_router(router)
    install_openapi(app, settings)
    _install_error_handlers(app, settings)
    # Added innermost first: metrics sees every response, including 413s and deadline 503s.
    app.add_middleware(DeadlineMiddleware, timeout_s=settings.request_timeout_s, retry_after_s=settings.retry_after_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", "X-API-Key"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=router.routes)
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="dide-serve", description="Serve the DiDE models over HTTP (settings: DIDE_*)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for all).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on.")
    args = parser.parse_args(argv)
    settings = get_settings()
    if not settings.bundles:
        parser.error("no bundles to serve: set DIDE_BUNDLES to one or more bundle directories (comma-separated)")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,  # keep the logging configured above
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
