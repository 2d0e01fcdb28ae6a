"""``llama-index-llms-openai`` 0.8.3 (under ``llama-index-llms-openai-like`` 0.8.1): retries
left to the openai client alone.

Overrides the private ``OpenAI._get_credential_kwargs(is_async=False)`` (checked by
tests/test_compat_guards.py): upstream hands its ``max_retries`` both to the openai client
and to its own tenacity layer around every call, so N retries become N x N tries with a
warning logged for each, and streams are not covered. Here LlamaIndex's layer is left at 0
(``max_retries=0``) and the client gets ``retries``.
"""

from __future__ import annotations

from typing import Any

from llama_index.llms.openai_like import OpenAILike
from pydantic import Field

WRITTEN_FOR = "0.8.3"


class OpenAILikeClientRetries(OpenAILike):
    """``OpenAILike`` whose openai client retries ``retries`` times."""

    retries: int = Field(default=2, ge=0, description="retries of a request that failed")

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_retries", 0)  # LlamaIndex's own layer: off
        super().__init__(**kwargs)

    def _get_credential_kwargs(self, is_async: bool = False) -> dict[str, Any]:
        return {**super()._get_credential_kwargs(is_async), "max_retries": self.retries}
