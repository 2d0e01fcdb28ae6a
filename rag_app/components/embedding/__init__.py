"""The embedding model: a LlamaIndex ``HuggingFaceEmbedding`` over sentence-transformers
(fp32, bf16), or for ``precision = "int8"`` an int8 ONNX graph run by ONNX Runtime on CPU
(:mod:`rag_app.components.embedding.onnx`).

Each vector is normalised by its own norm, in float32 whatever the model's precision, so
inner product equals cosine similarity; the query instruction (BGE's retrieval prefix)
goes on queries only. The model itself (torch, sentence-transformers) is imported only
when one is built: deciding that nothing needs embedding must not pay for it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_app.config import RagConfig
from rag_app.errors import RagAppError, first_line

if TYPE_CHECKING:
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from rag_app.components.embedding.server import ServerEmbedding


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.path.isabs(model)


def model_identity(model: str) -> str:
    """The name stored with a collection: a hub id and a local copy of it compare equal."""
    return Path(model.rstrip("/")).name


def build_embed_model(cfg: RagConfig) -> BaseEmbedding:
    """Load the configured sentence-transformers model (a hub id or a local folder), or, in
    server mode, a client of the embedding server (no torch is imported then)."""
    settings = cfg.embedding
    if settings.mode == "server":
        return build_server_embedding(cfg)
    if _looks_like_path(settings.model) and not (Path(settings.model) / "config.json").is_file():
        raise RagAppError(
            f"embedding model folder not found: {settings.model} "
            "(run `.venv/bin/python scripts/fetch_models.py`, or set embedding.model)"
        )
    if settings.precision == "int8":
        return _build_int8(cfg)
    torch = import_torch()
    query_encoder = _query_encoder_settings(cfg)

    from rag_app.components.embedding.huggingface import UnitNormEmbedding

    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    try:
        model = UnitNormEmbedding(
            model_name=settings.model,
            # "" is kept as "": no instruction (see UnitNormEmbedding._embed), where None
            # would let HuggingFaceEmbedding put BGE's default back for BGE model ids.
            query_instruction=settings.query_instruction,
            text_instruction=settings.text_instruction,
            normalize=True,
            embed_batch_size=settings.batch_size,
            device=None if settings.device == "auto" else settings.device,
            model_kwargs={"dtype": dtype},
        )
    except OSError as exc:
        reason = first_line(exc)
        raise RagAppError(
            f"cannot load embedding model {settings.model!r}: {reason} "
            "(download it first, e.g. `hf download MODEL`, or point embedding.model "
            "at a local folder)"
        ) from None
    if query_encoder is not None:
        from rag_app.components.embedding.onnx import OnnxQueryEncoder

        model.use_query_encoder(OnnxQueryEncoder, **query_encoder)
    return model


def _query_encoder_settings(cfg: RagConfig) -> dict[str, Any] | None:
    """Whether queries go through the fp32 ONNX export (``embedding.query_runtime``; see
    :mod:`rag_app.components.embedding.onnx`), decided before the model loads: the
    arguments of its ``OnnxQueryEncoder``, or ``None`` for torch. Nothing is exported here."""
    settings = cfg.embedding
    if settings.query_runtime == "torch":
        return None
    required = settings.query_runtime == "onnx"
    if int8_device_refusal(settings.device, _gpu_present) is not None:
        if not required:
            return None
        raise RagAppError(
            'embedding.query_runtime = "onnx" runs on CPU only, but embedding.device = '
            f"{settings.device!r} (a GPU): set embedding.query_runtime = "
            '"auto" or "torch"'
        )
    if required:
        from rag_app.components.embedding.onnx import require_backend

        require_backend()
    elif importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        model_dir = _local_model_dir(settings.model)
    except RagAppError:
        if required:
            raise
        return None  # a hub id not downloaded yet: sentence-transformers fetches it
    return {"model_dir": model_dir, "required": required}


def import_torch() -> Any:
    """``import torch``, its OpenMP threads waiting passively unless ``OMP_WAIT_POLICY`` says
    otherwise (set for this process only: vLLM's engine processes keep their own policy).

    OpenMP's default spin-waiting threads fight Milvus Lite's threads in the same process for
    the cores: measured on 2 cores over the Milvus docs, a dense retrieve took 116 ms (p50)
    with spinning threads and 29 ms with passive ones, hybrid 118 and 56 ms; batch embedding
    lost 3-7% of its chunks/s. The policy is read once, when torch loads OpenMP.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        import torch

        return torch
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)
    return torch


def int8_device_refusal(device: str, gpu_present: Callable[[], bool]) -> str | None:
    """Why int8 cannot run on ``device``, or ``None``: its ONNX graph is quantized for CPU
    vector units (VNNI), and on a GPU bf16 is the faster choice anyway."""
    if device == "cpu" or (device == "auto" and not gpu_present()):
        return None
    where = (
        'a GPU is present and embedding.device = "auto"'
        if device == "auto"
        else (f"embedding.device = {device!r}")
    )
    return (
        f'embedding.precision = "int8" runs on CPU only, but {where}: set embedding.precision '
        '= "bf16" for the GPU, or embedding.device = "cpu"'
    )


def _gpu_present() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _local_model_dir(model: str) -> Path:
    """The folder of ``model``: itself, or its copy in the Hugging Face cache (no download:
    an int8 export is made from files already here)."""
    if _looks_like_path(model) or Path(model).is_dir():
        return Path(model).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # huggingface_hub's not-cached errors have no common base
        raise RagAppError(
            f"cannot find embedding model {model!r} locally for int8: {first_line(exc)} "
            "(download it first, e.g. `hf download MODEL`, or point embedding.model "
            "at a local folder)"
        ) from None


def _build_int8(cfg: RagConfig) -> BaseEmbedding:
    """The int8 ONNX model (see :mod:`rag_app.components.embedding.onnx`)."""
    settings = cfg.embedding
    refusal = int8_device_refusal(settings.device, _gpu_present)
    if refusal:
        raise RagAppError(refusal)
    from rag_app.components.embedding.onnx import OnnxInt8Embedding, require_backend

    require_backend()
    return OnnxInt8Embedding(
        _local_model_dir(settings.model),
        # As given, as for fp32/bf16: "" is no instruction.
        query_instruction=settings.query_instruction,
        text_instruction=settings.text_instruction,
        embed_batch_size=settings.batch_size,
    )


def build_server_embedding(cfg: RagConfig) -> ServerEmbedding:
    """A client of the OpenAI-compatible embedding server at ``embedding.api_base``.

    The model name sent is ``embedding.model``; a local folder's name is sent instead of
    its path (start the server with ``--served-model-name`` that name), which is also the
    identity stored with the collection, so in-process and server vectors mix. Chunks are
    measured with ``embedding.tokenizer``, else with the folder's tokenizer.
    """
    from rag_app.components.embedding.server import ServerEmbedding

    settings = cfg.embedding
    local = _looks_like_path(settings.model) or Path(settings.model).expanduser().is_dir()
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", settings.model) is not None
    tokenizer = settings.tokenizer or (settings.model if local or hub_id else "")
    return ServerEmbedding(
        model_name=model_identity(settings.model) if local else settings.model,
        api_base=settings.api_base,
        api_key=settings.api_key.get_secret_value(),
        embed_batch_size=settings.batch_size,
        max_in_flight=settings.max_in_flight,
        retries=settings.max_retries,
        timeout=settings.request_timeout,
        query_instruction=settings.query_instruction or None,
        text_instruction=settings.text_instruction or None,
        extra_body=settings.extra_body,
        tokenizer_name=tokenizer,
    )


def embedding_dimension(embed_model: BaseEmbedding) -> int:
    """The vector size the model produces, which the collection's schema must match."""
    probe = getattr(embed_model, "dimension", None)
    if callable(probe):  # a server's model: one request, remembered
        return int(probe())
    model = getattr(embed_model, "_model", None)
    getter = getattr(model, "get_embedding_dimension", None) or getattr(
        model, "get_sentence_embedding_dimension", None
    )
    dim = getter() if getter else None
    return int(dim) if dim else len(embed_model.get_text_embedding("dimension probe"))


def token_counter(embed_model: BaseEmbedding) -> tuple[Callable[[str], int], int] | None:
    """A function counting the model's tokens in a text, and the most the model reads.

    ``None`` for models that do not expose a tokenizer; text beyond the limit would be
    silently truncated by the model, so chunking uses this to split such chunks further.
    A server's model counts with its tokenizer loaded here, if one is known.
    """
    own = getattr(embed_model, "token_counter", None)
    if callable(own):
        return own()  # type: ignore[no-any-return]
    model = getattr(embed_model, "_model", None)
    tokenizer = getattr(model, "tokenizer", None)
    limit = getattr(model, "max_seq_length", None)
    if tokenizer is None or not limit:
        return None

    def count(text: str) -> int:
        return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])

    return count, int(limit)
