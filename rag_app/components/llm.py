"""The generator: vLLM in-process (``local``) or a vLLM OpenAI-compatible server (``server``).

``llama_index.llms.vllm.Vllm`` 0.8 has three defects against vLLM 0.32 that
:class:`ChatTemplateVllm` fixes: it passes ``best_of`` (removed from ``SamplingParams``),
it formats chat messages as a generic ``"user: ...\\nassistant:"`` text instead of the
model's chat template, and it never shuts the engine down (the program hangs at exit).
Server mode uses ``OpenAILike`` against ``/v1/chat/completions``, where the server applies
the chat template and streams tokens.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.generic_utils import completion_response_to_chat_response
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LLMMetadata,
)
from llama_index.core.llms import LLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.llms.openai_like import OpenAILike
from llama_index.llms.vllm import Vllm
from pydantic import PrivateAttr

from rag_app.config import RagConfig
from rag_app.errors import RagAppError, first_line
from rag_app.prompts import quote_as_data


class ChatTemplateVllm(Vllm):
    """``Vllm`` that renders every prompt with the model's own chat template.

    ``complete(text)`` sends ``text`` as one user turn; ``chat(messages)`` renders the
    messages (system, user, assistant) with the template and a generation prompt. The
    rendered text is what ``LLMCompletionStartEvent`` reports and what is tokenised,
    without a second BOS token.
    """

    context_window: int = 4096
    seed: int | None = None
    repetition_penalty: float = 1.0
    _tokenizer: Any = PrivateAttr()

    def __init__(
        self,
        *,
        context_window: int,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.context_window = context_window
        self.seed = seed
        self.repetition_penalty = repetition_penalty
        self._tokenizer = self._client.get_tokenizer()
        if not getattr(self._tokenizer, "chat_template", None):
            raise RagAppError(
                f"model {self.model!r} has no chat template; use an instruct/chat model"
            )
        self.messages_to_prompt = self.render_chat
        self.completion_to_prompt = self.render_completion  # type: ignore[assignment]
        _live_engines[id(self)] = weakref.ref(self)

    @classmethod
    def class_name(cls) -> str:
        return "ChatTemplateVllm"

    def __repr__(self) -> str:  # the default recurses through the bound prompt renderers
        return f"ChatTemplateVllm(model={self.model!r}, context_window={self.context_window})"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            model_name=self.model or "",
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
        )

    @property
    def _model_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in super()._model_kwargs.items() if k != "best_of"}
        kwargs["seed"] = self.seed
        kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The exact prompt text for ``messages`` under the model's chat template.

        Control tokens inside the messages' text are neutralised: only the template opens
        and closes turns.
        """
        special = [t for t in self._tokenizer.all_special_tokens if len(t) > 1]
        turns = [
            {"role": m.role.value, "content": _neutralise(m.content or "", special)}
            for m in messages
        ]
        return str(
            self._tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        )

    def render_completion(self, completion: str) -> str:
        return self.render_chat([ChatMessage(role="user", content=completion)])

    def token_ids(self, rendered: str) -> list[int]:
        """Token ids for a rendered prompt; the template already holds any special tokens."""
        return list(self._tokenizer.encode(rendered, add_special_tokens=False))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(
            self.complete(self.render_chat(messages), formatted=True, **kwargs)
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        from vllm import SamplingParams

        if not formatted:  # re-enter, so the completion event shows the rendered prompt
            return self.complete(self.render_completion(prompt), formatted=True, **kwargs)
        params = SamplingParams(**{**self._model_kwargs, **kwargs})
        outputs = self._client.generate(
            [{"prompt_token_ids": self.token_ids(prompt)}], params, use_tqdm=False
        )
        return CompletionResponse(text=outputs[0].outputs[0].text)

    def complete_many(
        self, prompts: Sequence[str], formatted: bool = False, **kwargs: Any
    ) -> list[CompletionResponse]:
        """Complete many prompts in one engine call: vLLM batches them continuously, which is
        where its throughput comes from. ``raw`` holds each reply's token count."""
        from vllm import SamplingParams

        rendered = [p if formatted else self.render_completion(p) for p in prompts]
        params = SamplingParams(**{**self._model_kwargs, **kwargs})
        outputs = self._client.generate(
            [{"prompt_token_ids": self.token_ids(p)} for p in rendered], params, use_tqdm=False
        )
        return [
            CompletionResponse(
                text=out.outputs[0].text, raw={"completion_tokens": len(out.outputs[0].token_ids)}
            )
            for out in outputs
        ]

    def close(self) -> None:  # type: ignore[override]
        """Stop vLLM's engine process; without it the interpreter hangs at exit."""
        client, self._client = self._client, None
        if client is not None:
            engine_core = getattr(getattr(client, "llm_engine", None), "engine_core", None)
            if engine_core is not None:
                engine_core.shutdown()
        _live_engines.pop(id(self), None)


def _neutralise(text: str, special_tokens: Sequence[str]) -> str:
    text = quote_as_data(text)
    for token in special_tokens:  # e.g. <s>, [INST]: not of the <|...|> form
        text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


_live_engines: dict[int, weakref.ref[ChatTemplateVllm]] = {}


@atexit.register
def _shutdown_engines() -> None:
    for ref in list(_live_engines.values()):
        engine = ref()
        if engine is not None:
            engine.close()


def _build_local(cfg: RagConfig) -> ChatTemplateVllm:
    settings = cfg.llm
    model = settings.model
    if model.startswith(("/", "./", "../", "~")) and not (Path(model) / "config.json").is_file():
        raise RagAppError(
            f"LLM model folder not found: {model} "
            "(run `.venv/bin/python scripts/fetch_models.py`, or set llm.model)"
        )
    for name, value in settings.env.items():
        os.environ.setdefault(name, value)
    try:
        return ChatTemplateVllm(
            model=model,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_tokens,
            dtype=settings.dtype,
            context_window=settings.max_model_len,
            seed=settings.seed,
            repetition_penalty=settings.repetition_penalty,
            vllm_kwargs={"max_model_len": settings.max_model_len, **settings.engine_kwargs},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        reason = first_line(exc)
        raise RagAppError(
            f"cannot start vLLM on {model!r}: {reason} (check llm.model, llm.engine_kwargs, "
            "or use llm.mode = 'server')"
        ) from None


def _build_server(cfg: RagConfig) -> OpenAILike:
    settings = cfg.llm
    extra: dict[str, Any] = {"top_p": settings.top_p}
    if settings.repetition_penalty != 1.0:
        extra["extra_body"] = {"repetition_penalty": settings.repetition_penalty}
    if settings.seed is not None:
        extra["seed"] = settings.seed
    return OpenAILike(
        model=settings.model,
        api_base=settings.api_base,
        api_key=settings.api_key.get_secret_value() or "EMPTY",
        is_chat_model=True,
        context_window=settings.max_model_len,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        additional_kwargs=extra,
        timeout=settings.request_timeout,
        max_retries=2,
    )


def build_llm(cfg: RagConfig) -> LLM:
    """The configured generator as a LlamaIndex ``LLM``.

    ``local`` starts a vLLM engine in a child process (tens of seconds, once); call
    ``close()`` on it when done. ``server`` only creates an HTTP client.
    """
    return _build_local(cfg) if cfg.llm.mode == "local" else _build_server(cfg)
