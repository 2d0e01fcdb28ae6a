"""``rag-app serve`` as its clients see it: the official ``openai`` client, a LlamaIndex
app (``OpenAILike``), MCP clients (the ``mcp`` SDK over streamable HTTP and over stdio),
``rag-app query --server``, and every error status, against one real server process
(SmolLM2 in vLLM, Milvus Lite) for the session (see ``rag_server`` in conftest.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import HNSW_QUESTION, SERVE_KEYS

FULL, TEAM = SERVE_KEYS["full"], SERVE_KEYS["team"]
# Greedy SmolLM2 talks on to its token limit here: a stream that is still running when
# the test looks at it.
LONG_QUESTION = "Explain all index types in detail"


def client(rag_server, key: str = FULL) -> openai.OpenAI:
    return openai.OpenAI(base_url=rag_server.ensure().url + "/v1", api_key=key, max_retries=0)


def post(rag_server, path: str, body: Any, key: str | None = FULL, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(rag_server.ensure().url + path, json=body, headers=headers, timeout=120,
                      **kwargs)  # fmt: skip


def ask(question: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], **extra}


def assert_openai_error(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"] and "Traceback" not in reply.text
    return error


def test_health_readiness_and_one_model_per_collection(rag_server):
    server = rag_server.ensure()
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    assert [m.id for m in client(rag_server).models.list()] == ["rag_docs", "team_kb"]
    assert [m.id for m in client(rag_server, TEAM).models.list()] == ["team_kb"]
    assert client(rag_server).models.retrieve("team_kb").model_extra["chunks"] > 0


def test_the_openai_client_gets_an_answer_with_its_sources(rag_server):
    completion = client(rag_server).chat.completions.create(
        model="rag_docs",
        messages=[{"role": "user", "content": HNSW_QUESTION}],
        extra_body={"top_k": 2},
    )
    assert completion.choices[0].message.content.strip()
    extra = completion.model_extra
    sources = extra["sources"]
    assert [s["number"] for s in sources] == [1, 2]
    assert sources[0]["source"] == "reference/index.md"
    assert {"source", "title", "score", "text"} <= set(sources[0]) and sources[0]["text"]
    assert isinstance(extra["citations"], list) and extra["abstained"] is False
    assert set(extra["timings"]) >= {"retrieve", "total"}


def test_a_stream_sends_tokens_then_the_sources_in_its_last_chunk(rag_server):
    stream = client(rag_server).chat.completions.create(
        model="rag_docs", messages=[{"role": "user", "content": HNSW_QUESTION}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1 and text.strip()
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert all("sources" not in (c.model_extra or {}) for c in chunks[:-1])
    assert last.model_extra["sources"][0]["source"] == "reference/index.md"
    if "[" not in text:  # no citation that the check could have removed
        assert last.model_extra["answer"] == text.strip()
    timings = last.model_extra["timings"]
    assert timings["retrieve"] <= timings["first_token"] <= timings["total"]


def test_filters_mode_and_top_k_reach_retrieval(rag_server):
    def retrieve(**body: Any) -> list[dict[str, Any]]:
        reply = post(rag_server, "/v1/retrieve", {"query": HNSW_QUESTION, **body})
        assert reply.status_code == 200, reply.text
        return reply.json()["data"]

    assert retrieve(top_k=4)[0]["source"] == "reference/index.md"
    assert len(retrieve(top_k=4)) == 4 and len(retrieve(top_k=1)) == 1
    chunks = retrieve(top_k=4, filters=["source=reference/cons*"])
    assert chunks and {c["source"] for c in chunks} == {"reference/consistency.md"}
    metadata = chunks[0]["metadata"]
    assert metadata["doc_type"] == "markdown" and "doc_hash" not in metadata
    # BM25 (sparse) finds no word of a made-up one; vectors (dense) always find neighbours.
    assert retrieve(query="zqxjkv", mode="sparse") == []
    assert len(retrieve(query="zqxjkv", mode="dense", top_k=2)) == 2


def test_a_conversation_is_answered_from_its_last_turn_with_the_history(rag_server):
    completion = client(rag_server).chat.completions.create(
        model="rag_docs",
        messages=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "What is HNSW?"},
            {"role": "assistant", "content": "HNSW is a graph-based index."},
            {"role": "user", "content": "What do its parameters mean?"},
        ],
    )
    assert completion.choices[0].message.content.strip()
    assert completion.model_extra["sources"]


def test_a_llamaindex_app_uses_the_service_as_an_openai_like_llm(rag_server):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        api_base=rag_server.ensure().url + "/v1", api_key=FULL, model="team_kb",
        is_chat_model=True, context_window=2048, max_retries=0,
    )  # fmt: skip
    reply = llm.chat([ChatMessage(role="user", content="What is a replica?")])
    assert reply.message.content.strip()
    assert reply.raw.model_extra["sources"][0]["source"] == "reference/replica.md"
    tokens = [r.delta for r in llm.stream_chat([ChatMessage(role="user", content="Replicas?")])]
    assert len(tokens) > 1


def _mcp_calls(session_factory, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    """The tools' names, then each call's result, through one MCP client session."""

    async def run() -> list[Any]:
        from mcp import ClientSession

        async with session_factory() as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            results: list[Any] = [[tool.name for tool in (await session.list_tools()).tools]]
            for name, arguments in calls:
                results.append(await session.call_tool(name, arguments))
            return results

    return asyncio.run(run())


def test_mcp_tools_over_streamable_http_behind_the_keys(rag_server):
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    url = rag_server.ensure().url + "/mcp"

    def session(key: str = FULL):
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120)
        return streamable_http_client(url, http_client=http)

    _, forbidden = _mcp_calls(lambda: session(TEAM), ("search", {"query": HNSW_QUESTION}))
    assert forbidden.is_error and "may not use collection 'rag_docs'" in forbidden.content[0].text
    tools, found, answered = _mcp_calls(
        session,
        ("search", {"query": HNSW_QUESTION, "top_k": 2}),
        ("ask", {"question": "What is a replica?", "collection": "team_kb"}),
    )
    assert set(tools) == {"search", "ask"}
    assert not found.is_error and not answered.is_error
    passages = found.structured_content["passages"]
    assert [p["number"] for p in passages] == [1, 2]
    assert passages[0]["source"] == "reference/index.md"
    answer = answered.structured_content
    assert answer["answer"].strip() and answer["collection"] == "team_kb"
    assert answer["sources"][0]["source"] == "reference/replica.md"
    assert_openai_error(httpx.post(url, json={}), 401, "missing_api_key")


def test_rag_app_mcp_over_stdio_forwards_to_the_server(rag_server):
    from mcp.client.stdio import StdioServerParameters, stdio_client

    server = rag_server.ensure()
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "rag_app.cli", "mcp", "--server", server.url],
        env={**server.env, "RAG_APP_CLIENT__API_KEY": TEAM},
    )
    tools, found, answered, forbidden = _mcp_calls(
        lambda: stdio_client(params),
        ("search", {"query": "replica", "collection": "team_kb"}),
        ("ask", {"question": "What is a replica?", "collection": "team_kb"}),
        ("search", {"query": HNSW_QUESTION}),  # rag_docs: not for the team's key
    )
    assert set(tools) == {"search", "ask"}
    assert found.structured_content["passages"][0]["source"] == "reference/replica.md"
    assert answered.structured_content["answer"].strip()
    assert answered.structured_content["sources"][0]["source"] == "reference/replica.md"
    assert forbidden.is_error
    assert "403: this API key may not use collection 'rag_docs'" in forbidden.content[0].text


def test_every_refusal_is_an_openai_error_with_its_status(rag_server):
    # 400: a body that is no chat request, top_k over the limit, an empty question, a bad
    # filter, a conversation that does not end with the user's question.
    assert_openai_error(post(rag_server, "/v1/chat/completions", {"messages": []}), 400,
                        "invalid_request")  # fmt: skip
    assert_openai_error(post(rag_server, "/v1/chat/completions", ask("x", top_k=21)), 400,
                        "invalid_top_k")  # fmt: skip
    assert_openai_error(post(rag_server, "/v1/chat/completions", ask("  ")), 400,
                        "invalid_request")  # fmt: skip
    bad_filter = post(rag_server, "/v1/chat/completions", ask("x", filters=["no-equals"]))
    assert "KEY=VALUE" in assert_openai_error(bad_filter, 400, "invalid_request")["message"]
    last_assistant = {"messages": [{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": "b"}]}  # fmt: skip
    assert_openai_error(post(rag_server, "/v1/chat/completions", last_assistant), 400,
                        "no_question")  # fmt: skip
    # 401: no key, a wrong key (the openai client raises its own exception).
    assert_openai_error(post(rag_server, "/v1/chat/completions", ask("x"), key=None), 401,
                        "missing_api_key")  # fmt: skip
    with pytest.raises(openai.AuthenticationError):
        client(rag_server, "sk-wrong-key-000000").models.list()
    # 403: a key limited to team_kb asking rag_docs (the default collection too).
    forbidden = post(rag_server, "/v1/chat/completions", ask("x", model="rag_docs"), key=TEAM)
    assert_openai_error(forbidden, 403, "collection_forbidden")
    with pytest.raises(openai.PermissionDeniedError):
        client(rag_server, TEAM).chat.completions.create(
            model="rag_docs", messages=[{"role": "user", "content": "x"}]
        )
    # 404: no such collection, no such route.
    with pytest.raises(openai.NotFoundError):
        client(rag_server).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert_openai_error(httpx.get(rag_server.url + "/v2/nothing"), 404, "not_found")
    # 413: a body over server.max_body_kb, announced or streamed without a length.
    huge = ask("x" * 300_000)
    assert_openai_error(post(rag_server, "/v1/chat/completions", huge), 413,
                        "request_too_large")  # fmt: skip
    chunked = httpx.post(
        rag_server.url + "/v1/chat/completions",
        content=iter([json.dumps(huge).encode()]),
        headers={"Authorization": f"Bearer {FULL}", "Content-Type": "application/json"},
    )
    assert_openai_error(chunked, 413, "request_too_large")
    # 503: what a request got while the models were loading (seen by the fixture).
    status, body = rag_server.loading_reply
    assert status == 503 and body["error"]["code"] == "not_ready"


def test_beyond_the_queue_requests_get_429_and_the_queue_drains(rag_server):
    """The fixture's gate: 2 answering and 2 waiting; the fifth request is refused."""
    server = rag_server.ensure()
    opened: list[httpx.Response] = []
    clients = [httpx.Client(timeout=120) for _ in range(4)]
    results: list[int] = []

    def stream(http: httpx.Client) -> None:
        request = http.build_request("POST", server.url + "/v1/chat/completions",
                                     json=ask(LONG_QUESTION, stream=True),
                                     headers={"Authorization": f"Bearer {FULL}"})  # fmt: skip
        reply = http.send(request, stream=True)
        opened.append(reply)
        results.append(reply.status_code)
        reply.read()

    threads = [threading.Thread(target=stream, args=(http,)) for http in clients]
    try:
        for thread in threads:
            thread.start()
        _until(lambda: server.metrics()["queued"] == 2 and server.metrics()["running"] == 2)
        refused = post(rag_server, "/v1/chat/completions", ask("x"))
        error = assert_openai_error(refused, 429, "server_busy")
        assert refused.headers["retry-after"] and "server.max_queue" in error["message"]
        for thread in threads:
            thread.join(timeout=300)
        assert results == [200, 200, 200, 200]  # the queued ones were answered
    finally:
        for reply in opened:
            reply.close()
        for http in clients:
            http.close()
    _until(lambda: server.metrics()["running"] == 0)


def test_a_client_that_disconnects_mid_stream_aborts_its_request_in_the_engine(rag_server):
    """Two identical answers: the one whose reader goes away leaves the engine while the
    other, started first, is still generating (unaborted, it would finish after it)."""
    server = rag_server.ensure()
    assert server.metrics()["engine_requests"] == 0
    kept_started, kept_done = threading.Event(), threading.Event()

    def keep_reading() -> None:
        with _stream(server) as reply:
            for line in reply.iter_lines():
                if '"delta": {"content"' in line:
                    kept_started.set()
        kept_done.set()

    kept = threading.Thread(target=keep_reading)
    kept.start()
    try:
        assert kept_started.wait(timeout=300)
        with _stream(server) as reply:
            lines = reply.iter_lines()
            tokens = 0
            while tokens < 3:
                tokens += '"delta": {"content"' in next(lines)
            during = server.metrics()
        assert during["engine_requests"] == 2 and during["running"] == 2
        while server.metrics()["engine_requests"] != 1:
            assert not kept_done.is_set(), "the abandoned request outlived the other one"
        assert not kept_done.is_set()
    finally:
        kept.join(timeout=300)
    # The server gives the turn back just after sending a stream's last byte.
    _until(lambda: server.metrics()["running"] == 0)
    after = server.metrics()
    assert after["engine_requests"] == 0 and after["running"] == 0
    assert after["answered"] == during["answered"] + 1  # the one read to its end


@contextmanager
def _stream(server) -> Iterator[httpx.Response]:
    with httpx.Client(timeout=120) as http, http.stream(
        "POST", server.url + "/v1/chat/completions", json=ask(LONG_QUESTION, stream=True),
        headers={"Authorization": f"Bearer {FULL}"},
    ) as reply:  # fmt: skip
        yield reply


def test_rag_app_query_and_chat_answer_through_the_server(rag_server):
    server = rag_server.ensure()
    env = {**server.env, "RAG_APP_CLIENT__API_KEY": FULL}
    done = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "query", "--server", server.url,
         HNSW_QUESTION, "--json", "--top-k", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["question"] == HNSW_QUESTION and answer["answer"].strip()
    assert answer["sources"][0]["source"] == "reference/index.md" and len(answer["sources"]) == 2
    chat = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "chat", "--server", server.url,
         "--collection", "team_kb"],
        env={**server.env, "RAG_APP_CLIENT__API_KEY": TEAM}, input="What is a replica?\n",
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("assistant> ") and "reference/replica.md" in chat.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "query", "--server", server.url, "x"],
        env={**server.env, "RAG_APP_CLIENT__API_KEY": "sk-wrong-key-000000"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"rag-app: error: rag-app serve at {server.url} answered 401: invalid API key "
        "(set RAG_APP_CLIENT__API_KEY to one of the server's keys)"
    )


def test_no_key_reaches_the_log_or_a_response(rag_server):
    server = rag_server.ensure()
    wrong = "sk-wrong-but-logged-1234567"
    replies = [
        post(rag_server, "/v1/chat/completions", ask("x"), key=wrong),
        post(rag_server, "/v1/chat/completions", ask("x", model="rag_docs"), key=TEAM),
        post(rag_server, "/v1/retrieve", {"query": "replica", "model": "team_kb"}, key=TEAM),
    ]
    for reply in replies:
        assert all(key not in reply.text for key in (FULL, TEAM, wrong))
    log = server.log()
    assert "POST /v1/retrieve" in log  # the access log is on
    assert all(key not in log for key in (FULL, TEAM, wrong)), log[-2000:]


def _until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
