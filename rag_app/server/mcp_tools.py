"""MCP tools on the official ``mcp`` SDK (``MCPServer``, formerly FastMCP): ``search``
(passages with their sources) and ``ask`` (an answer with its sources), each over any
served collection.

The same tools run in ``rag-app serve`` (streamable HTTP at ``/mcp``, behind the same API
keys) and in ``rag-app mcp`` (stdio, for Claude Desktop, Cursor, Claude Code), which
either holds the models itself or forwards to a running server (``--server URL``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from rag_app.errors import RagAppError
from rag_app.pipelines.answer import answer_dict, source_dicts
from rag_app.server.auth import OPEN, KeyRing, Principal
from rag_app.server.client import RagClient
from rag_app.server.errors import ApiError
from rag_app.server.service import RagService

INSTRUCTIONS = (
    "Tools over a document knowledge base. `search` returns numbered passages with their "
    "sources; `ask` returns an answer that cites those numbers as [n], with the sources. "
    "Both take `collection` (a knowledge base; default: {default}). Collections: {names}."
)


class Backend(Protocol):
    """Where the tools' work is done: this process, or a running rag-app serve."""

    default_collection: str

    async def search(
        self, query: str, collection: str | None, top_k: int | None,
        filters: list[str] | None, headers: Mapping[str, str] | None,
    ) -> dict[str, Any]: ...  # fmt: skip

    async def ask(
        self, question: str, collection: str | None, top_k: int | None,
        filters: list[str] | None, headers: Mapping[str, str] | None,
    ) -> dict[str, Any]: ...  # fmt: skip


class LocalBackend:
    """The tools on this process's :class:`RagService`. Over HTTP the caller is the
    request's API key; over stdio (``stdio=True``) it is the local user, who may use every
    collection, and a tool called while the models load waits for them."""

    def __init__(self, service: RagService, keys: KeyRing, *, stdio: bool = False) -> None:
        self.service = service
        self.keys = keys
        self.stdio = stdio
        self.default_collection = service.cfg.milvus.collection

    async def _caller(self, headers: Mapping[str, str] | None) -> Principal:
        if self.stdio:
            await self.service.wait_ready()
            return OPEN
        caller = self.keys.check((headers or {}).get("authorization"))
        self.service.require_ready()
        return caller

    async def search(
        self, query: str, collection: str | None, top_k: int | None,
        filters: list[str] | None, headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:  # fmt: skip
        caller = await self._caller(headers)
        ask = self.service.make_ask(caller, collection, query, (), top_k, filters)
        nodes = await self.service.retrieve(ask)
        return {"collection": ask.collection, "passages": source_dicts(nodes)}

    async def ask(
        self, question: str, collection: str | None, top_k: int | None,
        filters: list[str] | None, headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:  # fmt: skip
        caller = await self._caller(headers)
        ask = self.service.make_ask(caller, collection, question, (), top_k, filters)
        answer = answer_dict(await self.service.answer(ask))
        return {"collection": ask.collection, **answer}


class RemoteBackend:
    """The tools forwarded to a running rag-app serve, with this side's API key."""

    def __init__(self, client: RagClient, default_collection: str) -> None:
        self.client = client
        self.default_collection = default_collection

    async def search(
        self, query: str, collection: str | None, top_k: int | None,
        filters: list[str] | None, headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:  # fmt: skip
        name = collection or self.default_collection
        found = await self.client.retrieve(query, collection=name, top_k=top_k, filters=filters)
        passages = [{k: v for k, v in chunk.items() if k != "metadata"} for chunk in found["data"]]
        return {"collection": name, "passages": passages}

    async def ask(
        self, question: str, collection: str | None, top_k: int | None,
        filters: list[str] | None, headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:  # fmt: skip
        name = collection or self.default_collection
        messages = [{"role": "user", "content": question}]
        answer = await self.client.answer(messages, collection=name, top_k=top_k, filters=filters)
        return {"collection": name, **answer}


def build_mcp(
    backend: Backend,
    *,
    collections: list[str] | None = None,
    lifespan: Callable[[MCPServer[Any]], AbstractAsyncContextManager[Any]] | None = None,
) -> MCPServer[Any]:
    """The MCP server with its two tools; ``collections`` names them in the instructions."""
    names = ", ".join(collections) if collections else "see GET /v1/models"
    server: MCPServer[Any] = MCPServer(
        "rag_app",
        instructions=INSTRUCTIONS.format(default=backend.default_collection, names=names),
        lifespan=lifespan,
        log_level="WARNING",
    )

    @server.tool(description="Search the knowledge base: numbered passages (source, title, "
                 "score, text), best first. filters: KEY=VALUE or KEY=PREFIX* metadata "
                 "matches, e.g. source=reference/*.")  # fmt: skip
    async def search(
        query: str,
        ctx: Context,
        collection: str | None = None,
        top_k: int | None = None,
        filters: list[str] | None = None,
    ) -> dict[str, Any]:
        async with _tool_errors():
            return await backend.search(query, collection, top_k, filters, ctx.headers)

    @server.tool(description="Ask the knowledge base a question: an answer citing numbered "
                 "sources as [n], the sources, and whether it abstained (the documents do "
                 "not say).")  # fmt: skip
    async def ask(
        question: str,
        ctx: Context,
        collection: str | None = None,
        top_k: int | None = None,
        filters: list[str] | None = None,
    ) -> dict[str, Any]:
        async with _tool_errors():
            return await backend.ask(question, collection, top_k, filters, ctx.headers)

    return server


@asynccontextmanager
async def _tool_errors() -> AsyncIterator[None]:
    """Anticipated failures become the tool's one-line error, for the agent to read."""
    try:
        yield
    except ApiError as exc:
        raise ToolError(exc.message) from None
    except RagAppError as exc:
        raise ToolError(str(exc)) from None
