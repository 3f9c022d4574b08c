"""Concurrent fan-outs with one instruction prefix warm its cache bucket once: a fan-out
planned while another's warm-up of the same bucket is in flight waits for that warm-up
instead of sending its own (`warmup.decision` says `joined`), and a warm-up that ends
without an answer (cancelled) still lets the fan-outs waiting on it go.

End to end against the simulator in a process of its own, which reports `cached_tokens`
with OpenAI's semantics (an entry usable only once the request that wrote it finished):
the number of sub-calls served cold is what the server observed, never a duration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import EventLog, rlm_config, sandbox_config

from rlm_async._cache import CacheSettings
from rlm_async._events import WarmupDecision
from rlm_async._prompts import sub_system_prompt
from rlm_async._rlm import RLM
from rlm_async._types import ModelRequest
from rlm_async.demo import demo_config
from rlm_async.sim import KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimProcess
from rlm_async.testing import ScriptedTransport
from rlm_async.workloads import CountingWorkload, oolong_counting

SUB_SYSTEM = sub_system_prompt()


def two_workloads() -> tuple[CountingWorkload, CountingWorkload]:
    """Two counting queries with the same question (so the same sub-call instructions) over
    different texts."""
    first = oolong_counting("100k", seed=3)
    second = oolong_counting("100k", seed=4, label=first.label)
    assert first.query == second.query and first.context != second.context
    return first, second


class TestSharedWarmupOverHTTP:
    @pytest.mark.e2e
    def test_two_concurrent_queries_warm_the_bucket_once(self) -> None:
        """Two queries of one RLM fan out 20 sub-calls each at the same moment: the server
        sees one cold sub-call (the one warm-up) and 39 served from its cache; the second
        fan-out's decision says it joined the first's warm-up; both answers are right."""
        a, b = two_workloads()
        sim = SimConfig(
            latency=LatencyModel(root=KindLatency(ttft_s=0.01), sub=KindLatency(ttft_s=1.5)),
            policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 20})),
        )
        events = EventLog()
        with SimProcess(sim) as server:
            assert server.base_url is not None
            config = dataclasses.replace(demo_config(server.base_url), sandbox=sandbox_config())

            async def both() -> list[Any]:
                results: list[Any] = [None, None]
                async with RLM(config=config, event_sinks=[events]) as rlm:

                    async def one(k: int, w: CountingWorkload) -> None:
                        results[k] = await rlm.acompletion(w.context, w.query)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(one, 0, a)
                        tg.start_soon(one, 1, b)
                return results

            results = anyio.run(both)
        subs = [e for e in server.read_log().entries if e.kind == "sub"]
        decisions = sorted(e.payload()["joined"] for e in events.of(WarmupDecision))
        assert [r.status for r in results] == ["ok", "ok"]
        assert a.score(results[0].response) and b.score(results[1].response)
        assert len(subs) == 40 and all(e.status == 200 for e in subs)
        assert decisions == [0, 1]
        assert sum(1 for e in subs if e.cached_tokens == 0) == 1


class TestWarmupThatNeverAnswers:
    @pytest.mark.anyio
    async def test_a_cancelled_warmup_lets_the_joined_fanout_go(self) -> None:
        """Query A's warm-up hangs at the server; query B, planned meanwhile, joins it.
        Cancelling A ends its warm-up, and B's sub-calls go (cold) and B answers."""
        prefix = "Count the words. " * 400  # a shared prefix well over the 1,024-token minimum
        b_planned = anyio.Event()
        hang = anyio.Event()  # never set: A's warm-up waits until cancelled
        sub_prompts: list[str] = []

        async def model(request: ModelRequest) -> str:
            if request.messages[0].content != SUB_SYSTEM:  # a root turn: fan out over the context
                return (
                    "```repl\n"
                    f"answers = llm_batch([{prefix!r} + context + str(i) for i in range(8)])\n"
                    'answer["content"] = ",".join(answers)\n'
                    'answer["ready"] = True\n'
                    "```"
                )
            prompt = request.messages[-1].content
            sub_prompts.append(prompt)
            if (
                prompt.startswith(prefix + "A")
                and len([p for p in sub_prompts if p.startswith(prefix + "A")]) == 1
            ):
                await hang.wait()
            return "ok"

        class Sink:
            def __call__(self, event: Any) -> None:
                if isinstance(event, WarmupDecision) and event.joined == 1:
                    b_planned.set()

        config = rlm_config(sub_overrides={"cache": CacheSettings(warm=True)})
        events = EventLog()
        async with RLM(
            config=config, transport=ScriptedTransport(model), event_sinks=[events, Sink()]
        ) as rlm:
            outcome: dict[str, Any] = {}
            async with anyio.create_task_group() as tg:
                a_scope = anyio.CancelScope()

                async def query_a() -> None:
                    with a_scope:
                        await rlm.acompletion("A", "q")

                async def query_b() -> None:
                    await anyio.lowlevel.checkpoint()  # after A's fan-out is planned
                    outcome["b"] = await rlm.acompletion("B", "q")

                tg.start_soon(query_a)
                with anyio.fail_after(30):
                    tg.start_soon(query_b)
                    await b_planned.wait()
                    a_scope.cancel()
        result = outcome["b"]
        assert result.status == "ok" and result.response == ",".join(["ok"] * 8)
        assert sorted(e.payload()["joined"] for e in events.of(WarmupDecision)) == [0, 1]
        assert sum(1 for p in sub_prompts if p.startswith(prefix + "B")) == 8
