"""Persistent sessions, compaction and the official log format, end to end over real HTTP
against the simulator, with real sandboxed workers (issue 18).

What a test asserts is what a server or the host can observe: the requests the simulator
logged (and their cached tokens), the variables the model's own code found in the REPL,
the processes left on the host, the log file written."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from _session_scripts import VARIABLES, scripted, steps
from conftest import EventLog, model, open_sim, sandbox_config, sim_config

from rlm_async import RLM, ModelPrice, RLMConfig
from rlm_async._events import RootCompacted, WorkerStart
from rlm_async.exceptions import ConfigError
from rlm_async.logger import RLMLogger
from rlm_async.sandbox import _procs as procs
from rlm_async.sandbox import start_worker
from rlm_async.sandbox._config import WorkerRequest
from rlm_async.sim import SimConfig, SimServer
from rlm_async.sim._config import CacheModel, Persona
from rlm_async.sim.server import SimProcess

pytestmark = pytest.mark.e2e


@asynccontextmanager
async def _rlm(config: SimConfig, **overrides: Any) -> AsyncIterator[tuple[RLM, SimServer]]:
    async with open_sim(config) as sim:
        rlm = RLM(config=sim_config(sim, **overrides))
        try:
            yield rlm, sim
        finally:
            await rlm.aclose()


def _alive_descendants() -> list[int]:
    """Processes under this test process that still run (zombies have exited)."""
    tree = procs.survivors(root=os.getpid(), group=None, uid=None)
    return [p.pid for p in tree if p.state not in ("Z", "X")]


async def _no_reply(request: WorkerRequest) -> list[str]:
    raise AssertionError("no sub-call expected")


class TestWorkerVariables:
    @pytest.mark.asyncio
    async def test_variables_the_engine_set_survive_a_restart(self) -> None:
        """set_variable binds names (and aliases) and appends to a list; after a restart the
        engine's variables are back and the code's are gone."""
        worker = await start_worker("zero", sandbox_config())
        try:
            await worker.set_variable("context_1", {"k": [1, 2]})
            await worker.set_variable("history_0", [{"role": "user", "content": "hi"}], aliases=("history",))
            await worker.set_variable("log", "first", append=True)
            await worker.set_variable("log", {"second": 2}, append=True)
            code = "mine = 1\nprint(context, context_1, history is history_0, history[0]['content'], log)"
            first = await worker.run_cell(code, _no_reply)
            assert first.stdout.strip() == "zero {'k': [1, 2]} True hi ['first', {'second': 2}]"
            await worker.restart()
            again = await worker.run_cell(
                "print(context_1['k'], len(history), log[-1], 'mine' in dir())", _no_reply
            )
            assert again.stdout.strip() == "[1, 2] 1 {'second': 2} False"
        finally:
            await worker.aclose()

    @pytest.mark.asyncio
    async def test_names_are_checked(self) -> None:
        """A variable name that is not an identifier is refused before anything is sent."""
        worker = await start_worker("x", sandbox_config())
        try:
            with pytest.raises(ValueError, match="not a Python identifier"):
                await worker.set_variable("not a name", 1)
        finally:
            await worker.aclose()


class TestSession:
    @pytest.mark.asyncio
    async def test_each_call_adds_context_n_and_history_n(self) -> None:
        """Three calls in one session, two turns each: the model's code finds its own counter
        and, as the official package names them, context_0..2, history_0..1 and the two
        aliases; the answer of one call never ends the next one's first turn."""
        peek = "```repl\nprint(type(context).__name__)\n```"
        async with _rlm(scripted(peek, VARIABLES)) as (rlm, sim), rlm.session() as session:
            answers = [(await session.completion(ctx, "what?")).response for ctx in ("a", ["b"], {"c": "d"})]
            assert (session.contexts, session.histories) == (3, 3)
        assert answers == [
            "call 1: ['context', 'context_0']",
            "call 2: ['context', 'context_0', 'context_1', 'history', 'history_0']",
            "call 3: ['context', 'context_0', 'context_1', 'context_2', 'history', 'history_0', 'history_1']",
        ]
        assert len(sim.log.of_kind("root")) == 6

    @pytest.mark.asyncio
    async def test_a_sessions_worker_may_come_from_the_worker_pool(self) -> None:
        """With `worker_pool` open, the session's first call takes a pre-started worker (its
        context loaded after the worker's `hello`); the next call runs in that same worker."""
        events = EventLog()
        async with open_sim(scripted(VARIABLES)) as sim:
            async with (
                RLM(config=sim_config(sim, worker_pool=1), event_sinks=[events]) as rlm,
                rlm.session() as session,
            ):
                first = await session.completion("a", "what?")
                second = await session.completion("b", "what?")
        assert first.response == "call 1: ['context', 'context_0']"
        assert second.response == "call 2: ['context', 'context_0', 'context_1', 'history', 'history_0']"
        assert [e.pooled for e in events.of(WorkerStart)] == [True]
        assert _alive_descendants() == []

    @pytest.mark.asyncio
    async def test_history_holds_the_messages_of_the_earlier_call(self) -> None:
        """history_0 is the first call's conversation, as dicts with role and content."""
        peek = (
            '```repl\nanswer["content"] = repr([m["role"] for m in history_0]) + "|" '
            '+ history_0[1]["content"].splitlines()[-1]\nanswer["ready"] = True\n```'
        )
        config = scripted(peek, by_query={"first": [VARIABLES]})
        async with _rlm(config) as (rlm, _), rlm.session() as session:
            await session.completion("ctx", "first")
            second = await session.completion("ctx2", "second")
        assert second.response is not None
        assert second.response == "['system', 'user']|This call's context is `context_0`."

    @pytest.mark.asyncio
    async def test_leaving_the_block_leaves_no_worker_process(self) -> None:
        """After `async with rlm.session()` the session's worker, and every process it
        started, is gone from the host (found by scanning /proc)."""
        spawn = '```repl\nimport subprocess\nsubprocess.Popen(["sleep", "300"])\nanswer["content"] = "spawned"\nanswer["ready"] = True\n```'
        async with _rlm(scripted(spawn)) as (rlm, _):
            async with rlm.session() as session:
                result = await session.completion("ctx", "go")
                pid = session.worker_pid
                assert result.response == "spawned" and pid is not None
                assert pid in _alive_descendants()
            assert session.worker_pid is None
            assert _alive_descendants() == []

    @pytest.mark.asyncio
    async def test_a_crash_mid_cell_reloads_every_context_and_tells_the_model(self) -> None:
        """The worker is killed by the code of the second call: a fresh one has context_0,
        context_1 and history_0 back, the model's own variable is gone, and the next message
        the model gets says so."""
        crash = "```repl\nimport os, signal\nmine = 1\nos.kill(os.getpid(), signal.SIGKILL)\n```"
        check = "```repl\nanswer[\"content\"] = f\"{sorted(n for n in dir() if n.startswith(('context', 'history', 'mine')))}\"\nanswer[\"ready\"] = True\n```"
        config = scripted(VARIABLES, by_query={"crash": [crash, check]})
        logger = RLMLogger()
        async with open_sim(config) as sim:
            rlm = RLM(config=sim_config(sim), logger=logger)
            async with rlm.session() as session:
                await session.completion("first", "one")
                second = await session.completion("second", "crash")
                told = second.metadata["iterations"][1]["prompt"][-1]["content"] if second.metadata else ""
                third = await session.completion("third", "three")
            await rlm.aclose()
        assert second.response == "['context', 'context_0', 'context_1', 'history', 'history_0']"
        assert "worker was killed" in told and "every context and history" in told
        # `calls` (the model's counter) was lost with the worker: the third call counts from 1.
        assert third.response is not None and third.response.startswith("call 1: ")
        assert "'context_2'" in third.response and "'history_1'" in third.response

    @pytest.mark.asyncio
    async def test_with_the_official_prompt_format_the_model_is_told_too(self) -> None:
        """With `custom_system_prompt` (the official message formats), a crash mid-cell is
        still told after the official "REPL output:" message, and the contexts and history
        are back in the fresh worker."""
        crash = "```repl\nimport os, signal\nmine = 1\nos.kill(os.getpid(), signal.SIGKILL)\n```"
        check = (
            '```repl\nanswer["content"] = f"{sorted(n for n in dir() if n.startswith((\'context\', '
            "'history', 'mine')))}\"\nanswer[\"ready\"] = True\n```"
        )
        logger = RLMLogger()
        async with open_sim(scripted(crash, check)) as sim:
            official = RLM(config=sim_config(sim), custom_system_prompt="You are an RLM.", logger=logger)
            async with official.session() as session:
                await session.completion("first", "one")
                second = await session.completion("second", "two")
            await official.aclose()
        assert second.response == "['context', 'context_0', 'context_1', 'history', 'history_0']"
        assert second.metadata is not None
        told = second.metadata["iterations"][1]["prompt"]
        observation = next(m["content"] for m in reversed(told) if m["content"].startswith("REPL output:"))
        assert "[the REPL worker was killed" in observation and "every context and history" in observation
        assert told[-1]["content"].endswith(
            "(context_0 through context_1).\n\nNote: You have 1 prior conversation history available in the `history` variable."
        )

    @pytest.mark.asyncio
    async def test_a_worker_killed_between_calls_is_replaced_and_the_model_told(self) -> None:
        """Killed from outside while idle: the next call starts a fresh worker, reloads the
        contexts and histories, and its first message says the variables are gone."""
        logger = RLMLogger()
        events = EventLog()
        async with open_sim(scripted(VARIABLES)) as sim:
            rlm = RLM(config=sim_config(sim), logger=logger, event_sinks=[events])
            async with rlm.session() as session:
                await session.completion("first", "one")
                pid = session.worker_pid
                assert pid is not None
                os.killpg(pid, signal.SIGKILL)
                for _ in range(200):  # it is gone within moments; the engine is not told
                    if pid not in _alive_descendants():
                        break
                    await anyio.sleep(0.05)
                second = await session.completion("second", "two")
            await rlm.aclose()
        assert second.response == "call 1: ['context', 'context_0', 'context_1', 'history', 'history_0']"
        assert second.metadata is not None
        first_message = second.metadata["iterations"][0]["prompt"][1]["content"]
        assert "the REPL worker had stopped since the last call" in first_message
        assert "This call's context is `context_1`" in first_message
        assert len(events.of(WorkerStart)) == 2

    @pytest.mark.asyncio
    async def test_a_closed_session_refuses_calls(self) -> None:
        """A session is not reusable once closed: the error says to open a new one."""
        async with _rlm(scripted(VARIABLES)) as (rlm, _):
            async with rlm.session() as session:
                await session.completion("ctx", "q")
            with pytest.raises(ConfigError, match="open a new one"):
                await session.completion("ctx", "q")

    @pytest.mark.asyncio
    async def test_persistent_true_shares_one_worker_across_acompletion_calls(self) -> None:
        """`RLM(persistent=True)`: plain acompletion calls share one worker per event loop;
        aclose() kills it."""
        events = EventLog()
        async with open_sim(scripted(VARIABLES)) as sim:
            config = sim_config(sim)
            rlm = RLM(config=config, persistent=True, event_sinks=[events])
            first = await rlm.acompletion("a", "q")
            second = await rlm.acompletion("b", "q")
            await rlm.aclose()
            assert _alive_descendants() == []
        assert first.response == "call 1: ['context', 'context_0']"
        assert second.response == "call 2: ['context', 'context_0', 'context_1', 'history', 'history_0']"
        assert len(events.of(WorkerStart)) == 1


class TestSyncPersistent:
    def test_completion_keeps_one_worker_until_close(self, tmp_path: Path) -> None:
        """The synchronous official form: `RLM(persistent=True).completion(...)` twice shares
        one worker (its event loop lives in a thread); `close()` leaves no process behind."""
        events = EventLog()
        with SimProcess(scripted(VARIABLES), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            model = {"model_name": "sim-model", "base_url": sim.base_url, "prices": ModelPrice.free()}
            with RLM(backend="openai", backend_kwargs=model, persistent=True, event_sinks=[events]) as rlm:
                rlm.config = dataclasses.replace(rlm.config, sandbox=sandbox_config())
                answers = [rlm.completion(ctx, "q").response for ctx in ("a", "b")]
            assert [p for p in _alive_descendants() if p != sim.pid] == []
        assert answers == [
            "call 1: ['context', 'context_0']",
            "call 2: ['context', 'context_0', 'context_1', 'history', 'history_0']",
        ]
        assert len(events.of(WorkerStart)) == 1

    def test_a_program_that_never_calls_close_still_exits(self, tmp_path: Path) -> None:
        """The kept event loop runs in a daemon thread: a script that forgets `close()`
        exits, and its worker dies with it (no process of it is left)."""
        script = tmp_path / "forgets_close.py"
        script.write_text(
            textwrap.dedent(
                f"""
                import dataclasses, os, sys
                from rlm_async import RLM, ModelPrice
                from rlm_async.sandbox import _procs as procs
                sys.path.insert(0, {str(Path(__file__).parent)!r})
                from conftest import sandbox_config
                base_url, sim = sys.argv[1], int(sys.argv[2])
                model = {{"model_name": "sim-model", "base_url": base_url, "prices": ModelPrice.free()}}
                rlm = RLM(backend="openai", persistent=True, backend_kwargs=model)
                rlm.config = dataclasses.replace(rlm.config, sandbox=sandbox_config())
                print(rlm.completion("x", "q").response)
                tree = procs.survivors(root=os.getpid(), group=None, uid=None)
                print(" ".join(str(p.pid) for p in tree if p.pid != sim and p.state not in ("Z", "X")), flush=True)
                """
            )
        )
        with SimProcess(scripted(VARIABLES), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            done = subprocess.run(
                [sys.executable, "-W", "ignore", str(script), sim.base_url, str(sim.pid)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, done.stderr[-2000:]
        answer, pids = done.stdout.splitlines()[:2]
        assert answer == "call 1: ['context', 'context_0']"
        workers = [int(p) for p in pids.split()]
        assert workers  # the session's worker was running when the script ended

        def running() -> list[int]:
            return [
                pid
                for pid in workers
                if (p := procs._read_proc(pid)) is not None and p.state not in ("Z", "X")
            ]

        for _ in range(100):  # each tier's worker dies with its parent, within moments
            if not running():
                break
            time.sleep(0.05)
        assert running() == []


STEPS = steps("lorem ipsum ", 150, until=12)
"""Each turn prints ~1,800 characters, so the conversation grows past any small window."""

SUMMARY = "SUMMARY: I printed lorem ipsum blocks; the step counter is in `step`."


class TestCompaction:
    @pytest.mark.asyncio
    async def test_a_long_conversation_is_compacted_and_its_prefix_stays_cached(self) -> None:
        """A window of 6,000 tokens (from the server's /v1/models) and a threshold of 50%:
        the conversation is summarised twice; `history` keeps every turn and both summaries;
        the summary request is served from cache up to the turn before it, and the turn after
        a summary still hits the cached system prompt and first message."""
        config = dataclasses.replace(
            scripted(STEPS, on_last_user={"Summarize your progress so far": SUMMARY}),
            persona=Persona.vllm(),
            context_window=6000,
            cache=CacheModel(min_tokens=16, step_tokens=16),
        )
        events = EventLog()
        async with _rlm(config, compaction=True, compaction_threshold_pct=0.5, max_iterations=20) as (
            rlm,
            sim,
        ):
            result = await rlm.acompletion("some context", "go", event_sinks=[events])
        compactions = events.of(RootCompacted)
        assert result.status == "ok"
        assert [(c.count, c.window_source, c.context_window, c.messages_after) for c in compactions] == [
            (1, "detected", 6000, 4),
            (2, "detected", 6000, 4),
        ]
        # 11 turns recorded (the 12th answered) plus the two summaries.
        assert result.response == "12 steps; history: 13 entries, 2 summaries"
        roots = [e for e in sim.log.by_arrival() if e.kind == "root"]
        first = roots[0]  # system prompt + first user message: the kept prefix
        summaries = [
            i for i in range(1, len(roots) - 1) if roots[i + 1].prompt_tokens < roots[i].prompt_tokens // 2
        ]
        assert len(summaries) == 2
        for i in summaries:
            before, summary, after = roots[i - 1], roots[i], roots[i + 1]
            # The summary request is the conversation plus one message: cached up to it.
            assert summary.cached_tokens >= before.prompt_tokens - 16
            # After it, the kept prefix (never rewritten) is still a cache hit.
            assert after.prompt_tokens < summary.prompt_tokens
            assert after.cached_tokens >= first.prompt_tokens - 32

    @pytest.mark.asyncio
    async def test_no_compaction_below_the_threshold(self) -> None:
        """A short conversation under the threshold is never summarised."""
        config = scripted(VARIABLES)
        events = EventLog()
        async with _rlm(config, compaction=True) as (rlm, sim):
            result = await rlm.acompletion("ctx", "q", event_sinks=[events])
        assert result.response == "call 1: ['context', 'context_0', 'history']"
        assert events.of(RootCompacted) == [] and len(sim.log) == 1

    def test_a_threshold_outside_0_to_1_is_refused(self) -> None:
        """compaction_threshold_pct is a share of the window: 85, or 0, names the fix."""
        with pytest.raises(ConfigError, match="compaction_threshold_pct is 85"):
            RLMConfig(root=model("m"), compaction=True, compaction_threshold_pct=85)


class TestLogger:
    @pytest.mark.asyncio
    async def test_the_log_file_has_metadata_then_one_line_per_root_turn(self, tmp_path: Path) -> None:
        """RLMLogger(log_dir) writes the official JSONL: a metadata line (no API key), then
        an iteration line per root turn with its prompt, reply, code blocks, sub-calls (with
        their usage) and the answer; the result carries the same trajectory."""
        ask = '```repl\nreply = llm_query("TASK ask\\nsay hi")\nprint(reply)\n```'
        done = '```repl\nanswer["content"] = "done"\nanswer["ready"] = True\n```'
        async with open_sim(scripted(ask, done)) as sim:
            logger = RLMLogger(log_dir=str(tmp_path / "logs"))
            backend = {
                "model_name": "sim-model",
                "base_url": sim.base_url,
                "api_key": "secret",
                "prices": ModelPrice.free(),
            }
            rlm = RLM(backend="openai", backend_kwargs=backend, logger=logger)
            rlm.config = dataclasses.replace(rlm.config, sandbox=sandbox_config())
            result = await rlm.acompletion("the context", "q")
            await rlm.aclose()
        assert logger.log_file_path is not None
        text = await anyio.Path(logger.log_file_path).read_text()
        lines = [json.loads(line) for line in text.splitlines()]
        assert [line["type"] for line in lines] == ["metadata", "iteration", "iteration"]
        meta = lines[0]
        assert meta["root_model"] == "sim-model" and "api_key" not in meta["backend_kwargs"]
        first, second = lines[1], lines[2]
        assert [m["role"] for m in first["prompt"]] == ["system", "user"]
        block = first["code_blocks"][0]
        assert block["code"].startswith("reply = llm_query(")
        call = block["result"]["rlm_calls"][0]
        assert call["prompt"] == "TASK ask\nsay hi" and call["response"] == block["result"]["stdout"].strip()
        usage = call["usage_summary"]["model_usage_summaries"]["sim-model"]
        assert usage["total_calls"] == 1 and usage["total_input_tokens"] > 0
        assert block["result"]["locals"]["reply"].startswith("<str of length")
        assert block["result"]["locals"]["context"] == "<str of length 11>"
        assert (
            second["final_answer"] == "done" and second["code_blocks"][0]["result"]["final_answer"] == "done"
        )
        assert result.metadata == {
            "run_metadata": {k: v for k, v in meta.items() if k not in ("type", "timestamp")},
            "iterations": lines[1:],
        }
