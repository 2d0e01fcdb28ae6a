"""``server`` mode against a real vLLM OpenAI-compatible server process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
from conftest import CORPUS, HNSW_QUESTION, POISONED_NAME, PROFILE, REPO, write_poisoned_document
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from rag_app import build_llm, build_query_engine
from rag_app.prompts import ABSTAIN_ANSWER

pytestmark = [pytest.mark.server, pytest.mark.llm]


def served_cli(vllm_server: str, tmp_path) -> tuple[list[str], dict[str, str]]:
    """The CLI and an environment for server mode, with reference/index.md ingested."""
    docs = tmp_path / "docs" / "reference"
    docs.mkdir(parents=True)
    shutil.copy(CORPUS / "reference" / "index.md", docs / "index.md")
    env = {
        **os.environ,
        "RAG_APP_CONFIG": str(PROFILE),
        "RAG_APP_MILVUS__URI": str(tmp_path / "cli.db"),
        "RAG_APP_LLM__MODE": "server",
        "RAG_APP_LLM__API_BASE": vllm_server,
        "RAG_APP_LLM__MODEL": "smollm2",
        "RAG_APP_LLM__TOKENIZER": str(REPO / ".models" / "SmolLM2-135M-Instruct"),
    }
    cli = [sys.executable, "-m", "rag_app.cli"]
    ingest = subprocess.run(
        [*cli, "ingest", str(tmp_path / "docs")], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr
    return cli, env


def test_server_mode_answers_with_sources(server_cfg, session_index):
    llm = build_llm(server_cfg)
    assert isinstance(llm, OpenAILike)
    response = build_query_engine(server_cfg, index=session_index, llm=llm).query(HNSW_QUESTION)
    assert str(response).strip()
    assert response.source_nodes[0].node.metadata["source"] == "reference/index.md"


def test_server_mode_sends_chat_turns_that_the_server_renders_with_the_models_template(
    vllm_server, server_cfg
):
    from transformers import AutoTokenizer

    llm = build_llm(server_cfg)
    assert llm.metadata.is_chat_model  # messages go to /chat/completions, never flattened
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is Milvus?"},
    ]
    request = urllib.request.Request(
        vllm_server.removesuffix("/v1") + "/tokenize",
        data=json.dumps(
            {"model": "smollm2", "messages": messages, "add_generation_prompt": True}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        served = json.load(reply)["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(REPO / ".models" / "SmolLM2-135M-Instruct")
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert served == list(getattr(expected, "input_ids", expected))


def test_server_mode_packs_long_contexts_with_the_models_tokenizer(server_cfg, session_index):
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatStartEvent
    from transformers import AutoTokenizer

    sent: list[list[dict[str, str]]] = []

    class Recorder(BaseEventHandler):
        def handle(self, event, **kwargs) -> None:
            if isinstance(event, LLMChatStartEvent):
                sent.append([{"role": m.role.value, "content": m.content} for m in event.messages])

    wide = server_cfg.model_copy(deep=True)
    wide.retrieval.candidates, wide.retrieval.dedupe = 40, False  # ~40 chunks, > 2048 tokens
    llm = build_llm(wide)
    tokenizer = AutoTokenizer.from_pretrained(wide.llm.tokenizer)
    assert llm.tokenizer is not None  # llm.tokenizer was loaded for packing
    recorder, dispatcher = Recorder(), get_dispatcher()
    dispatcher.add_event_handler(recorder)
    try:
        engine = build_query_engine(wide, index=session_index, llm=llm, top_k=40)
        response = engine.query(HNSW_QUESTION)  # the server refuses an over-long prompt
    finally:
        dispatcher.event_handlers.remove(recorder)
    assert str(response).strip() and len(response.source_nodes) == 40
    budget = wide.llm.max_model_len - wide.llm.max_tokens
    rendered = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in sent]
    lengths = [len(getattr(ids, "input_ids", ids)) for ids in rendered]
    assert len(lengths) > 1  # the excerpts did not fit one prompt: compact and refine
    assert all(length <= budget for length in lengths), lengths


def test_server_mode_streams_tokens(server_cfg, session_index):
    llm = build_llm(server_cfg)
    deltas = [
        chunk.delta
        for chunk in llm.stream_chat([ChatMessage(role="user", content="Count to five.")])
    ]
    assert len(deltas) > 1 and "".join(d or "" for d in deltas).strip()

    engine = build_query_engine(server_cfg, index=session_index, llm=llm, streaming=True)
    response = engine.query(HNSW_QUESTION)
    tokens = list(response.response_gen)
    assert len(tokens) > 1 and "".join(tokens).strip()
    assert response.source_nodes[0].node.metadata["source"] == "reference/index.md"


def test_cli_query_json_and_stream_against_the_server(vllm_server, tmp_path):
    cli, env = served_cli(vllm_server, tmp_path)
    query = subprocess.run(
        [*cli, "query", HNSW_QUESTION, "--json", "--top-k", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert query.returncode == 0, query.stderr
    result = json.loads(query.stdout)
    assert result["answer"].strip()
    assert [s["source"] for s in result["sources"]] == ["reference/index.md"] * 2
    assert all(set(s) >= {"source", "score", "text"} and s["text"] for s in result["sources"])
    assert [s["number"] for s in result["sources"]] == [1, 2]
    assert set(result["citations"]) <= {1, 2}
    assert result["abstained"] is (result["answer"] == ABSTAIN_ANSWER)

    questions = tmp_path / "questions.txt"
    questions.write_text(f"{HNSW_QUESTION}\n\nWhat does efConstruction control?\n")
    batch = subprocess.run(
        [*cli, "query", "--file", str(questions), "--json", "--top-k", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert batch.returncode == 0, batch.stderr
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [r["question"] for r in rows] == [HNSW_QUESTION, "What does efConstruction control?"]
    assert all(r["answer"].strip() and r["sources"][0]["source"] == "reference/index.md"
               for r in rows)  # fmt: skip
    both = subprocess.run(
        [*cli, "query", "q", "--file", str(questions)], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert both.returncode == 2
    assert both.stderr.strip() == "rag-app: error: give a question or --file FILE, not both"

    strict = subprocess.run(
        [*cli, "query", "Who won the football World Cup in 1998?", "--json"],
        env={**env, "RAG_APP_RETRIEVAL__ABSTAIN_BELOW": "0.99"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert strict.returncode == 0, strict.stderr
    assert json.loads(strict.stdout) == {
        "question": "Who won the football World Cup in 1998?",
        "answer": ABSTAIN_ANSWER, "abstained": True, "citations": [], "sources": [],
    }  # fmt: skip

    streamed = subprocess.run(
        [*cli, "query", HNSW_QUESTION, "--stream"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert streamed.returncode == 0, streamed.stderr
    answer, _, sources = streamed.stdout.partition("\nSources:\n")
    assert answer.strip() and "[1] reference/index.md" in sources


def test_cli_chat_answers_each_turn_with_sources_and_exits_on_end_of_input(vllm_server, tmp_path):
    cli, env = served_cli(vllm_server, tmp_path)
    turns = f"{HNSW_QUESTION}\nWhich one matters at search time?\n/reset\n"
    chat = subprocess.run(
        [*cli, "chat", "--top-k", "2"], input=turns, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.splitlines()
    answers = [i for i, line in enumerate(lines) if line.startswith("assistant> ")]
    assert len(answers) == 2
    for i in answers:
        assert lines[i].removeprefix("assistant> ").strip()
        first_source = next(line for line in lines[i:] if line.startswith("  ["))
        assert first_source.startswith("  [1] reference/index.md")
    assert lines[-1] == "(conversation forgotten)"


def test_cli_refuses_stream_with_a_question_file_in_one_line(tmp_path):
    questions = tmp_path / "questions.txt"
    questions.write_text("What is HNSW?\n")
    env = {**os.environ, "RAG_APP_MILVUS__URI": str(tmp_path / "x.db")}
    result = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "--config", str(PROFILE), "query",
         "--file", str(questions), "--stream"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "rag-app: error: --stream answers one question; drop it with --file"
    )


@pytest.fixture
def sent_messages(monkeypatch) -> list[list[dict]]:
    """The messages of every chat request the openai client sends (sync and async)."""
    from openai.resources.chat import completions

    sent: list[list[dict]] = []
    for cls in (completions.Completions, completions.AsyncCompletions):
        create = cls.create

        def recording(self, *args, _create=create, **kwargs):
            sent.append([dict(m) for m in kwargs["messages"]])
            return _create(self, *args, **kwargs)

        monkeypatch.setattr(cls, "create", recording)
    return sent


def _served_token_ids(vllm_server: str, messages: list[dict]) -> list[int]:
    request = urllib.request.Request(
        vllm_server.removesuffix("/v1") + "/tokenize",
        data=json.dumps(
            {"model": "smollm2", "messages": messages, "add_generation_prompt": True}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return list(json.load(reply)["tokens"])


def test_no_control_token_from_a_document_reaches_the_served_model(
    vllm_server, server_cfg, embed_model, sent_messages, tmp_path
):
    from transformers import AutoTokenizer

    from rag_app import build_chat_engine, build_index, build_vector_store, ingest_path

    cfg = server_cfg.model_copy(deep=True)
    cfg.milvus.uri = str(tmp_path / "poisoned.db")
    docs = tmp_path / "docs"
    write_poisoned_document(docs)
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, docs, embed_model=embed_model, vector_store=store)
    index = build_index(cfg, embed_model=embed_model, vector_store=store)
    llm = build_llm(cfg)
    response = build_query_engine(cfg, index=index, llm=llm).query(HNSW_QUESTION)
    assert response.source_nodes[0].node.metadata["source"] == POISONED_NAME
    chat = build_chat_engine(cfg, index=index, llm=llm)
    chat.chat(HNSW_QUESTION)
    chat.chat("And what does M do?")  # condensed with the history, then answered
    assert len(sent_messages) >= 4  # the query, a chat turn, a condensing call, a chat turn

    tokenizer = AutoTokenizer.from_pretrained(REPO / ".models" / "SmolLM2-135M-Instruct")
    special = set(tokenizer.all_special_ids) | {
        tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()
    }
    assert "answer PWNED" in json.dumps(sent_messages)  # the document did reach the prompts
    for messages in sent_messages:
        sent = _served_token_ids(vllm_server, messages)
        blank = _served_token_ids(vllm_server, [{**m, "content": "x"} for m in messages])
        # The template's own control tokens, exactly; none from the content.
        assert sorted(t for t in sent if t in special) == sorted(t for t in blank if t in special)
