"""Injected faults, each as `OpenAITransport` sees it, and their seeded reproducibility."""

from __future__ import annotations

import anyio
import pytest

from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import ConnectionFailed, RateLimited, ServerError
from rlm_async.sim import Faults, KindLatency, LatencyModel, SimConfig, SimServer
from rlm_async.transport import OpenAITransport

pytestmark = pytest.mark.anyio


def req(i: int = 0) -> ModelRequest:
    return ModelRequest(model="sim-model", messages=(Message("user", f"question {i}"),), max_tokens=20)


async def outcomes_of(config: SimConfig, n: int, **transport_kw: object) -> tuple[list[object], SimServer]:
    """Send n requests one after another; return what each raised or returned."""
    results: list[object] = []
    async with SimServer(config) as sim:
        transport = OpenAITransport(sim.base_url, **transport_kw)  # type: ignore[arg-type]
        for i in range(n):
            try:
                results.append(await transport.complete(req(i)))
            except Exception as exc:
                results.append(exc)
        await transport.aclose()
        with anyio.fail_after(5):  # an abandoned request is logged when the server sees the disconnect
            await sim.log.wait_for(n)
    return results, sim


class TestEachFault:
    async def test_scripted_faults_raise_the_matching_transport_errors(self) -> None:
        """500 -> ServerError, injected 429 -> RateLimited with retry_after, drop -> ConnectionFailed,
        malformed JSON -> ServerError; an "ok" after them succeeds."""
        config = SimConfig(
            faults=Faults(script=("error_500", "error_429", "drop", "malformed", "ok"), retry_after_s=0.25)
        )
        results, sim = await outcomes_of(config, 5)
        e500, e429, dropped, malformed, ok = results
        assert isinstance(e500, ServerError) and e500.status_code == 500
        assert isinstance(e429, RateLimited) and e429.retry_after == pytest.approx(0.25)
        assert isinstance(dropped, ConnectionFailed)
        assert isinstance(malformed, ServerError) and "malformed" in str(malformed)
        assert not isinstance(ok, Exception)
        log = sim.log.by_arrival()
        assert [e.outcome for e in log] == ["error_500", "error_429", "drop", "malformed", "ok"]
        assert [e.status for e in log] == [500, 429, 0, 200, 200]
        assert log[0].start is None and log[2].start is not None  # refused before service vs. served then cut

    async def test_slow_response_times_the_client_out_and_the_server_sees_it_leave(self) -> None:
        """A slow response outlasts the client's timeout (ConnectionFailed); the server logs the
        request as cancelled when the client disconnects, long before the slow reply was due."""
        config = SimConfig(faults=Faults(script=("slow",), slow_extra_s=30.0))
        results, sim = await outcomes_of(config, 1, timeout_s=0.3)
        assert isinstance(results[0], ConnectionFailed)
        (entry,) = sim.log.entries
        assert entry.outcome == "cancelled" and entry.status == 0

    async def test_slow_response_is_served_when_the_client_waits(self) -> None:
        """A slow response still arrives, well-formed, to a client that waits for it."""
        config = SimConfig(faults=Faults(script=("slow",), slow_extra_s=0.2))
        results, sim = await outcomes_of(config, 1)
        assert not isinstance(results[0], Exception)
        assert sim.log.entries[0].outcome == "slow" and sim.log.entries[0].status == 200

    async def test_faults_apply_only_to_the_configured_kinds(self) -> None:
        """With kinds=("root",), plain requests (kind "other") never fault."""
        config = SimConfig(faults=Faults(error_500=1.0, kinds=("root",)))
        results, _ = await outcomes_of(config, 3)
        assert not any(isinstance(r, Exception) for r in results)


class TestSeededFaults:
    async def test_same_seed_gives_the_same_faults_and_a_retry_draws_afresh(self) -> None:
        """Two servers with one seed fault the same requests; resending a failed request
        draws again (so retries can succeed), and a different seed gives a different pattern."""
        faults = Faults(error_500=0.5)

        async def pattern(seed: int) -> list[str]:
            _, sim = await outcomes_of(SimConfig(seed=seed, faults=faults), 12)
            return [e.outcome for e in sim.log.by_arrival()]

        a, b, c = await pattern(1), await pattern(1), await pattern(2)
        assert a == b
        assert a != c
        assert set(a) == {"ok", "error_500"}

        async with SimServer(SimConfig(seed=1, faults=faults)) as sim:
            transport = OpenAITransport(sim.base_url)
            failed_once = next(i for i, o in enumerate(a) if o == "error_500")
            seen = []
            for _ in range(8):  # the same body, again and again
                try:
                    await transport.complete(req(failed_once))
                    seen.append("ok")
                except ServerError:
                    seen.append("error_500")
            await transport.aclose()
        assert seen[0] == "error_500" and "ok" in seen

    async def test_fault_and_jitter_draws_are_uniform_and_independent(self) -> None:
        """Over 300 distinct requests, a 30% fault rate faults 30% +- 3 standard deviations,
        and the jitter of the requests served (those whose fault draw was >= 0.3) spreads
        evenly over [1 - jitter, 1 + jitter]: each quarter holds 25% +- 3 standard deviations."""
        config = SimConfig(
            seed=3,
            faults=Faults(error_500=0.3),
            latency=LatencyModel(sub=KindLatency(ttft_s=0.001, jitter=0.5)),
        )
        _, sim = await outcomes_of(config, 300)
        outcomes = [e.outcome for e in sim.log.entries]
        assert 63 <= outcomes.count("error_500") <= 117 and outcomes.count("ok") == 300 - outcomes.count(
            "error_500"
        )
        factors = [e.modeled_s / 0.001 for e in sim.log.entries if e.modeled_s is not None]
        assert all(0.5 <= f < 1.5 for f in factors)
        served = len(factors)
        for quarter in range(4):
            share = sum(1 for f in factors if 0.5 + quarter / 4 <= f < 0.5 + (quarter + 1) / 4)
            assert abs(share - served / 4) <= 3 * (served * 0.25 * 0.75) ** 0.5, (quarter, share, served)


class TestLatencyUnderFaults:
    async def test_drop_happens_after_the_service_time(self) -> None:
        """A dropped request is served first (its service start and finish are logged) and cut at the end."""
        config = SimConfig(faults=Faults(script=("drop",)), latency=LatencyModel(sub=KindLatency(ttft_s=0.1)))
        results, sim = await outcomes_of(config, 1)
        assert isinstance(results[0], ConnectionFailed)
        (entry,) = sim.log.entries
        assert entry.start is not None and entry.finish - entry.start >= 0.099
