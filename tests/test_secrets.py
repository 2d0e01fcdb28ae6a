"""Secrets: Milvus tokens, API keys and Hugging Face tokens come from the environment or a
secrets file, and never show in output, logs, errors or what is stored in Milvus."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROFILE

from rag_app import RagAppError, load_config
from rag_app.errors import redact, redact_uri

# Distinctive fake secrets: from the secrets file, and from the environment.
FILE_SECRETS = {
    "RAG_APP_MILVUS__TOKEN": "root:milvus-FILE-7c1d93",
    "RAG_APP_LLM__API_KEY": "sk-FILE-llmkey-5e02b1",
    "HF_TOKEN": "hf_FILEtoken4a8f2c",
}
ENV_SECRETS = {
    "RAG_APP_MILVUS__TOKEN": "root:milvus-ENV-31b7e0",
    "RAG_APP_LLM__API_KEY": "sk-ENV-llmkey-9d44c6",
    "HF_TOKEN": "hf_ENVtoken0b3e91",
}
URI_PASSWORD = "uripass-URI-62fa0c"
ALL_SECRETS = [*FILE_SECRETS.values(), *ENV_SECRETS.values(), URI_PASSWORD]
# The CLI with every logger at DEBUG (main() keeps an already configured root logger).
DEBUG_MAIN = (
    "import logging, sys; logging.basicConfig(level=logging.DEBUG); "
    "from rag_app.cli import main; sys.exit(main(sys.argv[1:]))"
)


def secrets_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("# secrets for rag_app\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return path


def assert_no_secret(text: str, where: str) -> None:
    leaked = [secret for secret in ALL_SECRETS if secret in text]
    assert not leaked, f"{leaked} found in {where}"


@pytest.fixture
def no_hf_token(monkeypatch):
    """No HF_TOKEN in the environment, and whatever a test sets there undone after it."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAG_APP_SECRETS_FILE"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    for name in ("RAG_APP_MILVUS__TOKEN", "RAG_APP_LLM__API_KEY", "RAG_APP_MILVUS__URI"):
        monkeypatch.delenv(name, raising=False)


def test_the_secrets_file_is_read_below_the_environment_and_above_the_toml_file(
    tmp_path, monkeypatch, no_hf_token
):
    from huggingface_hub import get_token

    toml = tmp_path / "c.toml"
    toml.write_text("[milvus]\ntoken = 'from-toml'\n[llm]\napi_key = 'from-toml'\n")
    toml.chmod(0o600)
    secrets = secrets_file(tmp_path / "secrets.env", FILE_SECRETS)

    cfg = load_config(toml, secrets_file=secrets)
    assert cfg.milvus.token.get_secret_value() == FILE_SECRETS["RAG_APP_MILVUS__TOKEN"]
    assert cfg.llm.api_key.get_secret_value() == FILE_SECRETS["RAG_APP_LLM__API_KEY"]
    assert os.environ["HF_TOKEN"] == FILE_SECRETS["HF_TOKEN"]
    assert get_token() == FILE_SECRETS["HF_TOKEN"]  # what gated downloads will send
    assert_no_secret(repr(cfg) + cfg.model_dump_json() + str(cfg.model_dump()), "the settings")

    # $RAG_APP_SECRETS_FILE names it too; the environment beats it, keywords beat both.
    monkeypatch.setenv("RAG_APP_SECRETS_FILE", str(secrets))
    monkeypatch.setenv("RAG_APP_MILVUS__TOKEN", ENV_SECRETS["RAG_APP_MILVUS__TOKEN"])
    monkeypatch.setenv("HF_TOKEN", ENV_SECRETS["HF_TOKEN"])
    cfg = load_config(toml)
    assert cfg.milvus.token.get_secret_value() == ENV_SECRETS["RAG_APP_MILVUS__TOKEN"]
    assert cfg.llm.api_key.get_secret_value() == FILE_SECRETS["RAG_APP_LLM__API_KEY"]
    assert os.environ["HF_TOKEN"] == ENV_SECRETS["HF_TOKEN"]  # not replaced by the file's
    assert load_config(toml, llm__api_key="kw").llm.api_key.get_secret_value() == "kw"
    monkeypatch.delenv("RAG_APP_SECRETS_FILE")
    assert load_config(toml).llm.api_key.get_secret_value() == "from-toml"


def test_a_missing_or_bad_secrets_file_is_a_one_line_error(tmp_path, monkeypatch, no_hf_token):
    missing = tmp_path / "nope.env"
    with pytest.raises(RagAppError, match=r"secrets file not found: .*nope\.env .*--secrets"):
        load_config(PROFILE, secrets_file=missing)
    monkeypatch.setenv("RAG_APP_SECRETS_FILE", str(missing))
    with pytest.raises(RagAppError, match=r"nope\.env .*RAG_APP_SECRETS_FILE"):
        load_config(PROFILE)
    monkeypatch.delenv("RAG_APP_SECRETS_FILE")

    binary = tmp_path / "binary.env"
    binary.write_bytes(b"RAG_APP_LLM__API_KEY=\xff\xfe\n")
    with pytest.raises(RagAppError, match=r"cannot read secrets file .*binary\.env"):
        load_config(PROFILE, secrets_file=binary)
    with pytest.raises(RagAppError, match=r"secrets file not found: .*"):
        load_config(PROFILE, secrets_file=tmp_path)  # a folder

    # A misspelt name would leave the token silently unset: refused, value not echoed.
    for line, expected in (
        ("RAG_APP_MILVUS_TOKEN=typo-secret-1", "unknown setting RAG_APP_MILVUS_TOKEN"),
        ("RAG_APP_MILVUS__TOKN=typo-secret-1", "unknown setting 'milvus.tokn' in secrets file"),
    ):
        (tmp_path / "typo.env").write_text(line + "\n")
        with pytest.raises(RagAppError) as error:
            load_config(PROFILE, secrets_file=tmp_path / "typo.env")
        message = str(error.value)
        assert expected in message and "typo.env" in message
        assert "typo-secret-1" not in message and "\n" not in message

    done = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "collections", "--config", str(PROFILE),
         "--secrets", str(missing)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"rag-app: error: secrets file not found: {missing} (pass --secrets FILE or set "
        "RAG_APP_SECRETS_FILE to a readable file of NAME=value lines)"
    ]


def test_credentials_in_a_milvus_uri_become_the_token_and_are_never_shown(no_hf_token):
    uri = f"https://bob:{URI_PASSWORD}@milvus.example:19530/team_db"
    cfg = load_config(PROFILE, milvus__uri=uri)
    assert cfg.milvus.uri == "https://milvus.example:19530/team_db"
    assert cfg.milvus.token.get_secret_value() == f"bob:{URI_PASSWORD}"
    assert not cfg.milvus.is_lite
    # An explicit token wins, as in pymilvus; the uri loses its credentials all the same.
    cfg = load_config(PROFILE, milvus={"uri": uri, "token": "explicit"})
    assert (cfg.milvus.uri, cfg.milvus.token.get_secret_value()) == (
        "https://milvus.example:19530/team_db",
        "explicit",
    )
    cfg.milvus.token = ""
    cfg.milvus.uri = uri  # assignment is validated the same way
    assert cfg.milvus.uri == "https://milvus.example:19530/team_db"
    assert cfg.milvus.token.get_secret_value() == f"bob:{URI_PASSWORD}"
    assert_no_secret(repr(cfg) + cfg.model_dump_json(), "the settings")

    assert redact_uri(uri) == "https://***@milvus.example:19530/team_db"
    assert redact_uri("/data/milvus@2.db") == "/data/milvus@2.db"
    assert_no_secret(str(RagAppError(f"cannot connect to {uri}: token {cfg.milvus.token}")), "")
    assert_no_secret(redact(f"pymilvus said: bad token bob:{URI_PASSWORD}"), "redact()")


def test_a_bad_setting_next_to_a_secret_does_not_echo_the_secret(tmp_path, no_hf_token):
    secrets = secrets_file(
        tmp_path / "secrets.env",
        {**FILE_SECRETS, "RAG_APP_LLM__MAX_TOKENS": "99999"},  # over max_model_len
    )
    with pytest.raises(RagAppError) as error:
        load_config(PROFILE, secrets_file=secrets)
    assert "max_tokens (99999) must be smaller" in str(error.value)
    assert_no_secret(str(error.value), "the error")


def test_a_world_readable_config_file_holding_a_token_is_warned_about(tmp_path, caplog):
    toml = tmp_path / "c.toml"
    toml.write_text("[milvus]\ntoken = 'root:in-the-file'\n")
    toml.chmod(0o644)
    with caplog.at_level("WARNING", logger="rag_app.config"):
        assert load_config(toml).milvus.token.get_secret_value() == "root:in-the-file"
    assert "readable by every user" in caplog.text and "milvus.token" in caplog.text
    assert "in-the-file" not in caplog.text
    caplog.clear()
    toml.chmod(0o600)
    load_config(toml)
    assert "readable by every user" not in caplog.text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", DEBUG_MAIN, *args, "--config", str(PROFILE)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert_no_secret(done.stdout, f"stdout of {args}")
    assert_no_secret(done.stderr, f"stderr of {args}")
    return done


@pytest.mark.slow
def test_no_secret_reaches_output_logs_errors_or_milvus(tmp_path, no_hf_token):
    from pymilvus import MilvusClient

    db = tmp_path / "store" / "milvus.db"
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "hnsw.md").write_text("# HNSW\nHNSW builds a graph; M sets its degree.\n")
    secrets = secrets_file(tmp_path / "secrets.env", FILE_SECRETS)
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "RAG_APP_MILVUS__URI": str(db),
        "RAG_APP_LLM__MODE": "server",
        "RAG_APP_LLM__API_BASE": f"http://127.0.0.1:{_closed_port()}/v1",
    }
    from_env = {**base, **ENV_SECRETS}
    from_file = {**base, "RAG_APP_SECRETS_FILE": str(secrets)}

    ingested = _cli("ingest", str(tmp_path / "kb"), "--secrets", str(secrets), env=base)
    assert ingested.returncode == 0, ingested.stderr
    assert "DEBUG" in ingested.stderr  # the libraries did log at DEBUG
    listed = _cli("collections", env=from_file)
    assert listed.returncode == 0 and "rag_docs" in listed.stdout, listed.stderr

    # Abstains before the LLM is asked: a full --json answer, no server needed.
    abstained = _cli(
        "query", "What does M set?", "--json",
        env={**from_file, "RAG_APP_RETRIEVAL__ABSTAIN_BELOW": "1.0"},
    )  # fmt: skip
    assert abstained.returncode == 0, abstained.stderr
    assert json.loads(abstained.stdout)["abstained"] is True
    # Asks the LLM, whose server is not there: an error, naming neither key nor token, nor
    # the credentials written in its URL (the openai client logs its URL at DEBUG).
    api_base = f"http://alice:{URI_PASSWORD}@127.0.0.1:{_closed_port()}/v1"
    failed = _cli(
        "query", "What does M set?", "--json", env={**from_env, "RAG_APP_LLM__API_BASE": api_base}
    )
    assert failed.returncode != 0
    assert "127.0.0.1" in failed.stderr

    # A Milvus server uri with credentials, unreachable: the error names the server only.
    server = f"http://bob:{URI_PASSWORD}@127.0.0.1:{_closed_port()}"
    refused = _cli("collections", env={**from_env, "RAG_APP_MILVUS__URI": server})
    assert refused.returncode == 2
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("rag-app: error: cannot connect to Milvus at http://127.0.0.1:")
    # A unix socket uri with credentials: gRPC prints the address it cannot reach.
    socket_uri = f"unix://bob:{URI_PASSWORD}@{tmp_path}/no-such.sock"
    refused = _cli("collections", env={**base, "RAG_APP_MILVUS__URI": socket_uri})
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"rag-app: error: cannot connect to Milvus at unix:{tmp_path}/no-such.sock")
    )

    # Everything the collection holds: rows with all fields, schema, properties, index.
    client = MilvusClient(uri=str(db))
    try:
        client.load_collection("rag_docs")
        stored = {
            "rows": client.query("rag_docs", filter='id != ""', output_fields=["*"]),
            "collection": client.describe_collection("rag_docs"),
            "index": [
                client.describe_index("rag_docs", i) for i in client.list_indexes("rag_docs")
            ],
            "stats": client.get_collection_stats("rag_docs"),
        }
    finally:
        client.close()
    assert stored["rows"], "nothing was ingested"
    assert_no_secret(json.dumps(stored, default=str), "what Milvus stores")
    for file in db.parent.rglob("*"):  # and the raw Milvus Lite files
        if file.is_file():
            assert_no_secret(file.read_bytes().decode("latin-1"), str(file))


TABLE_SECRET = "hf_TABLEtoken7d21e9"


@pytest.mark.parametrize(
    ("name", "table"),
    [
        ("RAG_APP_LLM__ENV", {"HF_TOKEN": TABLE_SECRET}),
        ("RAG_APP_LLM__ENGINE_KWARGS", {"hf_token": TABLE_SECRET, "enforce_eager": True}),
    ],
)
def test_a_token_in_a_table_setting_is_masked_in_any_error(monkeypatch, no_hf_token, name, table):
    monkeypatch.setenv(name, json.dumps(table))
    for bad in ({"RAG_APP_LLM__MAX_TOKENS": "5000"}, {"RAG_APP_LLM__TEMPERATURE": "hot"}):
        for key, value in bad.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(RagAppError) as error:
            load_config(PROFILE)
        assert TABLE_SECRET not in str(error.value), str(error.value)
        for key in bad:
            monkeypatch.delenv(key)
    # Errors quoting the value itself mask it too, by value: whatever the message says.
    assert TABLE_SECRET not in str(RagAppError(f"vLLM said: bad token {TABLE_SECRET}"))


def test_credentials_in_the_llm_api_base_become_the_api_key(no_hf_token):
    cfg = load_config(PROFILE, llm__api_base=f"https://alice:{URI_PASSWORD}@llm.example/v1")
    assert cfg.llm.api_base == "https://llm.example/v1"
    assert cfg.llm.api_key.get_secret_value() == f"alice:{URI_PASSWORD}"
    cfg = load_config(PROFILE, llm={"api_base": f"https://{URI_PASSWORD}@llm.example/v1"})
    assert cfg.llm.api_key.get_secret_value() == URI_PASSWORD  # a bare key before the @
    explicit = load_config(
        PROFILE, llm={"api_base": f"https://a:{URI_PASSWORD}@h/v1", "api_key": "sk-explicit"}
    )
    assert (explicit.llm.api_base, explicit.llm.api_key.get_secret_value()) == (
        "https://h/v1", "sk-explicit",
    )  # fmt: skip
    assert_no_secret(repr(cfg) + cfg.model_dump_json(), "the settings")


def test_credentials_in_a_unix_socket_uri_become_the_token(no_hf_token):
    cfg = load_config(PROFILE, milvus__uri=f"unix://bob:{URI_PASSWORD}@/run/milvus.sock")
    assert cfg.milvus.uri == "unix:/run/milvus.sock"
    assert cfg.milvus.token.get_secret_value() == f"bob:{URI_PASSWORD}"
    assert not cfg.milvus.is_lite


def test_log_records_of_any_library_are_masked_by_value(no_hf_token, capsys):
    import logging

    from rag_app.errors import redact_logs

    load_config(PROFILE, milvus__token="root:log-secret-19ab")
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        redact_logs()
        logging.getLogger("openai._base_client").warning(
            "headers: token=%s", "root:log-secret-19ab"
        )
        try:
            raise ValueError("bad token root:log-secret-19ab")
        except ValueError:
            logging.getLogger("some.library").exception("call failed")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "headers: token=**********" in err and "bad token **********" in err
    assert "log-secret-19ab" not in err
