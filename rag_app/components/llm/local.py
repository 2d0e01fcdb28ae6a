"""vLLM in-process (``llm.mode = "local"``), on vLLM's async engine.

``llama_index.llms.vllm.Vllm`` 0.8 drives vLLM's blocking ``LLM`` class: it cannot stream,
its async methods block the event loop, and against vLLM 0.32 it also passes ``best_of``
(removed from ``SamplingParams``), formats chat as a generic ``"user: ...\\nassistant:"``
text instead of the model's chat template, and never shuts the engine down (the program
hangs at exit). :class:`AsyncEngineVllm` keeps ``Vllm``'s fields and interface but runs
vLLM's async engine (``AsyncLLM``), so tokens stream, ``acomplete``/``aquery`` are truly
asynchronous, and concurrent requests are batched by the engine.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import queue
import threading
import uuid
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.llms.vllm import Vllm
from pydantic import PrivateAttr

from rag_app.config import RagConfig
from rag_app.errors import RagAppError, first_line
from rag_app.prompts import quote_as_data

T = TypeVar("T")
_DONE = object()  # end of a token stream


class AsyncEngineVllm(Vllm):
    """``Vllm`` on vLLM's async engine, rendering every prompt with the model's chat template.

    The engine (``vllm.v1.engine.async_llm.AsyncLLM``) runs on an event loop of its own, in
    a background thread, so it serves callers on any thread or event loop: ``complete`` and
    ``stream_complete`` block only their caller, ``acomplete`` and ``astream_complete`` await
    without blocking the caller's loop, and whatever is in flight at once is batched.
    A stream abandoned half-way aborts its request in the engine.

    ``complete(text)`` sends ``text`` as one user turn; ``chat(messages)`` renders the
    messages (system, user, assistant) with the template and a generation prompt. The
    rendered text is what ``LLMCompletionStartEvent`` reports and what is tokenised,
    without a second BOS token.
    """

    context_window: int = 4096
    seed: int | None = None
    repetition_penalty: float = 1.0
    _tokenizer: Any = PrivateAttr()
    _engine: Any = PrivateAttr(default=None)
    _loop: asyncio.AbstractEventLoop = PrivateAttr()
    _thread: threading.Thread = PrivateAttr()

    def __init__(
        self,
        *,
        context_window: int,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        **kwargs: Any,
    ) -> None:
        # Vllm.__init__ would start vLLM's blocking engine: set the fields without it.
        super(Vllm, self).__init__(api_url="", **kwargs)
        self.context_window = context_window
        self.seed = seed
        self.repetition_penalty = repetition_penalty
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        _live_engines[id(self)] = weakref.ref(self)
        try:
            self._engine = self._run(self._start_engine())
            self._tokenizer = self._engine.get_tokenizer()
        except BaseException:
            self.close()
            raise
        if not getattr(self._tokenizer, "chat_template", None):
            self.close()
            raise RagAppError(
                f"model {self.model!r} has no chat template; use an instruct/chat model"
            )
        self.messages_to_prompt = self.render_chat
        self.completion_to_prompt = self.render_completion  # type: ignore[assignment]

    async def _start_engine(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = {
            "model": self.model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "trust_remote_code": self.trust_remote_code,
            "dtype": self.dtype,
            "download_dir": self.download_dir,
            "disable_log_stats": True,
            **self.vllm_kwargs,
        }
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    @classmethod
    def class_name(cls) -> str:
        return "AsyncEngineVllm"

    def __repr__(self) -> str:  # the default recurses through the bound prompt renderers
        return f"AsyncEngineVllm(model={self.model!r}, context_window={self.context_window})"

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

    # -- the engine, on its own loop ------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C while waiting: abort the request in the engine
            raise

    async def _generate(
        self, prompt: str, sink: Callable[[str], object] | None = None, **kwargs: Any
    ) -> CompletionResponse:
        """One request; each new piece of text goes to ``sink`` as it is decoded."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None:
            raise RagAppError("the vLLM engine is closed (build a new LLM)")
        params = SamplingParams(
            **{**self._model_kwargs, **kwargs}, output_kind=RequestOutputKind.DELTA
        )
        parts: list[str] = []
        tokens = 0
        request = {"prompt_token_ids": self.token_ids(prompt)}
        async for output in self._engine.generate(request, params, uuid.uuid4().hex):
            delta = output.outputs[0]
            tokens += len(delta.token_ids)
            if delta.text:
                parts.append(delta.text)
                if sink is not None:
                    sink(delta.text)
        return CompletionResponse(text="".join(parts), raw={"completion_tokens": tokens})

    def _stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        pieces: queue.Queue[Any] = queue.Queue()
        future = self._submit(self._generate(prompt, pieces.put, **kwargs))
        future.add_done_callback(lambda _: pieces.put(_DONE))
        try:
            while (piece := pieces.get()) is not _DONE:
                yield piece
            future.result()  # an engine error, raised here rather than lost
        finally:
            future.cancel()  # the reader stopped early: abort the request

    async def _astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        future = self._submit(self._generate(prompt, put, **kwargs))
        future.add_done_callback(lambda _: put(_DONE))
        try:
            while (piece := await pieces.get()) is not _DONE:
                yield piece
            future.result()
        finally:
            future.cancel()

    # -- LlamaIndex's LLM interface -------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if not formatted:  # re-enter, so the completion event shows the rendered prompt
            return self.complete(self.render_completion(prompt), formatted=True, **kwargs)
        return self._run(self._generate(prompt, **kwargs))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        if not formatted:
            return await self.acomplete(self.render_completion(prompt), formatted=True, **kwargs)
        future = self._submit(self._generate(prompt, **kwargs))
        return await asyncio.wrap_future(future)  # cancelling the caller aborts the request

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        if not formatted:
            return self.stream_complete(self.render_completion(prompt), formatted=True, **kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in self._stream(prompt, **kwargs):
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        if not formatted:
            rendered = self.render_completion(prompt)
            return await self.astream_complete(rendered, formatted=True, **kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for piece in self._astream(prompt, **kwargs):
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(
            self.complete(self.render_chat(messages), formatted=True, **kwargs)
        )

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response = await self.acomplete(self.render_chat(messages), formatted=True, **kwargs)
        return completion_response_to_chat_response(response)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return stream_completion_response_to_chat_response(
            self.stream_complete(self.render_chat(messages), formatted=True, **kwargs)
        )

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        stream = await self.astream_complete(self.render_chat(messages), formatted=True, **kwargs)
        return astream_completion_response_to_chat_response(stream)

    def complete_many(
        self, prompts: Sequence[str], formatted: bool = False, **kwargs: Any
    ) -> list[CompletionResponse]:
        """Complete many prompts at once: vLLM batches what is in flight together, which is
        where its throughput comes from. ``raw`` holds each reply's token count."""
        rendered = [p if formatted else self.render_completion(p) for p in prompts]

        async def together() -> list[CompletionResponse]:
            return list(await asyncio.gather(*(self._generate(p, **kwargs) for p in rendered)))

        return self._run(together())

    def close(self) -> None:  # type: ignore[override]
        """Stop vLLM's engine process and the engine's loop; without it the interpreter
        hangs at exit."""
        _live_engines.pop(id(self), None)
        engine, self._engine = self._engine, None
        if engine is not None:
            self._submit(_cancel_engine_tasks()).result(timeout=30)
            engine.shutdown()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_running():
            self._loop.close()


async def _cancel_engine_tasks() -> None:
    """Stop the tasks that read the engine's outputs before the engine stops, so they do
    not log the engine's shutdown as a crash."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _neutralise(text: str, special_tokens: Sequence[str]) -> str:
    text = quote_as_data(text)
    for token in special_tokens:  # e.g. <s>, [INST]: not of the <|...|> form
        text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


_live_engines: dict[int, weakref.ref[AsyncEngineVllm]] = {}


@atexit.register
def _shutdown_engines() -> None:
    for ref in list(_live_engines.values()):
        engine = ref()
        if engine is not None:
            engine.close()


def build_local(cfg: RagConfig) -> AsyncEngineVllm:
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
        return AsyncEngineVllm(
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
