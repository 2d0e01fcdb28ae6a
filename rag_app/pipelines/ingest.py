"""Ingestion as a sync: make the collection hold exactly the chunks of a folder.

The collection is the only record. Every chunk row carries its document's id (the path
relative to the ingested folder), a fingerprint of the document version it came from
(``doc_hash``: text, title, chunking settings with the context template, embedding
settings) and the number of chunks of
that version (``doc_chunks``). So a run, from any machine, can tell for each document
whether it is unchanged (all its rows carry the current fingerprint and none is missing:
nothing is embedded), new or changed (embedded and upserted under stable chunk ids
``<doc id>#<n>``, then rows of other versions deleted), or gone from the folder (deleted).

Each step is idempotent, so a run killed at any moment is completed by the next one: a
half-written document has rows of two versions or too few rows and is written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, Document
from llama_index.vector_stores.milvus import MilvusVectorStore
from tqdm import tqdm

from rag_app.components.chunking import chunk_documents, embed_text
from rag_app.components.embedding import build_embed_model, model_identity, token_counter
from rag_app.components.milvus_expr import ALL_ROWS, absent_or_not, equals, one_of
from rag_app.components.readers import (
    PARSERS,
    UnreadableFile,
    discover,
    document_id,
    load_documents,
    select_files,
)
from rag_app.components.vector_store import (
    MilvusRetry,
    build_vector_store,
    check_model_fits,
    open_vector_store,
    quiet_lite_timestamps,
    record_model,
)
from rag_app.config import RagConfig
from rag_app.display import one_line
from rag_app.errors import RagAppError

log = logging.getLogger(__name__)
LOG_EVERY_SECONDS = 10.0
HASH_KEY = "doc_hash"
CHUNKS_KEY = "doc_chunks"
WRITTEN_KEY = "written_at"  # when this version was written: readers keep the newest
_BOOKKEEPING = (HASH_KEY, CHUNKS_KEY, WRITTEN_KEY)


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    # Files of the folder left out by ingestion.include/exclude (their stored documents,
    # if any, are deleted like removed files' and counted in ``deleted``).
    excluded: int = 0
    chunks: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def documents(self) -> int:
        """Documents the collection now holds from this folder."""
        return self.added + self.updated + self.unchanged

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        line = (
            f"ingested {self.documents} documents: {self.added} added, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.deleted} deleted; {self.chunks} chunks written "
            f"in {self.seconds:.1f} s ({self.chunks_per_second:.1f} chunks/s)"
        )
        if self.excluded:
            line += f"; {self.excluded} files excluded by ingestion.include/exclude"
        if self.skipped:
            line += f"; skipped {len(self.skipped)}: " + "; ".join(
                f"{one_line(path)} ({one_line(reason)})" for path, reason in self.skipped
            )
        return line


@dataclass
class _StoredDocument:
    hashes: Counter[str] = field(default_factory=Counter)
    expected: int = 0

    def is_complete(self, doc_hash: str) -> bool:
        return set(self.hashes) == {doc_hash} and self.hashes[doc_hash] == self.expected


def fingerprint(cfg: RagConfig, document: Document) -> str:
    """Changes whenever the chunks or their vectors would: text, title, settings, model."""
    settings = (
        cfg.chunking.splitter,
        cfg.embedding.precision,
        cfg.chunking.chunk_size,
        cfg.chunking.chunk_overlap,
        cfg.chunking.context_template,
        model_identity(cfg.embedding.model),
        cfg.embedding.text_instruction,
        document.metadata.get("title"),
    )
    payload = json.dumps(settings) + "\n" + document.text
    return hashlib.sha256(payload.encode()).hexdigest()


def _stored_documents(store: MilvusVectorStore) -> dict[str, _StoredDocument]:
    """What the collection holds, per document: fingerprints of its rows, chunks expected."""
    stored: dict[str, _StoredDocument] = {}
    with quiet_lite_timestamps():
        iterator = store.client.query_iterator(
            store.collection_name,
            batch_size=2000,
            filter=ALL_ROWS,
            output_fields=[store.doc_id_field, HASH_KEY, CHUNKS_KEY],
        )
        try:
            while rows := iterator.next():
                for row in rows:
                    doc = stored.setdefault(row.get(store.doc_id_field) or "", _StoredDocument())
                    doc.hashes[row.get(HASH_KEY) or ""] += 1
                    doc.expected = int(row.get(CHUNKS_KEY) or 0)
        finally:
            iterator.close()
    return stored


def _delete_other_versions(store: MilvusVectorStore, doc_id: str, doc_hash: str) -> None:
    """Delete a document's rows of any version but ``doc_hash`` (rows with no hash too, in
    an expression Milvus Lite and Milvus 2.3 read alike: see ``absent_or_not``)."""
    store.client.delete(
        collection_name=store.collection_name,
        filter=f"{equals(store.doc_id_field, doc_id)} and {absent_or_not(HASH_KEY, doc_hash)}",
    )


def _delete_documents(store: MilvusVectorStore, doc_ids: Sequence[str]) -> None:
    for start in range(0, len(doc_ids), 500):
        batch = list(doc_ids[start : start + 500])
        store.client.delete(
            collection_name=store.collection_name,
            filter=one_of(store.doc_id_field, batch),
        )


def _write_units(nodes: Sequence[BaseNode], size: int) -> Iterator[list[BaseNode]]:
    """Whole documents' chunks, gathered until at least ``size`` chunks: one write each."""
    unit: list[BaseNode] = []
    for index, node in enumerate(nodes):
        unit.append(node)
        next_doc = nodes[index + 1].ref_doc_id if index + 1 < len(nodes) else None
        if len(unit) >= size and next_doc != node.ref_doc_id:
            yield unit
            unit = []
    if unit:
        yield unit


class _Writer:
    """Writes embedded units to Milvus on a thread of its own, so embedding never waits.

    For each unit: one upsert of all its chunks, then, per document, deletion of its rows
    of other versions. Between the two, a search can find rows of both versions of a
    changed document; the retriever keeps the newest (see ``retrieval.NewestVersion``).
    """

    def __init__(
        self, store: MilvusVectorStore, retry: MilvusRetry, hashes: dict[str, str], new: set[str]
    ) -> None:
        self._store, self._retry, self._hashes, self._new = store, retry, hashes, new
        self._queue: queue.Queue[list[BaseNode] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self.documents_written = 0
        self._thread = threading.Thread(target=self._run, name="milvus-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (unit := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                store = self._store
                self._retry.call(partial(store.add, unit), "write")  # an upsert by chunk id
                for doc_id in dict.fromkeys(node.ref_doc_id or "" for node in unit):
                    if doc_id not in self._new:  # a new document has no other rows
                        self._retry.call(
                            partial(_delete_other_versions, store, doc_id, self._hashes[doc_id]),
                            "delete",
                        )
                    self.documents_written += 1
            except BaseException as exc:  # re-raised in the ingesting thread
                self._error = exc

    def put(self, unit: list[BaseNode]) -> None:
        self._raise_if_failed()
        self._queue.put(unit)

    def close(self) -> None:
        """Wait for the queued writes and re-raise a write error, if any."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _read_folder(
    cfg: RagConfig, root: Path, report: IngestReport
) -> tuple[list[Document], set[str]]:
    """The readable documents, and the ids of skipped files whose stored rows are kept (a
    file that cannot be read now; not one left out on purpose, such as a link out of the
    folder, whose rows go like a deleted file's)."""
    if not root.exists():
        raise RagAppError(f"no such file or folder: {root}")
    files = discover(root)
    kinds = ", ".join(sorted(PARSERS))
    if not files:
        raise RagAppError(f"no documents to ingest in {root} (looked for {kinds})")
    settings = cfg.ingestion
    selection = select_files(root, files, settings.include, settings.exclude)
    for key, patterns in (
        ("include", selection.unmatched_include),
        ("exclude", selection.unmatched_exclude),
    ):
        for pattern in patterns:
            log.warning(
                "ingestion.%s glob %r matches no file in %s (a typo? globs match paths "
                "relative to the folder, '**/' for any folders)",
                key, pattern, root,
            )  # fmt: skip
    report.excluded = selection.excluded
    if not selection.files:
        raise RagAppError(
            f"no documents to ingest in {root}: ingestion.include {settings.include} and "
            f"ingestion.exclude {settings.exclude} leave none of its {len(files)} files "
            f"(looked for {kinds})"
        )
    if selection.excluded:
        log.info(
            "%d of %d files left out by ingestion.include/exclude",
            selection.excluded, len(files),
        )  # fmt: skip
    files = selection.files
    documents: list[Document] = []
    kept: set[str] = set()
    for file, result in load_documents(
        files,
        root,
        max_bytes=settings.max_file_mb * 2**20,
        follow_symlinks_outside=settings.follow_symlinks_outside,
    ):
        if isinstance(result, UnreadableFile):
            report.skipped.append((str(file), str(result)))
            if result.keep_stored:
                kept.add(document_id(file, root))
        else:
            documents.append(result)
    if not documents:
        path, reason = report.skipped[0]
        raise RagAppError(
            f"none of the {len(files)} files in {root} could be read: {path}: {reason}"
        )
    return documents, kept


def _embed_into(
    cfg: RagConfig,
    embed_model: BaseEmbedding,
    nodes: list[BaseNode],
    writer: _Writer,
    report: IngestReport,
    show_bar: bool,
    log_every: float,
    documents: int,
) -> None:
    """Embed the chunks in batches and hand each whole-documents unit to the writer.

    A server's model (``max_in_flight``) is given that many batches per call, which it
    sends at once; an in-process model gets one batch per call."""
    batch_size = max(cfg.embedding.batch_size, 1)
    in_flight = int(getattr(embed_model, "max_in_flight", 1) or 1)
    step = batch_size * in_flight
    started = last_log = time.perf_counter()
    with tqdm(total=len(nodes), unit="chunk", desc="embedding", disable=not show_bar) as bar:
        for unit in _write_units(nodes, batch_size * max(4, 2 * in_flight)):
            # Similar lengths in a batch waste less compute on padding.
            by_length = sorted(unit, key=lambda node: len(node.get_content()))
            for start in range(0, len(by_length), step):
                batch = by_length[start : start + step]
                texts = [embed_text(node) for node in batch]
                vectors = embed_model.get_text_embedding_batch(texts)
                for node, vector in zip(batch, vectors, strict=True):
                    node.embedding = vector
                report.chunks += len(batch)
                bar.update(len(batch))
            writer.put(unit)
            bar.set_postfix(documents=f"{writer.documents_written}/{documents}")
            if not show_bar and time.perf_counter() - last_log >= log_every:
                last_log = time.perf_counter()
                log.info(
                    "embedded %d/%d chunks (%.1f chunks/s), %d/%d documents written",
                    report.chunks, len(nodes), report.chunks / (last_log - started),
                    writer.documents_written, documents,
                )  # fmt: skip


def ingest_path(
    cfg: RagConfig,
    path: str | Path,
    *,
    embed_model: BaseEmbedding | None = None,
    vector_store: MilvusVectorStore | None = None,
    delete_missing: bool = True,
    progress: bool | None = None,
    log_every: float = LOG_EVERY_SECONDS,
) -> IngestReport:
    """Sync a folder (read recursively) or a single file into the configured collection.

    Documents that vanished from a folder, or that ``ingestion.include``/``exclude`` now
    leave out, are deleted unless ``delete_missing`` is false; a single file is ingested
    whatever the globs say (naming it is explicit) and never deletes others. Unreadable
    files are skipped, listed in the report and keep whatever the collection held for them.
    A path with nothing readable raises :class:`RagAppError`. ``progress=None`` shows a bar
    on a terminal;
    without one, a log line reports progress every ``log_every`` seconds.
    """
    started = time.perf_counter()
    root = Path(path).expanduser()
    report = IngestReport()
    documents, kept = _read_folder(cfg, root, report)

    # The model is loaded only when something needs embedding: an unchanged folder is
    # decided from the fingerprints stored in Milvus alone.
    store = vector_store or open_vector_store(cfg)
    if store is None:  # a new collection takes its dimension from the model
        embed_model = embed_model or build_embed_model(cfg)
        store = build_vector_store(cfg, embed_model)
    retry = MilvusRetry.for_store(cfg, store)
    if getattr(store, "enable_sparse", False) and getattr(store, "context_field", 1) is None:
        log.warning(
            "collection %r was created before chunks carried their context: its BM25 reads "
            "the bare chunk text (dense search gets the context); for BM25 over titles and "
            "sections too, ingest into a new milvus.collection (or drop this one with "
            "`rag-app collections --drop %s --yes` and ingest again)",
            store.collection_name, store.collection_name,
        )  # fmt: skip
    stored = retry.call(lambda: _stored_documents(store), "read of the stored documents")

    pending: list[Document] = []
    hashes: dict[str, str] = {}
    new: set[str] = set()
    for document in documents:
        hashes[document.doc_id] = doc_hash = fingerprint(cfg, document)
        previous = stored.get(document.doc_id)
        if previous is not None and previous.is_complete(doc_hash):
            report.unchanged += 1
            continue
        pending.append(document)
        if previous is None:
            report.added += 1
            new.add(document.doc_id)
        else:
            report.updated += 1

    nodes: list[BaseNode] = []
    if pending:
        embed_model = embed_model or build_embed_model(cfg)
        check_model_fits(cfg, store, embed_model)
        if cfg.milvus.adopt_foreign_collection:
            retry.call(lambda: record_model(cfg, store), "update of the collection's properties")
        nodes = chunk_documents(cfg, pending, token_counter(embed_model))
    remaining = Counter(node.ref_doc_id for node in nodes)
    for node in nodes:
        doc_id = node.ref_doc_id or ""
        node.metadata.update(
            {HASH_KEY: hashes[doc_id], CHUNKS_KEY: remaining[doc_id], WRITTEN_KEY: time.time()}
        )
        node.excluded_embed_metadata_keys += list(_BOOKKEEPING)
        node.excluded_llm_metadata_keys += list(_BOOKKEEPING)

    log.info(
        "%d documents to write (%d new, %d changed), %d unchanged; %d chunks to embed",
        len(pending), report.added, report.updated, report.unchanged, len(nodes),
    )  # fmt: skip
    if embed_model is not None and nodes:
        writer = _Writer(store, retry, hashes, new)
        try:
            show_bar = sys.stderr.isatty() if progress is None else progress
            _embed_into(cfg, embed_model, nodes, writer, report, show_bar, log_every, len(pending))
        finally:
            writer.close()

    if delete_missing and root.is_dir():
        present = set(hashes) | kept
        gone = sorted(doc_id for doc_id in stored if doc_id not in present)
        retry.call(lambda: _delete_documents(store, gone), "delete")
        report.deleted = len(gone)

    if nodes or report.deleted:
        # Sealed segments are what Milvus searches fast: Lite's BM25 scans unflushed rows
        # one by one (844 ms vs 9 ms per search over 6,000 rows, measured), and a server
        # indexes a segment once it is sealed.
        name = store.collection_name
        retry.call(lambda: store.client.flush(name), "flush")
    report.seconds = time.perf_counter() - started
    return report
