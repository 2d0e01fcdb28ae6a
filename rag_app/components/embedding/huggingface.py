"""A sentence-transformers model in-process, as LlamaIndex's ``HuggingFaceEmbedding``.

Each vector is normalised by its own norm, in float32 whatever the model's precision, so
inner product equals cosine similarity.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from llama_index.embeddings.huggingface import HuggingFaceEmbedding


class UnitNormEmbedding(HuggingFaceEmbedding):
    """``HuggingFaceEmbedding`` whose vectors have unit length in float32, one by one.

    An empty ``query_instruction`` / ``text_instruction`` is no instruction, for any model.

    sentence-transformers normalises in the model's dtype: with bf16 weights the norms
    come out up to 0.5% off 1, and inner product is then no longer cosine similarity.
    """

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
