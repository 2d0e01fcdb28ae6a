"""vLLM in-process (``llm.mode = "local"``), as a LlamaIndex ``CustomLLM`` on vLLM's public
async engine (``vllm.AsyncLLMEngine``).

The async engine lets tokens stream, keeps ``acomplete``/``aquery`` truly asynchronous, and
batches concurrent requests. LlamaIndex's own ``Vllm`` class is not used: it drives vLLM's
blocking ``LLM``, formats chat as generic ``"user: ..."`` text instead of the model's chat
template, and never shuts its engine down. Only public names of both libraries are used
here, so upgrades break loudly rather than silently.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import os
import queue
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from pydantic import Field, PrivateAttr

from rag_app.config import RagConfig
from rag_app.errors import RagAppError, first_line
from rag_app.prompts import quote_as_data

T = TypeVar("T")
_DONE = object()  # end of a token stream


class AsyncEngineVllm(CustomLLM):
    """A vLLM engine in this process, rendering every prompt with the model's chat template.

    The engine runs on an event loop of its own, in a background thread, so it serves
    callers on any thread or event loop: ``complete`` and ``stream_complete`` block only
    their caller, ``acomplete`` and ``astream_complete`` await without blocking the
    caller's loop, and whatever is in flight at once is batched. A stream abandoned
    half-way, or a wait interrupted (Ctrl-C, a cancelled task), aborts its request.

    ``complete(text)`` sends ``text`` as one user turn; ``chat(messages)`` renders the
    messages (system, user, assistant) with the template and a generation prompt. The
    rendered text is what ``LLMCompletionStartEvent`` reports and what is tokenised,
    without a second BOS token. ``close()`` stops the engine.
    """

    model: str = Field(description="Model folder or Hugging Face id.")
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = Field(default=512, description="Most tokens in one answer.")
    seed: int | None = None
    repetition_penalty: float = 1.0
    context_window: int = Field(default=4096, description="The engine's max_model_len.")
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    download_dir: str | None = None
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More vllm.AsyncEngineArgs, e.g. max_num_seqs."
    )
    _engine: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _loop: asyncio.AbstractEventLoop = PrivateAttr()
    _thread: threading.Thread = PrivateAttr()
    _processes: list[Any] = PrivateAttr(default_factory=list)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        _live_engines[id(self)] = weakref.ref(self)
        try:
            self._run(self._start_engine())
        except BaseException:
            self.close()
            raise
        if not getattr(self._tokenizer, "chat_template", None):
            self.close()
            raise RagAppError(
                f"model {self.model!r} has no chat template; use an instruct/chat model"
            )
        # For LlamaIndex code that formats prompts itself (CustomLLM.chat among it).
        self.messages_to_prompt = self.render_chat
        self.completion_to_prompt = self.render_completion

    async def _start_engine(self) -> None:
        """Built on the engine's loop: its client binds to the loop it is created on.

        No local variable holds the engine: vLLM's first import keeps the importing frames
        alive, and the engine must be collectable once ``close()`` drops it.
        """
        import psutil
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        before = {child.pid for child in psutil.Process().children(recursive=True)}
        args = AsyncEngineArgs(
            **{
                "model": self.model,
                "max_model_len": self.context_window,
                "tensor_parallel_size": self.tensor_parallel_size,
                "trust_remote_code": self.trust_remote_code,
                "dtype": self.dtype,
                "download_dir": self.download_dir,
                "disable_log_stats": True,
                **self.engine_kwargs,
            }
        )
        self._engine = AsyncLLMEngine.from_engine_args(args)
        self._processes = [  # the engine core and its workers, waited for in close()
            child
            for child in psutil.Process().children(recursive=True)
            if child.pid not in before and not _is_resource_tracker(child)
        ]
        tokenizer = self._engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # a coroutine in vLLM's V0 engine
            tokenizer = await tokenizer
        self._tokenizer = tokenizer

    @classmethod
    def class_name(cls) -> str:
        return "AsyncEngineVllm"

    def __repr__(self) -> str:  # the default recurses through the bound prompt renderers
        return f"AsyncEngineVllm(model={self.model!r}, context_window={self.context_window})"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            model_name=self.model,
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
        )

    @property
    def engine(self) -> Any:
        """The running ``vllm.AsyncLLMEngine`` (e.g. for ``get_num_unfinished_requests``)."""
        if self._engine is None:
            raise RagAppError("the vLLM engine is closed (build a new LLM)")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer, as the engine loaded it."""
        return self._tokenizer

    # -- prompts --------------------------------------------------------------------------

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

    def render_completion(self, prompt: str) -> str:
        """``prompt`` as one user turn of the chat template."""
        return self.render_chat([ChatMessage(role="user", content=prompt)])

    def token_ids(self, rendered: str) -> list[int]:
        """Token ids for a rendered prompt; the template already holds any special tokens."""
        return list(self._tokenizer.encode(rendered, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` takes in a prompt (for packing excerpts into the window)."""
        return len(self.token_ids(text))

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
        """One request; each new piece of text goes to ``sink`` as it is decoded.

        Outputs are cumulative (vLLM's default), so the new piece is what extends the text
        already seen. A request that does not finish (cancelled, failed) is aborted.
        """
        from vllm import SamplingParams, TokensPrompt

        engine = self.engine
        params = SamplingParams(
            **{
                "temperature": self.temperature,
                "top_p": self.top_p,
                "max_tokens": self.max_new_tokens,
                "seed": self.seed,
                "repetition_penalty": self.repetition_penalty,
                **kwargs,
            }
        )
        request_id, text, tokens, finished = uuid.uuid4().hex, "", 0, False
        request = TokensPrompt(prompt_token_ids=self.token_ids(prompt))
        try:
            async for output in engine.generate(request, params, request_id):
                completion, finished = output.outputs[0], output.finished
                tokens = len(completion.token_ids)
                if piece := completion.text[len(text) :]:
                    text = completion.text
                    if sink is not None:
                        sink(piece)
        finally:
            if not finished:
                await engine.abort(request_id)
        return CompletionResponse(text=text, raw={"completion_tokens": tokens})

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

    # -- LlamaIndex's LLM interface (chat and stream_chat: CustomLLM's, via render_chat) --

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
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response = await self.acomplete(self.render_chat(messages), formatted=True, **kwargs)
        return completion_response_to_chat_response(response)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        stream = await self.astream_complete(self.render_chat(messages), formatted=True, **kwargs)
        return astream_completion_response_to_chat_response(stream)

    def close(self) -> None:
        """Stop vLLM's engine process and the engine's loop; without it the interpreter
        hangs at exit."""
        _live_engines.pop(id(self), None)
        engine, self._engine = self._engine, None
        if engine is not None:
            self._submit(_cancel_engine_tasks()).result(timeout=30)
            engine.shutdown()
        _reap(self._processes)
        self._processes = []
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_running():
            self._loop.close()


def _is_resource_tracker(process: Any) -> bool:
    """multiprocessing's resource tracker: it exits after this process, not before."""
    import psutil

    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return True


def _reap(processes: Sequence[Any], timeout: float = 20) -> None:
    """Wait for the engine's processes to exit; stop the ones that do not.

    ``shutdown()`` asks vLLM's engine core to stop and returns: its worker processes may
    outlive this process (and a service's SIGTERM) unless waited for.
    """
    import psutil

    _, alive = psutil.wait_procs(list(processes), timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


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
            # llm.tokenizer: the engine tokenises (and packing counts) with it, not the model's.
            engine_kwargs={
                **({"tokenizer": settings.tokenizer} if settings.tokenizer else {}),
                **settings.engine_kwargs,
            },
        )
    except (OSError, ValueError, RuntimeError, TypeError) as exc:  # TypeError: a bad kwarg
        reason = first_line(exc)
        raise RagAppError(
            f"cannot start vLLM on {model!r}: {reason} (check llm.model, llm.engine_kwargs, "
            "or use llm.mode = 'server')"
        ) from None
