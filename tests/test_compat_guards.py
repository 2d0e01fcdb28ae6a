"""Guards for rag_app.compat: every private API of a library that rag_app overrides still
has the signature, and the role, that the override was written for. A failure here means
upstream changed: re-read the upstream code, then fix the compat module and this guard."""

from __future__ import annotations

import inspect


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_milvus_store_still_searches_bm25_through_the_overridden_private_methods():
    from llama_index.vector_stores.milvus import MilvusVectorStore

    for name in ("_sparse_search", "_async_sparse_search"):
        assert _parameters(getattr(MilvusVectorStore, name)) == [
            "self", "query", "string_expr", "output_fields", "kwargs",
        ]  # fmt: skip
    assert _parameters(MilvusVectorStore._parse_from_milvus_results) == ["self", "results"]
    assert "self._sparse_search(" in inspect.getsource(MilvusVectorStore.query)
    assert "self._async_sparse_search(" in inspect.getsource(MilvusVectorStore.aquery)
    # The reason for the override: upstream asks for a drop ratio Milvus Lite refuses.
    assert '"drop_ratio_search": 0.2' in inspect.getsource(MilvusVectorStore._sparse_search)


def test_milvus_store_async_searches_go_through_the_per_loop_client_property():
    from llama_index.vector_stores.milvus import MilvusVectorStore

    assert isinstance(inspect.getattr_static(MilvusVectorStore, "aclient"), property)
    assert "self.aclient.search(" in inspect.getsource(MilvusVectorStore._async_default_search)


def test_openai_llm_still_builds_its_client_from_the_overridden_credential_kwargs():
    from llama_index.llms.openai import OpenAI

    from rag_app.components.llm.server import VllmServerLLM

    assert _parameters(OpenAI._get_credential_kwargs) == ["self", "is_async"]
    assert "_get_credential_kwargs()" in inspect.getsource(OpenAI._get_client)
    assert "_get_credential_kwargs(is_async=True)" in inspect.getsource(OpenAI._get_aclient)
    llm = VllmServerLLM(model="m", api_base="http://127.0.0.1:9/v1", api_key="k", retries=5)
    assert llm.max_retries == 0  # LlamaIndex's own retry layer stays off
    assert llm._get_client().max_retries == 5
    assert llm._get_aclient().max_retries == 5


def test_milvus_lite_still_builds_its_in_process_server_through_grpc_server(monkeypatch):
    import grpc
    import milvus_lite.adapter.grpc.server as lite_server
    from milvus_lite import server_manager

    from rag_app.compat import milvus_lite

    assert "grpc.server(" in inspect.getsource(lite_server._build_server)
    assert "_build_server(" in inspect.getsource(lite_server.start_server_in_thread)
    assert "start_server_in_thread" in inspect.getsource(server_manager)
    assert milvus_lite.accept_keepalive_pings() and milvus_lite.accept_keepalive_pings()
    seen: list[object] = []
    monkeypatch.setattr(grpc, "server", lambda *args, options=(), **kw: seen.append(options))
    lite_server.grpc.server(None, options=[("grpc.max_send_message_length", 1)])
    assert seen == [[("grpc.max_send_message_length", 1), *milvus_lite.PING_OPTIONS]]
