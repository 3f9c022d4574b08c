"""The critical-path bound: root turns in sequence plus each fan-out's slowest sub-call (or its
capacity / rate-limit term), from the service times the simulator drew."""

from __future__ import annotations

import time

import anyio
import pytest

from rlm_async._prompts import root_system_prompt, sub_system_prompt
from rlm_async._types import Message, ModelRequest
from rlm_async.sim import (
    KindLatency,
    LatencyModel,
    LogEntry,
    RateLimits,
    SimConfig,
    SimServer,
    critical_path,
    critical_path_bound,
)
from rlm_async.transport import OpenAITransport

pytestmark = pytest.mark.anyio


def entry(
    seq: int,
    kind: str,
    modeled: float | None,
    *,
    outcome: str = "ok",
    prompt: int = 100,
    completion: int = 10,
    cached: int = 0,
    max_tokens: int | None = None,
    served: bool = True,
) -> LogEntry:
    return LogEntry(
        id=f"r{seq}",
        seq=seq,
        arrival=float(seq),
        start=float(seq) if served else None,
        finish=float(seq) + 1,
        kind=kind,
        model="m",
        status=200 if outcome in ("ok", "slow") else 500,
        outcome=outcome,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        max_tokens=max_tokens,
        modeled_s=modeled,
    )


class TestShape:
    def test_root_turns_add_and_each_fanout_costs_its_slowest_member(self) -> None:
        """Two root turns around a fan-out of three: 1 + max(0.3, 0.5, 0.4) + 2, whatever the
        order the sub-calls were logged in."""
        log = [
            entry(0, "root", 1.0),
            entry(3, "sub", 0.4),
            entry(1, "sub", 0.3),
            entry(2, "sub", 0.5),
            entry(4, "root", 2.0),
        ]
        path = critical_path(log)
        assert path.root_turns_s == (1.0, 2.0)
        assert len(path.fanouts) == 1 and path.fanouts[0].requests == 3
        assert path.fanouts[0].after_turn == 1 and path.fanouts[0].limited_by == "slowest"
        assert path.bound_s == pytest.approx(3.5) == critical_path_bound(log)
        assert path.sequential_s == pytest.approx(4.2)
        assert path.source == "sampled"

    def test_fanouts_are_split_by_root_turns(self) -> None:
        """Sub-calls separated by a root turn are two fan-outs, each bounded on its own."""
        log = [entry(0, "root", 1.0), entry(1, "sub", 0.5), entry(2, "root", 1.0), entry(3, "sub", 0.7)]
        path = critical_path(log)
        assert [f.slowest_s for f in path.fanouts] == [0.5, 0.7]
        assert path.bound_s == pytest.approx(3.2)

    def test_failed_and_refused_requests_add_nothing(self) -> None:
        """A 429 refused before service, an injected 500, a dropped reply and a cancelled request
        are left out; a "slow" fault was served and counts."""
        log = [
            entry(0, "root", 1.0),
            entry(1, "sub", None, outcome="rate_limited", served=False),
            entry(2, "sub", 9.0, outcome="drop"),
            entry(3, "sub", 9.0, outcome="cancelled"),
            entry(4, "sub", None, outcome="error_500", served=False),
            entry(5, "sub", 0.6, outcome="slow"),
        ]
        path = critical_path(log)
        assert path.excluded == 4 and path.bound_s == pytest.approx(1.6)

    def test_empty_log(self) -> None:
        assert critical_path_bound([]) == 0.0


class TestLimits:
    def test_capacity_makes_the_sum_over_capacity_the_bound_when_larger(self) -> None:
        """Ten sub-calls of 0.2 s through 2 slots take at least 1 s; one at a time, 2 s."""
        log = [entry(0, "root", 1.0), *(entry(i, "sub", 0.2) for i in range(1, 11))]
        assert critical_path_bound(log) == pytest.approx(1.2)
        two = critical_path(log, capacity=2)
        assert two.fanouts[0].limited_by == "capacity" and two.bound_s == pytest.approx(2.0)
        assert critical_path_bound(log, capacity=1) == pytest.approx(3.0)

    def test_capacity_defaults_to_the_latency_models_sub_capacity(self) -> None:
        latency = LatencyModel(sub=KindLatency(ttft_s=0.2, capacity=5))
        log = [entry(i, "sub", 0.2) for i in range(10)]
        assert critical_path_bound(log, latency) == pytest.approx(0.4)

    def test_rate_limits_bound_admission_from_full_buckets(self) -> None:
        """120 requests at 60 RPM: a full bucket admits 60 at once, the other 60 need 60 s,
        then the last one still needs its service time."""
        log = [entry(i, "sub", 0.5) for i in range(120)]
        path = critical_path(log, rate_limits=RateLimits(rpm=60))
        assert path.fanouts[0].limited_by == "rate" and path.bound_s == pytest.approx(60.5)
        # TPM counts prompt + max_tokens: 10 x (900 + 100) = 10,000 tokens at 6,000 TPM.
        log = [entry(i, "sub", 0.5, prompt=900, max_tokens=100) for i in range(10)]
        assert critical_path_bound(log, rate_limits=RateLimits(tpm=6_000)) == pytest.approx(40.5)
        # Within the bucket: no rate term.
        assert critical_path_bound(log, rate_limits=RateLimits(tpm=100_000)) == pytest.approx(0.5)


class TestSource:
    latency = LatencyModel(
        root=KindLatency(ttft_s=1.0, prefill_s_per_token=0.001, output_s_per_token=0.01, jitter=0.2),
        sub=KindLatency(ttft_s=0.5, prefill_s_per_token=0.001, jitter=0.2),
    )

    def test_without_modeled_s_the_jitter_minimum_is_used(self) -> None:
        """(1.0 + 0.001 x (100 - 20) uncached) x 0.8 + 0.01 x 10 x 0.8 for the root turn."""
        log = [entry(0, "root", None, cached=20), entry(1, "sub", None)]
        path = critical_path(log, self.latency)
        assert path.source == "jitter_min"
        assert path.root_turns_s[0] == pytest.approx((1.0 + 0.08 + 0.1) * 0.8)
        assert path.fanouts[0].slowest_s == pytest.approx((0.5 + 0.1) * 0.8)

    def test_sampled_false_ignores_the_draws(self) -> None:
        log = [entry(0, "root", 5.0), entry(1, "sub", 5.0)]
        assert critical_path(log, self.latency).bound_s == pytest.approx(10.0)
        path = critical_path(log, self.latency, sampled=False)
        assert path.source == "jitter_min" and path.bound_s < 2.0

    def test_a_log_missing_some_draws_is_mixed(self) -> None:
        path = critical_path([entry(0, "root", 5.0), entry(1, "sub", None)], self.latency)
        assert path.source == "mixed"

    def test_without_draws_or_a_latency_model_it_says_what_is_missing(self) -> None:
        with pytest.raises(ValueError, match="modeled_s"):
            critical_path([entry(0, "sub", None)])


def _request(kind: str, text: str) -> ModelRequest:
    system = root_system_prompt() if kind == "root" else sub_system_prompt()
    return ModelRequest(
        model="sim-model", messages=(Message("system", system), Message("user", text)), max_tokens=64
    )


class TestAgainstTheServer:
    async def test_the_server_logs_its_draws_and_a_fanout_takes_at_least_the_bound(self) -> None:
        """Over real HTTP: every served request logs the service time it drew (jitter
        included, within the jitter band of the model); a root turn then a 20-way fan-out
        takes no less than the bound, and not much more on loopback."""
        latency = LatencyModel(
            root=KindLatency(ttft_s=0.15, jitter=0.3), sub=KindLatency(ttft_s=0.1, jitter=0.3)
        )
        async with SimServer(SimConfig(latency=latency, seed=3)) as sim:
            transport = OpenAITransport(sim.base_url)
            try:
                began = time.monotonic()
                await transport.complete(_request("root", "Query: how many?"))

                async def sub(i: int) -> None:
                    await transport.complete(_request("sub", f"chunk {i}"))

                async with anyio.create_task_group() as tg:
                    for i in range(20):
                        tg.start_soon(sub, i)
                wall = time.monotonic() - began
            finally:
                await transport.aclose()
            log = sim.log
        assert len(log) == 21
        draws = [e.modeled_s for e in log]
        assert all(d is not None for d in draws)
        for e in log:
            base = 0.15 if e.kind == "root" else 0.1
            assert e.modeled_s is not None and base * 0.7 <= e.modeled_s <= base * 1.3
            assert e.finish is not None and e.start is not None
            assert e.finish - e.start >= e.modeled_s - 1e-3  # the server slept at least its draw
        assert len({round(d or 0, 6) for d in draws}) > 10  # the draws differ: jitter is on
        path = critical_path(log, latency)
        sub_draws = [e.modeled_s or 0 for e in log if e.kind == "sub"]
        assert path.fanouts[0].slowest_s == pytest.approx(max(sub_draws))
        assert path.bound_s <= wall < path.bound_s + 1.0
        # The jitter-minimum bound is below the sampled one.
        assert critical_path_bound(log, latency, sampled=False) < path.bound_s
