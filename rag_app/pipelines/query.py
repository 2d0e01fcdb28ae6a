"""Answering questions: Milvus retrieval, the grounded prompt, and the generator."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response, StreamingResponse
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.llms import LLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import CompactAndRefine
from llama_index.core.response_synthesizers.base import QueryTextType
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore
from llama_index.core.vector_stores.types import MetadataFilters
from llama_index.vector_stores.milvus import MilvusVectorStore

from rag_app.components.embedding import build_embed_model
from rag_app.components.llm import build_llm
from rag_app.components.retrieval import build_retriever
from rag_app.components.vector_store import build_vector_store
from rag_app.config import RagConfig
from rag_app.display import one_line
from rag_app.pipelines.answer import finish_answer
from rag_app.pipelines.citations import number_excerpts
from rag_app.prompts import ABSTAIN_ANSWER, GROUNDED_QA_PROMPT, REFINE_PROMPT, quote_as_data

CHUNK_SEPARATOR = "\n---\n"


def node_source(node: NodeWithScore) -> str:
    """The file path (relative to the ingested folder) or URL a chunk came from."""
    metadata = node.node.metadata
    return str(metadata.get("source") or metadata.get("file_path") or node.node.ref_doc_id or "")


class GroundedSynthesizer(CompactAndRefine):
    """Compact-and-refine with the recipe's ordering: best chunk last, sources listed.

    ``source_nodes`` on the response stay best-first; only the prompt is reversed, so the
    most relevant text sits next to the question. Excerpts are numbered as the sources are
    (``[1]`` = best); citations of numbers no excerpt has are removed from the answer, and
    ``response.metadata["citations"]`` lists the numbers it cites.
    """

    def synthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        if not nodes:
            return _abstention(self._streaming)
        response_kwargs.setdefault("sources_str", sources_str(nodes))
        response = super().synthesize(query, nodes, additional_source_nodes, **response_kwargs)
        return _checked(query, response, nodes)

    async def asynthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        if not nodes:
            return _abstention(self._streaming)
        response_kwargs.setdefault("sources_str", sources_str(nodes))
        response = await super().asynthesize(
            query, nodes, additional_source_nodes, **response_kwargs
        )
        return _checked(query, response, nodes)

    def _make_compact_text_chunks(self, query_str: str, text_chunks: Sequence[str]) -> list[str]:
        return super()._make_compact_text_chunks(query_str, excerpts_best_last(text_chunks))


def excerpts_best_last(texts: Sequence[str]) -> list[str]:
    """Retrieved texts (best first) as the prompt shows them: quoted as data, numbered as
    the sources are, separated, and in reverse so the best sits next to the question.

    The prompt templates quote their document variables too (see
    :func:`rag_app.prompts.chat_template`); quoting here, before the excerpts are packed,
    makes the packing count the text the model will receive."""
    numbered = number_excerpts([quote_as_data(text) for text in texts])
    return [CHUNK_SEPARATOR.lstrip("\n") + text for text in reversed(numbered)]


def _prompt_helper(llm: LLM) -> PromptHelper:
    """Packs excerpts into prompts that fit the model's window minus the answer budget,
    counting with the model's own tokenizer (``llm.tokenizer``: both of rag_app's LLMs have
    one; see ``llm.tokenizer`` in the settings). LlamaIndex's default counts with tiktoken,
    which can undercount another model's tokens and overflow the engine."""
    tokenizer = getattr(llm, "tokenizer", None)
    count = None
    if tokenizer is not None and callable(getattr(tokenizer, "encode", None)):
        count = partial(tokenizer.encode, add_special_tokens=False)
    return PromptHelper.from_llm_metadata(llm.metadata, tokenizer=count)


def sources_str(nodes: Sequence[NodeWithScore]) -> str:
    """The "Grounding sources:" line: one line whatever the file names hold (a name with a
    newline cannot forge a line of the prompt); the template neutralises control tokens."""
    return ", ".join(f"[{number}] {one_line(node_source(n))}" for number, n in enumerate(nodes, 1))


def _checked(
    query: QueryTextType, response: RESPONSE_TYPE, nodes: Sequence[NodeWithScore]
) -> RESPONSE_TYPE:
    """A finished answer as :func:`finish_answer` leaves it: citations to no excerpt removed,
    the cited numbers and abstention in ``metadata`` (a stream is finished by its reader)."""
    if isinstance(response, Response) and response.response is not None:
        answer = finish_answer(str(query), response.response, nodes)
        response.response = answer.answer
        response.metadata = {
            **(response.metadata or {}),
            "citations": answer.citations,
            "abstained": answer.abstained,
        }
    return response


def _abstention(streaming: bool) -> RESPONSE_TYPE:
    """The answer when retrieval found nothing relevant enough: no LLM call, no sources."""
    metadata = {"citations": [], "abstained": True}
    if streaming:
        return StreamingResponse(response_gen=(t for t in [ABSTAIN_ANSWER]), metadata=metadata)
    return Response(ABSTAIN_ANSWER, source_nodes=[], metadata=metadata)


def build_index(
    cfg: RagConfig,
    *,
    embed_model: BaseEmbedding | None = None,
    vector_store: MilvusVectorStore | None = None,
) -> VectorStoreIndex:
    """A ``VectorStoreIndex`` over the existing Milvus collection (nothing is re-embedded)."""
    embed_model = embed_model or build_embed_model(cfg)
    vector_store = vector_store or build_vector_store(cfg, embed_model)
    return VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)


def configured_retriever(
    cfg: RagConfig,
    index: VectorStoreIndex | None = None,
    *,
    top_k: int | None = None,
    filters: MetadataFilters | None = None,
    embed_model: BaseEmbedding | None = None,
) -> BaseRetriever:
    """The configured retriever over ``index``, or over the configured collection opened
    with ``embed_model`` (loaded once, shared by the index and the relevance gate): what the
    query and chat engines search when they are not given a retriever."""
    if index is None:
        embed_model = embed_model or build_embed_model(cfg)
        index = build_index(cfg, embed_model=embed_model)
    return build_retriever(cfg, index, top_k=top_k, filters=filters, embed_model=embed_model)


def build_query_engine(
    cfg: RagConfig,
    *,
    index: VectorStoreIndex | None = None,
    llm: LLM | None = None,
    top_k: int | None = None,
    filters: MetadataFilters | None = None,
    streaming: bool = False,
    retriever: BaseRetriever | None = None,
    embed_model: BaseEmbedding | None = None,
) -> RetrieverQueryEngine:
    """The grounded query engine: retrieve ``top_k`` chunks, answer from them with sources.

    ``filters`` (e.g. from :func:`rag_app.components.retrieval.parse_filters`) restrict the
    search in Milvus itself. ``retriever``: one already built, used instead (a service
    shares one between its streaming and whole-answer engines).
    """
    if retriever is None:
        retriever = configured_retriever(cfg, index, top_k=top_k, filters=filters,
                                         embed_model=embed_model)  # fmt: skip
    llm = llm or build_llm(cfg)
    synthesizer = GroundedSynthesizer(
        llm=llm,
        text_qa_template=GROUNDED_QA_PROMPT,
        refine_template=REFINE_PROMPT,
        streaming=streaming,
        prompt_helper=_prompt_helper(llm),
    )
    return RetrieverQueryEngine(
        retriever=retriever,
        response_synthesizer=synthesizer,
    )
