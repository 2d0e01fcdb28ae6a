"""Embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint (``embedding.mode =
"server"``): vLLM's pooling runner, Infinity and TEI all serve one.

The vectors are treated as the in-process ones are: each is normalised by its own norm in
float32, the query instruction goes on queries only and the text instruction on chunks.
Several batches are in flight at once (``embedding.max_in_flight``) so that the servers,
which batch what arrives together, stay busy while this process waits for answers. No
torch is imported here: the point of server mode is a client without the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import Field, PrivateAttr

from rag_app.components.openai_errors import reason, server_message, transport_error
from rag_app.errors import RagAppError, first_line, redact_uri

log = logging.getLogger(__name__)
_RETRIED_STATUS = {408, 409, 429}  # and 5xx: the statuses the openai client retries


def _unit(vectors: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each vector divided by its own norm, in float32 (as ``UnitNormEmbedding`` does)."""
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return (array / np.where(norms > 0, norms, 1.0)).tolist()  # type: ignore[no-any-return]


class ServerEmbedding(BaseEmbedding):
    """A LlamaIndex embedding model whose vectors come from an embedding server.

    Failures raise a one-line :class:`RagAppError` naming the server and the fix, never the
    API key. Retries are the openai client's: a request that could not connect, timed out,
    lost its connection or got 408/409/429/5xx is sent again up to ``retries`` times with
    exponential backoff (0.5 s doubling up to 8 s), so a server restarted during an ingest
    costs the ingest a pause, not its run.
    """

    api_base: str = Field(description="the server's /v1 URL")
    max_in_flight: int = Field(default=2, ge=1, description="batches sent at once")
    retries: int = Field(default=4, ge=0)
    timeout: float = Field(default=60.0, gt=0)
    query_instruction: str | None = None
    text_instruction: str | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)
    tokenizer_name: str = Field(default="", description="folder or hub id; '' = none")

    _api_key: str = PrivateAttr(default="EMPTY")
    _client: openai.OpenAI | None = PrivateAttr(default=None)
    _aclients: dict[int, openai.AsyncOpenAI] = PrivateAttr(default_factory=dict)
    _pool: ThreadPoolExecutor | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _dimension: int | None = PrivateAttr(default=None)

    def __init__(self, *, api_key: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("num_workers", kwargs.get("max_in_flight", 2))  # async batches
        super().__init__(**kwargs)
        self._api_key = api_key or "EMPTY"

    @classmethod
    def class_name(cls) -> str:
        return "ServerEmbedding"

    # -- clients -------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "base_url": self.api_base,
            "api_key": self._api_key,
            "timeout": self.timeout,
            "max_retries": self.retries,
        }

    def _sync_client(self) -> openai.OpenAI:
        with self._lock:
            if self._client is None:
                self._client = openai.OpenAI(**self._client_kwargs())
            return self._client

    def _async_client(self) -> openai.AsyncOpenAI:
        """One client per event loop: an httpx async pool belongs to the loop it ran on."""
        loop = id(asyncio.get_running_loop())
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = openai.AsyncOpenAI(**self._client_kwargs())
        return client

    # -- requests ------------------------------------------------------------------------

    def _request(self, texts: list[str]) -> dict[str, Any]:
        return {"model": self.model_name, "input": texts, "extra_body": self.extra_body or None}

    def _embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            reply = self._sync_client().embeddings.create(**self._request(texts))
        except openai.APIError as exc:
            raise self.server_error(exc) from exc
        return self._vectors(reply, len(texts))

    async def _aembed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            reply = await self._async_client().embeddings.create(**self._request(texts))
        except openai.APIError as exc:
            raise await asyncio.to_thread(self.server_error, exc) from exc
        return self._vectors(reply, len(texts))

    def _vectors(self, reply: Any, expected: int) -> list[list[float]]:
        data = sorted(reply.data, key=lambda item: item.index)
        if len(data) != expected:
            raise RagAppError(
                f"{self._where()} returned {len(data)} vectors for {expected} texts "
                "(check that embedding.api_base is an embedding server)"
            )
        return _unit([item.embedding for item in data])

    # -- LlamaIndex's interface ----------------------------------------------------------

    def _query_text(self, query: str) -> str:
        return f"{self.query_instruction}{query}" if self.query_instruction else query

    def _texts(self, texts: list[str]) -> list[str]:
        prefix = self.text_instruction
        return [f"{prefix}{text}" for text in texts] if prefix else list(texts)

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([self._query_text(query)])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._aembed([self._query_text(query)]))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed(self._texts([text]))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aembed(self._texts([text])))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(self._texts(texts))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._aembed(self._texts(texts))

    def get_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        """Embed ``texts`` in batches of ``embed_batch_size``, ``max_in_flight`` of them at
        once (LlamaIndex's own sync version sends one batch after another). Ingestion calls
        this with ``max_in_flight`` batches' worth of chunks at a time."""
        size = self.embed_batch_size
        batches = [texts[start : start + size] for start in range(0, len(texts), size)]
        one_batch = super().get_text_embedding_batch
        if len(batches) <= 1 or self.max_in_flight == 1:
            return one_batch(texts, show_progress, **kwargs)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_in_flight, "embedding-request")
            pool = self._pool
        futures: list[Future[list[Embedding]]] = [
            pool.submit(one_batch, batch, **kwargs) for batch in batches
        ]
        try:
            return [vector for future in futures for vector in future.result()]
        finally:
            for future in futures:
                future.cancel()  # after a failure: the batches not sent yet are not

    # -- what the collection code asks ---------------------------------------------------

    def dimension(self) -> int:
        """The vectors' size, from one probe request (once)."""
        if self._dimension is None:
            self._dimension = len(self._embed(["dimension probe"])[0])
        return self._dimension

    def token_counter(self) -> tuple[Callable[[str], int], int] | None:
        """Counts the model's tokens with its tokenizer loaded here (``tokenizer_name``), and
        the most the model reads; ``None`` (logged) when no tokenizer is known."""
        name = self.tokenizer_name
        fix = (
            "chunks are not checked against the model's input limit; set embedding.tokenizer "
            "to the model's folder or hub id"
        )
        if not name:
            log.warning("embedding model %r names no tokenizer: %s", self.model_name, fix)
            return None
        try:
            count, stated = _load_counter(name)
        except Exception as exc:  # any loader's failure: warn, and go on without
            log.warning("cannot load the tokenizer %r (%s): %s", name, first_line(exc), fix)
            return None
        limit = _max_seq_length(name) or stated
        if not 0 < limit < 1_000_000:  # transformers' "no limit" is a huge number
            log.warning("the tokenizer %r states no input limit: %s", name, fix)
            return None
        return count, limit

    # -- errors --------------------------------------------------------------------------

    def _where(self) -> str:
        return f"the embedding server at {redact_uri(self.api_base)}"

    def server_error(self, exc: BaseException) -> RagAppError:
        """The one-line error for a failed request (may ask the server what it serves)."""
        where = self._where()
        tries = f"{self.retries + 1} tries" if self.retries else "1 try"
        message = transport_error(exc, where, tries, "embedding", self.timeout)
        if message is None:
            if (
                isinstance(exc, openai.APIStatusError)
                and exc.status_code in (400, 404)
                and (
                    (served := self._served_models()) is not None and self.model_name not in served
                )
            ):
                names = ", ".join(served) or "no model"
                message = (
                    f"{where} does not serve model {self.model_name!r} (it serves: {names}; "
                    "set embedding.model to one of them)"
                )
            elif isinstance(exc, openai.APIStatusError):
                status = exc.status_code
                retried = f", after {tries}" if status >= 500 or status in _RETRIED_STATUS else ""
                message = (
                    f"{where} answered HTTP {status}{retried}: {server_message(exc)} "
                    f"({_STATUS_HINTS.get(status, 'check the server log')})"
                )
            else:
                message = f"{where} failed: {reason(exc)} (check the server log)"
        key = self._api_key
        if key and key != "EMPTY":
            message = message.replace(key, "***")
        return RagAppError(message)

    def _served_models(self) -> list[str] | None:
        """The names the server serves (``/v1/models``), ``None`` if it does not say."""
        try:
            listing = self._sync_client().with_options(max_retries=0).models.list()
            return sorted(model.id for model in listing.data)
        except (openai.APIError, AttributeError, TypeError):
            return None


_STATUS_HINTS = {
    400: (
        "a text may be longer than the server's limit: set embedding.tokenizer so chunks are "
        "split to fit, and let the server truncate questions (vLLM: embedding.extra_body = "
        "{truncate_prompt_tokens = -1}; TEI: --auto-truncate)"
    ),
    401: "check embedding.api_key, or RAG_APP_EMBEDDING__API_KEY, against the server's key",
    403: "check embedding.api_key, or RAG_APP_EMBEDDING__API_KEY, against the server's key",
    404: "check that embedding.api_base ends in /v1 and the server serves embeddings",
    429: "the server is overloaded: try again later, or lower embedding.max_in_flight",
}


def _load_counter(name: str) -> tuple[Callable[[str], int], int]:
    """A token counter for ``name`` and the limit its tokenizer states (0: none). A folder's
    ``tokenizer.json`` is read with ``tokenizers`` alone; transformers' AutoTokenizer (the
    fallback, for hub ids and slow tokenizers) imports torch, which server mode avoids."""
    file = Path(name).expanduser() / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(file))
        fast.no_truncation()
        fast.no_padding()
        stated = (
            json.loads((file.parent / "tokenizer_config.json").read_text()).get(
                "model_max_length", 0
            )
            if (file.parent / "tokenizer_config.json").is_file()
            else 0
        )
        return (lambda text: len(fast.encode(text).ids)), int(stated or 0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)

    def count(text: str) -> int:
        return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])

    return count, int(getattr(tokenizer, "model_max_length", 0) or 0)


def _max_seq_length(name: str) -> int:
    """sentence-transformers' own input limit, from a local model folder (0 if none): it is
    what the model was trained for and what in-process embedding truncates at."""
    config = Path(name).expanduser() / "sentence_bert_config.json"
    try:
        return int(json.loads(config.read_text()).get("max_seq_length") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
