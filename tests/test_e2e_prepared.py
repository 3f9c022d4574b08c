"""Followers prepared while the warm-up is in flight, end to end over real HTTP against the
simulator in a process of its own.

While a fan-out's warm-up call is at the server, its followers are fitted, planned, keyed
and (the first bodies) encoded, so that their release is only admission and sending. What
a server can observe of that: no follower arrives before the warm-up has finished; every
body made ahead was made before the warm-up finished (on the one monotonic clock the
server logs on); the bodies, the requests, the tokens and the dollars are byte for byte and
token for token those of the same run with nothing prepared; a follower retried after its
body made ahead was sent is sent again whole; a query cancelled during the warm-up sends
no follower and holds no reservation. No test asserts a duration.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from conftest import sandbox_config

import rlm_async._engine.fanout as fanout
from rlm_async._config import ModelConfig
from rlm_async._governor import BudgetLimits, Governor
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._types import ModelRequest, Usage
from rlm_async.demo import demo_config
from rlm_async.sim import (
    Faults,
    KindLatency,
    LatencyModel,
    LogEntry,
    Policies,
    PolicySpec,
    SimConfig,
    SimProcess,
)
from rlm_async.transport import Encoded, OpenAITransport, Transport
from rlm_async.workloads import oolong_counting

pytestmark = pytest.mark.e2e

CHUNKS = 200
WARMUP_S = 1.0


class CountingTransport(OpenAITransport):
    """The real HTTP transport, noting when each body made ahead was made."""

    def __init__(self, base_url: str, encoded_at: list[float]) -> None:
        super().__init__(base_url, api_key_env=None)
        self.encoded_at = encoded_at

    def encode(self, request: ModelRequest) -> Encoded:
        self.encoded_at.append(time.monotonic())
        return super().encode(request)


@dataclass
class Run:
    result: RLMResult
    log: list[LogEntry]
    encoded_at: list[float]
    governor: Governor

    @property
    def subs(self) -> list[LogEntry]:
        return [e for e in self.log if e.kind == "sub"]

    def warmup(self) -> LogEntry:
        return min(self.subs, key=lambda e: e.arrival)


def run(
    *,
    warmup_s: float = WARMUP_S,
    prepare: bool = True,
    faults: Faults | None = None,
    deadline_s: float | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> Run:
    """A counting run of `CHUNKS` sub-calls whose warm-up takes `warmup_s` at the server;
    `prepare=False`: the same run with the followers' preparation turned off."""
    workload = oolong_counting("100k", seed=5)
    sim = SimConfig(
        latency=LatencyModel(root=KindLatency(ttft_s=0.01), sub=KindLatency(ttft_s=warmup_s, jitter=0.0)),
        policies=Policies(root=PolicySpec(name="rlm", options={"chunks": CHUNKS})),
        faults=faults or Faults(),
        seed=2,
    )
    encoded_at: list[float] = []
    governor = Governor()
    if not prepare:
        assert monkeypatch is not None

        async def nothing(self: Any, gate: Any) -> None:
            return None

        monkeypatch.setattr(fanout._FanOut, "_prepare_followers", nothing)
    with SimProcess(sim) as server:
        assert server.base_url is not None
        config = demo_config(server.base_url)
        config = dataclasses.replace(
            config,
            sandbox=sandbox_config(),
            budget=BudgetLimits(max_seconds=deadline_s),
        )
        governor = Governor(config.governor)

        def factory(model: ModelConfig) -> Transport:
            return CountingTransport(model.base_url, encoded_at)

        async def go() -> RLMResult:
            async with RLM(config=config, transport=factory, governor=governor) as rlm:
                return await rlm.acompletion(workload.context, workload.query)

        result = anyio.run(go)
        log = server.read_log().entries
    if deadline_s is None:
        assert result.status == "ok", result.detail
        assert workload.score(result.response), (result.response, workload.truth)
    return Run(result, log, encoded_at, governor)


@pytest.fixture(scope="module")
def prepared() -> Iterator[Run]:
    yield run()


@pytest.fixture(scope="module")
def unprepared() -> Iterator[Run]:
    with pytest.MonkeyPatch.context() as mp:  # undone before the other tests run
        unprepared_run = run(prepare=False, monkeypatch=mp)
    yield unprepared_run


def _charged(result: RLMResult) -> tuple[int, int, int, int, float]:
    t = result.total
    return (t.calls, t.prompt_tokens, t.cached_tokens, t.completion_tokens, round(t.cost_usd, 12))


class TestPreparedFollowers:
    def test_bodies_are_made_while_the_warmup_is_at_the_server(self, prepared: Run) -> None:
        """Every follower's body (all of them fit the bytes allowed ahead here) was encoded
        before the warm-up finished at the server, so none of that work is left for the
        followers' release."""
        warmup = prepared.warmup()
        assert len(prepared.encoded_at) == CHUNKS - 1
        assert all(t <= warmup.finish for t in prepared.encoded_at)

    def test_no_follower_is_sent_before_the_warmup_returns(self, prepared: Run) -> None:
        """Preparing is not sending: the warm-up is alone at the server until it finished."""
        warmup = prepared.warmup()
        assert len(prepared.subs) == CHUNKS
        assert all(e.arrival >= warmup.finish for e in prepared.subs if e is not warmup)

    def test_the_server_gets_the_same_bytes_and_charges_the_same(
        self, prepared: Run, unprepared: Run
    ) -> None:
        """With the followers prepared or not, the server receives byte-identical requests
        (the same set of body hashes), and the run is charged the same calls, tokens and
        dollars."""
        assert not unprepared.encoded_at
        assert sorted(e.body_sha256 or "" for e in prepared.subs) == sorted(
            e.body_sha256 or "" for e in unprepared.subs
        )
        assert _charged(prepared.result) == _charged(unprepared.result)
        assert prepared.result.response == unprepared.result.response

    def test_what_was_charged_is_what_the_server_reported(self, prepared: Run) -> None:
        """The ledger's spend is the server's usage, and every reservation was settled."""
        ok = [e for e in prepared.log if e.status == 200]
        spent = prepared.governor.process_ledger.spent
        assert spent.prompt_tokens == sum(e.prompt_tokens for e in ok)
        assert spent.completion_tokens == sum(e.completion_tokens for e in ok)
        assert prepared.governor.process_ledger.reserved == Usage()


class TestRetriedAndCancelled:
    def test_a_follower_retried_after_its_body_went_is_sent_whole_again(self) -> None:
        """Some followers get a 500 for the attempt that carried the body made ahead; the
        retry (the governor's one retry layer) sends the same bytes again, encoded anew,
        and only the answered attempts' tokens are charged."""
        r = run(faults=Faults(error_500=0.05, kinds=("sub",), retry_after_s=0.1))
        failed = [e for e in r.subs if e.status == 500]
        assert failed and len(r.encoded_at) == CHUNKS - 1
        answered = {e.body_sha256 for e in r.subs if e.status == 200}
        assert {e.body_sha256 for e in failed} <= answered
        ok = [e for e in r.log if e.status == 200]
        assert r.result.total.prompt_tokens == sum(e.prompt_tokens for e in ok)
        assert sum(c.attempts for c in r.result.calls) == len(r.log)

    def test_a_query_cancelled_during_the_warmup_sends_no_follower_and_holds_nothing(self) -> None:
        """The query's deadline falls while the warm-up is at the server: the prepared
        followers are dropped unsent, and no reservation is left held."""
        # The worker and the root turns take far less than the deadline; the warm-up alone
        # takes far more.
        r = run(warmup_s=60.0, deadline_s=10.0)
        assert r.result.status == "timeout"
        assert [e.kind for e in r.log].count("sub") == 1
        assert r.encoded_at  # the followers had been prepared
        assert r.governor.process_ledger.reserved == Usage()
