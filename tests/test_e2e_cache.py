"""Prefix caching end to end: 1000-chunk counting runs against the simulator, in a process of
its own, which reports `cached_tokens` with OpenAI's semantics (prefixes of 1,024+ tokens,
hits in 128-token steps, an entry usable only once the request that wrote it finished).

What "the shared prefix" is, here: the longest common start of the sub-call prompts as the
simulator serialises them (`serialize_messages`, the text its cache hashes), in its own
units of 4 characters a token. The prompts are captured on their way out by a transport
wrapper, so the figure comes from the requests themselves, not from the policy's intent.
A sub-call's share of it that was served from cache is `min(cached_tokens, prefix)`.

Every number asserted comes from the server's request log or the run's result; no test
asserts a duration. Sub-calls take 2 s at the server (longer than sending a 1000-request
batch takes), so a batch sent cold has all its requests in flight before any finishes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.lowlevel
import pytest
from conftest import EventLog, sandbox_config

from rlm_async._cache import CacheSettings, shared_prefix
from rlm_async._config import ModelConfig
from rlm_async._events import WarmupDecision
from rlm_async._prompts import sub_system_prompt
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._types import Completion, ModelRequest
from rlm_async.demo import DEMO_PRICES, demo_config
from rlm_async.sim import (
    KindLatency,
    LatencyModel,
    LogEntry,
    Policies,
    PolicySpec,
    SimConfig,
    SimProcess,
    priced,
    serialize_messages,
)
from rlm_async.transport import OpenAITransport, Transport
from rlm_async.workloads import CountingWorkload, oolong_counting

pytestmark = pytest.mark.e2e

CHUNKS = 1000
SUB_LATENCY_S = 2.0
SUB_SYSTEM = sub_system_prompt()
CHARS_PER_SIM_TOKEN = 4
STEP_TOKENS = 128


# ============================================================================ plumbing


class CapturingTransport(Transport):
    """The real HTTP transport, keeping every request it sends, and for each, how many
    requests had been handed to it when this one went on to be sent: it passes through the
    event loop once first, so requests handed over in the same step all count."""

    def __init__(
        self, inner: Transport, sent: list[ModelRequest], handed: list[tuple[ModelRequest, int]]
    ) -> None:
        self.inner = inner
        self.endpoint = inner.endpoint
        self.sent = sent
        self.handed = handed

    async def complete(self, request: ModelRequest) -> Completion:
        self.sent.append(request)
        await anyio.lowlevel.checkpoint()
        self.handed.append((request, len(self.sent)))
        return await self.inner.complete(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def capturing(
    sent: list[ModelRequest], handed: list[tuple[ModelRequest, int]]
) -> Callable[[ModelConfig], Transport]:
    def factory(model: ModelConfig) -> Transport:
        return CapturingTransport(OpenAITransport(model.base_url, api_key_env=None), sent, handed)

    return factory


@dataclass
class CountRun:
    """One counting run: what the engine returned and what the server saw."""

    workload: CountingWorkload
    result: RLMResult
    events: EventLog
    log: list[LogEntry]
    sub_requests: list[ModelRequest]
    sub_handed: list[int]
    """For each sub-call, in the order they went on to be sent: how many sub-calls had been
    handed to the transport by then."""

    @property
    def subs(self) -> list[LogEntry]:
        return [e for e in self.log if e.kind == "sub"]

    def decision(self) -> dict[str, Any]:
        decisions = self.events.of(WarmupDecision)
        assert len(decisions) == 1, decisions
        return decisions[0].payload()

    def prefix_tokens(self) -> int:
        """The sub-calls' shared prefix, in the simulator's tokens (see the module docstring)."""
        texts = [serialize_messages(r.messages) for r in self.sub_requests]
        return len(common_prefix(texts)) // CHARS_PER_SIM_TOKEN

    def prefix_cached_ratio(self) -> float:
        """Of the shared-prefix tokens of all sub-calls, the share the server reported cached."""
        prefix = self.prefix_tokens()
        return sum(min(e.cached_tokens, prefix) for e in self.subs) / (prefix * len(self.subs))

    def first_sub_finish(self) -> float:
        return min(e.finish for e in self.subs)


def common_prefix(texts: list[str]) -> str:
    """The longest common start of `texts` (that of the least and the greatest of them)."""
    lo, hi = min(texts), max(texts)
    end = next((i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))
    return lo[:end]


def count_run(
    *,
    warm: bool | Literal["auto"],
    chunks: int = CHUNKS,
    tokens: str = "100k",
    pad_chars: int | None = None,
) -> CountRun:
    """A counting run of `chunks` sub-calls on the demo's configuration and prices."""
    workload = oolong_counting(tokens, seed=3)
    options: dict[str, Any] = {"chunks": chunks, "max_chunks": max(chunks, 1000)}
    if pad_chars is not None:
        options["pad_chars"] = pad_chars
    sim = SimConfig(
        latency=LatencyModel(root=KindLatency(ttft_s=0.01), sub=KindLatency(ttft_s=SUB_LATENCY_S)),
        policies=Policies(root=PolicySpec(name="rlm", options=options)),
    )
    events = EventLog()
    sent: list[ModelRequest] = []
    handed: list[tuple[ModelRequest, int]] = []
    with SimProcess(sim) as server:
        assert server.base_url is not None
        config = demo_config(server.base_url)
        cache = CacheSettings(warm=warm)
        config = dataclasses.replace(
            config,
            root=dataclasses.replace(config.root, cache=cache),
            sub=dataclasses.replace(config.sub, cache=cache) if config.sub else None,
            sandbox=sandbox_config(),
        )

        async def go() -> RLMResult:
            async with RLM(config=config, transport=capturing(sent, handed), event_sinks=[events]) as rlm:
                return await rlm.acompletion(workload.context, workload.query)

        result = anyio.run(go)
    log = server.read_log().entries
    subs = [r for r in sent if r.messages[0].content == SUB_SYSTEM]
    # The root turns before the fan-out: a sub-call's count less these is its count among
    # the sub-calls (root turns and sub-calls never overlap here).
    roots_before = next((i for i, r in enumerate(sent) if r.messages[0].content == SUB_SYSTEM), 0)
    sub_handed = [n - roots_before for r, n in handed if r.messages[0].content == SUB_SYSTEM]
    assert result.status == "ok", result.detail
    assert workload.score(result.response), (result.response, workload.truth)
    assert len(subs) == chunks and all(e.status == 200 for e in log)
    return CountRun(workload, result, events, log, subs, sub_handed)


@pytest.fixture(scope="module")
def warm_run() -> Iterator[CountRun]:
    """A 1000-chunk run with the planner's default rule (it warms such a batch)."""
    yield count_run(warm="auto")


@pytest.fixture(scope="module")
def cold_run() -> Iterator[CountRun]:
    """The same run with warming off."""
    yield count_run(warm=False)


# ============================================================================ warm, then fan out


class TestWarmFanOut:
    def test_the_planner_warms_a_1000_call_batch_and_says_why(self, warm_run: CountRun) -> None:
        """The `warmup.decision` event says "warm" because it pays off, with the numbers
        behind it: one warm-up for the one bucket of the 1000-request batch."""
        d = warm_run.decision()
        assert (d["decision"], d["reason"]) == ("warm", "pays_off")
        assert (d["batch_size"], d["buckets"], d["warmups"]) == (CHUNKS, 1, 1)
        assert d["cacheable_tokens"] >= 1024
        assert "tokens/s" in d["detail"] and "threshold" in d["detail"]

    def test_the_planners_prefix_estimate_matches_the_requests(self, warm_run: CountRun) -> None:
        """The planner's shared-prefix estimate is within a few tokens of the prefix the sent
        sub-requests really share (it counts content, the server also counts role markers)."""
        measured = warm_run.prefix_tokens()
        assert measured >= 1024
        assert abs(warm_run.decision()["prefix_tokens"] - measured) <= 16
        assert shared_prefix(warm_run.sub_requests).tokens == warm_run.decision()["prefix_tokens"]

    def test_one_warm_up_goes_first_and_the_rest_follow_its_finish(self, warm_run: CountRun) -> None:
        """Exactly one sub-call reaches the server before the first sub-call finishes — the
        warm-up, which misses — and every other one arrives after it finished, the 999 then
        in flight together: the batch waits for one sub-call, nothing more. (The benchmark
        `benchmarks/caching.py` puts a number on it: warm minus cold fan-out time is about
        the warm-up's own latency.)"""
        first_finish = warm_run.first_sub_finish()
        early = [e for e in warm_run.subs if e.arrival < first_finish]
        assert len(early) == 1
        warmup = early[0]
        assert warmup.cached_tokens == 0 and warmup.finish == first_finish
        rest = [e for e in warm_run.subs if e is not warmup]
        assert all(e.arrival >= warmup.finish for e in rest)
        # Not sent one after another either: most of them are in the server together.
        assert max(e.in_flight for e in rest) >= 0.5 * len(rest)

    def test_the_followers_are_let_go_in_waves_not_all_at_once(self, warm_run: CountRun) -> None:
        """When the warm-up has finished, the first followers go on to be sent before most
        of the others have even been handed to the transport: they are let go an eighth at
        a time (125 of the 999), with the event loop running between, rather than all in
        one step (which had every follower open its connection before the first was sent)."""
        assert warm_run.sub_handed[0] == 1  # the warm-up, alone
        first_follower = warm_run.sub_handed[1]
        wave = -(-(CHUNKS - 1) // 8)
        assert 1 < first_follower <= 1 + 2 * wave < CHUNKS // 2
        assert warm_run.sub_handed[-1] == CHUNKS

    def test_at_least_90_percent_of_the_shared_prefix_is_served_from_cache(self, warm_run: CountRun) -> None:
        """Of the shared-prefix tokens of the 1000 sub-calls, at least 90% are reported
        cached: every sub-call but the warm-up hits, for the prefix rounded down to whole
        128-token steps (the rest of the 10% is that rounding)."""
        prefix = warm_run.prefix_tokens()
        cacheable = prefix // STEP_TOKENS * STEP_TOKENS
        hits = [e for e in warm_run.subs if e.cached_tokens > 0]
        assert len(hits) == CHUNKS - 1
        assert all(e.cached_tokens == cacheable for e in hits)
        assert warm_run.prefix_cached_ratio() >= 0.90

    def test_the_depth_1_hit_ratio_is_the_servers(self, warm_run: CountRun) -> None:
        """`by_depth[1]` reports the cached and prompt tokens the server reported for the
        sub-calls, so its hit ratio is the server's."""
        subs = warm_run.subs
        depth1 = warm_run.result.by_depth[1]
        cached, prompt = sum(e.cached_tokens for e in subs), sum(e.prompt_tokens for e in subs)
        assert (depth1.calls, depth1.cached_tokens, depth1.prompt_tokens) == (CHUNKS, cached, prompt)
        assert depth1.cache_hit_ratio == pytest.approx(cached / prompt, rel=1e-12)
        assert depth1.cache_hit_ratio is not None and depth1.cache_hit_ratio > 0.8

    def test_cached_tokens_are_priced_at_the_cached_input_price(self, warm_run: CountRun) -> None:
        """The run's cost equals the server log priced with cached tokens at the cached-input
        price — well below the same tokens at the full input price."""
        assert warm_run.result.total.cost_usd == pytest.approx(priced(warm_run.log, DEMO_PRICES), rel=1e-9)
        uncached = [dataclasses.replace(e, cached_tokens=0) for e in warm_run.log]
        assert warm_run.result.total.cost_usd < 0.5 * priced(uncached, DEMO_PRICES)


# ============================================================================ warming off


class TestColdFanOut:
    def test_the_planner_skips_when_warming_is_off(self, cold_run: CountRun) -> None:
        """With `CacheSettings(warm=False)` the event says "skip", reason "disabled"."""
        d = cold_run.decision()
        assert (d["decision"], d["reason"], d["warmups"]) == ("skip", "disabled", 0)

    def test_simultaneous_cold_requests_all_miss(self, cold_run: CountRun) -> None:
        """Sent at once, the batch is in flight before any of it finishes, so nothing is
        cached yet for any of them: every request that arrived before the first finish
        missed, and that is most of the batch. The server looks the prefix up when service
        starts (after its capacity queue), so "before" is judged on the service start."""
        first_finish = cold_run.first_sub_finish()
        early = [e for e in cold_run.subs if e.arrival < first_finish]
        assert len(early) >= 0.5 * CHUNKS
        served_early = [e for e in early if e.start is not None and e.start < first_finish]
        assert served_early and all(e.cached_tokens == 0 for e in served_early)

    def test_warming_turns_the_misses_into_hits(self, warm_run: CountRun, cold_run: CountRun) -> None:
        """The same batch has >= 90% of its shared prefix cached when warmed, under half
        cold, and so costs less warmed (both priced from the server's log)."""
        assert warm_run.prefix_tokens() == cold_run.prefix_tokens()
        assert warm_run.prefix_cached_ratio() >= 0.90
        assert cold_run.prefix_cached_ratio() < 0.5
        assert priced(warm_run.log, DEMO_PRICES) < priced(cold_run.log, DEMO_PRICES)
        assert cold_run.result.total.cost_usd == pytest.approx(priced(cold_run.log, DEMO_PRICES), rel=1e-9)


# ============================================================================ not worth warming


class TestSkip:
    def test_a_small_batch_goes_out_at_once_and_the_event_says_why(self) -> None:
        """Eight sub-calls sharing a cacheable prefix would save too few tokens per second
        of waiting: the event says "skip", "batch_too_small", with the rate and threshold,
        and the server sees all eight arrive before any finished."""
        run = count_run(warm="auto", chunks=8, tokens="16k")
        d = run.decision()
        assert (d["decision"], d["reason"], d["batch_size"]) == ("skip", "batch_too_small", 8)
        assert d["cacheable_tokens"] >= 1024
        assert "tokens/s" in d["detail"] and "threshold 2000" in d["detail"]
        assert all(e.arrival < run.first_sub_finish() for e in run.subs)
        assert all(e.cached_tokens == 0 for e in run.subs)

    def test_a_prefix_below_the_cacheable_minimum_is_not_warmed(self) -> None:
        """Sub-prompts sharing only a few hundred tokens cannot be cached, so a batch of 50
        is not warmed: the event says "prefix_below_minimum" and names the minimum, and
        the server caches none of them."""
        run = count_run(warm="auto", chunks=50, pad_chars=0)
        d = run.decision()
        assert (d["decision"], d["reason"], d["batch_size"]) == ("skip", "prefix_below_minimum", 50)
        assert run.prefix_tokens() < 1024 and d["cacheable_tokens"] == 0
        assert "1024" in d["detail"]
        assert all(e.arrival < run.first_sub_finish() for e in run.subs)
        assert all(e.cached_tokens == 0 for e in run.subs)
