"""Custom tools (`custom_tools` / `custom_sub_tools`) end to end over real HTTP.

The simulator's scripted root model writes code that calls the tools by name inside a real
sandboxed worker; the call travels over the control channel and the host function runs in
the engine. The tests assert what the tools received, what the model was shown (the next
request's messages, from the simulator's log) and what the run returned; none asserts a
duration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import EventLog, sandbox_config, sim_config

from rlm_async import Tool
from rlm_async._events import ToolFinish, ToolStart, WorkerStart
from rlm_async._governor import BudgetLimits
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._tools import parse_tools
from rlm_async.exceptions import ConfigError
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer

pytestmark = pytest.mark.e2e


def fence(code: str) -> str:
    return f"Let me run this.\n```repl\n{code}\n```"


DONE = fence('answer["content"] = "done"\nanswer["ready"] = True')


def scripted(*replies: str) -> SimConfig:
    """A simulator whose root model replies with `replies`, one per turn (the last repeats)."""
    return SimConfig(
        record_bodies=True,
        policies=Policies(root=PolicySpec(name="script", options={"replies": list(replies)})),
    )


async def run(
    sim: SimServer,
    tools: dict[str, Any],
    *,
    events: EventLog | None = None,
    context: str = "a small context",
    **config: Any,
) -> RLMResult:
    sinks = [events] if events is not None else []
    async with RLM(config=sim_config(sim, **config), custom_tools=tools, event_sinks=sinks) as rlm:
        return await rlm.acompletion(context, "Use the tools.")


def user_messages(sim: SimServer) -> list[str]:
    """The last user message of every request the root model got, in arrival order."""
    out = []
    for entry in sorted(sim.log, key=lambda e: e.seq):
        assert entry.body is not None
        users = [m["content"] for m in entry.body["messages"] if m["role"] == "user"]
        out.append(users[-1])
    return out


class TestCalls:
    @pytest.mark.asyncio
    async def test_sync_and_async_tools_run_on_the_host(self, events: EventLog) -> None:
        """The code calls a sync and an async host function by name; each gets the JSON
        arguments it was called with, and the code gets their results back."""
        received: list[tuple[str, Any]] = []

        def add(a: int, b: int = 0) -> int:
            """Add two numbers."""
            received.append(("add", (a, b)))
            return a + b

        async def lookup(key: str, *, table: dict[str, list[int]]) -> dict[str, Any]:
            received.append(("lookup", (key, table)))
            await anyio.lowlevel.checkpoint()
            return {"key": key, "values": table.get(key, [])}

        code = (
            "s = add(2, b=3)\n"
            "r = lookup('x', table={'x': [1, 2], 'y': [3]})\n"
            "print('SUM', s, 'GOT', r)\n"
            'answer["content"] = f"{s} {r[\'values\']}"\nanswer["ready"] = True'
        )
        async with SimServer(scripted(fence(code))) as sim:
            result = await run(sim, {"add": add, "lookup": lookup}, events=events)
        assert result.status == "ok" and result.response == "5 [1, 2]"
        assert received == [("add", (2, 3)), ("lookup", ("x", {"x": [1, 2], "y": [3]}))]
        assert [e.tool for e in events.of(ToolStart)] == ["add", "lookup"]
        assert [(e.tool, e.status) for e in events.of(ToolFinish)] == [("add", "ok"), ("lookup", "ok")]

    @pytest.mark.asyncio
    async def test_plain_values_are_variables(self) -> None:
        """Plain values in custom_tools are variables of the REPL, copied in as JSON data."""
        code = 'answer["content"] = f"{threshold} {labels} {meta[\'k\']}"\nanswer["ready"] = True'
        async with SimServer(scripted(fence(code))) as sim:
            result = await run(sim, {"threshold": 5, "labels": ["a", "b"], "meta": {"k": None}})
        assert result.response == "5 ['a', 'b'] None"

    @pytest.mark.asyncio
    async def test_a_pooled_worker_gets_the_tools_and_values(self, events: EventLog) -> None:
        """With a worker pool the root's worker was pre-started with no context: its tools
        and values arrive with the context, and the code calls the tool and reads the value
        as in a worker started on demand."""
        received: list[int] = []

        def double(x: int) -> int:
            received.append(x)
            return 2 * x

        code = 'answer["content"] = f"{double(threshold)} {labels}"\nanswer["ready"] = True'
        async with SimServer(scripted(fence(code))) as sim:
            result = await run(
                sim, {"double": double, "threshold": 21, "labels": ["a"]}, events=events, worker_pool=1
            )
        assert result.status == "ok" and result.response == "42 ['a']"
        assert received == [21]
        assert [e.pooled for e in events.of(WorkerStart)] == [True]

    @pytest.mark.asyncio
    async def test_the_system_prompt_lists_names_signatures_and_docstrings(self) -> None:
        """rlm_async's own prompt names each tool with its signature and docstring, and each
        value with its type."""

        def search(query: str, k: int = 5) -> list[str]:
            """Search the product index.

            Longer notes that stay out of the prompt."""
            return []

        async with SimServer(scripted(DONE)) as sim:
            await run(
                sim, {"search": search, "limit": 3, "shop": {"tool": "acme", "description": "The shop."}}
            )
            entry = sim.log.entries[0]
        assert entry.body is not None
        system = entry.body["messages"][0]["content"]
        assert "- `search(query: str, k: int = 5) -> list[str]`: Search the product index." in system
        assert "Longer notes" not in system
        assert "- `limit`: a value of type int" in system
        assert "- `shop`: The shop." in system


class TestSecrets:
    @pytest.mark.asyncio
    async def test_a_tool_uses_its_secret_which_the_sandbox_cannot_reach(self) -> None:
        """A tool holding an API key works, while the code in the sandbox finds the key
        nowhere: not in the tool's function, its closure, the heap, the environment or the
        files it can read."""
        secret = "sk-test-" + secrets.token_hex(16)

        def sign(message: str) -> str:
            """Sign a message with the service key."""
            return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()

        # The probe knows the key's prefix only; the planted value proves it finds what is there.
        code = r"""
import gc, os
PREFIX = "sk-" + "test-"
sig = sign("hello")
found = set()
for obj in gc.get_objects():
    for ref in gc.get_referents(obj):
        if isinstance(ref, bytes):
            ref = ref.decode("latin-1")
        if isinstance(ref, str) and PREFIX in ref and ref != PREFIX:
            found.add(ref[:40])
where = [repr(getattr(sign, "__closure__", None)), repr(getattr(sign, "__wrapped__", None)), repr(sign.__defaults__)]
for path in ("/proc/self/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ", f"/proc/{os.getppid()}/cmdline"):
    try:
        where.append(open(path, "rb").read().decode("latin-1"))
    except OSError:
        pass
where.append(repr(dict(os.environ)))
found |= {w[w.index(PREFIX):][:40] for w in where if PREFIX in w}
answer["content"] = f"{sig} found={sorted(found)}"
answer["ready"] = True
"""
        async with SimServer(scripted(fence(code))) as sim:
            result = await run(sim, {"sign": sign, "planted": "sk-test-planted"})
        expected = hmac.new(secret.encode(), b"hello", hashlib.sha256).hexdigest()
        assert result.response is not None
        sig, found = result.response.split(" found=")
        assert sig == expected
        assert found.startswith("['sk-test-planted") and secret[8:] not in found  # planted seen, key not


class TestErrors:
    @pytest.mark.asyncio
    async def test_a_raising_tool_shows_the_model_a_short_traceback(self, events: EventLog) -> None:
        """A tool that raises shows the model `ToolError` with the exception and the tool's
        own frames, not the engine's; the code can catch it and go on."""

        def inner(key: str) -> str:
            raise KeyError(f"no record {key}")

        def fetch(key: str) -> str:
            return inner(key)

        code = "try:\n    fetch('k9')\nexcept ToolError as e:\n    print('CAUGHT', e)\nfetch('k10')"
        async with SimServer(scripted(fence(code), DONE)) as sim:
            result = await run(sim, {"fetch": fetch}, events=events)
            shown = user_messages(sim)[1]
        assert result.status == "ok"
        assert "CAUGHT fetch raised KeyError: 'no record k9'" in shown
        assert "ToolError: fetch raised KeyError: 'no record k10'" in shown
        assert "in fetch" in shown and "in inner" in shown
        assert "rlm_async" not in shown and "anyio" not in shown
        assert [e.status for e in events.of(ToolFinish)] == ["error", "error"]

    @pytest.mark.asyncio
    async def test_arguments_and_results_must_be_json(self) -> None:
        """Arguments that are not JSON data fail in the sandbox before anything is sent; a
        result that is not JSON data is a ToolError naming the tool and the fix."""
        calls: list[Any] = []

        def bad_result() -> Any:
            calls.append("bad_result")
            return {1, 2}

        def echo(x: Any) -> Any:
            calls.append(x)
            return x

        code = (
            "for f in (lambda: echo({1, 2}), bad_result, lambda: echo((1, 'a'))):\n"
            "    try:\n        print('OK', f())\n"
            "    except (TypeError, ToolError) as e:\n        print(type(e).__name__, e)"
        )
        async with SimServer(scripted(fence(code), DONE)) as sim:
            await run(sim, {"echo": echo, "bad_result": bad_result})
            shown = user_messages(sim)[1]
        assert "TypeError echo: arguments must be JSON data" in shown
        assert "ToolError bad_result returned a set, which cannot cross into the sandbox" in shown
        assert "OK [1, 'a']" in shown  # a tuple crosses as a list
        assert calls == ["bad_result", [1, "a"]]

    @pytest.mark.parametrize(
        ("tools", "message"),
        [
            ({"llm_query": len}, "reserved"),
            ({"context_2": len}, "reserved"),
            ({"_hidden": len}, "reserved"),
            ({"not a name": len}, "not a valid Python name"),
            ({"lambda": len}, "not a valid Python name"),
            ({"conn": object()}, "cannot cross into the sandbox"),
            ({"f": Tool(len, max_concurrency=0)}, "max_concurrency"),
            ({"f": {"tool": len, "desc": "x"}}, "unknown key"),
        ],
    )
    def test_bad_entries_are_refused_at_construction(self, tools: dict[str, Any], message: str) -> None:
        """A bad tool entry is a ConfigError at construction, naming the entry and the fix."""
        with pytest.raises(ConfigError, match=message):
            RLM(backend_kwargs={"model_name": "m", "base_url": "http://127.0.0.1:9/v1"}, custom_tools=tools)


class TestLimits:
    @pytest.mark.asyncio
    async def test_tool_calls_count_against_the_budget_of_calls(self) -> None:
        """Each tool call is one call of the query's budget: past `max_calls` the code gets
        BudgetExceeded and the tool is not run."""
        ran: list[int] = []

        def tick(i: int) -> int:
            ran.append(i)
            return i

        code = (
            "done = []\nfor i in range(5):\n    try:\n        done.append(tick(i))\n"
            "    except BudgetExceeded as e:\n        print('REFUSED', i, e)\n        break"
        )
        async with SimServer(scripted(fence(code), DONE)) as sim:
            result = await run(sim, {"tick": tick}, budget=BudgetLimits(max_calls=3))
            requests = len(sim.log)
        # The first root turn is one call, two ticks fill the cap of 3; the next root turn is refused.
        assert ran == [0, 1]
        assert requests == 1
        assert result.status == "budget_exceeded"

    @pytest.mark.asyncio
    async def test_a_tool_call_counts_against_the_cells_deadline(self) -> None:
        """Time in a tool counts toward the cell's timeout (unlike a sub-call's): a tool that
        never returns is cancelled when the cell times out, and the model is told."""
        cancelled = threading.Event()

        async def hang() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        async with SimServer(scripted(fence("hang()"), DONE)) as sim:
            result = await run(sim, {"hang": hang}, sandbox=sandbox_config(cell_timeout_s=1.0))
            shown = user_messages(sim)[1]
        assert cancelled.is_set()
        assert "cell_timeout_s" in shown
        assert result.status == "ok"

    @pytest.mark.asyncio
    @pytest.mark.parametrize(("cap", "expected"), [(None, 8), (2, 2)])
    async def test_concurrent_calls_run_as_tasks_under_a_per_tool_cap(
        self, cap: int | None, expected: int
    ) -> None:
        """Eight calls from the code's threads run at once as tasks in the engine; with
        `Tool(max_concurrency=2)` at most two of them run at a time."""
        state = {"in_flight": 0, "finished": 0, "peak": 0}
        changed = [anyio.Event()]

        def bump() -> None:
            changed[0].set()
            changed[0] = anyio.Event()

        async def work(i: int) -> int:
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            bump()
            # Wait until as many run at once as may (the cap, or all eight), or no other can come.
            while state["in_flight"] < (cap or 8) and state["in_flight"] + state["finished"] < 8:
                await changed[0].wait()
            state["in_flight"] -= 1
            state["finished"] += 1
            bump()
            return i * i

        code = (
            "from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(8) as pool:\n    out = list(pool.map(work, range(8)))\n"
            'answer["content"] = str(out)\nanswer["ready"] = True'
        )
        tool: Any = work if cap is None else Tool(work, max_concurrency=cap)
        async with SimServer(scripted(fence(code))) as sim:
            result = await run(sim, {"work": tool})
        assert result.response == str([i * i for i in range(8)])
        assert state["peak"] == expected and state["finished"] == 8


class TestSubTools:
    @pytest.mark.asyncio
    async def test_a_child_rlm_calls_its_sub_tools(self) -> None:
        """A child RLM (rlm_query under max_depth=2) has custom_sub_tools and not the root's
        custom_tools; the root has its own."""
        root = fence(
            "r = rlm_query('a task for the child')\n"
            "answer['content'] = f\"root:{root_only()} {'sub_only' in globals()} child:{r}\"\nanswer['ready'] = True"
        )
        child = fence(
            "answer['content'] = f\"{sub_only()} {'root_only' in globals()}\"\nanswer['ready'] = True"
        )
        policy = PolicySpec(
            name="script", options={"replies": [child], "by_query": {"Use the tools.": [root]}}
        )
        config = SimConfig(policies=Policies(root=policy))
        async with SimServer(config) as sim:
            rlm = RLM(
                config=sim_config(sim, max_depth=2),
                custom_tools={"root_only": lambda: "R"},
                custom_sub_tools={"sub_only": lambda: "S"},
            )
            async with rlm:
                result = await rlm.acompletion("ctx", "Use the tools.")
        assert result.response == "root:R False child:S False"

    def test_child_rlms_get_the_sub_tools(self) -> None:
        """custom_sub_tools are a child RLM's tools; without them, children inherit custom_tools."""
        rlm = RLM(
            backend_kwargs={"model_name": "m", "base_url": "http://127.0.0.1:9/v1"},
            custom_tools={"a": len},
            custom_sub_tools={"b": len},
        )
        assert [e.name for e in rlm.config.tools_for_depth(0).entries] == ["a"]
        assert [e.name for e in rlm.config.tools_for_depth(1).entries] == ["b"]
        inherited = dataclasses.replace(rlm.config, sub_tools=None)
        assert [e.name for e in inherited.tools_for_depth(2).entries] == ["a"]
        assert not parse_tools({}).entries

    def names(self, entries: Sequence[Any]) -> list[str]:
        return [e.name for e in entries]


class TestProtocol:
    def test_a_tool_request_names_a_tool_and_no_model(self) -> None:
        """The engine reads a worker's tool request strictly: an identifier as the tool, no
        model, one argument blob; a tool name on any other request is a violation."""
        from rlm_async.sandbox._channel import ProtocolViolation
        from rlm_async.sandbox._protocol import parse_request

        args = b'{"args": [], "kwargs": {}}'  # a fresh blob each time: parsing consumes it
        rid, request = parse_request(
            {"op": "request", "id": 1, "kind": "tool", "tool": "f", "lengths": [len(args)]}, bytearray(args)
        )
        assert (rid, request.op, request.tool, request.prompts) == (1, "tool", "f", (args.decode(),))
        for bad in (
            {"kind": "tool", "tool": "not a name"},
            {"kind": "tool", "tool": None},
            {"kind": "tool", "tool": "f", "model": "m"},
            {"kind": "llm_query", "tool": "f"},
        ):
            with pytest.raises(ProtocolViolation):
                parse_request(
                    {"op": "request", "id": 2, "lengths": [len(args)], "model": None, **bad}, bytearray(args)
                )

    @pytest.mark.asyncio
    async def test_a_forged_call_of_an_unknown_tool_is_a_tool_error(self) -> None:
        """Code that forges a request for a tool that does not exist gets ToolError; the
        engine runs nothing and the worker lives on."""
        code = (
            "import json\nch = llm_query.__self__.channel\n"
            "try:\n    ch.call_tool('nope', json.dumps({'args': [], 'kwargs': {}}))\n"
            "except ToolError as e:\n    print('REFUSED', e)\n"
            "try:\n    ch.call_tool('known', 'not json')\n"
            "except ToolError as e:\n    print('REFUSED', e)"
        )
        ran: list[int] = []
        async with SimServer(scripted(fence(code), DONE)) as sim:
            result = await run(sim, {"known": lambda: ran.append(1)})
            shown = user_messages(sim)[1]
        assert "REFUSED there is no tool named 'nope' here" in shown
        assert "REFUSED known: the arguments are not JSON" in shown
        assert ran == [] and result.status == "ok"
