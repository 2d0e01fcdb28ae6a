"""``rag-app``: ingest documents and ask questions from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rag_app.errors import RagAppError


def _quiet_libraries() -> None:
    """Keep vLLM's and Hugging Face's start-up chatter out of answers, unless asked for."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":  # transformers' "Loading weights"
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    # pymilvus logs a traceback for every failed call, retried or not; rag_app reports
    # retries as warnings and a final failure as one line.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="settings file (default: $RAG_APP_CONFIG, else ./config.toml)",
    )
    common.add_argument(
        "--secrets",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="NAME=value lines: RAG_APP_MILVUS__TOKEN, RAG_APP_LLM__API_KEY, HF_TOKEN "
        "(default: $RAG_APP_SECRETS_FILE); the environment overrides them",
    )
    common.add_argument(
        "--collection",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="Milvus collection (one per knowledge base; default: milvus.collection)",
    )
    parser = argparse.ArgumentParser(
        prog="rag-app", description="RAG over Milvus and vLLM.", parents=[common]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser(
        "ingest", parents=[common], help="load a file or folder of documents into Milvus"
    )
    ingest.add_argument("path", help="file or folder (read recursively)")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    ingest.add_argument(
        "--log-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="without a terminal, log progress this often (default 10)",
    )
    ingest.add_argument(
        "--no-delete",
        action="store_true",
        help="keep documents that are no longer in the folder (default: delete them)",
    )

    query = commands.add_parser("query", parents=[common], help="answer a question with sources")
    query.add_argument("question", nargs="?", help="the question (or --file)")
    query.add_argument(
        "--file",
        metavar="FILE",
        help="answer every line of FILE, together (vLLM batches them); - reads stdin",
    )
    query.add_argument("--top-k", type=int, metavar="N", help="chunks to retrieve")
    query.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only chunks whose metadata matches (repeatable; VALUE* matches a prefix), "
        "e.g. --filter source=reference/* --filter doc_type=markdown",
    )
    query.add_argument("--json", action="store_true", help="print one JSON object")
    query.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="print tokens as they arrive (default: on when printing to a terminal)",
    )

    chat = commands.add_parser(
        "chat", parents=[common], help="a conversation about the documents, in the terminal"
    )
    chat.add_argument("--top-k", type=int, metavar="N", help="chunks to retrieve per turn")
    chat.add_argument(
        "--filter", action="append", default=[], metavar="KEY=VALUE", help="as for query"
    )

    collections = commands.add_parser(
        "collections", parents=[common], help="list the collections (or drop one)"
    )
    collections.add_argument("--drop", metavar="NAME", help="delete a collection and its data")
    collections.add_argument("--yes", action="store_true", help="confirm --drop")
    collections.add_argument(
        "--describe", metavar="NAME", help="print one collection's settings as JSON"
    )

    evaluate = commands.add_parser(
        "eval", parents=[common], help="score retrieval against a QA file (JSON lines)"
    )
    evaluate.add_argument("qa", metavar="QA.jsonl", help='lines of {"question", "sources"}')
    evaluate.add_argument("-k", type=int, default=5, help="documents ranked per question")
    evaluate.add_argument("--out", metavar="FILE", help="write the scores as JSON here")
    evaluate.add_argument(
        "--mode", choices=["dense", "hybrid", "sparse"], help="override retrieval.mode"
    )
    return parser


def _load_config(args: argparse.Namespace, **overrides: Any) -> Any:
    """The settings, with ``--config``, ``--secrets`` and ``--collection`` applied."""
    from rag_app.config import load_config

    if hasattr(args, "collection"):
        overrides["milvus__collection"] = args.collection
    secrets = getattr(args, "secrets", None)
    return load_config(getattr(args, "config", None), secrets_file=secrets, **overrides)


def _collections(args: argparse.Namespace) -> int:
    from rag_app.components.vector_store import drop_collection, list_collections

    cfg = _load_config(args)
    if args.drop:
        if not args.yes:
            raise RagAppError(
                f"dropping {args.drop!r} deletes its documents for good: add --yes to confirm"
            )
        drop_collection(cfg, args.drop)
        print(f"dropped {args.drop}")
        return 0
    infos = list_collections(cfg)
    if not infos:
        print(f"no collections at {cfg.milvus.uri}")
        return 0
    if args.describe:
        info = next((i for i in infos if i.name == args.describe), None)
        if info is None:
            raise RagAppError(f"no collection {args.describe!r} at {cfg.milvus.uri}")
        print(json.dumps(dataclasses.asdict(info), indent=2))
        return 0
    print(f"{'collection':<28}{'chunks':>8}{'dim':>6}  {'bm25':<5} {'index':<14} embedding model")
    for info in infos:
        bm25 = "yes" if info.bm25 else "no"
        index = f"{info.index_type or '-'}/{info.metric or '-'}"
        print(
            f"{info.name:<28}{info.rows:>8}{info.dim or '-':>6}  {bm25:<5} {index:<14} "
            f"{info.model or '-'}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rag_app.components.retrieval import build_retriever
    from rag_app.pipelines.evaluate import CHUNKS_PER_DOCUMENT, evaluate_retrieval, load_qa
    from rag_app.pipelines.query import build_index

    if args.k < 1:
        raise RagAppError(f"-k must be at least 1, got {args.k}")
    items = load_qa(args.qa)
    overrides = {"retrieval__mode": args.mode} if args.mode else {}
    cfg = _load_config(args, **overrides)
    retriever = build_retriever(cfg, build_index(cfg), top_k=CHUNKS_PER_DOCUMENT * args.k)
    scores = evaluate_retrieval(items, retriever.retrieve, k=args.k)
    print(f"{cfg.retrieval.mode:<12}{scores.row()}")
    if args.out:
        Path(args.out).write_text(json.dumps(scores.to_json(), indent=2) + "\n")
        print(f"scores written to {args.out}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from rag_app.components.llm import build_llm
    from rag_app.components.retrieval import parse_filters
    from rag_app.pipelines.chat import build_chat_engine
    from rag_app.pipelines.query import node_source

    cfg = _load_config(args)
    filters = parse_filters(args.filter)
    if args.top_k is not None and args.top_k < 1:
        raise RagAppError(f"--top-k must be at least 1, got {args.top_k}")
    llm = build_llm(cfg)
    thread_hook = threading.excepthook
    # LlamaIndex re-raises a failed stream in its history-writer thread too, which would
    # print a traceback: the same error reaches this thread, and is reported in one line.
    threading.excepthook = lambda hook_args: (
        None if isinstance(hook_args.exc_value, RagAppError) else thread_hook(hook_args)
    )
    try:
        engine = build_chat_engine(cfg, llm=llm, top_k=args.top_k, filters=filters)
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
                if sys.stdout.isatty():  # tokens as they arrive
                    print("assistant> ", end="", flush=True)
                    try:
                        response = engine.stream_chat(message)
                        for token in response.response_gen:
                            print(token, end="", flush=True)
                    finally:
                        print()  # also ends an answer that was cut short
                else:
                    response = engine.chat(message)
                    print(f"assistant> {str(response).strip()}")
            except RagAppError as exc:  # e.g. the vLLM server is down: keep the conversation
                if not interactive:
                    raise
                print(f"rag-app: error: {exc}", file=sys.stderr, flush=True)
                continue
            for number, node in enumerate(response.source_nodes, 1):
                score = None if node.score is None else round(float(node.score), 4)
                print(f"  [{number}] {node_source(node)}  (score {score})")
            print(flush=True)
    finally:
        threading.excepthook = thread_hook
        close = getattr(llm, "close", None)
        if callable(close):
            close()
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from rag_app.pipelines.ingest import ingest_path

    cfg = _load_config(args)
    report = ingest_path(
        cfg,
        args.path,
        delete_missing=not args.no_delete,
        log_every=args.log_every,
        progress=False if args.no_progress else None,
    )
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(report.summary())
    return 0


def _sources(response: Any) -> list[dict[str, Any]]:
    return _source_dicts(response.source_nodes)


def _source_dicts(nodes: Any) -> list[dict[str, Any]]:
    from rag_app.pipelines.query import node_source

    return [
        {
            "number": number,
            "source": node_source(node),
            "title": node.node.metadata.get("title"),
            "score": None if node.score is None else round(float(node.score), 4),
            "text": node.node.get_content(),
        }
        for number, node in enumerate(nodes, 1)
    ]


def _query(args: argparse.Namespace) -> int:
    from rag_app.components.llm import build_llm
    from rag_app.components.retrieval import parse_filters
    from rag_app.pipelines.citations import check_citations
    from rag_app.pipelines.query import build_query_engine, is_abstention

    cfg = _load_config(args)
    filters = parse_filters(args.filter)
    if args.top_k is not None and args.top_k < 1:
        raise RagAppError(f"--top-k must be at least 1, got {args.top_k}")
    if (args.question is None) == (args.file is None):
        raise RagAppError("give a question or --file FILE, not both")
    if args.file is not None:
        return _query_file(cfg, args, filters)
    stream = args.stream if args.stream is not None else sys.stdout.isatty() and not args.json
    llm = build_llm(cfg)
    try:
        engine = build_query_engine(
            cfg, llm=llm, top_k=args.top_k, filters=filters, streaming=stream
        )
        response = engine.query(args.question)
        if stream:
            parts = []
            try:
                for token in response.response_gen:  # type: ignore[union-attr]
                    parts.append(token)
                    if not args.json:
                        print(token, end="", flush=True)
            except RagAppError:  # e.g. the server closed the stream: end the partial line
                if parts and not args.json:
                    print(flush=True)
                raise
            answer = "".join(parts).strip()
        else:
            answer = str(response).strip()
    finally:
        close = getattr(llm, "close", None)
        if callable(close):
            close()
    sources = _sources(response)
    printed, (answer, cited) = answer, check_citations(answer, len(sources))
    abstained = not sources or is_abstention(answer)
    if args.json:
        result = {"answer": answer, "abstained": abstained, "citations": cited, "sources": sources}
        print(json.dumps(result))
        return 0
    print("" if stream else answer)
    if stream and printed != answer:  # already on screen: flag what the check removed
        print("(citations to no listed source were printed above; ignore them)")
    print("\nSources:" if sources else "\nSources: none relevant enough")
    for number, source in enumerate(sources, 1):
        print(f"  [{number}] {source['source']}  (score {source['score']})")
    return 0


def _query_file(cfg: Any, args: argparse.Namespace, filters: Any) -> int:
    from rag_app.components.llm import build_llm
    from rag_app.pipelines.batch import answer_many

    if args.stream:
        raise RagAppError("--stream answers one question; drop it with --file")
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RagAppError(f"cannot read questions from {args.file}: {exc}") from None
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise RagAppError(f"no questions in {args.file} (one per line)")
    llm = build_llm(cfg)
    try:
        answers = answer_many(cfg, questions, llm=llm, top_k=args.top_k, filters=filters)
    finally:
        close = getattr(llm, "close", None)
        if callable(close):
            close()
    for answer in answers:
        sources = _source_dicts(answer.sources)
        result = {
            "question": answer.question,
            "answer": answer.answer,
            "abstained": answer.abstained,
            "citations": answer.citations,
            "sources": sources,
        }
        if args.json:
            print(json.dumps(result))
            continue
        print(f"Q: {answer.question}\nA: {answer.answer}")
        for source in sources:
            print(f"  [{source['number']}] {source['source']}  (score {source['score']})")
        print()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, with a one-line message)."""
    args = _parser().parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("rag_app").setLevel(logging.INFO)
    try:
        commands = {
            "ingest": _ingest,
            "query": _query,
            "chat": _chat,
            "eval": _eval,
            "collections": _collections,
        }
        return commands[args.command](args)
    except RagAppError as exc:
        print(f"rag-app: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rag-app: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
