"""The governor end to end: the engine against the simulated server with rate limits and
faults switched on, over real HTTP.

Every assertion is about what the server observed (its request log: statuses, outcomes,
arrival order on its clock) or what the run returned. A 1000-chunk fan-out under RPM/TPM
limits gets almost no 429s, whether the governor is told the limits or learns them from
the `x-ratelimit-*` headers; under injected 500s, 429s, dropped connections and malformed
bodies every query still gets the right answer and keeps every sub-call result; and a 429
holds back every request of that model until its `retry-after` has passed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from conftest import open_sim, sim_config

from rlm_async._config import RLMConfig
from rlm_async._governor import EndpointLimits
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._types import Completion, ModelRequest
from rlm_async.exceptions import RateLimited
from rlm_async.sim import (
    Faults,
    KindLatency,
    LatencyModel,
    Policies,
    PolicySpec,
    RateLimits,
    RequestLog,
    SimConfig,
    SimServer,
)
from rlm_async.transport import OpenAITransport, Transport
from rlm_async.workloads import Workload, oolong_counting, s_niah

pytestmark = pytest.mark.e2e

RPM = 900
TPM = 1_700_000
CHUNKS = 1000


def fan_out(chunks: int, **options: Any) -> Policies:
    return Policies(root=PolicySpec(name="rlm", options={"chunks": chunks, **options}))


def limited(sim: SimServer, limits: EndpointLimits, **overrides: Any) -> RLMConfig:
    """The simulator's models, both under `limits`, with the demo's output caps (what TPM
    meters count per request, with the prompt)."""
    return sim_config(
        sim,
        root_overrides={"limits": limits, "max_tokens": 2048},
        sub_overrides={"limits": limits, "max_tokens": 256},
        **overrides,
    )


def rejected(log: RequestLog) -> int:
    return sum(1 for e in log if e.status == 429)


def assert_complete(result: RLMResult, workload: Workload, chunks: int) -> None:
    """The right answer, and one kept result for every chunk's sub-call."""
    assert result.status == "ok", result.detail
    assert workload.score(result.response), (result.response, workload.truth)
    assert result.failures == []
    subs = [c for c in result.calls if c.kind == "sub" and c.status == "ok"]
    assert len(subs) == chunks
    assert len(result.subcall_results) == chunks


# ============================================================================ RPM/TPM


class TestRateLimitedFanOut:
    @pytest.mark.asyncio
    async def test_a_1000_chunk_fan_out_under_configured_limits_gets_almost_no_429s(self) -> None:
        """A 1000-prompt llm_batch against a server allowing 900 requests and 1.7M tokens a
        minute (more than one minute's burst, so the limits bind: sent at once, about a
        tenth would be refused), with the governor told those limits and sending at most
        128 at a time: the right answer, every sub-call result, and at most 1% of the
        requests the server saw refused with a 429."""
        w = oolong_counting("128k", seed=1)
        config = SimConfig(rate_limits=RateLimits(rpm=RPM, tpm=TPM), policies=fan_out(CHUNKS))
        limits = EndpointLimits(max_concurrency=128, requests_per_minute=RPM, tokens_per_minute=TPM)
        async with open_sim(config) as sim:
            async with RLM(config=limited(sim, limits)) as rlm:
                result = await rlm.acompletion(w.context, w.query)
            log = sim.log
        assert_complete(result, w, CHUNKS)
        assert len(log.of_kind("sub")) >= CHUNKS
        assert rejected(log) <= 0.01 * len(log), f"{rejected(log)} of {len(log)} requests got a 429"

    @pytest.mark.asyncio
    async def test_limits_learned_from_headers_alone(self) -> None:
        """The same fan-out with the governor told no rate limit at all: it learns them from
        the server's `x-ratelimit-*` headers (and pauses on 429s), completes with the right
        answer and every sub-call result, and keeps 429s to at most 1% of requests."""
        w = oolong_counting("128k", seed=1)
        config = SimConfig(rate_limits=RateLimits(rpm=RPM, tpm=TPM), policies=fan_out(CHUNKS))
        async with open_sim(config) as sim:
            async with RLM(config=limited(sim, EndpointLimits(max_concurrency=128))) as rlm:
                result = await rlm.acompletion(w.context, w.query)
            log = sim.log
        assert_complete(result, w, CHUNKS)
        assert rejected(log) <= 0.01 * len(log), f"{rejected(log)} of {len(log)} requests got a 429"


# ============================================================================ faults


class TestFaults:
    @pytest.mark.asyncio
    async def test_every_query_survives_injected_faults_with_nothing_lost(self) -> None:
        """Three queries at once against a server that allows 140 requests a minute (fewer
        than the queries send, so the limit binds) and answers about 13% of requests, root
        turns and sub-calls alike, with a 500, a 429, a dropped connection or a cut-off JSON
        body: every query gets the right answer, no sub-call is reported failed, every
        chunk's result is kept, every well-formed answer the server sent was used exactly
        once, and the rate limit itself refused at most 1% of requests."""
        chunks = 40
        workloads = [oolong_counting("32k", seed=2), s_niah("32k", seed=3), oolong_counting("16k", seed=4)]
        config = SimConfig(
            seed=5,
            rate_limits=RateLimits(rpm=140, tpm=400_000),
            faults=Faults(error_500=0.04, error_429=0.03, drop=0.03, malformed=0.03, retry_after_s=0.2),
            policies=fan_out(chunks),
        )
        limits = EndpointLimits(max_concurrency=64, requests_per_minute=140, tokens_per_minute=400_000)
        by_index: dict[int, RLMResult] = {}
        async with open_sim(config) as sim:
            async with RLM(config=limited(sim, limits)) as rlm:

                async def one(i: int, w: Workload) -> None:
                    by_index[i] = await rlm.acompletion(w.context, w.query)

                async with anyio.create_task_group() as tg:
                    for i, w in enumerate(workloads):
                        tg.start_soon(one, i, w)
            log = sim.log
        results = list(by_index.values())
        for i, w in enumerate(workloads):
            assert_complete(by_index[i], w, chunks)

        outcomes = Counter(e.outcome for e in log)
        assert {"error_500", "error_429", "drop", "malformed"} <= set(outcomes), outcomes
        assert outcomes["rate_limited"] <= 0.01 * len(log), outcomes
        # Each 200 with a well-formed body reached exactly one call record.
        answered = [e for e in log if e.outcome == "ok"]
        assert sum(1 for r in results for c in r.calls if c.status == "ok") == len(answered)
        assert sum(r.total.prompt_tokens for r in results) == sum(e.prompt_tokens for e in answered)
        # Every request the server saw is an attempt some call record counts.
        assert sum(c.attempts for r in results for c in r.calls) == len(log)


# ============================================================================ the shared pause


@dataclass
class Sent:
    at: float
    model: str


@dataclass
class Refused:
    at: float
    model: str
    retry_after: float


class ClockedTransport(Transport):
    """The real HTTP transport, noting (on `time.monotonic`, the in-process simulator's
    clock too) when each request left and when each 429 came back."""

    def __init__(self, inner: Transport, sent: list[Sent], refused: list[Refused]) -> None:
        self.inner = inner
        self.endpoint = inner.endpoint
        self.sent = sent
        self.refused = refused

    async def complete(self, request: ModelRequest) -> Completion:
        self.sent.append(Sent(time.monotonic(), request.model))
        try:
            return await self.inner.complete(request)
        except RateLimited as exc:
            assert exc.retry_after is not None
            self.refused.append(Refused(time.monotonic(), request.model, exc.retry_after))
            raise

    async def aclose(self) -> None:
        await self.inner.aclose()


class TestSharedPause:
    @pytest.mark.asyncio
    async def test_after_a_429_no_request_of_that_model_arrives_before_retry_after(self) -> None:
        """Sub-calls of a 60-chunk fan-out (eight at a time) get 429s with a 0.4 s
        `retry-after`: after the client receives each one, no request of that model is
        sent until 0.4 s have passed, and the server sees none arrive in that time but the
        ones already on their way (measured on the server's clock)."""
        w = oolong_counting("32k", seed=6)
        config = SimConfig(
            seed=1,
            latency=LatencyModel(sub=KindLatency(ttft_s=0.05)),
            faults=Faults(error_429=0.12, retry_after_s=0.4, kinds=("sub",)),
            policies=fan_out(60),
        )
        sent: list[Sent] = []
        refused: list[Refused] = []

        def transport(model: Any) -> Transport:
            return ClockedTransport(OpenAITransport(model.base_url, api_key_env=None), sent, refused)

        async with open_sim(config) as sim:
            limits = EndpointLimits(max_concurrency=8, adaptive=False)
            async with RLM(config=limited(sim, limits), transport=transport) as rlm:
                result = await rlm.acompletion(w.context, w.query)
            log = sim.log
        assert_complete(result, w, 60)
        assert refused and all(r.model == "sim-mini" for r in refused)
        assert len(refused) == sum(1 for e in log if e.status == 429)

        sends = sorted(s.at for s in sent if s.model == "sim-mini")
        arrivals = sorted(e.arrival for e in log if e.model == "sim-mini")
        quiet_windows = 0
        for r in refused:
            window = (r.at, r.at + r.retry_after)
            sent_in_window = [t for t in sends if window[0] <= t < window[1]]
            assert sent_in_window == [], f"sent {len(sent_in_window)} request(s) during a 429 pause"
            on_their_way = sum(1 for t in sends if t < r.at) - sum(1 for t in arrivals if t < r.at)
            arrived = sum(1 for t in arrivals if window[0] <= t < window[1])
            assert arrived <= on_their_way, f"{arrived} arrived in a pause, {on_their_way} were on their way"
            quiet_windows += arrived == 0
        assert quiet_windows >= 1
