"""Settings: the TOML file, environment and Python overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PROFILE

from rag_app import RagAppError, RagConfig, load_config
from rag_app.cli import main

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_config_holds_the_production_defaults():
    cfg = load_config(REPO / "config.toml")
    assert cfg.milvus.uri == str(REPO / "data" / "milvus_rag.db")
    assert cfg.milvus.is_lite
    assert cfg.embedding.model == "BAAI/bge-large-en-v1.5"
    assert cfg.embedding.query_instruction.startswith("Represent this sentence")
    assert cfg.embedding.device == "auto"
    assert (cfg.chunking.chunk_size, cfg.chunking.chunk_overlap) == (512, 51)
    assert cfg.llm.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (cfg.llm.mode, cfg.llm.temperature, cfg.llm.top_p) == ("local", 0.2, 0.95)


def test_code_defaults_equal_the_shipped_file_so_a_missing_default_file_changes_nothing(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no config.toml here
    shipped = load_config(REPO / "config.toml").model_dump()
    builtin = load_config().model_dump()
    shipped["milvus"].pop("uri"), builtin["milvus"].pop("uri")
    assert builtin == shipped


def test_relative_paths_resolve_from_the_config_files_directory(tmp_path, monkeypatch):
    profile = load_config(REPO / "configs" / "cpu-small.toml")
    monkeypatch.chdir(tmp_path)
    assert load_config(REPO / "configs" / "cpu-small.toml") == profile
    assert profile.embedding.model == str(REPO / ".models" / "all-MiniLM-L6-v2")
    assert profile.llm.model == str(REPO / ".models" / "SmolLM2-135M-Instruct")
    assert profile.milvus.uri == str(REPO / "data" / "milvus_cpu_small.db")


def test_hub_ids_and_server_uris_are_left_alone(tmp_path):
    cfg_file = write(
        tmp_path / "c.toml",
        '[milvus]\nuri = "http://10.0.0.5:19530"\n[embedding]\nmodel = "BAAI/bge-small-en-v1.5"\n',
    )
    cfg = load_config(cfg_file)
    assert cfg.milvus.uri == "http://10.0.0.5:19530"
    assert not cfg.milvus.is_lite
    assert cfg.embedding.model == "BAAI/bge-small-en-v1.5"


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    cfg_file = write(tmp_path / "c.toml", "[retrieval]\ntop_k = 4\n[llm]\nmodel = 'a'\n")
    monkeypatch.setenv("RAG_APP_RETRIEVAL__TOP_K", "7")
    monkeypatch.setenv("RAG_APP_LLM__MODEL", "b")
    monkeypatch.setenv("RAG_APP_MILVUS__URI", "http://127.0.0.1:19530")
    monkeypatch.setenv("RAG_APP_EMBEDDING__MODEL", "some/model")
    cfg = load_config(cfg_file)
    assert cfg.retrieval.top_k == 7
    assert (cfg.llm.model, cfg.milvus.uri, cfg.embedding.model) == (
        "b",
        "http://127.0.0.1:19530",
        "some/model",
    )
    assert cfg.llm.temperature == 0.2  # untouched keys keep their values


def test_python_overrides_beat_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_APP_RETRIEVAL__TOP_K", "7")
    cfg = load_config(write(tmp_path / "c.toml", ""), retrieval__top_k=9, llm={"max_tokens": 64})
    assert cfg.retrieval.top_k == 9
    assert cfg.llm.max_tokens == 64
    assert cfg.llm.model == "meta-llama/Llama-3.1-8B-Instruct"


def test_rag_app_config_selects_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "RAG_APP_CONFIG", str(write(tmp_path / "other.toml", "[retrieval]\ntop_k = 11\n"))
    )
    assert load_config().retrieval.top_k == 11


def test_secrets_do_not_show_in_the_settings_repr(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_APP_MILVUS__TOKEN", "root:s3cret-token")
    cfg = load_config(write(tmp_path / "c.toml", ""))
    assert cfg.milvus.token.get_secret_value() == "root:s3cret-token"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.model_dump())


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        (
            "[llm]\ntemprature = 0.1\n",
            {},
            ["unknown setting 'llm.temprature'", "c.toml", "temperature"],
        ),
        ("[nosuch]\nx = 1\n", {}, ["unknown setting 'nosuch'", "c.toml"]),
        ("[llm]\ntemperature = 'hot'\n", {}, ["'llm.temperature'", "c.toml", "hot"]),
        ("[chunking]\nchunk_size = 100\nchunk_overlap = 100\n", {}, ["'chunking'", "smaller than"]),
        ("[llm\n", {}, ["c.toml", "not valid TOML"]),
        (
            "",
            {"RAG_APP_RETRIEVAL__TOP_K": "many"},
            ["'retrieval.top_k'", "RAG_APP_RETRIEVAL__TOP_K"],
        ),
        ("[llm]\nmode = 'remote'\n", {}, ["'llm.mode'", "'local' or 'server'"]),
    ],
)
def test_bad_settings_give_one_line_naming_key_and_origin(
    tmp_path, monkeypatch, toml, env, expected
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RagAppError) as error:
        load_config(write(tmp_path / "c.toml", toml))
    message = str(error.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_a_named_missing_file_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(RagAppError, match=r"config file not found: .*nope\.toml"):
        load_config(tmp_path / "nope.toml")
    monkeypatch.setenv("RAG_APP_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(RagAppError, match=r"gone\.toml"):
        load_config()


def test_cli_reports_config_errors_in_one_line_without_traceback(tmp_path, capsys):
    bad = write(tmp_path / "c.toml", "[llm]\ntemprature = 0.1\n")
    for args in (
        ["--config", str(tmp_path / "missing.toml"), "query", "q"],
        ["query", "q", "--config", str(bad)],
    ):
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rag-app: error:"), lines


def test_every_default_passes_its_own_validation():
    """Pydantic does not validate defaults: a default that breaks its field's bounds (or a
    cross-field rule) would go unnoticed until a user copied it into a file."""
    secrets = {"milvus": {"token"}, "llm": {"api_key"}}
    defaults = RagConfig().model_dump(mode="json", exclude={"source": True, **secrets})
    revalidated = RagConfig.model_validate(defaults)
    assert revalidated.model_dump(exclude={"source"}) == RagConfig().model_dump(exclude={"source"})


@pytest.mark.parametrize(
    ("name", "value"),
    [("RAG_APP_LLM__ENV", "{bad json"), ("RAG_APP_LLM__ENGINE_KWARGS", '{"a": 1,}'),
     ("RAG_APP_MILVUS__INDEX_PARAMS", "[1"), ("RAG_APP_LLM", "not json")],
)  # fmt: skip
def test_malformed_json_in_a_table_variable_is_one_line_naming_it(monkeypatch, capsys, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(RagAppError) as error:
        load_config(PROFILE)
    message = str(error.value)
    assert message.startswith(f"environment variable {name} is not valid JSON (")
    assert value not in message  # the value may hold a token: not echoed
    assert main(["collections", "--config", str(PROFILE)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"rag-app: error: {message}"]


def test_malformed_json_in_a_secrets_line_is_one_line_naming_it(tmp_path):
    secrets = write(tmp_path / "secrets.env", 'RAG_APP_LLM__ENV={"HF_TOKEN": "hf_unclosed\n')
    with pytest.raises(RagAppError, match=r"^RAG_APP_LLM__ENV in secrets file .*secrets\.env is "
                       r"not valid JSON \("):  # fmt: skip
        load_config(PROFILE, secrets_file=secrets)


def test_errors_name_the_environment_variable_that_set_the_value(monkeypatch):
    monkeypatch.setenv("RAG_APP_LLM__MAX_TOKENS", "5000")  # over the profile's max_model_len
    with pytest.raises(RagAppError) as error:
        load_config(PROFILE)
    message = str(error.value)
    assert "environment variable RAG_APP_LLM__MAX_TOKENS" in message, message
    assert "cpu-small.toml" not in message
    monkeypatch.setenv("RAG_APP_LLM__ENV", '{"A": 1}')  # a value inside a JSON table
    monkeypatch.delenv("RAG_APP_LLM__MAX_TOKENS")
    with pytest.raises(
        RagAppError, match=r"'llm\.env\.A' in environment variable RAG_APP_LLM__ENV"
    ):
        load_config(PROFILE)


def test_new_settings_default_to_the_safe_choice():
    cfg = load_config(REPO / "config.toml")
    assert cfg.milvus.adopt_foreign_collection is False
    assert cfg.ingestion.follow_symlinks_outside is False


def test_a_lite_uri_in_an_unusable_folder_is_one_line_naming_the_folder(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "a_file").write_text("not a folder")
    for uri, expected in (
        (tmp_path / "a_file" / "milvus.db", f"cannot create the folder {tmp_path / 'a_file'}"),
        ("/proc/milvus.db", "the folder /proc of the Milvus Lite file milvus.db is not writable"),
        (tmp_path / "milvus.sqlite", "nor a Milvus Lite file name ending in .db"),
    ):
        monkeypatch.setenv("RAG_APP_MILVUS__URI", str(uri))
        assert main(["collections", "--config", str(PROFILE)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and expected in err, err
        assert "one process at a time" not in err
