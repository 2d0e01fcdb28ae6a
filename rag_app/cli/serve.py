"""``rag-app serve`` (the HTTP service) and ``rag-app mcp`` (the MCP tools over stdio).

FastAPI, uvicorn and the MCP SDK are imported here, when the command runs, never by
``rag-app --help``.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from rag_app.cli import load_cli_config
from rag_app.config import RagConfig
from rag_app.errors import RagAppError, redact

log = logging.getLogger("rag_app.serve")


class RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) with every registered secret masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _configure_logging(cfg: RagConfig) -> None:
    """uvicorn's start-up and access lines through the root handler, secrets masked. The
    access log holds method, path, status and client address: no header, so no key."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)
    logging.getLogger("uvicorn.access").setLevel(
        logging.INFO if cfg.server.access_log else logging.WARNING
    )


def check_exposure(cfg: RagConfig) -> None:
    """Without API keys, only loopback unless told otherwise: an open port on a network
    would hand the documents to anyone who finds it."""
    from rag_app.server.auth import is_loopback

    settings = cfg.server
    if settings.key_scopes() or settings.allow_remote_without_keys or is_loopback(settings.host):
        return
    raise RagAppError(
        f"refusing to listen on {settings.host} without API keys: set "
        "RAG_APP_SERVER__API_KEYS (environment or secrets file), or "
        "server.allow_remote_without_keys = true, or listen on 127.0.0.1"
    )


def serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["server__host"] = args.host
    if args.port is not None:
        overrides["server__port"] = args.port
    cfg = load_cli_config(args, **overrides)
    check_exposure(cfg)

    import uvicorn

    from rag_app.server.app import create_app
    from rag_app.server.service import RagService

    _configure_logging(cfg)
    service = RagService(cfg)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            """SIGTERM/SIGINT: stop accepting, let in-flight answers finish (up to
            server.shutdown_timeout), close the engine, and exit 0. (uvicorn would raise
            the signal again at the end, making a clean drain look like a kill.)"""
            if service.state in ("loading", "ready"):
                service.state = "draining"
                log.info("shutting down: finishing the answers in flight")
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    def failed(reason: str) -> None:
        server.should_exit = True

    app = create_app(cfg, service=service, on_failure=failed)
    config = uvicorn.Config(
        app,
        host=cfg.server.host,
        port=cfg.server.port,
        log_config=None,
        access_log=cfg.server.access_log,
        timeout_graceful_shutdown=int(cfg.server.shutdown_timeout),
        server_header=False,
    )
    server = Server(config)
    log.info(
        "rag-app serve on http://%s:%d: API at /v1, MCP at /mcp, web page at /%s",
        cfg.server.host, cfg.server.port,
        "" if cfg.server.key_scopes() else " (no API keys: loopback only)",
    )  # fmt: skip
    server.run()
    if service.failure is not None:
        raise RagAppError(service.failure)
    return 0


def mcp(args: argparse.Namespace) -> int:
    """The MCP tools over stdio: the models held here, or a running server's (``--server``)."""
    cfg = load_cli_config(args)
    url = args.server or cfg.client.server_url

    from rag_app.server.auth import KeyRing
    from rag_app.server.mcp_tools import LocalBackend, RemoteBackend, build_mcp

    if url:
        from rag_app.server.client import RagClient

        client = RagClient(url, cfg.client.api_key.get_secret_value(), timeout=cfg.client.timeout)

        @asynccontextmanager
        async def remote(_: object) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await client.aclose()

        server = build_mcp(RemoteBackend(client, cfg.milvus.collection), lifespan=remote)
    else:
        from rag_app.server.service import RagService

        service = RagService(cfg)

        @asynccontextmanager
        async def local(_: object) -> AsyncIterator[None]:
            # Loaded once the transport holds stdout (stray output goes to stderr); a
            # tool called before the models are ready waits for them.
            service.start_loading()
            try:
                yield
            finally:
                await service.close()

        backend = LocalBackend(service, KeyRing({}), stdio=True)
        server = build_mcp(backend, collections=cfg.server.collections or None, lifespan=local)
    server.run("stdio")
    return 0
