"""The FastAPI application of ``rag-app serve``: the ``/v1`` API, MCP at ``/mcp``, health
and readiness, a small metrics object, and the web page at ``/``.

Every error a client sees is OpenAI-shaped JSON with its status, never a traceback:
refused requests (:class:`ApiError`), invalid bodies (400), bodies over
``server.max_body_kb`` (413), unknown routes (404) and unexpected failures (500, with the
detail in the server's log only).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from mcp.server.transport_security import TransportSecuritySettings
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rag_app.config import RagConfig
from rag_app.errors import first_line
from rag_app.server.auth import KeyRing, is_loopback
from rag_app.server.errors import ApiError, error_body
from rag_app.server.mcp_tools import LocalBackend, build_mcp
from rag_app.server.openai_api import Caller, Service, error_response, router
from rag_app.server.service import RagService

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(
    cfg: RagConfig,
    *,
    service: RagService | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service's ASGI app. Its lifespan loads the models in the background (so
    ``/healthz`` answers at once and ``/readyz`` says when answers can start) and closes
    the generator at shutdown; ``on_failure`` hears why the models could not load."""
    service = service or RagService(cfg)
    keys = KeyRing(cfg.server.key_scopes())
    mcp = build_mcp(LocalBackend(service, keys), collections=cfg.server.collections or None)
    security = None if is_loopback(cfg.server.host) else _any_host()
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=True,
        json_response=True,
        transport_security=security,
        host=cfg.server.host,
        max_request_body_size=cfg.server.max_body_kb * 1024,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_loading(on_failure)
        try:
            async with mcp.session_manager.run():
                yield
        finally:
            await service.close()

    app = FastAPI(
        title="rag_app",
        summary="Answers from your documents, with sources: OpenAI-compatible API and MCP.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads its scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.service = service
    app.state.keys = keys
    app.include_router(router)
    app.router.routes.extend(mcp_app.routes)  # POST/GET/DELETE /mcp, streamable HTTP

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        body: dict[str, Any] = {"status": service.state}
        if service.failure:
            body["error"] = service.failure
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(rag: Service, caller: Caller) -> dict[str, Any]:
        return rag.metrics()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _install_error_handlers(app)
    app.add_middleware(McpKeys, keys=keys)
    app.add_middleware(BodyLimit, limit=cfg.server.max_body_kb * 1024)
    return app


def _any_host() -> TransportSecuritySettings:
    """Off loopback the API keys guard /mcp; DNS-rebinding checks pin it to loopback."""
    return TransportSecuritySettings(enable_dns_rebinding_protection=False)


class BodyTooLarge(HTTPException):
    """Raised while a body streams in (FastAPI passes HTTP exceptions through as they are)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this service's limit of "
                         f"{limit // 1024} KB")  # fmt: skip


class BodyLimit:
    """413 for a request body over the limit, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, self._error())
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)

    def _error(self) -> ApiError:
        return ApiError(413, BodyTooLarge(self.limit).detail, "request_too_large")


class McpKeys:
    """The API keys in front of /mcp: 401 before the MCP transport sees the request."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") == "/mcp":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                self.keys.check(header or None)
            except ApiError as exc:
                await _send_error(send, exc)
                return
        await self.app(scope, receive, send)


async def _send_error(send: Send, exc: ApiError) -> None:
    response = error_response(exc)
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})  # fmt: skip
    await send({"type": "http.response.body", "body": response.body})


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        message = f"{where}: {error['msg']}" if where else str(error["msg"])
        return error_response(ApiError(400, message, "invalid_request", param=where or None))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        body = error_body(exc.status_code, message, codes.get(exc.status_code, "http_error"))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback (through the redacting log formatter) after this.
        log.error("%s %s failed: %s", request.method, request.url.path, first_line(exc))
        body = error_body(500, f"internal error: {first_line(exc)}", "server_error")
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
