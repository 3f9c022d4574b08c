"""Parity with the official `rlms` package (0.1.3), compared on the wire.

The same scenario runs twice against the simulator: once under the official package (in its
own venv, through `tests/_official.py`) and once under rlm_async. The simulator keeps every
request's body, so the tests compare what each package sent, message by message and field
by field — the system prompt with `{custom_tools_section}` and the orchestrator addendum,
the metadata message, the user prologue, the per-turn "Turn i/N:" messages, the "REPL
output:" observations and the plain sub-calls — plus what the tools received, the answers
and the sampling fields. Skipped without `.venv-official` (`.ci/install-official`); under
CI=true they fail instead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from _official import official_python, rlm_async_backend_kwargs, run_official, wire_messages
from conftest import sandbox_config

from rlm_async import RLM
from rlm_async.sim import LogEntry, Policies, PolicySpec, SimConfig, SimServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = (
    "You are a careful analyst with a Python REPL; `context` holds the document.\n"
    "Helpers: llm_query(prompt). Reply with ```repl``` blocks; set answer when done.{custom_tools_section}\n"
    'Literal braces are written {{"like": "this"}}.'
)
CONTEXT = "alpha beta gamma\n" * 20
QUERY = "How many lines mention beta?"
PROLOGUE = "Tip: count lines, not words."


def fence(code: str) -> str:
    return f"I will run code.\n```repl\n{code}\n```"


TURNS = [
    fence(
        "lines = context.splitlines()\n"
        "n = sum('beta' in line for line in lines)\n"
        "hint = lookup('beta', limit=limit)\n"
        "s = llm_query('Say hi in one word.')\n"
        "print('lines', len(lines), 'beta', n, hint, note)\n"
        "print('sub', len(s))"
    ),
    fence('answer["content"] = str(n)\nanswer["ready"] = True'),
]


def sim_for(replies: list[str]) -> SimConfig:
    # Neither package's prompt is the simulator's own, so its "other" policy answers both.
    return SimConfig(
        record_bodies=True, policies=Policies(other=PolicySpec(name="script", options={"replies": replies}))
    )


def official_script(kwargs: dict[str, Any]) -> str:
    """The scenario under the official package: `kwargs` become its RLM(...) arguments."""
    return f"""
import json
from rlm import RLM
received = []

def lookup(key, limit=1):
    received.append([key, limit])
    return f"{{key}}:{{limit}}"

ARGS = json.loads({json.dumps(json.dumps(kwargs))})
tools = {{
    "lookup": {{"tool": lookup, "description": "Look a key up in the index."}},
    "limit": 3,
    "note": {{"tool": "from the host", "description": "A note for you."}},
}}
r = RLM(backend="openai", backend_kwargs=backend_kwargs(), custom_tools=tools, **ARGS)
res = r.completion({CONTEXT!r}, root_prompt={QUERY!r})
report(answer=res.response, received=received)
"""


async def run_ours(sim: SimServer, kwargs: dict[str, Any]) -> dict[str, Any]:
    received: list[list[Any]] = []

    def lookup(key: str, limit: int = 1) -> str:
        received.append([key, limit])
        return f"{key}:{limit}"

    tools = {
        "lookup": {"tool": lookup, "description": "Look a key up in the index."},
        "limit": 3,
        "note": {"tool": "from the host", "description": "A note for you."},
    }
    rlm = RLM(backend="openai", backend_kwargs=rlm_async_backend_kwargs(sim), custom_tools=tools, **kwargs)
    rlm.config = dataclasses.replace(rlm.config, sandbox=sandbox_config())  # the tests' tier
    async with rlm:
        result = await rlm.acompletion(CONTEXT, QUERY)
    return {"answer": result.response, "received": received, "status": result.status}


def assert_same_messages(official: list[LogEntry], ours: list[LogEntry]) -> None:
    """Request by request, message by message, field by field."""
    theirs, mine = wire_messages(official), wire_messages(ours)
    assert len(mine) == len(theirs), f"{len(theirs)} official requests, {len(mine)} of ours"
    for i, (a, b) in enumerate(zip(theirs, mine, strict=True)):
        assert [m["role"] for m in b] == [m["role"] for m in a], f"request {i}: roles differ"
        for j, (ma, mb) in enumerate(zip(a, b, strict=True)):
            assert set(mb) == set(ma), f"request {i} message {j}: fields {sorted(mb)} vs {sorted(ma)}"
            assert mb["content"] == ma["content"], f"request {i} message {j} ({ma['role']}) differs"


@pytest.fixture(scope="module", autouse=True)
def _needs_official() -> None:
    official_python()


class TestOfficialPrompt:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("orchestrator", [True, False])
    async def test_messages_on_the_wire_match_the_official_package(self, orchestrator: bool) -> None:
        """With custom_system_prompt, custom tools, a user prologue and a plain sub-call,
        rlm_async sends the messages the official package sends, and its tools receive the
        same calls."""
        kwargs = {
            "custom_system_prompt": PROMPT,
            "user_prologue": PROLOGUE,
            "max_iterations": 5,
            "orchestrator": orchestrator,
        }
        async with SimServer(sim_for(TURNS)) as sim:
            official = await run_official(official_script(kwargs), sim)
        async with SimServer(sim_for(TURNS)) as sim:
            ours = await run_ours(sim, kwargs)
            ours_log = sorted(sim.log, key=lambda e: e.seq)
        assert official.report["answer"] == ours["answer"] == "20"
        assert official.report["received"] == ours["received"] == [["beta", 3]]
        assert len(official.requests) == 3  # two root turns and the sub-call between them
        assert_same_messages(official.requests, ours_log)
        system = wire_messages(ours_log)[0][0]["content"]
        assert "- `lookup`: Look a key up in the index." in system
        assert ("As an RLM, you should act as an orchestrator" in system) is orchestrator

    @pytest.mark.asyncio
    async def test_sampling_args_reach_the_wire_as_the_official_package_sends_them(self) -> None:
        """sampling_args go into every root request, and sub_sampling_args into sub-calls, with
        the same values the official package sends."""
        kwargs = {
            "custom_system_prompt": PROMPT,
            "max_iterations": 5,
            "sampling_args": {"temperature": 0.25, "top_p": 0.5, "seed": 11},
            "sub_sampling_args": {"temperature": 0.0, "seed": 3},
        }
        async with SimServer(sim_for(TURNS)) as sim:
            official = await run_official(official_script(kwargs), sim)
        async with SimServer(sim_for(TURNS)) as sim:
            await run_ours(sim, kwargs)
            ours_log = sorted(sim.log, key=lambda e: e.seq)
        fields = ("temperature", "top_p", "seed")
        theirs = [{k: e.body.get(k) for k in fields} for e in official.requests if e.body is not None]
        mine = [{k: e.body.get(k) for k in fields} for e in ours_log if e.body is not None]
        assert mine == theirs
        assert theirs[0] == {"temperature": 0.25, "top_p": 0.5, "seed": 11}
        assert theirs[1] == {"temperature": 0.0, "top_p": 0.5, "seed": 3}  # the sub-call
        assert_same_messages(official.requests, ours_log)

    @pytest.mark.asyncio
    async def test_max_errors_stops_after_the_same_turns(self) -> None:
        """max_errors: after that many turns in a row whose code failed, both packages stop
        (the official one raises, rlm_async ends with status "error"), having sent the same
        requests."""
        failing = [fence("print('try')\nraise ValueError('bad input')")]
        kwargs = {"custom_system_prompt": PROMPT, "max_iterations": 6, "max_errors": 2}
        script = (
            official_script(kwargs)
            .replace(
                "res = r.completion(",
                "from rlm.utils.exceptions import ErrorThresholdExceededError\ntry:\n    res = r.completion(",
            )
            .replace(
                "report(answer=res.response, received=received)",
                "except ErrorThresholdExceededError as exc:\n    report(error=str(exc))",
            )
        )
        script = script.replace("\nres = r.completion", "\n    res = r.completion")
        async with SimServer(sim_for(failing)) as sim:
            official = await run_official(script, sim)
        async with SimServer(sim_for(failing)) as sim:
            ours = await run_ours(sim, kwargs)
            ours_log = sorted(sim.log, key=lambda e: e.seq)
        assert "2 consecutive errors" in official.report["error"]
        assert ours["status"] == "error"
        assert len(ours_log) == len(official.requests) == 2
        assert_same_messages(official.requests, ours_log)

    @pytest.mark.asyncio
    async def test_out_of_iterations_the_last_request_matches(self) -> None:
        """When iterations run out, both packages make the same last request (the official
        "Please provide a final answer" as an assistant message) and answer with its reply."""
        never = [fence("print('still looking')")]
        kwargs = {"custom_system_prompt": PROMPT, "max_iterations": 2}
        async with SimServer(sim_for(never)) as sim:
            official = await run_official(official_script(kwargs), sim)
        async with SimServer(sim_for(never)) as sim:
            ours = await run_ours(sim, kwargs)
            ours_log = sorted(sim.log, key=lambda e: e.seq)
        assert len(official.requests) == len(ours_log) == 3
        assert_same_messages(official.requests, ours_log)
        last = wire_messages(ours_log)[-1][-1]
        assert last["role"] == "assistant" and last["content"].startswith("Please provide a final answer")
        assert ours["status"] == "max_iterations"
        assert ours["answer"] == official.report["answer"].strip()
