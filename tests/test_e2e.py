"""The engine end to end over real HTTP, against the simulated OpenAI-compatible server.

The simulator's scripted root model writes the code, a real sandboxed worker runs it, the
sub-calls travel over loopback HTTP, and the tests assert what the server observed (its
request log: requests in flight, kinds, counts) and what the run returned. No test here
asserts a duration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from conftest import EventLog, open_sim, sim_config

from rlm_async import _events
from rlm_async._config import ModelConfig
from rlm_async._events import CallStart, WorkerKill, WorkerStart
from rlm_async._governor import EndpointLimits
from rlm_async._parsing import find_final
from rlm_async._prompts import sub_system_prompt
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._types import Completion, ModelRequest
from rlm_async.exceptions import ConfigError
from rlm_async.sandbox._launch import BOOTSTRAP_PATH, SANDBOX_BOOTSTRAP
from rlm_async.sim import KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimServer
from rlm_async.sim.policies import split_sub_prompt
from rlm_async.transport import OpenAITransport, Transport
from rlm_async.workloads import oolong_counting, parse_query, parse_record, s_niah

pytestmark = pytest.mark.e2e

SUB_SYSTEM = sub_system_prompt()


def root_policy(**options: Any) -> Policies:
    return Policies(root=PolicySpec(name="rlm", options=options))


async def run(
    sim: SimServer, context: Any, query: str, *, events: EventLog | None = None, **config: Any
) -> RLMResult:
    sinks = [events] if events is not None else []
    async with RLM(config=sim_config(sim, **config), event_sinks=sinks) as rlm:
        return await rlm.acompletion(context, query)


@dataclass
class Seen:
    node_id: str | None
    request: ModelRequest
    text: str


class RecordingTransport(Transport):
    """The real HTTP transport, plus a note of which call-tree node sent each request and
    what came back (the engine binds the node in a context variable around every call)."""

    def __init__(self, inner: Transport, seen: list[Seen]) -> None:
        self.inner = inner
        self.endpoint = inner.endpoint
        self.seen = seen

    async def complete(self, request: ModelRequest) -> Completion:
        _query, node_id, _depth = _events.current_ids()
        completion = await self.inner.complete(request)
        self.seen.append(Seen(node_id, request, completion.text))
        return completion

    async def aclose(self) -> None:
        await self.inner.aclose()


def recording(seen: list[Seen]) -> Callable[[ModelConfig], Transport]:
    def factory(model: ModelConfig) -> Transport:
        return RecordingTransport(OpenAITransport(model.base_url, api_key_env=None), seen)

    return factory


# ---------------------------------------------------------------------------- process scan


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    uid: int
    cmdline: str


def scan_processes() -> list[ProcInfo]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read().decode("ascii", "replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:  # gone while we looked
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
        found.append(ProcInfo(int(name), int(fields[1]), int(fields[2]), int(fields[3]), uid, cmdline))
    return found


def worker_processes_left(pids: set[int], uids: set[int]) -> list[ProcInfo]:
    """Processes of the workers this test started: their top pids, members of their
    process groups or sessions, their private uids, descendants of any of those (bwrap's
    own init runs in a session of its own), and any child of this process whose command
    line is a worker's (the bootstrap, or bwrap)."""
    me = os.getpid()
    procs = scan_processes()
    found = {
        p.pid: p
        for p in procs
        if p.pid in pids
        or p.pgid in pids
        or p.sid in pids
        or p.uid in uids
        or (p.ppid == me and any(s in p.cmdline for s in (BOOTSTRAP_PATH, SANDBOX_BOOTSTRAP, "bwrap")))
    }
    grew = True
    while grew:
        grew = False
        for p in procs:
            if p.pid not in found and p.ppid in found:
                found[p.pid] = p
                grew = True
    return sorted(found.values(), key=lambda p: p.pid)


# ============================================================================ tasks


class TestSimulatedTasks:
    @pytest.mark.asyncio
    async def test_niah_is_answered(self, sim: SimServer) -> None:
        """A needle-in-a-haystack query over a 32K-token context gets the right number."""
        w = s_niah("32k", seed=11)
        result = await run(sim, w.context, w.query)
        root_turns = len(sim.log.of_kind("root"))
        assert result.status == "ok"
        assert w.score(result.response), (result.response, w.truth)
        assert root_turns == result.total.calls - len([c for c in result.calls if c.kind == "sub"])
        assert result.by_depth[1].calls >= 1

    @pytest.mark.asyncio
    async def test_counting_is_answered(self) -> None:
        """A counting query that needs every chunk gets the exact count."""
        w = oolong_counting("32k", seed=5)
        async with open_sim(SimConfig(policies=root_policy(chunks=8))) as sim:
            result = await run(sim, w.context, w.query)
            subs = sim.log.of_kind("sub")
        assert result.status == "ok"
        assert w.score(result.response), (result.response, w.truth)
        assert len(subs) == 8 and all(e.outcome == "ok" for e in subs)

    @pytest.mark.asyncio
    async def test_a_list_context_is_answered(self, sim: SimServer) -> None:
        """A context given as a list of documents is answered like a single string."""
        w = s_niah("16k", seed=2, shape="list")
        result = await run(sim, w.context, w.query)
        assert result.status == "ok" and w.score(result.response)


# ============================================================================ fan-out


class TestFanOut:
    @pytest.mark.asyncio
    async def test_a_100_prompt_batch_is_in_flight_at_once(self) -> None:
        """One llm_batch of 100 prompts reaches the server as >= 90 requests in flight
        together (sub-calls take 0.5 s there, so serialised or small-capped sending would
        show far fewer), and the answer is still right."""
        w = s_niah("32k", seed=4)
        config = SimConfig(
            latency=LatencyModel(sub=KindLatency(ttft_s=0.5)),
            policies=root_policy(chunks=100),
        )
        async with open_sim(config) as sim:
            result = await run(
                sim,
                w.context,
                w.query,
                sub_overrides={"limits": EndpointLimits(max_concurrency=200)},
            )
            subs = sim.log.of_kind("sub")
            peak = sim.log.max_in_flight(kind="sub")
        assert result.status == "ok" and w.score(result.response)
        assert len(subs) == 100
        assert peak >= 90, f"the server saw at most {peak} sub-calls in flight"


# ============================================================================ depth 2


class TestDepthTwo:
    @pytest.mark.asyncio
    async def test_child_rlms_have_their_own_workers_and_answers(self) -> None:
        """With max_depth=2, rlm_query_batched runs one child RLM per prompt, each in a
        worker of its own (distinct pids); each child answers from its own data only (its
        count equals the count over the chunks its own sub-calls read), and the parent
        combines them into the right total. (The policy finishes with FINAL lines, so each
        child's printed result and its answer both reach the wire.)"""
        w = oolong_counting("16k", seed=8)
        task = parse_query(w.query)
        assert task is not None and task.label is not None
        config = SimConfig(
            policies=root_policy(chunks=3, fanout="rlm_query_batched", child_chunks=2, finish="final")
        )
        seen: list[Seen] = []
        events = EventLog()
        async with open_sim(config) as sim:
            async with RLM(
                config=sim_config(sim, max_depth=2), transport=recording(seen), event_sinks=[events]
            ) as rlm:
                result = await rlm.acompletion(w.context, w.query)
        assert result.status == "ok" and w.score(result.response), (result.response, w.truth)

        nodes = {n["node_id"]: n for n in result.nodes}
        rlm_nodes = [n for n in result.nodes if n["kind"] == "rlm"]
        root_id = rlm_nodes[0]["node_id"]
        children = [n["node_id"] for n in rlm_nodes if n["depth"] == 1]
        assert len(children) == 3 and all(nodes[c]["parent_id"] == root_id for c in children)

        starts = events.of(WorkerStart)
        assert sorted(e.node_id for e in starts) == sorted([root_id, *children])  # type: ignore[type-var]
        assert len({e.pid for e in starts}) == 4

        task_label = task.label
        child_chunks: dict[str, list[str]] = {}
        answers: list[str] = []
        for c in children:
            mine = [s for s in seen if s.node_id is not None and nodes[s.node_id]["parent_id"] == c]
            subs = [s for s in mine if s.request.messages[0].content == SUB_SYSTEM]
            turns = [s for s in mine if s not in subs]
            assert subs and turns
            chunks = [split_sub_prompt(s.request.messages[-1].content)[1] for s in subs]
            child_chunks[c] = chunks
            expected = sum(_count(chunk, task_label) for chunk in chunks)
            assert sum(int(s.text.split("COUNT:")[1]) for s in subs) == expected
            observations = "\n".join(s.request.messages[-1].content for s in turns[1:])
            printed = re.findall(r"^ANSWER>>> (.*)$", observations, re.M)
            assert printed == [f"COUNT: {expected}"], f"child {c} printed {printed}"
            final = find_final(turns[-1].text)
            assert final is not None and final.value == f"COUNT: {expected}"
            answers.append(final.value)
        assert sorted(r.response for r in result.subcall_results if r.depth == 1) == sorted(answers)
        all_chunks = [chunk for chunks in child_chunks.values() for chunk in chunks]
        assert len(set(all_chunks)) == len(all_chunks) == 6  # no chunk read by two children
        assert sum(_count(chunk, task_label) for chunk in all_chunks) == w.truth


def _count(chunk: str, label: str) -> int:
    total = 0
    for line in chunk.splitlines():
        rec = parse_record(line)
        if rec is not None and rec[1] == label:
            total += 1
    return total


# ============================================================================ cancellation


class TestCancellation:
    @pytest.mark.asyncio
    async def test_cancelling_a_query_mid_fan_out_leaves_no_worker(self) -> None:
        """Cancelling a depth-2 query while its children wait on sub-calls kills every
        worker it started: afterwards no process of theirs (bootstrap or bwrap, by pid,
        group, session, private uid or parentage) is left."""
        w = oolong_counting("16k", seed=3)
        config = SimConfig(
            latency=LatencyModel(sub=KindLatency(ttft_s=120.0)),  # sub-calls never return in time
            policies=root_policy(chunks=3, fanout="rlm_query_batched", child_chunks=2),
        )
        events = EventLog()
        ready = anyio.Event()
        waiting_children: set[str] = set()

        def watch(event: _events.Event) -> None:
            if isinstance(event, CallStart) and event.call_kind == "sub" and event.depth == 2:
                waiting_children.add(event.parent_id)
                if len(waiting_children) == 3:
                    ready.set()

        outcome: list[RLMResult] = []
        async with open_sim(config) as sim:
            async with RLM(config=sim_config(sim, max_depth=2), event_sinks=[events, watch]) as rlm:
                async with anyio.create_task_group() as tg:

                    async def query() -> None:
                        outcome.append(await rlm.acompletion(w.context, w.query))

                    tg.start_soon(query)
                    with anyio.fail_after(60):
                        await ready.wait()
                    tg.cancel_scope.cancel()
        assert outcome == []  # the query was cancelled, not finished
        starts = events.of(WorkerStart)
        assert len(starts) == 4
        pids = {e.pid for e in starts}
        uids = {e.uid for e in starts if e.uid is not None}
        killed = {e.pid for e in events.of(WorkerKill)}
        assert pids <= killed
        assert worker_processes_left(pids, uids) == []


# ============================================================================ misbehaving models


class TestMisbehavingModels:
    @pytest.mark.parametrize("policy", ["no_code", "syntax_error", "endless", "never_answers"])
    @pytest.mark.asyncio
    async def test_a_misbehaving_root_model_ends_with_max_iterations(self, policy: str) -> None:
        """A root model that never answers (prose only, broken code, replies cut at
        max_tokens, harmless code forever) is stopped after max_iterations turns plus one
        final call, with status "max_iterations" and a detail that says so."""
        config = SimConfig(policies=Policies(root=PolicySpec(name=policy)))
        async with open_sim(config) as sim:
            result = await run(
                sim,
                "some context\n" * 20,
                "What is in it?",
                max_iterations=3,
                root_overrides={"max_tokens": 256},
            )
            roots = sim.log.of_kind("root")
        assert result.status == "max_iterations"
        assert result.detail is not None and "max_iterations (3) reached" in result.detail
        assert len(roots) == 4 and all(e.outcome == "ok" for e in roots)
        assert [c.kind for c in result.calls if c.depth == 0] == ["root", "root", "root", "final"]
        assert result.response is not None
        if policy == "endless":
            assert all(e.finish_reason == "length" for e in roots)


# ============================================================================ the sync API


class TestSyncCompletion:
    @pytest.mark.asyncio
    async def test_completion_works_from_a_plain_thread(self, sim: SimServer) -> None:
        """RLM.completion() called from a thread with no event loop runs the query in a loop
        of its own and returns the right answer."""
        w = s_niah("8k", seed=21)
        rlm = RLM(config=sim_config(sim))
        result = await anyio.to_thread.run_sync(rlm.completion, w.context, w.query)
        served = len(sim.log.ok())
        assert result.status == "ok" and w.score(result.response)
        assert served == result.total.calls

    @pytest.mark.asyncio
    async def test_completion_inside_a_running_loop_is_a_config_error(self, sim: SimServer) -> None:
        """RLM.completion() inside a running event loop raises ConfigError (use acompletion)
        and sends nothing to the server."""
        rlm = RLM(config=sim_config(sim))
        with pytest.raises(ConfigError, match=r"await rlm\.acompletion"):
            rlm.completion("ctx", "q")
        assert len(sim.log) == 0


# ============================================================================ the official constructor


class TestOfficialConstructor:
    @pytest.mark.asyncio
    async def test_official_arguments_run_against_an_openai_compatible_server(self, sim: SimServer) -> None:
        """Code written for the official package (backend_kwargs, other_backends for the
        sub-calls, max_budget) runs unchanged, and the result has the official fields."""
        w = oolong_counting("32k", seed=9)
        rlm = RLM(
            backend="openai",
            backend_kwargs={"model_name": "sim-model", "base_url": sim.base_url, "api_key": "sk-test"},
            other_backends=["openai"],
            other_backend_kwargs=[{"model_name": "sim-mini", "base_url": sim.base_url, "api_key": "sk-test"}],
            max_depth=1,
            max_iterations=10,
            max_tokens=10_000_000,
            max_timeout=120,
        )
        async with rlm:
            result = await rlm.acompletion(w.context, root_prompt=w.query)
        assert result.status == "ok" and w.score(result.response)
        assert result.root_model == "sim-model" and result.prompt == w.query
        usage = result.usage_summary.model_usage_summaries
        assert set(usage) == {"sim-model", "sim-mini"}
        assert usage["sim-mini"].total_calls == len(sim.log.of_kind("sub"))
        assert usage["sim-model"].total_calls == len(sim.log.of_kind("root"))
        assert result.execution_time > 0

    def test_unsupported_backend_names_the_fix(self) -> None:
        """A backend rlm_async does not speak is refused at construction, naming what works."""
        with pytest.raises(ConfigError, match="OpenAI-compatible"):
            RLM(backend="anthropic", backend_kwargs={"model_name": "claude"})
