"""The model as an ONNX graph run by ONNX Runtime on CPU: dynamically int8-quantized for
``embedding.precision = "int8"``, and in fp32 for the queries of fp32/bf16 models
(``embedding.query_runtime``, :class:`OnnxQueryEncoder`).

Why a module of its own rather than sentence-transformers' ``backend="onnx"``: that backend
loads and exports through Optimum (``optimum-onnx``), whose releases (0.1.0, the newest)
require ``transformers<4.58`` while rag_app pins ``transformers==5.19.0``; ``optimum-intel``
(OpenVINO) likewise caps transformers below 5.6. So the export uses public APIs of the
libraries that do install next to the pinned stack: ``torch.onnx.export`` of the
transformers ``AutoModel`` (fp32), then ``onnxruntime.quantization.quantize_dynamic`` with
the settings of Optimum's ``AutoQuantizationConfig.avx512_vnni(is_static=False)``: int8
symmetric weights per channel, uint8 asymmetric activations quantized per batch at run
time, no reduced range (VNNI's ``VPDPBUSD`` has no overflow to avoid). Pooling and the
query instruction follow the model folder's sentence-transformers files, so the vectors are
those of the same model in fp32, up to quantization error.

Why queries go through ONNX Runtime: one short question through torch's eager MiniLM took
~13-20 ms here (per-operator overhead of ~100 small operators, each a parallel region on
passive OpenMP threads); the same fp32 graph in ONNX Runtime takes ~3 ms. The weights are
the model's own in fp32, so the vectors are those of the fp32 model (the bf16 model's
documents and fp32 queries mix as bf16 and fp32 vectors always do: see bench_ingest).

Where the files live: ``<model folder>/onnx/model_qint8_avx512_vnni.onnx`` (int8) and
``onnx/model.onnx`` (fp32), the names and place sentence-transformers' hub repositories use
for the same exports (a model
downloaded with its ONNX files is used as it comes, and a folder copied to another machine
takes its export along). Where that folder cannot be written (a read-only install, a model
in the Hugging Face cache, which belongs to huggingface_hub), it goes to
``$XDG_CACHE_HOME/rag_app/onnx/<model name>-<hash of its path>/``. It is exported once: a
JSON file beside it records the weights it was made from (size and modification time), and a
changed model is exported again. The file is written under a temporary name and renamed, so
an interrupted export never leaves a half-written model to load.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from rag_app.errors import RagAppError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

INT8_FILE = "model_qint8_avx512_vnni.onnx"  # sentence-transformers' names for these exports
FP32_FILE = "model.onnx"
EXPORT_VERSION = 2  # bump when the export recipe changes: older files are then re-exported
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}
INSTALL_HINT = "pip install onnxruntime==1.32.0 onnx==1.23.2"


def require_backend() -> None:
    """One line naming the package to install when ONNX Runtime or onnx is missing."""
    for package in ("onnxruntime", "onnx"):
        try:
            __import__(package)
        except ImportError:
            raise RagAppError(
                f'embedding.precision = "int8" needs the {package} package, which is not '
                f"installed: run `.venv/bin/{INSTALL_HINT}` (or set embedding.precision "
                '= "bf16")'
            ) from None


def _weights_file(model_dir: Path) -> Path:
    for name in _WEIGHTS:
        if (model_dir / name).is_file():
            return model_dir / name
    raise RagAppError(
        f"no model weights ({' or '.join(_WEIGHTS)}) in {model_dir} to export to int8 "
        '(int8 needs a sentence-transformers model folder; or set embedding.precision = "bf16")'
    )


def _source_stamp(model_dir: Path, quantized: bool = True) -> dict[str, Any]:
    """What the export was made from: a model replaced in place is exported again."""
    weights = _weights_file(model_dir)
    stat = weights.stat()
    return {
        "export_version": EXPORT_VERSION,
        "weights": weights.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "quantization": (
            "dynamic int8, avx512_vnni (per-channel symmetric int8 weights)"
            if quantized
            else "none (fp32)"
        ),
    }


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (tried, not guessed from permissions)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            return True
    except OSError:
        return False


def cache_dir() -> Path:
    """rag_app's own cache, beside ``engine.log``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rag_app"


def onnx_model_path(model_dir: Path, quantized: bool = True) -> Path:
    """Where the int8 (or fp32) export of ``model_dir`` is, or will be written (see the
    module doc)."""
    name = INT8_FILE if quantized else FP32_FILE
    model_dir = model_dir.resolve()
    beside = model_dir / "onnx" / name
    if beside.is_file() or _writable(beside.parent):
        return beside
    key = hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]
    return cache_dir() / "onnx" / f"{model_dir.name}-{key}" / name


def _stamp_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".json")


def is_current(onnx_path: Path, model_dir: Path, quantized: bool = True) -> bool:
    """An export that can be used: present, and made from these weights by this recipe.

    A file without rag_app's stamp beside it came with the model (sentence-transformers'
    hub repositories ship this export) and is used as it is.
    """
    if not onnx_path.is_file():
        return False
    stamp = _stamp_path(onnx_path)
    if not stamp.is_file():
        return True
    try:
        return bool(json.loads(stamp.read_text()) == _source_stamp(model_dir, quantized))
    except (OSError, ValueError):
        return False


def ensure_onnx_model(model_dir: Path, quantized: bool = True) -> Path:
    """The int8 (or fp32) ONNX file of ``model_dir``, exported first if there is none (or a
    stale one)."""
    target = onnx_model_path(model_dir, quantized)
    if not is_current(target, model_dir, quantized):
        export_onnx(model_dir, target, quantized)
    return target


def export_onnx(model_dir: Path, target: Path, quantized: bool = True) -> None:
    """Export ``model_dir``'s transformer to ONNX (fp32) and, unless ``quantized`` is false,
    quantize it dynamically to int8.

    Both files are made in a temporary folder beside ``target`` and the result is renamed
    into place: a reader sees the old file, or none, or the whole new one.
    """
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    stamp = _source_stamp(model_dir, quantized)
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = "int8" if quantized else "fp32"
    # int8 takes a while and changes the vectors: said; the fp32 query graph (~2 s) is not.
    log.log(
        logging.WARNING if quantized else logging.INFO,
        "exporting %s to %s ONNX at %s (once)",
        model_dir,
        kind,
        target,
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as work:
        fp32, int8 = Path(work) / "model.onnx", Path(work) / INT8_FILE
        # Eager attention traces to the plain MatMul/Softmax graph that ONNX Runtime fuses
        # and quantizes well (SDPA's mask code traces to a slower graph: ~1.4x here).
        model = AutoModel.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        sample = tokenizer(
            ["an example", "a longer example sentence"], padding=True, return_tensors="pt"
        )
        names = [name for name in _INPUTS if name in sample]

        class _LastHiddenState(torch.nn.Module):
            """The transformer with positional inputs and its token embeddings as output."""

            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
                return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state  # type: ignore[no-any-return]

        axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer's warnings (shape-dependent branches) say nothing to a user.
            warnings.simplefilter("ignore")
            # The TorchScript exporter: the dynamo one needs onnxscript, not in the stack.
            torch.onnx.export(
                _LastHiddenState(),
                tuple(sample[name] for name in names),
                str(fp32),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        if not quantized:
            os.replace(fp32, target)
            _write_atomically(_stamp_path(target), json.dumps(stamp, indent=2) + "\n")
            return
        quantize_dynamic(
            str(fp32),
            str(int8),
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        os.replace(int8, target)
    _write_atomically(_stamp_path(target), json.dumps(stamp, indent=2) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


class OnnxSentenceModel:
    """A sentence-transformers model folder run through ONNX Runtime: tokenize, the int8
    transformer, pooling as the folder's ``Pooling`` module says.

    It exposes what rag_app reads of a ``SentenceTransformer`` (``tokenizer``,
    ``max_seq_length``, ``get_embedding_dimension``) so chunking counts the same tokens.
    """

    def __init__(self, model_dir: Path, onnx_path: Path) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        modules = _read_json(model_dir / "modules.json") or [
            {"type": "sentence_transformers.models.Transformer", "path": ""},
            {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"},
        ]
        kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
        unsupported = set(kinds) - _SUPPORTED_MODULES
        if unsupported or kinds.get("Transformer", "") != "":
            raise RagAppError(
                f"int8 runs Transformer + Pooling models; {model_dir.name} also has "
                f"{', '.join(sorted(unsupported)) or 'a transformer in a subfolder'} "
                '(set embedding.precision = "bf16")'
            )
        pooling = _read_json(model_dir / kinds.get("Pooling", "1_Pooling") / "config.json") or {}
        if pooling.get("pooling_mode_cls_token"):
            self.pooling = "cls"
        elif pooling.get("pooling_mode_mean_tokens", True):
            self.pooling = "mean"
        else:
            raise RagAppError(
                f"int8 supports mean or CLS pooling; {model_dir.name} pools otherwise "
                '(set embedding.precision = "bf16")'
            )
        st_config = _read_json(model_dir / "sentence_bert_config.json") or {}
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        self.do_lower_case = bool(st_config.get("do_lower_case", False))
        self.max_seq_length = int(
            st_config.get("max_seq_length") or min(self.tokenizer.model_max_length, 512)
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._dimension = int(self.session.get_outputs()[0].shape[-1])

    def get_embedding_dimension(self) -> int:
        return self._dimension

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Unit-norm float32 vectors, in ``texts`` order; batches of similar lengths."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            out[batch] = self._forward([texts[i] for i in batch])
        return out

    def _forward(self, texts: list[str]) -> np.ndarray:
        if self.do_lower_case:
            texts = [text.lower() for text in texts]
        encoded = self.tokenizer(
            [text.strip() for text in texts],
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="np",
        )
        feeds = {name: np.asarray(encoded[name], dtype=np.int64) for name in self.input_names}
        if "token_type_ids" in self.input_names and "token_type_ids" not in encoded:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        hidden = self.session.run(None, feeds)[0].astype(np.float32)
        if self.pooling == "cls":
            vectors = hidden[:, 0]
        else:
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            vectors = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0)  # type: ignore[no-any-return]


class OnnxInt8Embedding(BaseEmbedding):
    """A LlamaIndex embedding over :class:`OnnxSentenceModel`: unit-norm float32 vectors,
    the query instruction on queries only, as :class:`UnitNormEmbedding` does in fp32/bf16."""

    query_instruction: str = Field(default="", description="Prepended to queries.")
    text_instruction: str = Field(default="", description="Prepended to texts.")
    onnx_path: str = Field(description="The int8 ONNX file in use.")
    _model: OnnxSentenceModel = PrivateAttr()

    def __init__(self, model_dir: Path, **kwargs: Any) -> None:
        require_backend()
        try:
            onnx_path = ensure_onnx_model(model_dir, quantized=True)
            model = OnnxSentenceModel(model_dir, onnx_path)
        except (OSError, RuntimeError, ValueError) as exc:
            raise RagAppError(
                f"cannot prepare the int8 model of {model_dir}: {first_line(exc)} "
                '(set embedding.precision = "bf16")'
            ) from None
        super().__init__(model_name=str(model_dir), onnx_path=str(onnx_path), **kwargs)
        self._model = model

    @classmethod
    def class_name(cls) -> str:
        return "OnnxInt8Embedding"

    def _embed(self, texts: list[str], instruction: str) -> list[list[float]]:
        prefixed = [instruction + text for text in texts] if instruction else texts
        return self._model.encode(prefixed, self.embed_batch_size).tolist()  # type: ignore[no-any-return]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query], self.query_instruction)[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text], self.text_instruction)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts, self.text_instruction)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


class OnnxQueryEncoder:
    """Queries of an fp32/bf16 model through the model's fp32 ONNX export (see the module
    doc for why), made and loaded at the first query, not when the model is built: an
    ingest embeds no query and never pays for it.

    ``required`` is ``embedding.query_runtime = "onnx"``: a failure to export or load is
    then an error; under ``"auto"`` it is logged once and :meth:`embed` returns ``None``,
    so the caller embeds the query with torch.
    """

    def __init__(self, model_dir: Path, instruction: str, required: bool) -> None:
        self.model_dir = model_dir
        self.instruction = instruction
        self.required = required
        self._model: OnnxSentenceModel | None = None
        self._failed = False
        self._lock = threading.Lock()

    def _load(self) -> OnnxSentenceModel | None:
        if self._model is not None or self._failed:
            return self._model  # every question after the first: no lock on the hot path
        with self._lock:
            if self._model is None and not self._failed:
                try:
                    require_backend()
                    path = ensure_onnx_model(self.model_dir, quantized=False)
                    self._model = OnnxSentenceModel(self.model_dir, path)
                except (RagAppError, OSError, RuntimeError, ValueError) as exc:
                    if self.required:
                        raise RagAppError(
                            f"cannot prepare the ONNX query model of {self.model_dir}: "
                            f'{first_line(exc)} (set embedding.query_runtime = "torch")'
                        ) from None
                    self._failed = True
                    log.warning(
                        "queries are embedded with torch: no ONNX query model (%s)",
                        first_line(exc),
                    )
            return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def embed(self, query: str) -> list[float] | None:
        """The query's unit vector, or ``None`` where the ONNX model is not to be had."""
        model = self._load()
        if model is None:
            return None
        return model.encode([self.instruction + query], batch_size=1)[0].tolist()  # type: ignore[no-any-return]
