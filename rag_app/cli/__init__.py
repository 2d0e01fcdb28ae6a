"""``rag-app``: ingest documents and ask questions from the command line.

Only the standard library is imported before the arguments are parsed, so ``--help`` and
argument errors answer at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rag_app.config import MAX_TOP_K, RagConfig
from rag_app.errors import RagAppError, redact_logs

# Library chatter that is not the user's business unless --verbose: vLLM's start-up lines,
# Triton/NUMA notices, Hugging Face progress bars and advice.
_QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}
_NOISY_LOGGERS = ("vllm", "pymilvus", "transformers", "sentence_transformers", "httpx")


def quiet_libraries(verbose: bool = False) -> None:
    """Keep vLLM's and Hugging Face's start-up chatter out of answers, unless ``verbose``.

    Set before any of those libraries is imported: they read these variables once, at
    import (child processes, such as vLLM's engine, inherit them).
    """
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("rag_app").setLevel(logging.INFO)
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        return
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # pymilvus logs a traceback for every failed call, retried or not (rag_app reports
    # retries as warnings and a final failure as one line), and sets its own level when
    # imported: import it first. Every command but --help talks to Milvus anyway.
    import pymilvus  # noqa: F401

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_TOP_K}, got {value}")
    return value


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
    common.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the libraries' own log lines (vLLM, Hugging Face, pymilvus)",
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
    ingest.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files whose path in the folder matches (repeatable; appended to "
        "ingestion.include), e.g. --include '**/*.md'; '**/' is any folders",
    )
    ingest.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files whose path in the folder matches (repeatable; appended to "
        "ingestion.exclude), e.g. --exclude '_static/**'; stored ones are deleted",
    )
    ingest.add_argument(
        "--adopt",
        action="store_true",
        help="take over a collection that rag_app did not create: record the embedding model "
        "on it and sync it, deleting documents not in the folder "
        "(milvus.adopt_foreign_collection)",
    )

    query = commands.add_parser("query", parents=[common], help="answer a question with sources")
    query.add_argument("question", nargs="?", help="the question (or --file)")
    query.add_argument(
        "--file",
        metavar="FILE",
        help="answer every line of FILE, together (vLLM batches them); - reads stdin",
    )
    query.add_argument(
        "--top-k", type=_top_k, metavar="N", help=f"chunks to retrieve (1 to {MAX_TOP_K})"
    )
    query.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only chunks whose metadata matches (repeatable; VALUE* matches a prefix), "
        "e.g. --filter source=reference/* --filter doc_type=markdown",
    )
    query.add_argument("--json", action="store_true", help="print one JSON object")
    _server_option(query)
    query.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="print tokens as they arrive (default: on when printing to a terminal)",
    )

    chat = commands.add_parser(
        "chat", parents=[common], help="a conversation about the documents, in the terminal"
    )
    chat.add_argument("--top-k", type=_top_k, metavar="N", help="chunks to retrieve per turn")
    chat.add_argument(
        "--filter", action="append", default=[], metavar="KEY=VALUE", help="as for query"
    )
    _server_option(chat)

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="a long-lived service: OpenAI-compatible API, MCP at /mcp, a web page at /",
    )
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: server.port, 8080)")

    mcp = commands.add_parser(
        "mcp", parents=[common], help="the MCP tools over stdio (for Claude Desktop, Cursor ...)"
    )
    _server_option(mcp)

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


def _server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        help="ask a running `rag-app serve` at URL instead of loading the models here "
        "(default: client.server_url; its key: RAG_APP_CLIENT__API_KEY)",
    )


def load_cli_config(args: argparse.Namespace, **overrides: Any) -> RagConfig:
    """The settings, with ``--config``, ``--secrets`` and ``--collection`` applied."""
    from rag_app.config import load_config

    if hasattr(args, "collection"):
        overrides["milvus__collection"] = args.collection
    secrets = getattr(args, "secrets", None)
    return load_config(getattr(args, "config", None), secrets_file=secrets, **overrides)


def engine_log() -> Path:
    """Where the local vLLM engine's own output goes (``--verbose``: the terminal)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rag_app" / "engine.log"


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 redirected to ``path``: what libraries write straight to
    the terminal (Triton and NUMA notices, weight-loading bars) and every child process
    started meanwhile (vLLM's engine, multiprocessing's resource tracker) write there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def start_llm(cfg: RagConfig, args: argparse.Namespace) -> Any:
    """The configured LLM; a local engine's start-up chatter (and its later output) goes to
    :func:`engine_log` unless ``--verbose``, and a failed start names that log."""
    from rag_app.components import llm as llm_module

    if cfg.llm.mode != "local" or getattr(args, "verbose", False):
        return llm_module.build_llm(cfg)
    log = engine_log()
    with _output_to(log):
        try:
            return llm_module.build_llm(cfg)
        except RagAppError as exc:
            failure = RagAppError(f"{exc}; vLLM's own output is in {log}")
    raise failure


def close_llm(llm: object) -> None:
    """Stop a local vLLM engine (a server client has nothing to stop)."""
    close = getattr(llm, "close", None)
    if callable(close):
        close()


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    if name in ("query", "chat"):
        return lambda args: _answer_command(name, args)
    if name in ("serve", "mcp"):
        from rag_app.cli import serve

        return serve.serve if name == "serve" else serve.mcp
    from rag_app.cli import manage

    return {"ingest": manage.ingest, "collections": manage.collections, "eval": manage.evaluate}[
        name
    ]


def _answer_command(name: str, args: argparse.Namespace) -> int:
    """``query`` and ``chat``: through a running server when one is named (no model is
    loaded here, nor LlamaIndex imported), else in this process."""
    cfg = load_cli_config(args)
    url = args.server or cfg.client.server_url
    if url:
        from rag_app.cli import remote

        return remote.query(args, cfg, url) if name == "query" else remote.chat(args, cfg, url)
    from rag_app.cli import answers

    return answers.query(args, cfg) if name == "query" else answers.chat(args, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, with a one-line message)."""
    args = _parser().parse_args(argv)
    quiet_libraries(getattr(args, "verbose", False))
    redact_logs()
    try:
        return _command(args.command)(args)
    except RagAppError as exc:
        print(f"rag-app: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rag-app: interrupted", file=sys.stderr)
        return 130
