"""A sentence-transformers model in-process, as LlamaIndex's ``HuggingFaceEmbedding``.

Each vector is normalised by its own norm, in float32 whatever the model's precision, so
inner product equals cosine similarity.
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

if TYPE_CHECKING:
    from rag_app.components.embedding.onnx import OnnxQueryEncoder


class UnitNormEmbedding(HuggingFaceEmbedding):
    """``HuggingFaceEmbedding`` whose vectors have unit length in float32, one by one.

    An empty ``query_instruction`` / ``text_instruction`` is no instruction, for any model.

    sentence-transformers normalises in the model's dtype: with bf16 weights the norms
    come out up to 0.5% off 1, and inner product is then no longer cosine similarity.

    Queries go through the query encoder (the fp32 ONNX graph of the same model) when one
    is set and can be had, else through sentence-transformers like texts.
    """

    _query_encoder: Any = PrivateAttr(default=None)  # an OnnxQueryEncoder, or None

    def use_query_encoder(self, make: type[OnnxQueryEncoder], **kwargs: Any) -> None:
        """Embed queries with ``make(instruction=..., **kwargs)``: the instruction is the
        query prompt sentence-transformers was given, so both paths prefix the same text."""
        prompts = getattr(self._model, "prompts", None) or {}
        instruction = "" if self.query_instruction == "" else prompts.get("query", "")
        self._query_encoder = make(instruction=instruction, **kwargs)

    @property
    def query_runtime(self) -> str:
        """Which runtime embeds queries now: "onnx" or "torch"."""
        encoder = self._query_encoder
        return "onnx" if encoder is not None and encoder.loaded else "torch"

    def _get_query_embedding(self, query: str) -> list[float]:
        if self._query_encoder is not None:
            vector = self._query_encoder.embed(query)
            if vector is not None:
                return vector  # type: ignore[no-any-return]
        return super()._get_query_embedding(query)

    def _embed(
        self, inputs: list[str | BytesIO], prompt_name: str | None = None
    ) -> list[list[float]]:
        # An instruction set to "" means none. HuggingFaceEmbedding builds the model's
        # prompts with `instruction or its default` (BGE's retrieval prefix for BGE ids), so
        # "" cannot reach them; encoding without a prompt name uses no prompt at all.
        instruction = {"query": self.query_instruction, "text": self.text_instruction}
        if prompt_name in instruction and instruction[prompt_name] == "":
            prompt_name = None
        vectors = np.asarray(super()._embed(inputs, prompt_name), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.where(norms > 0, norms, 1.0)).tolist()  # type: ignore[no-any-return]
