"""What the CLI prints is its own: libraries' and child processes' chatter goes to a log."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from rag_app import RagAppError, load_config
from rag_app.cli import engine_log, start_llm


def test_a_local_engine_start_writes_its_chatter_to_the_log_not_the_terminal(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def noisy_engine(cfg):
        os.write(2, b"Triton is installed, but doesn't include CPU backend.\n")
        subprocess.run([sys.executable, "-c", "print('EngineCore: loading weights')"], check=True)
        return "llm"

    monkeypatch.setattr("rag_app.components.llm.build_llm", noisy_engine)
    cfg = load_config(None)
    assert start_llm(cfg, argparse.Namespace()) == "llm"
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert engine_log() == tmp_path / "rag_app" / "engine.log"
    logged = engine_log().read_text()
    assert "Triton is installed" in logged and "EngineCore: loading weights" in logged


def test_a_failed_engine_start_names_the_log_and_verbose_shows_everything(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def failing_engine(cfg):
        os.write(2, b"CUDA out of memory\n")
        raise RagAppError("cannot start vLLM on 'm': out of memory")

    monkeypatch.setattr("rag_app.components.llm.build_llm", failing_engine)
    with pytest.raises(RagAppError, match=r"out of memory; vLLM's own output is in .*engine.log"):
        start_llm(load_config(None), argparse.Namespace())
    assert capfd.readouterr().err == ""
    with pytest.raises(RagAppError):
        start_llm(load_config(None), argparse.Namespace(verbose=True))
    assert "CUDA out of memory" in capfd.readouterr().err  # --verbose: on the terminal
