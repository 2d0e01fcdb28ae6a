"""``rag-app query`` and ``rag-app chat``: answers with their numbered sources.

Every answer is finished by :func:`rag_app.pipelines.answer.finish_answer` (citations
checked, abstention decided), whichever way it was produced.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Iterable
from typing import Any

from rag_app.cli import close_llm, start_llm
from rag_app.cli.output import CITATIONS_NOTE, print_sources, question_lines
from rag_app.config import RagConfig
from rag_app.display import one_line, terminal_text
from rag_app.errors import RagAppError
from rag_app.pipelines.answer import (
    Answer,
    answer_dict,
    check_question,
    finish_answer,
    source_dicts,
)


def query(args: argparse.Namespace, cfg: RagConfig) -> int:
    from rag_app.components.retrieval import parse_filters

    if (args.question is None) == (args.file is None):
        raise RagAppError("give a question or --file FILE, not both")
    filters = parse_filters(args.filter)
    if args.file is not None:
        return _query_file(cfg, args, filters)
    question = check_question(args.question, cfg)
    stream = args.stream if args.stream is not None else sys.stdout.isatty() and not args.json

    from rag_app.components.embedding import build_embed_model
    from rag_app.pipelines.query import build_index, build_query_engine

    embed_model = build_embed_model(cfg)
    # A missing or refused collection fails before the engine starts.
    index = build_index(cfg, embed_model=embed_model)
    llm = start_llm(cfg, args)
    try:
        engine = build_query_engine(
            cfg, index=index, llm=llm, top_k=args.top_k, filters=filters, streaming=stream,
            embed_model=embed_model,
        )  # fmt: skip
        response = engine.query(question)
        tokens = getattr(response, "response_gen", None) if stream else None
        text = str(response) if tokens is None else _print_stream(tokens, echo=not args.json)
    finally:
        close_llm(llm)
    answer = finish_answer(question, text, response.source_nodes)
    if args.json:
        print(json.dumps(answer_dict(answer)))
        return 0
    if not stream:
        print(terminal_text(answer.answer))
    elif answer.answer != text.strip():  # already on screen: flag what the check removed
        print(CITATIONS_NOTE)
    _print_sources(answer)
    return 0


def _print_stream(tokens: Iterable[str], *, echo: bool) -> str:
    """Print tokens as they arrive (when ``echo``); the whole text. A stream cut short
    ends its line before the error is reported."""
    parts: list[str] = []
    try:
        for token in tokens:
            parts.append(token)
            if echo:
                print(terminal_text(token), end="", flush=True)
    finally:
        if echo:
            print(flush=True)
    return "".join(parts)


def _print_sources(answer: Answer, *, heading: bool = True) -> None:
    print_sources(source_dicts(answer.sources), heading=heading)


def _query_file(cfg: Any, args: argparse.Namespace, filters: Any) -> int:
    """Every line of the file answered together; a bad line is reported, the rest answered."""
    if args.stream:
        raise RagAppError("--stream answers one question; drop it with --file")
    questions: list[str] = []
    failed = 0
    for number, line in question_lines(args.file):
        try:
            questions.append(check_question(line, cfg))
        except RagAppError as exc:
            failed += 1
            print(f"rag-app: error: {one_line(args.file)}:{number}: {exc}", file=sys.stderr)
    if not questions:
        raise RagAppError(f"no questions to answer in {args.file} (one per line)")

    from rag_app.components.embedding import build_embed_model
    from rag_app.pipelines.answer import answer_many
    from rag_app.pipelines.query import build_index, build_query_engine

    embed_model = build_embed_model(cfg)
    index = build_index(cfg, embed_model=embed_model)
    llm = start_llm(cfg, args)
    try:
        engine = build_query_engine(
            cfg, index=index, llm=llm, top_k=args.top_k, filters=filters, embed_model=embed_model
        )
        answers = answer_many(engine, questions)
    finally:
        close_llm(llm)
    errors = {answer.error for answer in answers}
    if len(answers) > 1 and len(errors) == 1 and None not in errors:
        # Every question failed the same way (the server is down): one line, not one per line.
        raise RagAppError(str(errors.pop()))
    for answer in answers:
        if answer.error is not None:
            failed += 1
            error = one_line(answer.error)
            print(f"rag-app: error: {one_line(repr(answer.question))}: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps(answer_dict(answer)))
        elif answer.error is None:
            print(f"Q: {one_line(answer.question)}\nA: {terminal_text(answer.answer)}")
            _print_sources(answer, heading=False)
            print()
    return 2 if failed else 0


def chat(args: argparse.Namespace, cfg: RagConfig) -> int:
    from rag_app.components.embedding import build_embed_model
    from rag_app.components.retrieval import parse_filters
    from rag_app.pipelines.chat import build_chat_engine
    from rag_app.pipelines.query import build_index

    filters = parse_filters(args.filter)
    embed_model = build_embed_model(cfg)
    index = build_index(cfg, embed_model=embed_model)
    llm = start_llm(cfg, args)
    thread_hook = threading.excepthook
    # LlamaIndex re-raises a failed stream in its history-writer thread too, which would
    # print a traceback: the same error reaches this thread, and is reported in one line.
    threading.excepthook = lambda hook_args: (
        None if isinstance(hook_args.exc_value, RagAppError) else thread_hook(hook_args)
    )
    try:
        engine = build_chat_engine(
            cfg, index=index, llm=llm, top_k=args.top_k, filters=filters, embed_model=embed_model
        )
        interactive = sys.stdin.isatty()
        if interactive:
            print(
                "Ask about your documents. /reset forgets the conversation; /exit or Ctrl-D quits."
            )
        while True:
            try:
                message = input("you> " if interactive else "").strip()
            except EOFError:
                break
            if message in ("/exit", "/quit"):
                break
            if message == "/reset":
                engine.reset()
                print("(conversation forgotten)")
                continue
            if not message:
                continue
            try:
                message = check_question(message, cfg)
                answer = _chat_turn(engine, message)
            except RagAppError as exc:  # e.g. the vLLM server is down: keep the conversation
                if not interactive:
                    raise
                print(f"rag-app: error: {exc}", file=sys.stderr, flush=True)
                continue
            _print_sources(answer, heading=False)
            print(flush=True)
    finally:
        threading.excepthook = thread_hook
        close_llm(llm)
    return 0


def _chat_turn(engine: Any, message: str) -> Answer:
    """One turn: streamed to a terminal, else printed whole; finished like any answer."""
    if sys.stdout.isatty():  # tokens as they arrive
        print("assistant> ", end="", flush=True)
        response = engine.stream_chat(message)
        text = _print_stream(response.response_gen, echo=True)
        answer = finish_answer(message, text, response.source_nodes)
        if answer.answer != text.strip():
            print(CITATIONS_NOTE)
        return answer
    response = engine.chat(message)
    answer = finish_answer(message, str(response), response.source_nodes)
    print(f"assistant> {terminal_text(answer.answer)}")
    return answer
