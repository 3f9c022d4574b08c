"""Budgets end to end over real HTTP, against the simulated server.

A fuzz test runs hundreds of seeded queries with random caps (dollars, total tokens, calls)
concurrently in one event loop against in-process simulators, and checks every run against
what was really spent: the call records, and the server's own request log. A deadline test
checks that `max_seconds` cancels the whole tree: the server sees the in-flight requests
abandoned, no REPL worker outlives the query, and the partial result comes back.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from conftest import EventLog, sandbox_config, sim_config

from rlm_async import _events
from rlm_async._config import RLMConfig
from rlm_async._events import WorkerKill, WorkerStart
from rlm_async._governor import BudgetLimits, Governor, GovernorConfig
from rlm_async._prompts import sub_system_prompt
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._types import Completion, ModelRequest
from rlm_async.demo import DEMO_PRICES
from rlm_async.sandbox._launch import BOOTSTRAP_PATH, SANDBOX_BOOTSTRAP
from rlm_async.sim import Faults, KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimServer
from rlm_async.transport import OpenAITransport, Transport
from rlm_async.workloads import oolong_counting

pytestmark = pytest.mark.e2e

SUB_SYSTEM = sub_system_prompt()
CAP_NAMES = {"max_usd": "usd", "max_total_tokens": "total_tokens", "max_calls": "calls"}

# ============================================================================ plumbing

_run_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("run_id", default=None)


@dataclass
class Paid:
    """One completion the server sent back: which run and call-tree node asked for it."""

    run: int | None
    node_id: str | None
    sub: bool
    prompt_tokens: int
    completion_tokens: int
    text: str


class SharedTransport(Transport):
    """One connection pool for many `RLM` instances: notes every completion (tagged with
    the run that sent it), and leaves closing to the test, since each `RLM` closes its
    transports when it is done."""

    def __init__(self, inner: Transport, paid: list[Paid]) -> None:
        self.inner = inner
        self.endpoint = inner.endpoint
        self.paid = paid

    async def complete(self, request: ModelRequest) -> Completion:
        _query, node_id, _depth = _events.current_ids()
        completion = await self.inner.complete(request)
        self.paid.append(
            Paid(
                run=_run_id.get(),
                node_id=node_id,
                sub=request.messages[0].content == SUB_SYSTEM,
                prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens,
                text=completion.text,
            )
        )
        return completion

    async def aclose(self) -> None:  # the test closes `inner` once every run is done
        pass


def priced(config: RLMConfig, *, sub_max_tokens: int = 2048, **changes: Any) -> RLMConfig:
    """The demo's stand-in prices, and a root max_tokens large enough for the scripted root
    model's code (so must the sub model's be when it runs a child RLM)."""
    root = dataclasses.replace(config.root, prices=DEMO_PRICES["sim-model"], max_tokens=2048)
    assert config.sub is not None
    sub = dataclasses.replace(config.sub, prices=DEMO_PRICES["sim-mini"], max_tokens=sub_max_tokens)
    return dataclasses.replace(config, root=root, sub=sub, **changes)


# ============================================================================ the fuzz

RUNS = 200
AT_ONCE = 48
FANOUTS: dict[str, tuple[dict[str, Any], int, int]] = {
    # name: (root policy options, max_depth, the sub model's max_tokens)
    "batch": ({"fanout": "llm_batch"}, 1, 256),
    "sequential": ({"fanout": "llm_query"}, 1, 256),
    "recursive": ({"fanout": "rlm_query_batched", "child_chunks": 2}, 2, 2048),
}


@dataclass
class Run:
    seed: int
    fanout: str
    caps: dict[str, float | int]
    truth: Any = None
    result: RLMResult | None = None
    score: bool = False
    paid: list[Paid] = field(default_factory=list)


def random_caps(rng: random.Random) -> dict[str, float | int]:
    """One to three caps, log-uniform from "refuses the first call" to "never reached"."""
    chosen = rng.sample(sorted(CAP_NAMES), rng.randint(1, 3))
    caps: dict[str, float | int] = {}
    for name in chosen:
        if name == "max_usd":
            caps[name] = round(10 ** rng.uniform(-2.2, -0.3), 6)  # $0.006 .. $0.50
        elif name == "max_total_tokens":
            caps[name] = int(10 ** rng.uniform(3.3, 5.6))  # 2,000 .. 400,000
        else:
            caps[name] = rng.randint(0, 60)
    return caps


class TestBudgetFuzz:
    @pytest.mark.asyncio
    async def test_spend_never_crosses_a_cap_and_a_cap_hit_returns_a_partial_result(self) -> None:
        """Hundreds of seeded queries with random dollar, token and call caps: for every run,
        what its call records say it spent is within each cap; a run that had a call
        refused ends "budget_exceeded", naming the cap and carrying its number; every
        sub-call answer the server sent is in the run's `subcall_results`; and, across
        all runs, the records account for exactly the requests and tokens in the
        servers' logs."""
        rng = random.Random(20240611)
        runs = [
            Run(seed=seed, fanout=rng.choice(sorted(FANOUTS)), caps=random_caps(rng)) for seed in range(RUNS)
        ]
        paid: list[Paid] = []
        governor = Governor(GovernorConfig(chars_per_token=4.0))
        async with contextlib.AsyncExitStack() as stack:
            sims: dict[str, SimServer] = {}
            transports: dict[str, OpenAITransport] = {}
            for i, (name, (options, _depth, _max_tokens)) in enumerate(FANOUTS.items()):
                policy = PolicySpec(name="rlm", options={"chunk_chars": 1500, "max_chunks": 8, **options})
                sims[name] = await stack.enter_async_context(
                    SimServer(SimConfig(seed=i, policies=Policies(root=policy)))
                )
                transports[name] = OpenAITransport(sims[name].base_url, api_key_env=None)
            limiter = anyio.Semaphore(AT_ONCE)

            async def run_one(run: Run) -> None:
                _options, depth, sub_max_tokens = FANOUTS[run.fanout]
                sim = sims[run.fanout]
                config = priced(
                    # Plain subprocess workers: the sandbox is not under test here, and
                    # bubblewrap would add half again to the run time.
                    sim_config(sim, sandbox=sandbox_config(isolation="none")),
                    sub_max_tokens=sub_max_tokens,
                    max_depth=depth,
                    budget=BudgetLimits(**run.caps),  # type: ignore[arg-type]
                )
                shared = SharedTransport(transports[run.fanout], paid)
                workload = oolong_counting(random.Random(run.seed).randint(500, 4000), seed=run.seed)
                run.truth = workload.truth
                async with limiter:
                    _run_id.set(run.seed)
                    rlm = RLM(config=config, governor=governor, transport=shared)
                    async with rlm:
                        run.result = await rlm.acompletion(workload.context, workload.query)
                run.score = workload.score(run.result.response)

            try:
                async with anyio.create_task_group() as tg:
                    for run in runs:
                        tg.start_soon(run_one, run)
            finally:
                for transport in transports.values():
                    await transport.aclose()
            logs = [entry for sim in sims.values() for entry in sim.log]

        for p in paid:
            assert p.run is not None
            runs[p.run].paid.append(p)
        for run in runs:
            check_run(run)
        results = [run.result for run in runs if run.result is not None]
        # The caps span "refuses the first call" to "never reached": every ending occurs.
        hit = [r for r in results if r.status == "budget_exceeded"]
        assert 0.2 * RUNS < len(hit) < 0.9 * RUNS, f"{len(hit)} of {RUNS} runs hit a cap"
        assert sum(r.status == "ok" for r in results) > 0.1 * RUNS
        assert sum(bool(r.subcall_results) for r in hit) > 0.1 * RUNS  # partial, with answers in
        assert sum(not r.calls or r.calls[0].status == "budget" for r in hit) > 0.02 * RUNS  # refused at once

        # Nothing paid is missing: the records hold every request and token the servers saw.
        assert sum(c.attempts for r in results for c in r.calls) == len(logs)
        served = [e for e in logs if e.status == 200]
        assert sum(r.total.prompt_tokens for r in results) == sum(e.prompt_tokens for e in served)
        assert sum(r.total.completion_tokens for r in results) == sum(e.completion_tokens for e in served)


def check_run(run: Run) -> None:
    r = run.result
    assert r is not None
    where = f"run {run.seed} ({run.fanout}, caps {run.caps}): status {r.status}, {r.detail}"
    # Spent, from the records, within every cap.
    spent = {
        "max_usd": sum(c.cost_usd for c in r.calls),
        "max_total_tokens": sum(c.usage.total_tokens for c in r.calls),
        "max_calls": sum(c.attempts for c in r.calls),
    }
    for name, cap in run.caps.items():
        assert spent[name] <= cap * (1 + 1e-9), f"{where}: spent {spent[name]} > {name}={cap}"
    # The records hold exactly what the server reported for this run.
    assert sum(p.prompt_tokens for p in run.paid) == r.total.prompt_tokens, where
    assert sum(p.completion_tokens for p in run.paid) == r.total.completion_tokens, where

    refused = [c for c in r.calls if c.status == "budget"]
    if refused or r.status == "budget_exceeded":
        assert r.status == "budget_exceeded", f"{where}: {len(refused)} call(s) refused"
        assert r.limit_hit in {CAP_NAMES[n] for n in run.caps}, where
        cap = run.caps[next(n for n, short in CAP_NAMES.items() if short == r.limit_hit)]
        assert r.detail is not None and f"{float(cap):g}" in r.detail, where
    else:
        assert r.status == "ok" and run.score, f"{where}: answer {r.response!r}, truth {run.truth}"

    # Every sub-call answer the server sent is in the result, under the node that asked.
    text_of = {p.node_id: p.text for p in run.paid if p.sub}
    sent = Counter[tuple[str | None, str]](
        (c.parent_id, text_of[c.node_id]) for c in r.calls if c.kind == "sub" and c.status == "ok"
    )
    kept = Counter[tuple[str | None, str]]((s.node_id, s.response) for s in r.subcall_results)
    assert not sent - kept, f"{where}: sub-call answers missing from the result: {sent - kept}"


# ============================================================================ the deadline


def worker_processes(pids: set[int]) -> list[str]:
    """Live processes that are one of `pids`, or run the REPL worker's bootstrap as a child
    of this process or of one of `pids` (bubblewrap's children)."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:  # gone while we looked
            continue
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        if state == "Z":
            continue
        bootstrap = BOOTSTRAP_PATH in cmdline or SANDBOX_BOOTSTRAP in cmdline
        if int(name) in pids or (bootstrap and int(ppid) in {me, *pids}):
            found.append(f"{name}: {cmdline}")
    return found


class TestDeadline:
    @pytest.mark.asyncio
    async def test_the_deadline_cancels_the_whole_tree(self) -> None:
        """With `max_seconds` set and half the sub-calls of a depth-2 query held by the
        server for a minute, the query ends "timeout" with a partial result: the server's
        log shows every request still in flight abandoned by the client within a second of
        the deadline (measured on the server's clock), every sub-call answer that did come
        back is in the result, and no REPL worker process is left."""
        deadline_s = 4.0
        workload = oolong_counting("16k", seed=21)
        policy = PolicySpec(
            name="rlm", options={"chunks": 4, "fanout": "rlm_query_batched", "child_chunks": 3}
        )
        config = SimConfig(
            seed=3,
            latency=LatencyModel(sub=KindLatency(ttft_s=0.05)),
            # "slow" holds a request for slow_extra_s more: these never finish in time.
            faults=Faults(slow=0.5, slow_extra_s=60.0, kinds=("sub",)),
            policies=Policies(root=policy),
        )
        events = EventLog()
        paid: list[Paid] = []
        async with SimServer(config) as sim:
            rlm_config = priced(sim_config(sim), max_depth=2, budget=BudgetLimits(max_seconds=deadline_s))
            transport = OpenAITransport(sim.base_url, api_key_env=None)
            try:
                async with RLM(
                    config=rlm_config, transport=SharedTransport(transport, paid), event_sinks=[events]
                ) as rlm:
                    started = time.monotonic()  # the simulator's clock too: same process
                    result = await rlm.acompletion(workload.context, workload.query)
            finally:
                await transport.aclose()
            log = list(sim.log)

        assert result.status == "timeout" and result.limit_hit == "seconds"
        assert result.detail is not None and f"{deadline_s:g} s" in result.detail

        # The server saw the slow requests abandoned, soon after the deadline.
        abandoned = [e for e in log if e.outcome == "cancelled"]
        assert len(abandoned) >= 2, [e.outcome for e in log]
        assert all(e.kind == "sub" and e.start is not None for e in abandoned)
        deadline_at = started + deadline_s
        late = [round(e.finish - deadline_at, 3) for e in abandoned if e.finish > deadline_at + 1.0]
        assert late == [], f"requests abandoned this many seconds after the deadline: {late}"
        # Every request the server answered was paid for and recorded; none is still open.
        assert {e.outcome for e in log} <= {"ok", "cancelled"}
        answered = [e for e in log if e.outcome == "ok"]
        assert len(paid) == len(answered)
        assert result.total.prompt_tokens == sum(e.prompt_tokens for e in answered)

        # The partial result keeps every sub-call answer that came back.
        sub_texts = {p.node_id: p.text for p in paid if p.sub}
        assert sub_texts, "no sub-call finished before the deadline"
        sent = Counter(
            (c.parent_id, sub_texts[c.node_id]) for c in result.calls if c.kind == "sub" and c.status == "ok"
        )
        kept = Counter[tuple[str | None, str]]((s.node_id, s.response) for s in result.subcall_results)
        assert sent and not sent - kept
        assert any(c.status == "cancelled" for c in result.calls)

        # Every worker of the tree (the root's and each child RLM's) was killed.
        starts = events.of(WorkerStart)
        assert len(starts) >= 2
        pids = {e.pid for e in starts}
        assert pids <= {e.pid for e in events.of(WorkerKill)}
        assert worker_processes(pids) == []
