"""The REPL worker starts beside the first root call, end to end over real HTTP.

The first root turn needs only the context's description, so the engine sends it while the
worker (a real sandbox, a real interpreter, the context loaded) comes up, and waits for the
worker only when a cell needs it. What the tests assert is what the simulator observed:
when the first root request arrived (its log's `arrival`, on the same monotonic clock as
the engine's events), how many requests it received, which were cancelled; and which
worker processes are left. No test asserts a duration.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from conftest import EventLog, open_sim, sandbox_config, sim_config
from test_e2e import worker_processes_left

from rlm_async import _events
from rlm_async._events import CallStart, NodeFinish, WorkerKill, WorkerStart
from rlm_async._governor import BudgetLimits, ModelPrice
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async.exceptions import IsolationUnavailable
from rlm_async.sim import KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimServer
from rlm_async.workloads import oolong_counting

pytestmark = pytest.mark.e2e

_SLOW_ROOT = LatencyModel(root=KindLatency(ttft_s=60.0))
"""A root call the server holds far longer than any test waits for it."""


def _counting() -> tuple[str, str, Any]:
    w = oolong_counting("256k", seed=3)  # about 1 MB: the worker's load is real work
    assert isinstance(w.context, str)
    return w.context, w.query, w.score


async def _run(sim: SimServer, context: str, query: str, events: EventLog, **config: Any) -> RLMResult:
    async with RLM(config=sim_config(sim, **config), event_sinks=[events]) as rlm:
        return await rlm.acompletion(context, query)


def _killed_all(events: EventLog) -> None:
    """Every worker that came up was killed, and none of its processes is left."""
    starts = events.of(WorkerStart)
    pids = {e.pid for e in starts}
    uids = {e.uid for e in starts if e.uid is not None}
    assert pids <= {e.pid for e in events.of(WorkerKill)}
    assert worker_processes_left(pids, uids) == []


class TestFirstRootCallOverlapsTheWorkerStart:
    @pytest.mark.asyncio
    async def test_the_first_root_request_reaches_the_server_before_the_worker_is_up(self) -> None:
        """The server receives the root's first request before the worker has loaded the
        context (the `worker.start` event is emitted once it has), and the run still
        answers right: its cells wait for the worker."""
        context, query, score = _counting()
        events = EventLog()
        async with open_sim(
            SimConfig(policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 4})))
        ) as sim:
            result = await _run(sim, context, query, events)
            roots = sim.log.of_kind("root")
        assert result.status == "ok" and score(result.response)
        first = min(roots, key=lambda e: e.seq)
        (started,) = events.of(WorkerStart)
        assert first.arrival < started.time
        # ...and the first cell ran after the worker was up, in that worker.
        cells = [e for e in events.events if e.kind == "cell.start"]
        assert cells and started.time <= cells[0].time
        assert events.of(WorkerKill)[-1].pid == started.pid

    @pytest.mark.parametrize("entered", [True, False], ids=["async-with", "bare"])
    @pytest.mark.asyncio
    async def test_a_sandbox_that_refuses_refuses_before_any_request(self, entered: bool) -> None:
        """An isolation tier that cannot run here raises IsolationUnavailable before the
        server has received a single request, and no worker is started: at `async with
        RLM(...)`, or, for an RLM used without it, at the query, before its first call."""
        context, query, _ = _counting()
        events = EventLog()
        refusing = sandbox_config(isolation="bubblewrap", bwrap_path="/no/such/bwrap")
        async with open_sim() as sim:
            with pytest.raises(IsolationUnavailable, match="no bwrap executable"):
                if entered:
                    await _run(sim, context, query, events, sandbox=refusing)
                else:
                    rlm = RLM(config=sim_config(sim, sandbox=refusing), event_sinks=[events])
                    try:
                        await rlm.acompletion(context, query)
                    finally:
                        await rlm.aclose()
            assert len(sim.log) == 0
        assert events.of(CallStart) == [] and events.of(WorkerStart) == []

    @pytest.mark.asyncio
    async def test_a_worker_that_fails_to_come_up_ends_the_run_keeping_the_paid_call(self) -> None:
        """A worker that passes the isolation check but does not come up (here: no reply
        within start_timeout_s) ends the run with status "error" naming why, once the
        first reply's code needs it; the root call sent meanwhile is in the result, as the
        server answered it."""
        context, query, _ = _counting()
        events = EventLog()
        async with open_sim() as sim:
            result = await _run(sim, context, query, events, sandbox=sandbox_config(start_timeout_s=1e-3))
            served = sim.log.ok()
        assert result.status == "error"
        assert result.detail is not None and "the REPL worker could not start" in result.detail
        assert "start_timeout_s" in result.detail
        assert [e.kind for e in served] == ["root"]
        assert [c.kind for c in result.calls] == ["root"] and result.calls[0].status == "ok"
        assert result.total.completion_tokens == served[0].completion_tokens
        _killed_all(events)


class TestStopsDuringTheOverlap:
    @pytest.mark.asyncio
    async def test_a_deadline_during_the_first_root_call_kills_the_worker(self) -> None:
        """A deadline that falls while the first root call is held by the server (and the
        worker is starting or up): status "timeout", the server saw that one request
        cancelled, and no worker process is left."""
        context, query, _ = _counting()
        events = EventLog()
        async with open_sim(SimConfig(latency=_SLOW_ROOT)) as sim:
            result = await _run(sim, context, query, events, budget=BudgetLimits(max_seconds=3.0))
            with anyio.fail_after(30):  # the server logs a request the client gave up when it notices
                await sim.log.wait_for(1)
            seen = list(sim.log)
        assert result.status == "timeout"
        assert [(e.kind, e.outcome) for e in seen] == [("root", "cancelled")]
        _killed_all(events)

    @pytest.mark.asyncio
    async def test_cancelling_after_the_worker_is_up_kills_it(self) -> None:
        """Cancelled once the worker is up while the first root call is still held: the
        query raises no result, the root node finishes "cancelled", the worker is killed
        and none of its processes is left."""
        context, query, _ = _counting()
        events = EventLog()
        up = anyio.Event()

        def watch(event: _events.Event) -> None:
            if isinstance(event, WorkerStart):
                up.set()

        outcome: list[RLMResult] = []
        async with open_sim(SimConfig(latency=_SLOW_ROOT)) as sim:
            async with RLM(config=sim_config(sim), event_sinks=[events, watch]) as rlm:
                async with anyio.create_task_group() as tg:

                    async def query_task() -> None:
                        outcome.append(await rlm.acompletion(context, query))

                    tg.start_soon(query_task)
                    with anyio.fail_after(60):
                        await up.wait()
                    assert len(sim.log.of_kind("root")) == 0  # the root call is still held
                    tg.cancel_scope.cancel()
            with anyio.fail_after(30):  # the server logs a request the client gave up when it notices
                await sim.log.wait_for(1)
            seen = list(sim.log)
        assert outcome == []
        assert [(e.kind, e.outcome) for e in seen] == [("root", "cancelled")]
        assert {e.status for e in events.of(NodeFinish)} == {"cancelled"}
        assert len(events.of(WorkerStart)) == 1
        _killed_all(events)

    @pytest.mark.asyncio
    async def test_a_budget_that_refuses_the_first_root_call_sends_nothing(self) -> None:
        """A dollar cap too small for the first root turn (and for the small final call
        after it): status "budget_exceeded", the server received nothing, and the worker
        that started beside the refused call is killed."""
        context, query, _ = _counting()
        events = EventLog()
        price = ModelPrice(input_per_mtok=100.0, output_per_mtok=100.0)
        async with open_sim() as sim:
            result = await _run(
                sim,
                context,
                query,
                events,
                budget=BudgetLimits(max_usd=1e-6),
                root_overrides={"prices": price},
                sub_overrides={"prices": price},
            )
            assert len(sim.log) == 0
        assert result.status == "budget_exceeded" and result.limit_hit == "usd"
        assert result.total.calls == 0
        _killed_all(events)
