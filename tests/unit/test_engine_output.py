"""kvprof's commands keep engine output in a log and set engine variables only while they run."""
from __future__ import annotations

import os
import subprocess
import sys

from kvprof.cli.engine_output import engine_output, py_spy_environ


def test_variables_are_set_for_the_command_and_restored(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("KVPROF_PY_SPY", raising=False)
    output = engine_output(str(tmp_path / "engine.log"), verbose=False, environ=py_spy_environ(True))
    with output.capturing():
        seen = (os.environ.get("VLLM_LOGGING_LEVEL"), os.environ.get("KVPROF_PY_SPY"))
        subprocess.run([sys.executable, "-c", "print('from an engine')"], check=True)
    assert seen == ("ERROR", "1")
    assert "VLLM_LOGGING_LEVEL" not in os.environ and "KVPROF_PY_SPY" not in os.environ
    assert (tmp_path / "engine.log").read_text() == "from an engine\n"


def test_a_users_logging_level_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    with engine_output(str(tmp_path / "engine.log"), verbose=False).capturing():
        seen = os.environ["VLLM_LOGGING_LEVEL"]
    assert seen == "DEBUG" and os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_verbose_sets_the_variables_too(monkeypatch):
    monkeypatch.delenv("KVPROF_PY_SPY", raising=False)
    with engine_output("unused.log", verbose=True, environ=py_spy_environ(True)).capturing():
        assert os.environ["KVPROF_PY_SPY"] == "1"
    assert "KVPROF_PY_SPY" not in os.environ
    assert py_spy_environ(False) == {}
