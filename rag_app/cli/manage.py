"""``rag-app ingest``, ``collections`` and ``eval``: what fills and inspects a collection."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rag_app.cli import load_cli_config
from rag_app.components.globs import glob_problem
from rag_app.display import one_line
from rag_app.errors import RagAppError


def ingest(args: argparse.Namespace) -> int:
    from rag_app.pipelines.ingest import ingest_path

    overrides: dict[str, object] = {"milvus__adopt_foreign_collection": True} if args.adopt else {}
    cfg = load_cli_config(args, **overrides)
    for flag, patterns in (("--include", args.include), ("--exclude", args.exclude)):
        for pattern in patterns:
            if (problem := glob_problem(pattern)) is not None:
                raise RagAppError(f"{flag} {pattern!r} {problem}")
    if args.include or args.exclude:  # appended to the settings' globs
        overrides["ingestion__include"] = [*cfg.ingestion.include, *args.include]
        overrides["ingestion__exclude"] = [*cfg.ingestion.exclude, *args.exclude]
        cfg = load_cli_config(args, **overrides)
    report = ingest_path(
        cfg,
        args.path,
        delete_missing=not args.no_delete,
        log_every=args.log_every,
        progress=False if args.no_progress else None,
    )
    for path, reason in report.skipped:
        print(f"skipped {one_line(path)}: {one_line(reason)}", file=sys.stderr)
    print(report.summary())
    return 0


def collections(args: argparse.Namespace) -> int:
    from rag_app.components.vector_store import drop_collection, list_collections

    cfg = load_cli_config(args)
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
            f"{one_line(info.name):<28}{info.rows:>8}{info.dim or '-':>6}  {bm25:<5} "
            f"{one_line(index):<14} {one_line(info.model or '-')}"
        )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from rag_app.components.retrieval import build_retriever
    from rag_app.pipelines.evaluate import CHUNKS_PER_DOCUMENT, evaluate_retrieval, load_qa
    from rag_app.pipelines.query import build_index

    if args.k < 1:
        raise RagAppError(f"-k must be at least 1, got {args.k}")
    items = load_qa(args.qa)
    overrides = {"retrieval__mode": args.mode} if args.mode else {}
    cfg = load_cli_config(args, **overrides)
    from rag_app.components.embedding import build_embed_model

    embed_model = build_embed_model(cfg)
    index = build_index(cfg, embed_model=embed_model)
    retriever = build_retriever(
        cfg, index, top_k=CHUNKS_PER_DOCUMENT * args.k, embed_model=embed_model
    )
    scores = evaluate_retrieval(items, retriever.retrieve, k=args.k)
    print(f"{cfg.retrieval.mode:<12}{scores.row()}")
    if args.out:
        Path(args.out).write_text(json.dumps(scores.to_json(), indent=2) + "\n")
        print(f"scores written to {args.out}")
    return 0
