"""Typed settings: a TOML file, overridden by ``RAG_APP_<SECTION>__<KEY>`` variables and Python.

Precedence, lowest to highest: the code defaults below (the same values as the shipped
``config.toml``), the TOML file, a dotenv-style secrets file (``$RAG_APP_SECRETS_FILE`` or
``--secrets``), environment variables, keyword overrides to :func:`load_config`.
Relative paths written in a TOML file are resolved from that file's directory, so a profile
such as ``configs/cpu-small.toml`` works whatever the working directory is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from rag_app.components.context import DEFAULT_TEMPLATE, check_template
from rag_app.components.globs import glob_problem
from rag_app.errors import RagAppError, first_line, register_secret

log = logging.getLogger(__name__)

ENV_PREFIX = "RAG_APP_"
CONFIG_ENV = "RAG_APP_CONFIG"
SECRETS_ENV = "RAG_APP_SECRETS_FILE"
DEFAULT_CONFIG_NAME = "config.toml"
_SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "grpcs://", "unix:")
# Set in os.environ from the secrets file (where not already set), for huggingface_hub.
_EXPORTED_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_SECRET_KEYS = {"token", "api_key", "api_keys"}  # SecretStr settings: never echoed in errors
# Names whose values are secrets wherever they appear: settings, [llm.env] and
# [llm.engine_kwargs] entries (HF_TOKEN, hf_token), secrets file lines.
_SECRET_NAME = re.compile(r"(TOKEN|KEY|KEYS|PASSWORD|PASSWD|SECRET|CREDENTIALS?)$", re.IGNORECASE)
MAX_TOP_K = 100  # chunks one question may retrieve (retrieval.top_k, --top-k, the API)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MilvusSettings(_Section):
    uri: str = "./data/milvus_rag.db"
    token: SecretStr = SecretStr("")
    collection: str = Field("rag_docs", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    consistency_level: Literal["Strong", "Session", "Bounded", "Eventually"] = "Session"
    # New collections get a BM25 sparse field computed by Milvus from the chunk text, so
    # retrieval.mode can be switched to "hybrid" or "sparse" without re-ingesting.
    bm25: bool = True
    # The dense index, built when a collection is created. FLAT is exact search, right for
    # Milvus Lite and small collections; servers usually want HNSW (or IVF_FLAT, DISKANN).
    index_type: Literal[
        "FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "SCANN", "DISKANN", "AUTOINDEX"
    ] = "FLAT"
    index_params: dict[str, Any] = Field(
        default_factory=dict
    )  # e.g. {M = 16, efConstruction = 200}
    search_params: dict[str, Any] = Field(default_factory=dict)  # e.g. {ef = 64}, {nprobe = 16}
    # Embeddings are unit-normalised, so IP and COSINE rank alike; IP skips a normalisation.
    metric: Literal["IP", "COSINE"] = "IP"
    # Seconds one Milvus call may take before it fails (pymilvus retries within it).
    timeout: float = Field(30.0, gt=0)
    # A collection that rag_app did not create (no rag_app.embedding_model property) is
    # refused; true opens it, and an ingest then records the marker and syncs it like its own.
    adopt_foreign_collection: bool = False

    @model_validator(mode="before")
    @classmethod
    def _token_from_uri(cls, data: Any) -> Any:
        """Credentials in a server uri (``https://user:pass@host``, ``unix://user:pass@/path``)
        become the token unless one is set, as pymilvus would use them;
        ``_uri_without_credentials`` drops them."""
        return _credentials_to_secret(data, "uri", "token")

    @field_validator("uri")
    @classmethod
    def _uri_without_credentials(cls, uri: str) -> str:
        """The uri is shown in messages and logged by pymilvus: no secret may be in it."""
        return split_uri_credentials(uri)[0]

    @property
    def is_lite(self) -> bool:
        """True when ``uri`` names a local Milvus Lite file rather than a server."""
        return not self.uri.startswith(_SERVER_SCHEMES)


class _ServerSection(_Section):
    """A section with a server's ``api_base`` and ``api_key`` (the LLM's, the embedding's)."""

    @model_validator(mode="before")
    @classmethod
    def _key_from_api_base(cls, data: Any) -> Any:
        """Credentials in ``api_base`` (``https://user:key@host/v1``) become ``api_key`` unless
        one is set: the openai client logs its base URL, so none may hold a secret."""
        return _credentials_to_secret(data, "api_base", "api_key")

    @field_validator("api_base", check_fields=False)
    @classmethod
    def _api_base_without_credentials(cls, url: str) -> str:
        return split_uri_credentials(url)[0]


class EmbeddingSettings(_ServerSection):
    model: str = "BAAI/bge-large-en-v1.5"
    query_instruction: str = "Represent this sentence for searching relevant passages: "
    text_instruction: str = ""
    batch_size: int = Field(32, ge=1, le=4096)
    device: str = "auto"
    # bf16 weights run ~2-3x faster on CPUs with AVX-512 BF16 and on GPUs; "int8" is a
    # dynamically int8-quantized ONNX export run by ONNX Runtime, CPU only (exported once,
    # beside the model or in ~/.cache/rag_app/onnx). See docs/configuration.md and
    # scripts/bench_ingest.py for the speed and retrieval-quality figures.
    precision: Literal["fp32", "bf16", "int8"] = "bf16"
    # How fp32/bf16 models embed a question on CPU: "onnx" = the model's fp32 ONNX export
    # (made once beside it, like int8's) in ONNX Runtime, ~3 ms where torch takes ~13-20 ms
    # for one short question here; "torch" = sentence-transformers; "auto" = onnx on CPU
    # when onnxruntime is installed (falling back to torch, with a warning, if the export
    # fails), torch on a GPU. Documents are embedded by `precision` either way.
    query_runtime: Literal["auto", "torch", "onnx"] = "auto"
    # "server": vectors from an OpenAI-compatible /v1/embeddings endpoint (vLLM's pooling
    # runner, Infinity, TEI) at api_base; embedding.model is then the served model name,
    # which is also the identity stored with the collection (its last path part), so a
    # collection embedded in-process can be queried with a server's vectors and vice versa.
    mode: Literal["local", "server"] = "local"
    api_base: str = ""  # e.g. http://127.0.0.1:8001/v1
    api_key: SecretStr = SecretStr("")
    # Server mode: the tokenizer chunks are measured with (a folder or hub id); "" =
    # embedding.model's when that is a folder. Without one, chunks are not checked against
    # the model's input limit (the server truncates what is longer).
    tokenizer: str = ""
    # Server mode: batches of batch_size chunks sent at once (the servers batch them too).
    max_in_flight: int = Field(2, ge=1, le=64)
    request_timeout: float = Field(60.0, gt=0)
    # Server mode: retries (exponential backoff, 0.5 s doubling up to 8 s) of a request
    # that could not connect, timed out or got 408/409/429/5xx: ~50 s of outage at 10.
    max_retries: int = Field(4, ge=0, le=30)
    # Server mode: extra fields of each request, e.g. vLLM's {truncate_prompt_tokens = -1}
    # (truncate a long question to the model's limit, as in-process embedding does).
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _server_needs_api_base(self) -> EmbeddingSettings:
        if self.mode == "server" and not self.api_base.startswith(("http://", "https://")):
            raise ValueError(
                "embedding.mode = 'server' needs embedding.api_base, the server's "
                "http(s)://HOST:PORT/v1 URL"
            )
        return self


class ChunkingSettings(_Section):
    # "sentence": paragraph/sentence/word recursion, sizes in characters (the recipe's);
    # "token": the same recursion, sizes in the embedding model's tokens.
    splitter: Literal["sentence", "token"] = "sentence"
    chunk_size: int = Field(512, ge=32, description="characters, or tokens for 'token'")
    chunk_overlap: int = Field(51, ge=0, description="characters, or tokens for 'token'")
    # The header embedded (and BM25-indexed) before each chunk's text: {title}, {section}
    # (the headings above the chunk, "Install > On Linux"), {source} (the file's path) and
    # {doc_type}. A variable a chunk lacks drops out with its separator; "" = bare chunks.
    # The LLM sees the chunk's text without it. Changing it re-embeds on the next ingest.
    context_template: str = DEFAULT_TEMPLATE

    @field_validator("context_template")
    @classmethod
    def _template_renders(cls, template: str) -> str:
        return check_template(template)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than "
                f"chunk_size ({self.chunk_size})"
            )
        return self


class IngestionSettings(_Section):
    # Larger files are skipped and reported (a 20 MB log is rarely meant as a document).
    max_file_mb: float = Field(10.0, gt=0)
    # Symbolic links to files outside the ingested folder are skipped and listed (a link to
    # /etc/passwd would be stored and served); true reads them.
    follow_symlinks_outside: bool = False
    # Globs over paths relative to the ingested folder ('**/' any folders, '*' and '?' inside
    # one segment, the whole path must match): a file is part of the folder if an include
    # glob matches it (no include globs: every supported file) and no exclude glob does.
    # `rag-app ingest --include/--exclude` append to these. See rag_app/components/globs.py.
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if (problem := glob_problem(pattern)) is not None:
                raise ValueError(f"glob {pattern!r} {problem}")
        return patterns


class RetrievalSettings(_Section):
    top_k: int = Field(3, ge=1, le=MAX_TOP_K)
    # dense: vectors only; sparse: Milvus BM25 full-text only; hybrid: both, fused.
    # hybrid, weighted 0.7 towards dense, measured best on eval/*/dev.jsonl with contextual
    # chunks (scripts/bench_retrieval.py; docs/retrieval.md has the table).
    mode: Literal["dense", "hybrid", "sparse"] = "hybrid"
    fusion: Literal["rrf", "weighted"] = "weighted"
    rrf_k: int = Field(60, ge=1, le=16384)
    dense_weight: float = Field(0.7, ge=0.0, le=1.0, description="weighted fusion only")
    # Chunks fetched before de-duplication and reranking cut them to top_k.
    candidates: int = Field(20, ge=1, le=1000)
    similarity_cutoff: float | None = Field(None, ge=-1.0, le=1.0)
    mmr: bool = False
    mmr_threshold: float = Field(0.5, ge=0.0, le=1.0)
    # Merge retrieved chunks that overlap (neighbours in one document) into one.
    dedupe: bool = True
    # Abstain (answer that the documents do not say, without asking the LLM) when no chunk's
    # cosine similarity to the question reaches this. Model-specific: measure it on your
    # questions (scripts/bench_retrieval.py prints the similarities); unset = never.
    abstain_below: float | None = Field(None, ge=-1.0, le=1.0)
    rerank: Literal["none", "cross-encoder"] = "none"
    rerank_model: str = "BAAI/bge-reranker-base"
    # Longer questions are refused before any model loads (a pasted document is not one).
    max_question_chars: int = Field(4000, ge=1)

    @model_validator(mode="after")
    def _dense_only_options(self) -> RetrievalSettings:
        if self.mode != "dense" and (self.mmr or self.similarity_cutoff is not None):
            raise ValueError(
                "mmr and similarity_cutoff work on cosine scores: use them with mode = 'dense'"
            )
        return self


class LLMSettings(_ServerSection):
    mode: Literal["local", "server"] = "local"
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    # The tokenizer prompts are packed with (a hub id or folder); "" = llm.model's. Set it in
    # server mode when llm.model is a served name (--served-model-name), not the model's id.
    tokenizer: str = ""
    api_base: str = "http://127.0.0.1:8000/v1"
    api_key: SecretStr = SecretStr("")
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    max_model_len: int = Field(8192, ge=128)
    dtype: str = "bfloat16"
    seed: int | None = 415
    request_timeout: float = Field(120.0, gt=0)
    # Server mode: retries (with exponential backoff) of a request that could not connect,
    # timed out or got 429/5xx before any of the answer arrived; a broken stream is not.
    max_retries: int = Field(2, ge=0, le=10)
    engine_kwargs: dict[str, Any] = Field(default_factory=lambda: {"gpu_memory_utilization": 0.85})
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _answer_fits(self) -> LLMSettings:
        if self.max_tokens >= self.max_model_len:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be smaller than "
                f"max_model_len ({self.max_model_len})"
            )
        return self


_KEY_ENTRY = re.compile(r"^(?P<key>[^\s,:]{8,})(?::(?P<collections>[A-Za-z_][A-Za-z0-9_+]*))?$")


class ServerSettings(_Section):
    """``rag-app serve``: where it listens, who may ask, and how much one request may ask.

    ``api_keys`` is read from the environment or the secrets file only
    (``RAG_APP_SERVER__API_KEYS``), never from a config file: comma-separated keys, each
    either alone (every collection) or as ``KEY:collection+collection`` (those only).
    """

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Collections served, one model each in /v1/models; empty = every collection at
    # milvus.uri that was embedded with embedding.model.
    collections: list[str] = Field(default_factory=list)
    api_keys: SecretStr = SecretStr("")
    # Without keys, serve refuses any host but loopback unless this is set.
    allow_remote_without_keys: bool = False
    # Answers generating at once (they reach vLLM together and are batched), and answers
    # waiting for a turn; a request beyond both gets 429.
    max_concurrent: int = Field(32, ge=1, le=4096)
    max_queue: int = Field(64, ge=0)
    max_body_kb: int = Field(256, ge=1)  # larger request bodies get 413
    max_top_k: int = Field(20, ge=1, le=MAX_TOP_K)
    max_messages: int = Field(50, ge=1)  # turns in one chat request
    # Seconds in-flight answers may take to finish after SIGTERM before they are cut.
    shutdown_timeout: float = Field(30.0, gt=0)
    access_log: bool = True

    @field_validator("api_keys")
    @classmethod
    def _keys_well_formed(cls, value: SecretStr) -> SecretStr:
        for entry in _key_entries(value.get_secret_value()):
            if not _KEY_ENTRY.match(entry):
                raise ValueError(
                    "write comma-separated KEY or KEY:collection+collection entries, "
                    "each key at least 8 characters, without spaces, commas or colons"
                )
        return value

    def key_scopes(self) -> dict[str, frozenset[str] | None]:
        """Each API key and the collections it may use (``None``: all)."""
        scopes: dict[str, frozenset[str] | None] = {}
        for entry in _key_entries(self.api_keys.get_secret_value()):
            match = _KEY_ENTRY.match(entry)
            if match is not None:
                names = match["collections"]
                scopes[match["key"]] = frozenset(names.split("+")) if names else None
        return scopes


def _key_entries(text: str) -> list[str]:
    return [entry.strip() for entry in text.split(",") if entry.strip()]


class ClientSettings(_Section):
    """``rag-app query`` / ``chat`` as clients of a running ``rag-app serve``."""

    server_url: str = ""  # e.g. http://127.0.0.1:8080; empty = answer in this process
    api_key: SecretStr = SecretStr("")  # RAG_APP_CLIENT__API_KEY, for a server with keys
    timeout: float = Field(120.0, gt=0)


def split_uri_credentials(uri: str) -> tuple[str, str | None]:
    """A uri without its ``user:password@`` (any ``scheme://``, ``unix://`` too), and those
    credentials (None if none). A local path (a Lite file) is returned as it is."""
    if "://" not in uri:
        return uri, None
    parts = urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return uri, None
    user, _, password = userinfo.partition(":")
    return parts._replace(netloc=host).geturl(), f"{user}:{password}" if password else user


def _credentials_to_secret(data: Any, url_key: str, secret_key: str) -> Any:
    """Settings data with the credentials of its ``url_key`` moved to ``secret_key`` (unless
    that is set already); the url field's validator then drops them from the url."""
    if isinstance(data, dict) and isinstance(data.get(url_key), str):
        credentials = split_uri_credentials(data[url_key])[1]
        secret = data.get(secret_key)
        is_set = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        if credentials is not None:
            register_secret(credentials)
            if not is_set:
                data = {**data, secret_key: SecretStr(credentials)}
    return data


def _register_secrets_in(value: Any, name: str = "") -> None:
    """Register as secrets, before anything is validated or shown: the values of secret
    names (``HF_TOKEN`` in ``[llm.env]``, ``hf_token`` in ``[llm.engine_kwargs]``, a token)
    at any depth, and the credentials in any url."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, dict):
        for key, item in value.items():
            _register_secrets_in(item, str(key))
    elif isinstance(value, list | tuple):
        for item in value:
            _register_secrets_in(item, name)
    elif isinstance(value, str):
        if _SECRET_NAME.search(name):
            register_secret(value)
        credentials = split_uri_credentials(value)[1]
        if credentials is not None:
            register_secret(credentials)
            register_secret(credentials.partition(":")[2])


def _register_env_secrets(environ: dict[str, str]) -> None:
    """Secrets in ``RAG_APP_*`` variables (or secrets file lines), tables given as JSON too."""
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        _register_secrets_in(value, name)
        try:
            table = json.loads(value)
        except ValueError:
            continue
        _register_secrets_in(table, name)


_toml_values: ContextVar[dict[str, Any] | None] = ContextVar("_toml_values", default=None)
_secrets_file: ContextVar[Path | None] = ContextVar("_secrets_file", default=None)


class _TomlValues(PydanticBaseSettingsSource):
    """Feeds the already-parsed TOML file to pydantic-settings at the lowest precedence."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_toml_values.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_values.get() or {})


class RagConfig(BaseSettings):
    """All of rag_app's settings. Build it with :func:`load_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_assignment=True,
    )

    milvus: MilvusSettings = Field(default_factory=lambda: MilvusSettings())
    embedding: EmbeddingSettings = Field(default_factory=lambda: EmbeddingSettings())
    chunking: ChunkingSettings = Field(default_factory=lambda: ChunkingSettings())
    ingestion: IngestionSettings = Field(default_factory=lambda: IngestionSettings())
    retrieval: RetrievalSettings = Field(default_factory=lambda: RetrievalSettings())
    llm: LLMSettings = Field(default_factory=lambda: LLMSettings())
    server: ServerSettings = Field(default_factory=lambda: ServerSettings())
    client: ClientSettings = Field(default_factory=lambda: ClientSettings())
    source: str = Field("", exclude=True, description="the TOML file these settings came from")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        secrets = _secrets_file.get()
        sources = [init_settings, env_settings]
        if secrets is not None:
            # Only RAG_APP_* names of real settings; other lines (HF_TOKEN) are not settings.
            sources.append(
                DotEnvSettingsSource(
                    settings_cls, env_file=secrets, dotenv_filtering="only_existing"
                )
            )
        return (*sources, _TomlValues(settings_cls))


def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "~", "/", ".\\", "..\\"))


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative paths written in a TOML file absolute, from the file's directory."""
    milvus = data.get("milvus")
    if isinstance(milvus, dict) and isinstance(milvus.get("uri"), str):
        uri = milvus["uri"]
        if not uri.startswith(_SERVER_SCHEMES):
            milvus["uri"] = str((base / Path(uri).expanduser()).resolve())
    for section, key in (
        ("embedding", "model"),
        ("embedding", "tokenizer"),
        ("llm", "model"),
        ("llm", "tokenizer"),
    ):
        values = data.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if isinstance(values, dict) and isinstance(value, str) and _looks_like_path(value):
            values[key] = str((base / Path(value).expanduser()).resolve())


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn ``llm__model="x"`` style keywords into ``{"llm": {"model": "x"}}``."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition("__")
        if rest:
            nested.setdefault(head, {})
            if not isinstance(nested[head], dict):
                raise RagAppError(f"override {key!r} conflicts with override {head!r}")
            nested[head].update(_nest({rest: value}))
        elif isinstance(value, dict) and isinstance(nested.get(head), dict):
            nested[head].update(value)
        else:
            nested[head] = value
    return nested


def _config_path(path: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The file to read, and whether the user named it (a named file must exist)."""
    if path is not None:
        return Path(path).expanduser(), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser(), True
    return Path.cwd() / DEFAULT_CONFIG_NAME, False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise RagAppError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise RagAppError(f"cannot read config file {path}: {exc.strerror}") from None


def _lookup(data: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _describe(
    error: Any,
    file: str,
    data: dict[str, Any],
    overrides: dict[str, Any],
    secrets: tuple[Path, set[str]] | None = None,
) -> str:
    """One line naming the key, where its value came from, and what is wrong with it. The
    value is shown only when it is a plain one of a setting that is not a secret (a table
    may hold tokens; registered secrets are masked in any case)."""
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc)
    where = _origin(loc, file, data, overrides, secrets)
    if error["type"] == "extra_forbidden":
        section = error["loc"][0] if len(error["loc"]) > 1 else None
        valid = _valid_keys(str(section)) if section else ", ".join(RagConfig.model_fields)
        return f"unknown setting {key!r} in {where}; valid keys there: {valid}"
    value, name = error.get("input"), str(loc[-1]) if loc else ""
    if isinstance(value, dict | list) or name.lower() in _SECRET_KEYS or _SECRET_NAME.search(name):
        return f"invalid setting {key!r} in {where}: {error['msg']}"
    return f"invalid setting {key!r} in {where}: {error['msg']} (got {value!r})"


def _origin(
    loc: tuple[Any, ...],
    file: str,
    data: dict[str, Any],
    overrides: dict[str, Any],
    secrets: tuple[Path, set[str]] | None,
) -> str:
    """Where the value at ``loc`` came from, the highest-precedence source first: keyword
    overrides, the environment, the secrets file, the TOML file. A value inside a table
    given as JSON comes from the variable holding the table; a rule between two keys of a
    section (``loc`` is the section) names the variables that set keys of it."""
    environment = _env_upper()
    in_secrets = secrets[1] if secrets is not None else set()
    secrets_file = secrets[0] if secrets is not None else ""
    for depth in range(len(loc), 0, -1):
        part = loc[:depth]
        name = ENV_PREFIX + "__".join(str(p) for p in part).upper()
        if _lookup(overrides, part):
            return "the keyword overrides"
        if name in environment:
            return f"environment variable {name}"
        if name in in_secrets:
            return f"secrets file {secrets_file} ({name})"
        if depth == 1 and len(loc) == 1:  # a section-wide rule: any variable of the section
            prefix = name + "__"
            names = sorted(n for n in environment if n.startswith(prefix))
            if names:
                plural = "s" if len(names) > 1 else ""
                return f"environment variable{plural} {', '.join(names)}"
            names = sorted(n for n in in_secrets if n.startswith(prefix))
            if names:
                return f"secrets file {secrets_file} ({', '.join(names)})"
        if _lookup(data, part):
            return file or "the built-in defaults"
    return file if file and _lookup(data, loc[:1]) else "the built-in defaults"


def _is_table(name: str) -> bool:
    """Whether ``RAG_APP_<SECTION>[__<KEY>]`` names a setting given as JSON (a section, or
    a table such as llm.env)."""
    parts = name.upper().removeprefix(ENV_PREFIX).lower().split("__")
    section = RagConfig.model_fields.get(parts[0])
    model = section.annotation if section is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or len(parts) > 2:
        return False
    if len(parts) == 1:
        return True
    field = model.model_fields.get(parts[1])
    origin = getattr(field.annotation, "__origin__", None) if field else None
    return origin in (dict, list)


def _check_json_tables(values: dict[str, str], where: Callable[[str], str]) -> None:
    """A table-valued variable must hold JSON: one line naming it (not its value, which may
    hold a token) instead of pydantic-settings' traceback."""
    for name, value in values.items():
        if not name.upper().startswith(ENV_PREFIX) or not _is_table(name):
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            reason = getattr(exc, "msg", None) or first_line(exc)
            column = getattr(exc, "colno", None)
            at = f" at column {column}" if column else ""
            raise RagAppError(
                f"{where(name)} is not valid JSON ({reason}{at}): write the table "
                f'as JSON, e.g. {name}=\'{{"key": "value"}}\''
            ) from None


def _env_upper() -> set[str]:
    return {name.upper() for name in os.environ}


def _valid_keys(section: str) -> str:
    field = RagConfig.model_fields.get(section)
    annotation = field.annotation if field else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ", ".join(annotation.model_fields)
    return ", ".join(RagConfig.model_fields)


def _read_secrets(path: Path) -> dict[str, str]:
    """The secrets file's ``NAME=value`` lines, checked: a missing or unreadable file, or an
    unknown ``RAG_APP_`` name (a typo would silently leave a token unset), is an error."""
    fix = f"pass --secrets FILE or set {SECRETS_ENV} to a readable file of NAME=value lines"
    if not path.is_file():
        raise RagAppError(f"secrets file not found: {path} ({fix})")
    try:
        with path.open(encoding="utf-8") as fh:
            values = {name: value or "" for name, value in dotenv_values(stream=fh).items()}
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise RagAppError(f"cannot read secrets file {path}: {reason} ({fix})") from None
    sections = ", ".join(name for name in RagConfig.model_fields if name != "source")
    for name, value in values.items():
        if _SECRET_NAME.search(name):
            register_secret(value)
    _register_env_secrets(values)
    _check_json_tables(values, lambda name: f"{name} in secrets file {path}")
    for name in values:
        head = name.upper().removeprefix(ENV_PREFIX).partition("__")[0].lower()
        if name.upper().startswith(ENV_PREFIX) and head not in RagConfig.model_fields:
            raise RagAppError(
                f"unknown setting {name} in secrets file {path}; names there are "
                f"{ENV_PREFIX}<SECTION>__<KEY> (sections: {sections}) "
                f"or {', '.join(_EXPORTED_SECRETS)}"
            )
    return values


def _secrets_path(secrets_file: str | os.PathLike[str] | None) -> Path | None:
    if secrets_file is not None:
        return Path(secrets_file).expanduser()
    if os.environ.get(SECRETS_ENV):
        return Path(os.environ[SECRETS_ENV]).expanduser()
    return None


def _warn_if_exposed(file: Path, data: dict[str, Any]) -> None:
    """A secret written in a config file that every user can read deserves a warning."""
    milvus, llm, client = data.get("milvus"), data.get("llm"), data.get("client")
    held = [
        key
        for key, section, name in (
            ("milvus.token", milvus, "token"),
            ("llm.api_key", llm, "api_key"),
            ("embedding.api_key", data.get("embedding"), "api_key"),
            ("client.api_key", client, "api_key"),
        )
        if isinstance(section, dict) and section.get(name)
    ]
    if held and file.stat().st_mode & 0o004:
        log.warning(
            "config file %s holds %s and is readable by every user: chmod 600 it, or move the "
            "secret to the environment or a secrets file (%s)",
            file, " and ".join(held), SECRETS_ENV,
        )  # fmt: skip


def _refuse_keys_in_file(file: Path, data: dict[str, Any]) -> None:
    """The service's API keys are never read from a config file (files get committed and
    copied); they come from the environment or the secrets file."""
    server = data.get("server")
    if isinstance(server, dict) and server.get("api_keys"):
        raise RagAppError(
            f"server.api_keys is set in config file {file}: remove it, and set "
            f"RAG_APP_SERVER__API_KEYS in the environment or the secrets file ({SECRETS_ENV})"
        )


def _register_secrets(cfg: RagConfig) -> None:
    register_secret(cfg.milvus.token.get_secret_value())
    register_secret(cfg.llm.api_key.get_secret_value())
    register_secret(cfg.embedding.api_key.get_secret_value())
    register_secret(cfg.client.api_key.get_secret_value())
    for key in cfg.server.key_scopes():
        register_secret(key)
    for name in _EXPORTED_SECRETS:
        register_secret(os.environ.get(name, ""))


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    secrets_file: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> RagConfig:
    """Load settings from ``path`` (or ``$RAG_APP_CONFIG``, or ``./config.toml``).

    Keyword overrides take precedence over everything and may be nested dicts
    (``llm={"model": ...}``) or double-underscore keys (``llm__model=...``), mirroring
    the environment variable names. A missing file that was not named explicitly means
    the built-in defaults; a named file that is missing, a syntax error, an unknown key
    or a wrong type raises :class:`RagAppError` with a one-line message.

    ``secrets_file`` (or ``$RAG_APP_SECRETS_FILE``) names a dotenv-style file of
    ``RAG_APP_<SECTION>__<KEY>=value`` lines, between the TOML file and the environment in
    precedence; its ``HF_TOKEN`` is set in ``os.environ`` for huggingface_hub unless the
    environment already has one.
    """
    environment = dict(os.environ)
    _register_env_secrets(environment)  # before anything can be echoed
    _check_json_tables(environment, lambda name: f"environment variable {name}")
    file, named = _config_path(path)
    data: dict[str, Any] = {}
    if file.is_file():
        data = _read_toml(file)
        _register_secrets_in(data)
        _resolve_paths(data, file.resolve().parent)
        _warn_if_exposed(file, data)
        _refuse_keys_in_file(file, data)
    elif named:
        raise RagAppError(f"config file not found: {file} (pass --config FILE or set {CONFIG_ENV})")
    secrets_path = _secrets_path(secrets_file)
    secrets = _read_secrets(secrets_path) if secrets_path is not None else {}
    nested = _nest(overrides)
    _register_secrets_in(nested)
    token = _toml_values.set(data)
    secrets_token = _secrets_file.set(secrets_path)
    try:
        cfg = RagConfig(**nested)
    except ValidationError as exc:
        origin = str(file) if file.is_file() else ""
        names = {name.upper() for name in secrets}
        where = (secrets_path, names) if secrets_path is not None else None
        raise RagAppError(_describe(exc.errors()[0], origin, data, nested, where)) from None
    except SettingsError as exc:  # what _check_json_tables did not foresee
        raise RagAppError(f"cannot read the settings: {first_line(exc)}") from None
    finally:
        _toml_values.reset(token)
        _secrets_file.reset(secrets_token)
    for name in _EXPORTED_SECRETS:
        if secrets.get(name) and name not in os.environ:
            os.environ[name] = secrets[name]
    _register_secrets(cfg)
    cfg.source = str(file.resolve()) if file.is_file() else ""
    return cfg
