"""Ingestion: read a folder, chunk, embed in batches, write to Milvus.

Rows are upserted under stable chunk ids, so running it again replaces documents in place
instead of duplicating them; chunks left over from a longer earlier version of a document
are deleted after its new chunks are written. Embedding happens before any write of a
batch, so a failure never removes what the collection already held.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, Document, MetadataMode
from llama_index.vector_stores.milvus import MilvusVectorStore
from tqdm import tqdm

from rag_app.components.chunking import chunk_documents
from rag_app.components.embedding import build_embed_model
from rag_app.components.readers import PARSERS, UnreadableFile, discover, load_documents
from rag_app.components.vector_store import build_vector_store
from rag_app.config import RagConfig
from rag_app.errors import RagAppError


@dataclass
class IngestReport:
    documents: int = 0
    chunks: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        line = (
            f"ingested {self.documents} documents, {self.chunks} chunks in "
            f"{self.seconds:.1f} s ({self.chunks_per_second:.1f} chunks/s)"
        )
        if self.skipped:
            line += f"; skipped {len(self.skipped)}: " + "; ".join(
                f"{path} ({reason})" for path, reason in self.skipped
            )
        return line


def _batches(nodes: Sequence[BaseNode], size: int) -> Iterator[Sequence[BaseNode]]:
    for start in range(0, len(nodes), size):
        yield nodes[start : start + size]


def _delete_stale_chunks(store: MilvusVectorStore, doc_id: str, keep: list[str]) -> None:
    """Remove a document's rows that its new version no longer has."""
    store.client.delete(
        collection_name=store.collection_name,
        filter=f"{store.doc_id_field} == {json.dumps(doc_id)} and id not in {json.dumps(keep)}",
    )


def ingest_path(
    cfg: RagConfig,
    path: str | Path,
    *,
    embed_model: BaseEmbedding | None = None,
    vector_store: MilvusVectorStore | None = None,
    progress: bool | None = None,
) -> IngestReport:
    """Ingest a file or a folder (recursively) into the configured collection.

    Unreadable files are skipped and listed in the report; a path with nothing
    readable raises :class:`RagAppError`. ``progress=None`` shows a bar on a terminal.
    """
    started = time.perf_counter()
    root = Path(path).expanduser()
    if not root.exists():
        raise RagAppError(f"no such file or folder: {root}")
    files = discover(root)
    if not files:
        kinds = ", ".join(sorted(PARSERS))
        raise RagAppError(f"no documents to ingest in {root} (looked for {kinds})")

    report = IngestReport()
    documents: list[Document] = []
    for file, result in load_documents(files, root):
        if isinstance(result, UnreadableFile):
            report.skipped.append((str(file), str(result)))
        else:
            documents.append(result)
    if not documents:
        first = report.skipped[0]
        raise RagAppError(
            f"none of the {len(files)} files in {root} could be read: {first[0]}: {first[1]}"
        )

    nodes = chunk_documents(cfg, documents)
    embed_model = embed_model or build_embed_model(cfg)
    store = vector_store or build_vector_store(cfg, embed_model)

    batch_size = max(cfg.embedding.batch_size, 1) * 4
    with tqdm(
        total=len(nodes),
        unit="chunk",
        desc="embedding",
        disable=None if progress is None else not progress,
    ) as bar:
        for batch in _batches(nodes, batch_size):
            texts = [node.get_content(metadata_mode=MetadataMode.EMBED) for node in batch]
            for node, vector in zip(
                batch, embed_model.get_text_embedding_batch(texts), strict=True
            ):
                node.embedding = vector
            store.add(list(batch))
            bar.update(len(batch))

    kept: dict[str, list[str]] = {}
    for node in nodes:
        kept.setdefault(node.ref_doc_id or "", []).append(node.node_id)
    for doc_id, ids in kept.items():
        _delete_stale_chunks(store, doc_id, ids)

    report.documents = len(documents)
    report.chunks = len(nodes)
    report.seconds = time.perf_counter() - started
    return report
