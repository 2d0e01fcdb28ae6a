"""``rag-app query --server URL`` and ``rag-app chat --server URL``: the same commands as
clients of a running ``rag-app serve`` (its OpenAI-compatible API, through the official
``openai`` client). Nothing heavy is imported and no model is loaded, so an answer costs
retrieval and generation on the server, not start-up here."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from rag_app.cli.output import CITATIONS_NOTE, print_sources, question_lines
from rag_app.config import RagConfig
from rag_app.display import one_line, terminal_text
from rag_app.errors import RagAppError
from rag_app.server.client import RagClient

_CONCURRENCY = 16  # questions of a --file in flight at once (the server batches them)


def _client(cfg: RagConfig, url: str) -> RagClient:
    return RagClient(url, cfg.client.api_key.get_secret_value(), timeout=cfg.client.timeout)


def _options(args: argparse.Namespace, cfg: RagConfig) -> dict[str, Any]:
    return {"collection": cfg.milvus.collection, "top_k": args.top_k, "filters": args.filter}


def query(args: argparse.Namespace, cfg: RagConfig, url: str) -> int:
    if (args.question is None) == (args.file is None):
        raise RagAppError("give a question or --file FILE, not both")
    if args.file is not None:
        if args.stream:
            raise RagAppError("--stream answers one question; drop it with --file")
        return asyncio.run(_query_file(args, cfg, url))
    stream = args.stream if args.stream is not None else sys.stdout.isatty() and not args.json
    return asyncio.run(_query(args, cfg, url, stream))


async def _query(args: argparse.Namespace, cfg: RagConfig, url: str, stream: bool) -> int:
    messages = [{"role": "user", "content": args.question}]
    async with _client(cfg, url) as client:
        if stream:
            answer, text = await _print_stream(client, messages, _options(args, cfg),
                                               echo=not args.json)  # fmt: skip
        else:
            answer = await client.answer(messages, **_options(args, cfg))
    if args.json:
        print(json.dumps(answer))
        return 0
    if not stream:
        print(terminal_text(answer["answer"]))
    elif answer["answer"] != text.strip():
        print(CITATIONS_NOTE)
    print_sources(answer.get("sources", []))
    return 0


async def _print_stream(
    client: RagClient, messages: list[dict[str, str]], options: dict[str, Any], *, echo: bool
) -> tuple[dict[str, Any], str]:
    """Print the tokens as they arrive; the finished answer and the text printed."""
    parts: list[str] = []
    answer: dict[str, Any] = {}
    try:
        async for item in client.stream(messages, **options):
            if isinstance(item, dict):
                answer = item
            else:
                parts.append(item)
                if echo:
                    print(terminal_text(item), end="", flush=True)
    finally:
        if echo:
            print(flush=True)
    return answer, "".join(parts)


async def _query_file(args: argparse.Namespace, cfg: RagConfig, url: str) -> int:
    """Every line answered, several at once; a line that fails is reported, the rest
    answered (the server checks each question)."""
    lines = question_lines(args.file)
    if not lines:
        raise RagAppError(f"no questions to answer in {args.file} (one per line)")
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(client: RagClient, line: str) -> dict[str, Any] | RagAppError:
        async with gate:
            try:
                return await client.answer([{"role": "user", "content": line}],
                                           **_options(args, cfg))  # fmt: skip
            except RagAppError as exc:
                return exc

    async with _client(cfg, url) as client:
        answers = await asyncio.gather(*(one(client, line) for _, line in lines))
    failed = 0
    for (number, _), answer in zip(lines, answers, strict=True):
        if isinstance(answer, RagAppError):
            failed += 1
            print(
                f"rag-app: error: {one_line(args.file)}:{number}: {one_line(str(answer))}",
                file=sys.stderr,
            )
        elif args.json:
            print(json.dumps(answer))
        else:
            print(f"Q: {one_line(answer['question'])}\nA: {terminal_text(answer['answer'])}")
            print_sources(answer.get("sources", []), heading=False)
            print()
    return 2 if failed else 0


def chat(args: argparse.Namespace, cfg: RagConfig, url: str) -> int:
    return asyncio.run(_chat(args, cfg, url))


async def _chat(args: argparse.Namespace, cfg: RagConfig, url: str) -> int:
    """The conversation is kept here and sent whole each turn (the service is stateless)."""
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []
    if interactive:
        print("Ask about your documents. /reset forgets the conversation; /exit or Ctrl-D quits.")
    async with _client(cfg, url) as client:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> " if interactive else "")
            except EOFError:
                break
            message = line.strip()
            if message in ("/exit", "/quit"):
                break
            if message == "/reset":
                messages.clear()
                print("(conversation forgotten)")
                continue
            if not message:
                continue
            turn = [*messages, {"role": "user", "content": message}]
            try:
                answer = await _chat_turn(client, turn, _options(args, cfg))
            except RagAppError as exc:
                if not interactive:
                    raise
                print(f"rag-app: error: {exc}", file=sys.stderr, flush=True)
                continue
            messages = [*turn, {"role": "assistant", "content": answer["answer"]}]
            print_sources(answer.get("sources", []), heading=False)
            print(flush=True)
    return 0


async def _chat_turn(
    client: RagClient, messages: list[dict[str, str]], options: dict[str, Any]
) -> dict[str, Any]:
    if sys.stdout.isatty():
        print("assistant> ", end="", flush=True)
        answer, text = await _print_stream(client, messages, options, echo=True)
        if answer["answer"] != text.strip():
            print(CITATIONS_NOTE)
        return answer
    answer = await client.answer(messages, **options)
    print(f"assistant> {terminal_text(answer['answer'])}")
    return answer
