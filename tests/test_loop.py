"""The event loop rlm_async starts where it owns one: uvloop where installed, asyncio on
request (RLM_ASYNC_LOOP), a clear error for anything else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import needs_uvloop, rlm_config
from test_cli import SIM_TOML, cli, one_line_error

from rlm_async import _loop
from rlm_async._rlm import RLM
from rlm_async._types import ModelRequest
from rlm_async.exceptions import ConfigError
from rlm_async.testing import ScriptedTransport

ROOT_REPLY = '```repl\nanswer["content"] = llm_query("which loop?")\nanswer["ready"] = True\n```'


class LoopRecorder:
    """A scripted model that answers the root with one cell calling `llm_query`, and each
    sub-call with the name of the loop the engine made it from."""

    def __init__(self) -> None:
        self.transport = ScriptedTransport(self)

    def __call__(self, request: ModelRequest) -> str:
        if request.model == "root-model":
            return ROOT_REPLY
        return _loop.loop_name()


class TestBackendOptions:
    @needs_uvloop
    def test_unset_picks_uvloop_where_installed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With RLM_ASYNC_LOOP unset and uvloop installed, the loop asked for is uvloop."""
        monkeypatch.delenv(_loop.ENV, raising=False)
        assert _loop.backend_options() == {"use_uvloop": True}

    def test_asyncio_is_asked_for_by_name(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """RLM_ASYNC_LOOP=asyncio (any case, spaces around) asks for plain asyncio."""
        monkeypatch.setenv(_loop.ENV, " AsyncIO ")
        assert _loop.backend_options() == {"use_uvloop": False}

    def test_unset_without_uvloop_is_asyncio(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where uvloop is not installed (Windows, PyPy), the default is asyncio, silently."""
        monkeypatch.delenv(_loop.ENV, raising=False)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        assert _loop.backend_options() == {"use_uvloop": False}

    def test_an_unknown_loop_is_a_config_error_naming_the_choices(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """RLM_ASYNC_LOOP=trio is refused with the values that work."""
        monkeypatch.setenv(_loop.ENV, "trio")
        with pytest.raises(
            ConfigError, match=r"RLM_ASYNC_LOOP='trio' is not a loop: use 'uvloop' or 'asyncio'"
        ):
            _loop.backend_options()

    def test_uvloop_asked_for_but_missing_says_how_to_install_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """RLM_ASYNC_LOOP=uvloop without uvloop installed names the fix, instead of falling back."""
        monkeypatch.setenv(_loop.ENV, "uvloop")
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        with pytest.raises(ConfigError, match=r"uvloop is not installed: `pip install uvloop`"):
            _loop.backend_options()


class TestWhereTheEngineRuns:
    @needs_uvloop
    def test_sync_completion_runs_on_uvloop_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`RLM.completion()` runs the query (its REPL worker, the cell's sub-call) on uvloop."""
        monkeypatch.delenv(_loop.ENV, raising=False)
        model = LoopRecorder()
        result = RLM(config=rlm_config(), transport=model.transport).completion("ctx", "q")
        assert result.status == "ok" and result.response == "uvloop"
        assert len(model.transport.requests) == 2

    def test_sync_completion_runs_on_asyncio_when_asked(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With RLM_ASYNC_LOOP=asyncio the same query runs on asyncio."""
        monkeypatch.setenv(_loop.ENV, "asyncio")
        model = LoopRecorder()
        result = RLM(config=rlm_config(), transport=model.transport).completion("ctx", "q")
        assert result.status == "ok" and result.response == "asyncio"

    @needs_uvloop
    def test_a_persistent_rlm_thread_runs_on_uvloop(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A persistent RLM's background loop (its session's thread) is the same choice."""
        monkeypatch.delenv(_loop.ENV, raising=False)
        model = LoopRecorder()
        with RLM(config=rlm_config(), transport=model.transport, persistent=True) as rlm:
            result = rlm.completion("ctx", "q")
        assert result.status == "ok" and result.response == "uvloop"

    def test_a_bad_choice_stops_the_sync_call_before_any_request(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bad RLM_ASYNC_LOOP fails `completion()` with the ConfigError, nothing sent."""
        monkeypatch.setenv(_loop.ENV, "trio")
        model = LoopRecorder()
        with pytest.raises(ConfigError, match="RLM_ASYNC_LOOP"):
            RLM(config=rlm_config(), transport=model.transport).completion("ctx", "q")
        assert model.transport.requests == []


class TestCommandLine:
    @needs_uvloop
    def test_doctor_says_which_loop_it_runs_on(self) -> None:
        """`rlm-async doctor` (a real subprocess) reports uvloop by default, asyncio when asked."""
        for env, name in (({}, "uvloop"), ({_loop.ENV: "asyncio"}, "asyncio")):
            proc = cli("doctor", "--config", str(SIM_TOML), env=env)
            assert f"event loop: {name} " in proc.stdout, (proc.stdout, proc.stderr)

    def test_an_unknown_loop_is_a_one_line_configuration_error(self, tmp_path: Path) -> None:
        """`RLM_ASYNC_LOOP=trio rlm-async run ...` exits 2 with one line naming the fix."""
        context = tmp_path / "ctx.txt"
        context.write_text("a line\n")
        proc = cli(
            "run",
            "--config",
            str(SIM_TOML),
            "--context",
            str(context),
            "--query",
            "q",
            env={_loop.ENV: "trio"},
        )
        line = one_line_error(proc)
        assert line.startswith("rlm-async: configuration error: RLM_ASYNC_LOOP='trio' is not a loop")
