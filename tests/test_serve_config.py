"""``rag-app serve`` settings and safety checks that need no model: API keys (from the
environment or a secrets file only, never echoed), who may be served without keys, and
which imports the CLI pays for (fast tier)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rag_app import RagAppError, load_config
from tests.conftest import PROFILE, REPO


def test_keys_are_comma_separated_each_for_every_collection_or_some(monkeypatch):
    monkeypatch.setenv("RAG_APP_SERVER__API_KEYS", "sk-all-0123456, sk-team-987654:team_kb+hr")
    scopes = load_config(PROFILE).server.key_scopes()
    assert scopes == {"sk-all-0123456": None, "sk-team-987654": frozenset({"team_kb", "hr"})}


@pytest.mark.parametrize("keys", ["short", "sk-fine-0123456:bad-name", "sk-a b-0123456"])
def test_a_malformed_key_list_is_a_one_line_error_that_shows_no_key(monkeypatch, keys):
    monkeypatch.setenv("RAG_APP_SERVER__API_KEYS", keys)
    with pytest.raises(RagAppError) as raised:
        load_config(PROFILE)
    message = str(raised.value)
    assert "server.api_keys" in message and "RAG_APP_SERVER__API_KEYS" in message
    assert keys not in message and "\n" not in message


def test_keys_in_a_config_file_are_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[server]\napi_keys = "sk-committed-by-mistake"\n')
    with pytest.raises(RagAppError, match="RAG_APP_SERVER__API_KEYS in the environment"):
        load_config(config)


def test_keys_from_the_secrets_file_are_masked_wherever_they_show(tmp_path):
    from rag_app.errors import redact

    secrets = tmp_path / "secrets.env"
    secrets.write_text("RAG_APP_SERVER__API_KEYS=sk-one-5551234,sk-two-5554321:team\n")
    cfg = load_config(PROFILE, secrets_file=secrets)
    assert set(cfg.server.key_scopes()) == {"sk-one-5551234", "sk-two-5554321"}
    assert "sk-two-5554321" not in redact("Bearer sk-two-5554321 refused")


def test_serve_without_keys_refuses_any_address_but_loopback_unless_told(monkeypatch):
    from rag_app.cli.serve import check_exposure

    monkeypatch.delenv("RAG_APP_SERVER__API_KEYS", raising=False)
    with pytest.raises(RagAppError, match=r"refusing to listen on 0\.0\.0\.0 without API keys"):
        check_exposure(load_config(PROFILE, server__host="0.0.0.0"))
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(load_config(PROFILE, server__host=host))
    check_exposure(load_config(PROFILE, server__host="0.0.0.0", server__api_keys="sk-k-0123456"))
    allowed = {"host": "0.0.0.0", "allow_remote_without_keys": True}
    check_exposure(load_config(PROFILE, server=allowed))


def _modules_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in done.stdout.split()}


def test_the_help_and_the_server_client_load_no_heavy_library():
    heavy = {"fastapi", "uvicorn", "mcp", "llama_index", "torch", "vllm", "transformers"}
    help_modules = _modules_after(
        "from rag_app.cli import _parser\n"
        "import contextlib, io\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    _parser().parse_args(['--help'])"
    )
    assert not help_modules & (heavy | {"openai"})
    assert not _modules_after("import rag_app.cli.remote") & heavy  # query/chat --server
