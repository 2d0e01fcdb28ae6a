"""``llama-index-vector-stores-milvus`` 1.2.0: BM25 search that runs on Milvus Lite, and an
async client per event loop.

Overrides private methods of ``MilvusVectorStore`` (checked by tests/test_compat_guards.py):

- ``_sparse_search`` / ``_async_sparse_search(query, string_expr, output_fields, **kwargs)``:
  upstream searches the BM25 field with ``drop_ratio_search = 0.2``, which Milvus Lite
  refuses ("only drop_ratio_search=0 is supported"); 0 (drop nothing, exact BM25) works on
  Lite and on servers. Lite also reports BM25 scores negated (best first, but -3.1 before
  -1.5); they are returned positive, as BM25 defines them. Results are parsed with
  upstream's ``_parse_from_milvus_results(results)``.
- ``aclient`` (a public property, but upstream keeps one client for the store's life):
  pymilvus's async client is bound to the event loop it first ran on, and fails with
  "Event loop is closed" once that loop is gone (a second ``asyncio.run``); here each
  running loop gets a client of its own.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import VectorStoreQuery
from llama_index.vector_stores.milvus import MilvusVectorStore
from llama_index.vector_stores.milvus.utils import BM25BuiltInFunction
from pydantic import PrivateAttr
from pymilvus import AsyncMilvusClient

WRITTEN_FOR = "1.2.0"
SparseResult = tuple[list[BaseNode], list[float], list[str]]


class MilvusVectorStoreCompat(MilvusVectorStore):
    """``MilvusVectorStore`` with the two fixes above; ``connection`` holds the
    ``uri``/``token`` keywords the async clients are made with."""

    _connection: dict[str, Any] = PrivateAttr(default_factory=dict)
    _loop_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncMilvusClient] = (
        PrivateAttr(default_factory=weakref.WeakKeyDictionary)
    )

    def __init__(self, *, uri: str, token: str = "", **kwargs: Any) -> None:
        super().__init__(uri=uri, token=token, **kwargs)
        self._connection = {"uri": uri, "token": token}

    @property
    def aclient(self) -> AsyncMilvusClient:
        loop = asyncio.get_running_loop()
        client = self._loop_clients.get(loop)
        if client is None:
            client = self._loop_clients[loop] = AsyncMilvusClient(**self._connection)
        return client

    def _sparse_search(
        self, query: VectorStoreQuery, string_expr: str, output_fields: list[str], **kwargs: Any
    ) -> SparseResult:
        if not isinstance(self.sparse_embedding_function, BM25BuiltInFunction):
            return super()._sparse_search(query, string_expr, output_fields, **kwargs)  # type: ignore[no-any-return]
        res = self.client.search(**self._bm25_request(query, string_expr, output_fields, kwargs))
        return self._positive_scores(res)

    async def _async_sparse_search(
        self, query: VectorStoreQuery, string_expr: str, output_fields: list[str], **kwargs: Any
    ) -> SparseResult:
        if not isinstance(self.sparse_embedding_function, BM25BuiltInFunction):
            return await super()._async_sparse_search(query, string_expr, output_fields, **kwargs)  # type: ignore[no-any-return]
        request = self._bm25_request(query, string_expr, output_fields, kwargs)
        return self._positive_scores(await self.aclient.search(**request))

    def _bm25_request(
        self,
        query: VectorStoreQuery,
        string_expr: str,
        output_fields: list[str],
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "collection_name": self.collection_name,
            "data": [query.query_str],
            "anns_field": self.sparse_embedding_field,
            "limit": query.similarity_top_k,
            "filter": string_expr,
            "output_fields": output_fields,
            "search_params": {"params": {"drop_ratio_search": 0.0}},
            "partition_names": kwargs.get("milvus_partition_names"),
        }

    def _positive_scores(self, results: Any) -> SparseResult:
        nodes, scores, ids = self._parse_from_milvus_results(results)
        return nodes, [abs(score) for score in scores], ids
