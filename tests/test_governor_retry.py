"""The one retry layer: which errors are retried, how long it waits (Retry-After honoured
and capped, jitter bounded), and that every attempt is charged."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from rlm_async._events import CallRetry, Event, sinks
from rlm_async._governor import (
    BudgetLimits,
    CallTally,
    Governor,
    GovernorConfig,
    ManualClock,
    ModelPrice,
    RetryConfig,
    backoff_s,
)
from rlm_async._types import Completion, Message, ModelRequest, Usage
from rlm_async.exceptions import (
    AuthenticationFailed,
    BadRequest,
    BudgetExceeded,
    ConnectionFailed,
    ContextLengthExceeded,
    FatalError,
    ModelNotFound,
    RateLimited,
    RetryableError,
    ServerError,
)
from rlm_async.testing import ScriptedTransport

pytestmark = pytest.mark.anyio


def req() -> ModelRequest:
    return ModelRequest(model="m", messages=(Message("user", "hi"),), max_tokens=10)


def governor(clock: ManualClock, **retry: float) -> Governor:
    gov = Governor(
        GovernorConfig(retry=RetryConfig(**retry)),  # type: ignore[arg-type]
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(1),
    )
    gov.prices.set_price("m", ModelPrice.free())
    return gov


def failing(errors: list[BaseException]) -> ScriptedTransport:
    """Raises the given errors in turn, then succeeds."""
    queue = list(errors)

    def handler(r: ModelRequest) -> Completion:
        if queue:
            raise queue.pop(0)
        return Completion(text="ok", usage=Usage(5, 1), model=r.model)

    return ScriptedTransport(handler)


RETRYABLE = [
    RateLimited("429", status_code=429),
    ServerError("500", status_code=500),
    ServerError("503", status_code=503),
    ServerError("408", status_code=408),
    ServerError("409", status_code=409),
    ServerError("malformed body"),
    ConnectionFailed("reset by peer"),
    ConnectionFailed("timed out"),
]
FATAL = [
    BadRequest("400", status_code=400),
    AuthenticationFailed("401", status_code=401),
    AuthenticationFailed("403", status_code=403),
    ModelNotFound("404", status_code=404),
    ContextLengthExceeded("too long", status_code=400),
]


class TestClassification:
    @pytest.mark.parametrize("error", RETRYABLE, ids=lambda e: f"{type(e).__name__}-{e}")
    async def test_retryable_errors_are_retried(self, error: RetryableError) -> None:
        """A retryable error is retried and the call then succeeds; every attempt counts."""
        clock = ManualClock()
        gov = governor(clock)
        ledger = gov.ledger(BudgetLimits(max_calls=10))
        transport = failing([error, error])
        async with clock.autojump():
            governed = await gov.call(req(), transport, ledger=ledger)
        assert governed.attempts == 3
        assert len(transport.requests) == 3
        assert ledger.spent.calls == 3
        assert ledger.spent.prompt_tokens == 5  # only the successful attempt reported usage

    @pytest.mark.parametrize("error", FATAL, ids=lambda e: f"{type(e).__name__}-{e}")
    async def test_fatal_errors_are_not_retried(self, error: FatalError) -> None:
        """A fatal error propagates after one attempt; the tally has the attempt count."""
        clock = ManualClock()
        gov = governor(clock)
        transport = failing([error])
        tally = CallTally()
        with pytest.raises(type(error)) as caught:
            await gov.call(req(), transport, tally=tally)
        assert caught.value is error
        assert tally.attempts == 1
        assert len(transport.requests) == 1
        assert clock.sleepers == 0

    async def test_bugs_are_not_retried(self) -> None:
        """An exception outside the error tree (a broken transport) is not retried."""
        clock = ManualClock()
        transport = failing([ZeroDivisionError("bug")])
        with pytest.raises(ZeroDivisionError):
            await governor(clock).call(req(), transport)
        assert len(transport.requests) == 1

    async def test_exhausted_retries_raise_the_last_error(self) -> None:
        """After max_attempts failures the last RetryableError itself is raised."""
        clock = ManualClock()
        errors = [ServerError(f"fail {i}", status_code=500) for i in range(3)]
        transport = failing(list(errors))
        tally = CallTally()
        async with clock.autojump():
            with pytest.raises(ServerError) as caught:
                await governor(clock, max_attempts=3).call(req(), transport, tally=tally)
        assert caught.value is errors[-1]
        assert tally.attempts == 3

    async def test_a_retry_the_budget_cannot_afford_is_not_sent(self) -> None:
        """Each attempt reserves again: with room for two calls, the third attempt raises
        BudgetExceeded naming the calls cap."""
        clock = ManualClock()
        gov = governor(clock)
        ledger = gov.ledger(BudgetLimits(max_calls=2))
        transport = failing([ServerError("a", status_code=500)] * 5)
        async with clock.autojump():
            with pytest.raises(BudgetExceeded) as caught:
                await gov.call(req(), transport, ledger=ledger)
        assert (caught.value.limit, caught.value.cap, caught.value.committed) == ("calls", 2, 2)
        assert len(transport.requests) == 2

    async def test_retries_emit_events(self) -> None:
        """Each retry emits call.retry with the attempt number, the error and the wait."""
        clock = ManualClock()
        events: list[Event] = []
        transport = failing([ServerError("a", status_code=500), ConnectionFailed("b")])
        with sinks(events.append, clock=clock):
            async with clock.autojump():
                await governor(clock).call(req(), transport)
        retries = [e for e in events if isinstance(e, CallRetry)]
        assert [r.attempt for r in retries] == [1, 2]
        assert retries[0].error == "ServerError: a"
        assert all(r.wait_s > 0 for r in retries)


class TestWaits:
    async def test_retry_after_is_honoured(self) -> None:
        """A 503 asking for 7 s is retried after 7 s plus at most base_s of jitter."""
        clock = ManualClock()
        transport = failing([ServerError("busy", status_code=503, retry_after=7)])
        async with clock.autojump():
            governed = await governor(clock, base_s=0.5).call(req(), transport)
        assert 7.0 <= clock() <= 7.5
        assert governed.backoff_s == clock()

    async def test_retry_after_is_capped(self) -> None:
        """A server asking for an hour is asked again after retry_after_cap_s."""
        clock = ManualClock()
        transport = failing([ServerError("busy", status_code=503, retry_after=3600)])
        async with clock.autojump():
            await governor(clock, retry_after_cap_s=20).call(req(), transport)
        assert 20.0 <= clock() <= 20.5

    def test_exponential_backoff_with_bounded_jitter(self) -> None:
        """Without Retry-After the wait after attempt n lies in [b/2, b], b = min(cap,
        base * 2**(n-1)), and varies between draws."""
        config = RetryConfig(base_s=0.5, cap_s=8.0)
        rng = random.Random(7)
        for attempt in range(1, 12):
            b = min(8.0, 0.5 * 2 ** (attempt - 1))
            waits = [backoff_s(config, attempt, ServerError("x"), rng) for _ in range(500)]
            assert all(b / 2 <= w <= b for w in waits)
            assert max(waits) - min(waits) > b / 4  # it is actually jittered

    def test_retry_after_jitter_is_bounded(self) -> None:
        """With Retry-After r the wait lies in [min(r, cap), min(r, cap) + base_s]."""
        config = RetryConfig(base_s=0.25, retry_after_cap_s=60.0)
        rng = random.Random(3)
        for r in (0.0, 1.5, 59.0, 61.0, 1e9):
            floor = min(r, 60.0)
            waits = [backoff_s(config, 1, RateLimited("x", retry_after=r), rng) for _ in range(200)]
            assert all(floor <= w <= floor + 0.25 for w in waits)

    async def test_no_retries_when_max_attempts_is_one(self) -> None:
        """max_attempts=1 turns retrying off."""
        clock = ManualClock()
        transport = failing([ServerError("a", status_code=500)])
        with pytest.raises(ServerError):
            await governor(clock, max_attempts=1).call(req(), transport)
        assert len(transport.requests) == 1

    async def test_each_attempt_waits_for_capacity_again(self) -> None:
        """A retry queues for a concurrency slot like any new call."""
        from rlm_async._governor import EndpointLimits

        clock = ManualClock()
        gov = Governor(
            GovernorConfig(default_limits=EndpointLimits(max_concurrency=1, adaptive=False)),
            clock=clock,
            sleep=clock.sleep,
            rng=random.Random(0),
        )
        gov.prices.set_price("m", ModelPrice.free())
        order: list[str] = []

        async def handler(r: ModelRequest) -> Completion:
            order.append(r.messages[0].content)
            if r.messages[0].content == "a" and order.count("a") == 1:
                raise ServerError("a fails once", status_code=500)
            await clock.sleep(5)
            return Completion(text="ok", usage=Usage(1, 1), model="m")

        transport = ScriptedTransport(handler)
        a = ModelRequest(model="m", messages=(Message("user", "a"),), max_tokens=1)
        b = ModelRequest(model="m", messages=(Message("user", "b"),), max_tokens=1)
        async with clock.autojump(), anyio.create_task_group() as tg:
            tg.start_soon(gov.call, a, transport)
            await anyio.lowlevel.checkpoint()
            tg.start_soon(gov.call, b, transport)
        assert order == ["a", "b", "a"]
        assert transport.max_in_flight == 1
