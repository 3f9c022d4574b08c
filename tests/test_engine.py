"""The RLM loop against a scripted model and a real REPL worker.

Every test runs `RLM.acompletion` end to end with a `ScriptedTransport`: the scripted root
model writes ```repl blocks, a real sandboxed worker runs them, and the test checks what the
model was shown next, what the engine recorded, and how the run ended. Nothing here sleeps
or measures time: overlap and ordering are observed through the transport and the events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest
from conftest import EventLog, NetworkAccessDenied, model, rlm_config, sandbox_config

from rlm_async._config import RLMConfig
from rlm_async._events import (
    CallFinish,
    CallStart,
    CellFinish,
    CellStart,
    NodeFinish,
    NodeStart,
    QueryFinish,
    QueryStart,
    WorkerKill,
    WorkerStart,
)
from rlm_async._governor import BudgetLimits, Governor, GovernorConfig, ModelPrice, RetryConfig
from rlm_async._prompts import root_system_prompt, sub_system_prompt
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._trace import summarize
from rlm_async._types import Completion, ModelRequest, Usage
from rlm_async.exceptions import BadRequest, ConfigError, ContextTypeError, SandboxError, ServerError
from rlm_async.testing import ScriptedTransport

ROOT_SYSTEM = root_system_prompt()
SUB_SYSTEM = sub_system_prompt()

Reply = str | Completion
Handler = Callable[[ModelRequest], Reply | Awaitable[Reply]]


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


def turn(request: ModelRequest) -> int:
    """How many replies the model already gave in this conversation."""
    return sum(1 for m in request.messages if m.role == "assistant")


def last_user(request: ModelRequest) -> str:
    return next(m.content for m in reversed(request.messages) if m.role == "user")


def answer_line(text: str, tag: str = "OUT") -> str:
    """The value printed as `OUT: value` in an observation."""
    m = re.search(rf"^{tag}: (.*)$", text, re.M)
    assert m is not None, f"no {tag}: line in {text!r}"
    return m.group(1)


class Model:
    """A scripted root model (one reply per turn, or a function) and sub model.

    Requests are told apart by their system prompt and model name: the root model's turns
    ("root-model" with the root system prompt), child RLM turns (another model with the
    root system prompt), and plain sub-calls (the sub-call system prompt)."""

    def __init__(
        self,
        root: Sequence[str] | Handler,
        *,
        sub: Handler | None = None,
        child: Sequence[str] | Handler | None = None,
        root_model: str = "root-model",
    ) -> None:
        self._root = root
        self._sub = sub or (lambda r: "sub:" + last_user(r))
        self._child = child
        self.root_model = root_model
        self.transport = ScriptedTransport(self)
        self.root_requests: list[ModelRequest] = []
        self.child_requests: list[ModelRequest] = []
        self.sub_requests: list[ModelRequest] = []

    @staticmethod
    def _pick(script: Sequence[str] | Handler, request: ModelRequest) -> Reply | Awaitable[Reply]:
        if callable(script):
            return script(request)
        n = turn(request)
        assert n < len(script), f"the script has no reply for turn {n}: {last_user(request)[-300:]!r}"
        return script[n]

    def __call__(self, request: ModelRequest) -> Reply | Awaitable[Reply]:
        if request.messages[0].content == SUB_SYSTEM:
            self.sub_requests.append(request)
            return self._sub(request)
        if request.model == self.root_model:
            self.root_requests.append(request)
            return self._pick(self._root, request)
        self.child_requests.append(request)
        assert self._child is not None, f"unexpected child RLM turn on {request.model}"
        return self._pick(self._child, request)

    @property
    def requests(self) -> list[ModelRequest]:
        return self.transport.requests

    def observation(self, turn_index: int) -> str:
        """What the root model was shown after its reply number `turn_index` (0-based)."""
        return last_user(self.root_requests[turn_index + 1])


async def run(
    model_: Model,
    context: Any = "the context",
    query: str | None = "the query",
    *,
    events: EventLog | None = None,
    **config: Any,
) -> RLMResult:
    sinks = [events] if events is not None else []
    async with RLM(config=rlm_config(**config), transport=model_.transport, event_sinks=sinks) as rlm:
        return await rlm.acompletion(context, query)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


# =========================================================================== the loop


class TestLoop:
    @pytest.mark.asyncio
    async def test_printed_output_is_the_next_observation(self) -> None:
        """What a cell prints is shown to the model in its next turn, and the loop goes on."""
        m = Model(
            [
                repl("print('len', len(context)); print('upper', context.upper())"),
                "FINAL(done)",
            ]
        )
        result = await run(m, "abc def")
        observation = m.observation(0)
        assert "len 7" in observation and "upper ABC DEF" in observation
        assert result.status == "ok" and result.response == "done"
        assert result.iterations == 2
        assert [r.kind for r in result.calls] == ["root", "root"]

    @pytest.mark.asyncio
    async def test_history_is_append_only_and_byte_identical(self) -> None:
        """Each root request repeats every earlier message unchanged, then adds exactly the
        last reply and its observation."""
        m = Model([repl(f"x{i} = {i}; print('step', x{i})") for i in range(4)] + ["FINAL(ok)"])
        result = await run(m)
        assert result.response == "ok"
        reqs = m.root_requests
        assert len(reqs) == 5
        assert reqs[0].messages[0].content == ROOT_SYSTEM
        assert [m_.role for m_ in reqs[0].messages] == ["system", "user"]
        for earlier, later in itertools.pairwise(reqs):
            n = len(earlier.messages)
            assert later.messages[:n] == earlier.messages
            assert [m_.role for m_ in later.messages[n:]] == ["assistant", "user"]
            assert later.messages[n].content == m._pick(m._root, earlier)

    @pytest.mark.asyncio
    async def test_variables_persist_between_turns(self) -> None:
        """A variable set in one turn's cell is there in the next turn's cell."""
        m = Model([repl("secret = context[::-1]"), repl("print('OUT:', secret)"), "FINAL(x)"])
        await run(m, "stressed")
        assert answer_line(m.observation(1)) == "desserts"

    @pytest.mark.asyncio
    async def test_every_repl_block_of_a_reply_runs_in_order(self) -> None:
        """Several ```repl blocks in one reply run one after another in the same namespace,
        and the observation shows each block's output in order."""
        reply = (
            "First I set up.\n"
            + repl("value = 20; print('block one')")
            + "\nThen I use it.\n"
            + repl("value += 1; print('block two', value)")
            + "\nAnd once more.\n"
            + repl("print('block three', value * 2)")
        )
        m = Model([reply, "FINAL(x)"])
        events = EventLog()
        await run(m, events=events)
        observation = m.observation(0)
        one, two, three = (observation.index(s) for s in ("block one", "block two 21", "block three 42"))
        assert one < two < three
        assert "Output of repl block 1 of 3" in observation
        assert [e.cell for e in events.of(CellStart)] == [1, 2, 3]

    @pytest.mark.asyncio
    async def test_python_blocks_are_not_run(self) -> None:
        """Only ```repl blocks run: a ```python (or bare ```) block in the reply is text."""
        reply = (
            "Here is an idea:\n```python\nprint('PY' + 'THON')\n```\n"
            "```\nprint('BA' + 'RE')\n```\n" + repl("print('RE' + 'PL')")
        )
        m = Model([reply, "FINAL(x)"])
        events = EventLog()
        await run(m, events=events)
        observation = m.observation(0)
        assert "REPL" in observation
        assert "PYTHON" not in observation and "BARE" not in observation
        assert len(events.of(CellStart)) == 1

    @pytest.mark.asyncio
    async def test_long_output_is_truncated_with_a_marker(self) -> None:
        """A block's output longer than `output_limit_chars` is cut there, and the model is
        told how many characters it did not see."""
        m = Model([repl("print('A' * 5000)"), "FINAL(x)"])
        await run(m, output_limit_chars=300)
        observation = m.observation(0)
        shown, marker = observation.split("\n... [output truncated: ", 1)
        assert len(shown) == 300
        cut = int(marker.split()[0])
        assert cut == len("REPL output:\n") + 5000 - 300
        assert "more characters not shown]" in marker

    @pytest.mark.asyncio
    async def test_syntax_error_is_shown_to_the_model(self) -> None:
        """Code that does not parse is an observation (SyntaxError and where), not a failure
        of the run."""
        m = Model([repl("for i in range(3)\n    print(i)"), repl("print('OUT:', 'fine')"), "FINAL(x)"])
        result = await run(m)
        assert "SyntaxError" in m.observation(0)
        assert answer_line(m.observation(1)) == "fine"
        assert result.status == "ok"

    @pytest.mark.asyncio
    async def test_exception_in_code_is_shown_and_the_worker_lives_on(self) -> None:
        """A raised exception shows as its traceback's end; variables made before survive."""
        m = Model([repl("kept = 7\n1 / 0"), repl("print('OUT:', kept)"), "FINAL(x)"])
        await run(m)
        assert "ZeroDivisionError" in m.observation(0)
        assert answer_line(m.observation(1)) == "7"

    @pytest.mark.asyncio
    async def test_feedback_counts_iterations(self) -> None:
        """Each observation tells the model which iteration it is on and how many are left."""
        m = Model([repl("print(1)"), repl("print(2)"), "FINAL(x)"])
        await run(m, max_iterations=5)
        assert "[iteration 1 of 5; 4 left]" in m.observation(0)
        assert "[iteration 2 of 5; 3 left]" in m.observation(1)


# =========================================================================== finishing


class TestFinishing:
    @pytest.mark.asyncio
    async def test_answer_dict_ends_the_run(self) -> None:
        """Setting answer["content"] and answer["ready"] = True ends the run at once with
        that content, even when the reply goes on after the block."""
        code = 'answer["content"] = "forty " + str(2)\nanswer["ready"] = True'
        m = Model([repl(code) + "\n" + repl("print('never')")])
        events = EventLog()
        result = await run(m, events=events)
        assert (result.status, result.response, result.iterations) == ("ok", "forty 2", 1)
        assert len(m.requests) == 1
        assert len(events.of(CellStart)) == 1

    @pytest.mark.asyncio
    async def test_answer_dict_without_ready_does_not_end(self) -> None:
        """Content without ready=True is just a variable: the loop continues."""
        m = Model([repl('answer["content"] = "draft"'), "FINAL(final)"])
        result = await run(m)
        assert result.response == "final" and len(m.root_requests) == 2

    @pytest.mark.asyncio
    async def test_final_line_ends_the_run(self) -> None:
        """FINAL(...) on a line of its own ends the run; the answer keeps inner parentheses."""
        m = Model(["I know it.\nFINAL(the answer (with notes))"])
        result = await run(m)
        assert (result.status, result.response) == ("ok", "the answer (with notes)")
        assert len(m.requests) == 1

    @pytest.mark.asyncio
    async def test_final_inside_code_or_mid_line_does_not_end(self) -> None:
        """FINAL written inside a code block or mid-sentence is not the end of the run."""
        m = Model([repl("s = 'FINAL(no)'\nprint(s)") + "\nI will write FINAL(x) later.", "FINAL(yes)"])
        result = await run(m)
        assert result.response == "yes" and len(m.root_requests) == 2

    @pytest.mark.asyncio
    async def test_final_var_answers_with_the_variable(self) -> None:
        """FINAL_VAR(name) after a block answers with str() of the variable the block set."""
        m = Model([repl("result = [n * n for n in range(4)]") + "\nFINAL_VAR(result)"])
        result = await run(m)
        assert (result.status, result.response) == ("ok", "[0, 1, 4, 9]")

    @pytest.mark.asyncio
    async def test_final_var_of_a_missing_variable_tells_the_model(self) -> None:
        """FINAL_VAR of a name that does not exist does not end the run: the model is told
        and gets another turn."""
        m = Model(["FINAL_VAR(nowhere)", repl("nowhere = 'here'") + "\nFINAL_VAR(nowhere)"])
        result = await run(m)
        assert "no variable named 'nowhere' exists" in m.observation(0)
        assert (result.status, result.response) == ("ok", "here")

    @pytest.mark.asyncio
    async def test_max_iterations_makes_one_final_call(self) -> None:
        """After max_iterations turns without an answer, one last call asks for the best
        answer; the run ends with status "max_iterations" and that answer."""

        def root(request: ModelRequest) -> str:
            if "You have used all 3 iterations" in last_user(request):
                return "Best guess:\nFINAL(partial)"
            return repl(f"print('turn', {turn(request)})")

        m = Model(root)
        result = await run(m, max_iterations=3)
        assert result.status == "max_iterations"
        assert result.response == "partial"
        assert result.detail is not None and "max_iterations (3)" in result.detail
        assert [r.kind for r in result.calls] == ["root", "root", "root", "final"]
        assert result.iterations == 3

    @pytest.mark.asyncio
    async def test_a_model_that_never_writes_code_is_bounded(self) -> None:
        """Prose without code or FINAL is answered with a reminder; after max_iterations the
        run ends with status "max_iterations" instead of looping."""
        m = Model(lambda r: "I am still thinking about it.")
        result = await run(m, max_iterations=4)
        assert "had no ```repl block and no FINAL(...) line" in m.observation(0)
        assert result.status == "max_iterations"
        assert len(m.requests) == 5
        assert result.response == "I am still thinking about it."


# =========================================================================== worker crashes


class TestWorkerCrash:
    @pytest.mark.asyncio
    async def test_a_crashed_worker_is_replaced_and_the_model_told(self) -> None:
        """A cell that kills its worker (os._exit) shows the model what happened; a fresh
        worker with `context` reloaded runs the next cell, and the query finishes."""
        m = Model(
            [
                repl("mine = 1; print('OUT:', len(context))"),
                repl("import os; os._exit(1)"),
                repl("print('OUT:', len(context), context[:5], 'mine' in globals())"),
                "FINAL(recovered)",
            ]
        )
        events = EventLog()
        result = await run(m, "hello world", events=events)
        crashed = m.observation(1)
        assert "the REPL worker was killed" in crashed and "every variable you created is gone" in crashed
        assert "exited with code 1" in crashed
        assert answer_line(m.observation(2)) == "11 hello False"
        assert (result.status, result.response) == ("ok", "recovered")
        first, second = events.worker_pids()
        assert first != second
        assert [e.status for e in events.of(CellFinish)] == ["ok", "crashed", "ok"]
        assert not pid_alive(first) and not pid_alive(second)


# =========================================================================== depth routing


class TestDepthRouting:
    @pytest.mark.asyncio
    async def test_sub_calls_use_the_sub_model(self) -> None:
        """llm_query and llm_batch go to the sub model with the sub-call system prompt, at
        depth 1, and their answers come back in order."""
        code = "a = llm_query('one')\nb = llm_batch(['two', 'three'])\nprint('OUT:', a, b)"
        m = Model([repl(code), "FINAL(x)"])
        result = await run(m)
        assert answer_line(m.observation(0)) == "sub:one ['sub:two', 'sub:three']"
        assert {r.model for r in m.sub_requests} == {"sub-model"}
        subs = [r for r in result.calls if r.kind == "sub"]
        assert len(subs) == 3 and {(r.depth, r.model) for r in subs} == {(1, "sub-model")}
        assert sorted(s.response for s in result.subcall_results) == ["sub:one", "sub:three", "sub:two"]

    @pytest.mark.asyncio
    async def test_without_a_sub_model_sub_calls_use_the_root_model(self) -> None:
        """With no `sub` configured, sub-calls go to the root model (sub-call prompt)."""
        m = Model([repl("print('OUT:', llm_query('q'))"), "FINAL(x)"])
        await run(m, sub=None)
        assert [r.model for r in m.sub_requests] == ["root-model"]

    @pytest.mark.asyncio
    async def test_at_max_depth_1_rlm_query_is_a_plain_call(self) -> None:
        """With max_depth=1 (the paper's setting), rlm_query and rlm_query_batched are plain
        sub-calls: no child loop, no second worker."""
        code = "a = rlm_query('p1')\nb = rlm_query_batched(['p2', 'p3'])\nprint('OUT:', a, b)"
        m = Model([repl(code), "FINAL(x)"])
        events = EventLog()
        result = await run(m, max_depth=1, events=events)
        assert answer_line(m.observation(0)) == "sub:p1 ['sub:p2', 'sub:p3']"
        assert len(m.sub_requests) == 3 and m.child_requests == []
        assert len(events.worker_pids()) == 1
        assert [n["depth"] for n in result.nodes if n["kind"] == "rlm"] == [0]

    @pytest.mark.asyncio
    async def test_at_max_depth_2_rlm_query_runs_a_child_rlm(self) -> None:
        """With max_depth=2, rlm_query starts a child RLM: its own loop on the sub model,
        its own worker holding the prompt as `context`, and its answer returned to the
        parent's code."""

        def child_turn(request: ModelRequest) -> str:
            if turn(request) == 0:
                return repl("print('OUT:', context.upper())")
            return f"FINAL(child saw {answer_line(last_user(request))})"

        m = Model([repl("print('OUT:', rlm_query('tiny context'))"), "FINAL(x)"], child=child_turn)
        events = EventLog()
        result = await run(m, max_depth=2, events=events)
        assert answer_line(m.observation(0)) == "child saw TINY CONTEXT"
        assert {r.model for r in m.child_requests} == {"sub-model"}
        assert m.child_requests[0].messages[0].content == ROOT_SYSTEM
        assert "str with 12 total characters" in m.child_requests[0].messages[1].content
        pids = events.worker_pids()
        assert len(pids) == 2 and len(set(pids)) == 2
        rlm_nodes = [n for n in result.nodes if n["kind"] == "rlm"]
        assert [n["depth"] for n in rlm_nodes] == [0, 1]
        assert rlm_nodes[1]["parent_id"] == rlm_nodes[0]["node_id"]
        child_calls = [r for r in result.calls if r.depth == 1]
        assert [r.kind for r in child_calls] == ["child", "child"]
        assert {r.parent_id for r in child_calls} == {rlm_nodes[1]["node_id"]}

    @pytest.mark.asyncio
    async def test_depth_models_choose_the_model_per_depth(self) -> None:
        """depth_models[d] serves depth d: the root loop, a child loop, and the child's
        plain sub-calls each go to their own model."""

        def child_turn(request: ModelRequest) -> str:
            if turn(request) == 0:
                return repl("print('OUT:', llm_query('leaf'))")
            return f"FINAL({answer_line(last_user(request))})"

        m = Model([repl("print('OUT:', rlm_query('mid'))"), "FINAL(x)"], child=child_turn, root_model="d0")
        result = await run(
            m,
            max_depth=2,
            depth_models=(model("d0"), model("d1"), model("d2")),
        )
        assert answer_line(m.observation(0)) == "sub:leaf"
        assert sorted({(r.depth, r.model) for r in result.calls}) == [(0, "d0"), (1, "d1"), (2, "d2")]
        assert set(result.by_model) == {"d0", "d1", "d2"}

    @pytest.mark.asyncio
    async def test_llm_query_can_pick_a_configured_model_by_name(self) -> None:
        """llm_query(p, model="name") and llm_batch(..., model=...) use that configured model."""
        code = "print('OUT:', llm_query('q', model='big-model'), llm_batch(['r'], model='big-model'))"
        m = Model([repl(code), "FINAL(x)"])
        await run(m, others=(model("big-model"),))
        assert [r.model for r in m.sub_requests] == ["big-model", "big-model"]

    @pytest.mark.asyncio
    async def test_an_unknown_model_name_is_an_error_string(self) -> None:
        """Naming a model that is not configured returns "Error:" strings naming the known
        models, sends nothing, and the loop goes on."""
        code = (
            "print('OUT:', llm_query('q', model='gpt-nope'))\n"
            "print('N:', len(llm_batch(['a', 'b'], model='x')))"
        )
        m = Model([repl(code), "FINAL(x)"])
        result = await run(m)
        text = answer_line(m.observation(0))
        assert text.startswith("Error: unknown model 'gpt-nope'")
        assert "root-model" in text and "sub-model" in text
        assert answer_line(m.observation(0), "N") == "2"
        assert m.sub_requests == []
        assert result.status == "ok"


# =========================================================================== sub-call failures


class TestSubCallFailures:
    @pytest.mark.asyncio
    async def test_one_failing_batch_item_fills_only_its_slot(self) -> None:
        """A batch item whose call fails holds an "Error:" string; the others hold their
        answers, the failure is in `result.failures`, and the run goes on; it ends
        "partial" (never a plain "ok"), counting the one failed sub-call."""

        def sub(request: ModelRequest) -> str:
            if last_user(request) == "bad":
                raise BadRequest("the server refused this prompt", status_code=400)
            return "ok:" + last_user(request)

        code = "out = llm_batch(['a', 'bad', 'c'])\nfor o in out: print('OUT:', o)"
        m = Model([repl(code), "FINAL(x)"], sub=sub)
        result = await run(m)
        lines = re.findall(r"^OUT: (.*)$", m.observation(0), re.M)
        assert lines[0] == "ok:a" and lines[2] == "ok:c"
        assert lines[1].startswith("Error: ") and "the server refused this prompt" in lines[1]
        assert len(result.failures) == 1
        assert result.failures[0].depth == 1 and "refused" in result.failures[0].error
        assert result.status == "partial" and result.failed_subcalls == 1
        assert result.detail is not None and "1 sub-call(s) failed" in result.detail
        assert [r.status for r in result.calls if r.kind == "sub"].count("error") == 1

    @pytest.mark.asyncio
    async def test_retryable_failure_after_retries_is_an_error_string(self) -> None:
        """A sub-call that keeps failing with a retryable error ends as an "Error:" slot
        once the attempts run out; the record counts every attempt."""
        attempts = 0

        def sub(request: ModelRequest) -> str:
            nonlocal attempts
            attempts += 1
            raise ServerError("HTTP 503 from the server", status_code=503)

        governor = Governor(GovernorConfig(retry=RetryConfig(max_attempts=2, base_s=0.0)))
        m = Model([repl("print('OUT:', llm_query('q'))"), "FINAL(x)"], sub=sub)
        async with RLM(config=rlm_config(), transport=m.transport, governor=governor) as rlm:
            result = await rlm.acompletion("ctx", "q")
        assert answer_line(m.observation(0)).startswith("Error: ")
        assert attempts == 2
        (failed,) = [r for r in result.calls if r.kind == "sub"]
        assert (failed.status, failed.attempts) == ("error", 2)

    @pytest.mark.asyncio
    async def test_a_child_rlm_whose_model_fails_fills_its_slot(self) -> None:
        """A child RLM whose own root call fails fatally gives its slot an "Error:" string;
        its siblings and the parent run on."""

        def child_turn(request: ModelRequest) -> str:
            if "BROKEN" in request.messages[1].content:
                raise BadRequest("child model rejected the request", status_code=400)
            return "FINAL(child fine)"

        code = "out = rlm_query_batched(['BROKEN one', 'good one'])\nfor o in out: print('OUT:', o)"
        m = Model([repl(code), "FINAL(parent done)"], child=child_turn)
        result = await run(m, max_depth=2)
        lines = re.findall(r"^OUT: (.*)$", m.observation(0), re.M)
        assert lines[0].startswith("Error: ") and "child model rejected the request" in lines[0]
        assert lines[1] == "child fine"
        assert (result.status, result.response) == ("partial", "parent done")
        assert len(result.failures) == 1 and result.failures[0].depth == 1


# =========================================================================== budgets and deadlines


class TestBudget:
    @pytest.mark.asyncio
    async def test_max_calls_ends_with_a_partial_result(self) -> None:
        """With max_calls=4 a fan-out gets only the calls that fit; the run ends with status
        budget_exceeded naming the limit, never sends a fifth call, and every call that was
        sent is in `result.calls`."""
        code = "out = llm_batch([f'p{i}' for i in range(6)])\nprint('OUT:', out)"
        m = Model([repl(code), "FINAL(x)"])
        result = await run(m, budget=BudgetLimits(max_calls=4))
        assert result.status == "budget_exceeded"
        assert result.limit_hit == "calls"
        assert result.detail is not None and "calls cap is 4" in result.detail
        assert len(m.requests) == 4
        sent = [r for r in result.calls if r.status == "ok"]
        assert len(sent) == 4
        assert sorted(r.kind for r in sent) == ["root", "sub", "sub", "sub"]
        assert len(result.subcall_results) == 3
        refused = [r for r in result.calls if r.status == "budget"]
        assert refused and all(r.usage == Usage() and r.cost_usd == 0 for r in refused)

    @pytest.mark.asyncio
    async def test_a_budget_refusal_is_visible_to_the_code(self) -> None:
        """The code sees refused batch slots as "Error: budget exceeded" strings and a
        refused llm_query as BudgetExceeded, and can still finish with what it has; the
        result keeps that answer but says the budget cut calls (never a silent "ok")."""
        code = (
            "out = llm_batch(['a', 'b', 'c'])\n"
            "refused = sum(o.startswith('Error: budget exceeded') for o in out)\n"
            "try:\n    llm_query('d')\n    raised = 'no'\n"
            "except BudgetExceeded as e:\n    raised = 'calls' in str(e)\n"
            "answer['content'] = f'{refused} refused, raised={raised}'\nanswer['ready'] = True"
        )
        m = Model([repl(code)])
        result = await run(m, budget=BudgetLimits(max_calls=3), keep_events=True)
        assert result.response == "1 refused, raised=True"
        totals = summarize(result.events).totals  # the trace counts calls as the result does
        assert (
            (totals.calls, totals.refused_calls) == (result.total.calls, result.total.refused_calls) == (3, 2)
        )
        assert (result.status, result.limit_hit) == ("budget_exceeded", "calls")
        assert result.detail is not None and "2 call(s) were refused" in result.detail
        assert len(m.requests) == 3

    @pytest.mark.asyncio
    async def test_deadline_ends_with_timeout_and_kills_the_worker(self) -> None:
        """max_seconds cancels a run blocked in a sub-call: status "timeout", limit
        "seconds", the hanging call recorded as cancelled, the worker killed."""

        async def hang(request: ModelRequest) -> str:
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        m = Model([repl("print('OUT:', llm_query('forever'))")], sub=hang)
        events = EventLog()
        result = await run(m, budget=BudgetLimits(max_seconds=0.5), events=events)
        assert (result.status, result.limit_hit) == ("timeout", "seconds")
        assert result.detail is not None and "deadline of 0.5 s" in result.detail
        assert result.response is None
        (pid,) = events.worker_pids()
        assert pid in [e.pid for e in events.of(WorkerKill)]
        assert not pid_alive(pid)
        assert [r.status for r in result.calls] == ["ok", "cancelled"]
        call_ids = [e.call_id for e in events.of(CallStart)]
        assert [e.call_id for e in events.of(CallFinish)] == call_ids
        assert events.of(CallFinish)[-1].status == "cancelled"
        root_node = result.nodes[0]
        assert root_node["status"] == "cancelled"


# =========================================================================== errors


class TestErrors:
    @pytest.mark.asyncio
    async def test_a_failing_root_call_ends_with_status_error(self) -> None:
        """A fatal error on a root turn ends the run with status "error" and the server's
        message in `detail`; nothing is raised."""

        def root(request: ModelRequest) -> str:
            raise BadRequest("context_length_exceeded: 200000 tokens > 128000", status_code=400)

        result = await run(Model(root))
        assert result.status == "error"
        assert result.detail is not None
        assert "root model call failed" in result.detail and "200000 tokens > 128000" in result.detail
        assert result.response is None
        assert [r.status for r in result.calls] == ["error"]

    @pytest.mark.asyncio
    async def test_an_unsupported_context_is_refused_before_any_call(self) -> None:
        """A context of the wrong type raises ContextTypeError naming the type; nothing is sent."""
        m = Model(["FINAL(x)"])
        with pytest.raises(ContextTypeError, match="item 1 is a int"):
            await run(m, ["ok", 3])
        assert m.requests == []

    @pytest.mark.asyncio
    async def test_a_query_that_is_not_a_str_is_refused_before_any_call(self) -> None:
        """`root_prompt` of another type names it (it was `TypeError: object of type 'int'
        has no len()` from deep in the engine); nothing is sent."""
        m = Model(["FINAL(x)"])
        bad: Any = 5
        with pytest.raises(
            ContextTypeError, match="root_prompt \\(the query\\) is a int; pass a str, or None"
        ):
            await run(m, "the context", bad)
        assert m.requests == []

    @pytest.mark.asyncio
    async def test_a_worker_that_cannot_start_raises_sandbox_error(self) -> None:
        """A sandbox that cannot run (a missing interpreter) raises SandboxError naming it."""
        m = Model(["FINAL(x)"])
        with pytest.raises(SandboxError, match="/no/such/python"):
            await run(m, sandbox=sandbox_config(python="/no/such/python"))
        assert m.requests == []

    @pytest.mark.asyncio
    async def test_a_dollar_cap_over_an_unpriced_model_is_refused_up_front(self) -> None:
        """A dollar budget with a model that has no known price raises ConfigError naming
        the model before any call or worker, not from inside a fan-out later."""
        m = Model([repl("print(llm_query('x'))"), "FINAL(x)"])
        events = EventLog()
        with pytest.raises(ConfigError, match=r"no price is known for model\(s\) \['sub-model'\]"):
            await run(m, budget=BudgetLimits(max_usd=1.0), sub_overrides={"prices": None}, events=events)
        assert m.requests == [] and events.of(WorkerStart) == []

    def test_bad_configuration_is_refused_at_construction(self) -> None:
        """max_depth < 1 and max_iterations < 1 are ConfigErrors that say what to use."""
        with pytest.raises(ConfigError, match="max_depth is 0; it must be at least 1"):
            rlm_config(max_depth=0)
        with pytest.raises(ConfigError, match="max_iterations is 0"):
            rlm_config(max_iterations=0)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("max_depth", "2"),
            ("max_depth", True),
            ("max_iterations", 2.5),
            ("output_limit_chars", 1e4),
            ("max_workers", "8"),
            ("max_errors", 3.0),
            ("max_pending_subcalls", False),
        ],
    )
    def test_a_count_that_is_not_a_whole_number_is_named(self, field: str, value: Any) -> None:
        """A "2" from an environment variable or a float from arithmetic: a ConfigError that
        names the field, where it was a TypeError in a comparison, or 2.5 turns accepted."""
        with pytest.raises(
            ConfigError, match=f"{field} is {re.escape(repr(value))}; it must be a whole number"
        ):
            rlm_config(**{field: value})

    @pytest.mark.parametrize(
        ("fields", "match"),
        [
            ({"max_tokens": -5}, "max_tokens is -5; use a positive number of tokens, or None"),
            ({"max_tokens": 0}, "max_tokens is 0; use a positive number"),
            ({"max_tokens": 2.5}, "max_tokens is 2.5; it must be a whole number"),
            ({"temperature": -0.1}, r"temperature is -0.1; use a number >= 0"),
            ({"temperature": float("nan")}, "temperature is nan; use a number >= 0"),
            ({"temperature": "0.7"}, "temperature is '0.7'; use a number >= 0"),
            ({"timeout_s": 0}, "timeout_s is 0; use a number of seconds > 0"),
            ({"timeout_s": float("nan")}, "timeout_s is nan; use a number of seconds > 0"),
            ({"model": ""}, "model is ''; name the model the endpoint serves"),
            ({"context_window": 8192.0}, "context_window is 8192.0; it must be a whole number"),
        ],
    )
    def test_a_model_setting_out_of_range_is_named(self, fields: dict[str, Any], match: str) -> None:
        """A negative max_tokens was sent as it was and reserved as a negative budget (the
        governor then warned of every call "output_tokens 0 > reserved -5"); a NaN timeout
        or temperature reached the wire. Each is refused by name."""
        with pytest.raises(ConfigError, match=match):
            model("m", **fields)

    def test_a_config_files_error_names_the_file_and_table(self, tmp_path: Any) -> None:
        """The dataclass's own check names the field; the file and table say where it is."""
        path = tmp_path / "bad.toml"
        path.write_text('[rlm]\nmax_depth = "2"\n[root]\nmodel = "m"\nmax_tokens = -5\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(f"{path}: [root]: max_tokens is -5")):
            RLMConfig.from_toml(path)
        path.write_text('[rlm]\nmax_depth = "2"\n[root]\nmodel = "m"\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(f"{path}: [rlm]: max_depth is '2'")):
            RLMConfig.from_toml(path)

    @pytest.mark.asyncio
    async def test_sync_completion_inside_a_running_loop_is_a_config_error(self) -> None:
        """RLM.completion() called from inside an event loop raises ConfigError pointing at
        acompletion, and sends nothing."""
        m = Model(["FINAL(x)"])
        rlm = RLM(config=rlm_config(), transport=m.transport)
        with pytest.raises(ConfigError, match="acompletion"):
            rlm.completion("ctx", "q")
        assert m.requests == []


# =========================================================================== usage accounting


class TestUsageTotals:
    @pytest.mark.asyncio
    async def test_totals_are_the_sums_of_the_call_records(self) -> None:
        """total, by_model and by_depth equal the sums over `result.calls`, and each call's
        cost follows its model's price (cached input at the cached price)."""
        root_price = ModelPrice(input_per_mtok=2.0, output_per_mtok=8.0, cached_input_per_mtok=0.5)
        sub_price = ModelPrice(input_per_mtok=0.25, output_per_mtok=2.0)

        def root(request: ModelRequest) -> Completion:
            text = repl("print(llm_batch(['a', 'b', 'c']))") if turn(request) == 0 else "FINAL(x)"
            return Completion(text=text, usage=Usage(1000, 100, 400), model=request.model)

        def sub(request: ModelRequest) -> Completion:
            return Completion(text="s", usage=Usage(300, 20, 0), model=request.model)

        m = Model(root, sub=sub)
        result = await run(m, root_overrides={"prices": root_price}, sub_overrides={"prices": sub_price})
        calls = result.calls
        assert len(calls) == 5

        def sums(records: list[Any]) -> tuple[int, int, int, int, float]:
            return (
                len(records),
                sum(r.usage.prompt_tokens for r in records),
                sum(r.usage.cached_tokens for r in records),
                sum(r.usage.completion_tokens for r in records),
                sum(r.cost_usd for r in records),
            )

        def of(t: Any) -> tuple[int, int, int, int, float]:
            return (t.calls, t.prompt_tokens, t.cached_tokens, t.completion_tokens, t.cost_usd)

        assert of(result.total) == pytest.approx(sums(calls))
        for name, totals in result.by_model.items():
            assert of(totals) == pytest.approx(sums([r for r in calls if r.model == name]))
        for depth, totals in result.by_depth.items():
            assert of(totals) == pytest.approx(sums([r for r in calls if r.depth == depth]))
        root_cost = (600 * 2.0 + 400 * 0.5 + 100 * 8.0) / 1e6
        sub_cost = (300 * 0.25 + 20 * 2.0) / 1e6
        assert result.by_model["root-model"].cost_usd == pytest.approx(2 * root_cost)
        assert result.by_model["sub-model"].cost_usd == pytest.approx(3 * sub_cost)
        assert result.cost_usd == pytest.approx(2 * root_cost + 3 * sub_cost)
        assert set(result.by_depth) == {0, 1}
        summary = result.usage_summary.to_dict()["model_usage_summaries"]
        assert summary["sub-model"] == {
            "total_calls": 3,
            "total_input_tokens": 900,
            "total_output_tokens": 60,
        }


# =========================================================================== events


class TestEvents:
    @pytest.mark.asyncio
    async def test_event_order_of_a_small_run(self) -> None:
        """A two-turn run emits query.start first and query.finish last; every call.start
        has one later call.finish; node parent links form one tree; iterations, cells and
        the worker's life nest in order."""
        m = Model([repl("print(llm_query('x'))"), "FINAL(done)"])
        events = EventLog()
        result = await run(m, events=events)
        kinds = events.kinds()
        assert kinds[0] == "query.start" and kinds[-1] == "query.finish"
        assert kinds.count("query.start") == kinds.count("query.finish") == 1
        assert events.of(QueryFinish)[0].status == "ok"

        starts = {e.call_id: i for i, e in enumerate(events.events) if isinstance(e, CallStart)}
        finishes: dict[str, list[int]] = {}
        for i, e in enumerate(events.events):
            if isinstance(e, CallFinish):
                finishes.setdefault(e.call_id, []).append(i)
        assert set(starts) == set(finishes) and len(starts) == 3
        assert all(len(finishes[c]) == 1 and finishes[c][0] > starts[c] for c in starts)

        parents: dict[str, str | None] = {}
        for e in events.of(NodeStart):
            parent = e.parent_id
            assert parent is None or parent in parents, "a node starts after its parent"
            assert e.node_id is not None
            parents[e.node_id] = parent
        assert [n for n, p in parents.items() if p is None] == ["n1"]
        finished = [str(e.node_id) for e in events.of(NodeFinish)]
        assert sorted(finished) == sorted(parents)
        assert {n["node_id"]: n["parent_id"] for n in result.nodes} == parents

        def index(kind: str, **fields: Any) -> int:
            return next(
                i
                for i, e in enumerate(events.events)
                if e.kind == kind and all(e.payload().get(k) == v for k, v in fields.items())
            )

        # The worker starts beside the first root call: after the query starts, before its first cell.
        assert index("query.start") < index("worker.start") < index("cell.start", iteration=1)
        order = [
            index("query.start"),
            index("iteration.start", iteration=1),
            index("cell.start", iteration=1),
            index("cell.finish", iteration=1),
            index("iteration.finish", iteration=1),
            index("iteration.start", iteration=2),
            index("iteration.finish", iteration=2),
            index("worker.kill"),
            index("query.finish"),
        ]
        assert order == sorted(order)
        ids = {e.query_id for e in events.events}
        assert len(ids) == 1 and re.fullmatch(r"q\d+", ids.pop() or "")  # one query, ids unique per process


class TestEventOptions:
    @pytest.mark.asyncio
    async def test_text_stays_out_of_events_by_default(self) -> None:
        """Prompts and replies (which carry context chunks) are not in events unless log_text."""
        code = "print(llm_query('SECRET-PROMPT'))\nanswer['content'] = 'x'\nanswer['ready'] = True"
        result = await run(Model([repl(code)], sub=lambda r: "SECRET-REPLY"), keep_events=True)
        dumped = json.dumps([e.to_dict() for e in result.events])
        assert result.events and "SECRET-PROMPT" not in dumped and "SECRET-REPLY" not in dumped

    @pytest.mark.asyncio
    async def test_log_text_puts_prompt_and_reply_in_call_events(self) -> None:
        """With log_text=True, call.start carries the prompt and call.finish the reply."""
        code = "print(llm_query('SECRET-PROMPT'))\nanswer['content'] = 'x'\nanswer['ready'] = True"
        result = await run(Model([repl(code)], sub=lambda r: "SECRET-REPLY"), keep_events=True, log_text=True)
        starts = [e.prompt for e in result.events if isinstance(e, CallStart)]
        finishes = [e.text for e in result.events if isinstance(e, CallFinish)]
        assert "SECRET-PROMPT" in starts and "SECRET-REPLY" in finishes

    @pytest.mark.asyncio
    async def test_events_are_in_the_result_only_when_asked(self) -> None:
        """keep_events=False (the default) leaves RLMResult.events empty."""
        result = await run(Model([repl("answer['content'] = 'x'\nanswer['ready'] = True")]))
        assert result.events == []


# =========================================================================== concurrent queries


class TestConcurrentQueries:
    @pytest.mark.asyncio
    async def test_five_queries_run_at_once_in_one_loop(self) -> None:
        """Five acompletion calls on one RLM run concurrently: all five first root turns are
        in flight together (each waits for the others), and each gets its own answer."""
        n = 5
        arrived = 0
        all_in = anyio.Event()

        async def root(request: ModelRequest) -> str:
            nonlocal arrived
            if turn(request) == 0:
                arrived += 1
                if arrived == n:
                    all_in.set()
                with anyio.fail_after(30):  # a serialising engine fails here instead of hanging
                    await all_in.wait()
                return repl("print('OUT:', llm_query(context))")
            return f"FINAL({answer_line(last_user(request))})"

        m = Model(root)
        events = EventLog()
        async with RLM(config=rlm_config(), transport=m.transport, event_sinks=[events]) as rlm:
            results: list[RLMResult | None] = [None] * n

            async def one(i: int) -> None:
                results[i] = await rlm.acompletion(f"context number {i}", f"query {i}")

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        assert m.transport.max_in_flight >= n
        assert [r.response if r else None for r in results] == [f"sub:context number {i}" for i in range(n)]
        assert all(r is not None and r.status == "ok" and len(r.calls) == 3 for r in results)
        assert len({e.query_id for e in events.of(QueryStart)}) == n
        assert len(set(events.worker_pids())) == n


# =========================================================================== the network guard


class TestNetworkGuard:
    @pytest.mark.parametrize("address", [("192.0.2.1", 443), ("8.8.8.8", 53)])
    def test_a_non_loopback_address_is_refused(self, address: tuple[str, int]) -> None:
        """Tests cannot open a connection to anything but loopback (conftest's guard)."""
        with socket.socket() as s, pytest.raises(NetworkAccessDenied, match="only connect to loopback"):
            s.connect(address)
        with socket.socket() as s, pytest.raises(NetworkAccessDenied):
            s.connect_ex(address)

    @pytest.mark.asyncio
    async def test_an_event_loop_connection_is_refused(self) -> None:
        """The guard also holds for connections the event loop makes (what httpx uses)."""
        with pytest.raises(NetworkAccessDenied):
            await asyncio.open_connection("192.0.2.1", 443)

    def test_loopback_is_allowed(self) -> None:
        """Connections to 127.0.0.1 (the simulator's address) go through."""
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=5) as client:
                assert client.getpeername() == server.getsockname()
