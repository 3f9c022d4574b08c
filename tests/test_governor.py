"""`Governor.call` end to end against a scripted transport, on a manual clock: run-wide
limits (concurrency, RPM, TPM), the shared 429 pause, adaptive concurrency, header
correction, and cancellation giving everything back."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from rlm_async._events import Event, RateLimitPause, sinks
from rlm_async._governor import (
    BudgetLimits,
    EndpointLimits,
    Governor,
    GovernorConfig,
    ManualClock,
    ModelPrice,
    RequestTooLarge,
    RetryConfig,
    wait_until_idle,
)
from rlm_async._governor._limits import LimitState
from rlm_async._types import Completion, Message, ModelRequest, RateLimitInfo, Usage
from rlm_async.exceptions import RateLimited, ServerError
from rlm_async.testing import ScriptedTransport

pytestmark = pytest.mark.anyio

EP = "scripted://"


def req(text: str = "hello", *, model: str = "m", max_tokens: int | None = 10) -> ModelRequest:
    return ModelRequest(model=model, messages=(Message("user", text),), max_tokens=max_tokens)


def reply(
    request: ModelRequest,
    *,
    prompt: int = 3,
    out: int = 2,
    cached: int = 0,
    rate_limit: RateLimitInfo | None = None,
) -> Completion:
    return Completion(text="ok", usage=Usage(prompt, out, cached), model=request.model, rate_limit=rate_limit)


def limit_state(gov: Governor, model: str = "m") -> LimitState:
    """The live limits of EP+model (the governor keeps them private: only tests look)."""
    return gov._registry.get(EP, model)


def governor(clock: ManualClock, limits: EndpointLimits | None = None, **config: object) -> Governor:
    cfg = GovernorConfig(default_limits=limits or EndpointLimits(), **config)  # type: ignore[arg-type]
    gov = Governor(cfg, clock=clock, sleep=clock.sleep, rng=random.Random(0))
    gov.prices.set_price("m", ModelPrice.free())
    return gov


class TestConcurrency:
    async def test_concurrency_cap_holds_across_callers(self) -> None:
        """Ten calls with a cap of three never have more than three in flight."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(max_concurrency=3))

        async def handler(r: ModelRequest) -> Completion:
            await clock.sleep(1)
            return reply(r)

        transport = ScriptedTransport(handler)
        async with clock.autojump(), anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(gov.call, req(), transport)
        assert transport.max_in_flight == 3
        assert clock() == 4  # four waves of at most three

    async def test_resize_at_run_time_lets_more_through(self) -> None:
        """Raising max_concurrency while calls queue admits more of them at once."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(max_concurrency=2))

        async def handler(r: ModelRequest) -> Completion:
            await clock.sleep(1)
            return reply(r)

        transport = ScriptedTransport(handler)
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(gov.call, req(), transport)
            await wait_until_idle()
            assert transport.in_flight == 2
            limit_state(gov).resize(max_concurrency=5)
            await wait_until_idle()
            assert transport.in_flight == 5
            while transport.in_flight:
                clock.advance(1)
                await wait_until_idle()
        assert len(transport.requests) == 20

    async def test_limits_passed_by_the_caller_configure_the_key(self) -> None:
        """`call(limits=...)` sets that endpoint+model's limits; a later resize survives
        callers passing the same limits again."""
        clock = ManualClock()
        gov = governor(clock)
        transport = ScriptedTransport(reply)
        limits = EndpointLimits(max_concurrency=7, adaptive=False)
        await gov.call(req(), transport, limits=limits)
        state = limit_state(gov)
        assert state.concurrency == 7
        state.resize(max_concurrency=3)
        await gov.call(req(), transport, limits=limits)
        assert state.concurrency == 3


class TestAdaptiveConcurrency:
    async def acquire_sent(self, state: LimitState, n: int) -> list:  # type: ignore[type-arg]
        permits = [await state.acquire(1) for _ in range(n)]
        for p in permits:
            p.sent = True
        return permits

    async def test_a_burst_of_errors_shrinks_once(self) -> None:
        """Eight failures from one round halve the limit once, not eight times."""
        clock = ManualClock()
        state = LimitState(EP, "m", EndpointLimits(max_concurrency=8), clock=clock, sleep=clock.sleep)
        for p in await self.acquire_sent(state, 8):
            state.release(p, error=ServerError("boom", status_code=503))
        assert state.concurrency == 4
        assert state.shrinks == 1
        # A failure admitted after the shrink is a new signal.
        (p,) = await self.acquire_sent(state, 1)
        state.release(p, error=ServerError("boom", status_code=503))
        assert state.concurrency == 2

    async def test_successes_grow_it_back_one_at_a_time(self) -> None:
        """After a shrink, each run of `limit` successes adds one slot, up to the maximum."""
        clock = ManualClock()
        state = LimitState(
            EP, "m", EndpointLimits(max_concurrency=4, decrease_factor=0.5), clock=clock, sleep=clock.sleep
        )
        (p,) = await self.acquire_sent(state, 1)
        state.release(p, error=ServerError("boom", status_code=500))
        assert state.concurrency == 2
        seen = []
        for _ in range(10):
            (p,) = await self.acquire_sent(state, 1)
            state.release(p, completion=Completion(text="", usage=Usage(), model="m"))
            seen.append(state.concurrency)
        assert seen == [2, 3, 3, 3, 4, 4, 4, 4, 4, 4]

    async def test_floor_and_fatal_errors(self) -> None:
        """The limit never drops below min_concurrency; fatal errors are not congestion."""
        from rlm_async.exceptions import BadRequest

        clock = ManualClock()
        state = LimitState(
            EP, "m", EndpointLimits(max_concurrency=4, min_concurrency=3), clock=clock, sleep=clock.sleep
        )
        (p,) = await self.acquire_sent(state, 1)
        state.release(p, error=BadRequest("no", status_code=400))
        assert state.concurrency == 4
        (p,) = await self.acquire_sent(state, 1)
        state.release(p, error=ServerError("boom", status_code=500))
        assert state.concurrency == 3


class TestWaitedIsTimeQueued:
    """`limiter.wait` and a permit's `waited_s` count only time spent queued for a slot,
    a paused gate or rate capacity; a call that found all of them free waited for nothing,
    however long its pass through the event loop took."""

    async def test_a_free_slot_is_no_wait_even_when_the_loop_pass_is_slow(self) -> None:
        clock = ManualClock()
        state = LimitState(EP, "m", EndpointLimits(max_concurrency=4), clock=clock, sleep=clock.sleep)
        seen: list[Event] = []

        async def busy_neighbour() -> None:
            clock.advance(0.25)  # another task's work, run in the acquiring call's loop pass

        with sinks(seen.append):
            async with anyio.create_task_group() as tg:
                tg.start_soon(busy_neighbour)
                permit = await state.acquire(1)
        assert clock() == 0.25
        assert permit.waited_s == 0
        assert [e.kind for e in seen] == []

    async def test_queueing_for_a_slot_is_a_wait_of_exactly_the_queueing(self) -> None:
        clock = ManualClock()
        state = LimitState(
            EP, "m", EndpointLimits(max_concurrency=1, adaptive=False), clock=clock, sleep=clock.sleep
        )
        seen: list[Event] = []
        first = await state.acquire(1)
        got: list[float] = []

        async def second() -> None:
            permit = await state.acquire(1)
            got.append(permit.waited_s)

        with sinks(seen.append):
            async with anyio.create_task_group() as tg:
                tg.start_soon(second)
                await anyio.lowlevel.checkpoint()
                clock.advance(3.0)
                state.release(first, completion=Completion(text="", usage=Usage(), model="m"))
        assert got == [3.0]
        assert [(e.kind, e.payload()["waited_s"]) for e in seen] == [("limiter.wait", 3.0)]


class TestRates:
    async def test_requests_per_minute(self) -> None:
        """With 60 RPM, 65 calls at once: 60 go now, then one a second."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(max_concurrency=None, requests_per_minute=60))
        sent_at: list[float] = []

        def handler(r: ModelRequest) -> Completion:
            sent_at.append(clock())
            return reply(r)

        transport = ScriptedTransport(handler)
        async with clock.autojump(), anyio.create_task_group() as tg:
            for _ in range(65):
                tg.start_soon(gov.call, req(), transport)
        assert sent_at[:60] == [0.0] * 60
        assert sent_at[60:] == pytest.approx([1, 2, 3, 4, 5])

    @pytest.mark.parametrize(("charges_max_tokens", "kept"), [(True, 100 + 500), (False, 100 + 20)])
    async def test_tokens_per_minute_counts_prompt_plus_max_tokens_and_refunds(
        self, charges_max_tokens: bool, kept: int
    ) -> None:
        """A call takes prompt estimate + max_tokens from the TPM bucket; after the reply it
        keeps what the server counts: reported prompt + max_tokens (OpenAI's meter), or
        reported usage (a server that meters usage)."""
        clock = ManualClock()
        limits = EndpointLimits(tokens_per_minute=10_000, tpm_charges_max_tokens=charges_max_tokens)
        gov = governor(clock, limits)
        request = req("x" * 400, max_tokens=500)
        estimate = gov.rate_estimator.prompt_tokens(request) + 500
        taken: list[float] = []

        def handler(r: ModelRequest) -> Completion:
            bucket = limit_state(gov).tokens_bucket
            assert bucket is not None
            taken.append(10_000 - bucket.level)
            return reply(r, prompt=100, out=20)

        await gov.call(request, ScriptedTransport(handler))
        assert taken == [estimate]
        bucket = limit_state(gov).tokens_bucket
        assert bucket is not None
        assert bucket.level == 10_000 - kept

    async def test_request_larger_than_the_bucket_is_refused_before_sending(self) -> None:
        """A request that can never fit the TPM limit raises RequestTooLarge with the
        numbers, is not retried, and leaves the budget untouched."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(tokens_per_minute=1000))
        transport = ScriptedTransport(reply)
        ledger = gov.ledger(BudgetLimits(max_total_tokens=1_000_000))
        with pytest.raises(RequestTooLarge, match=r"needs about 2,\d{3} tokens .* limit .* is 1,000"):
            await gov.call(req(max_tokens=2000), transport, ledger=ledger)
        assert transport.requests == []
        assert ledger.reserved.total_tokens == 0
        assert ledger.spent.calls == 0


class TestPause:
    async def test_a_429_pauses_everyone_behind_one_gate(self) -> None:
        """After a 429 with retry-after 10 s, no call reaches the server before t = 10, and
        the waiting calls share one sleeping timer rather than one each."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(max_concurrency=100))
        sent_at: list[float] = []
        events: list[Event] = []

        def handler(r: ModelRequest) -> Completion:
            sent_at.append(clock())
            if len(sent_at) == 1:
                raise RateLimited("slow down", status_code=429, retry_after=10)
            return reply(r)

        transport = ScriptedTransport(handler)
        with sinks(events.append, clock=clock):
            async with anyio.create_task_group() as tg:
                tg.start_soon(gov.call, req(), transport)
                await wait_until_idle()
                for _ in range(20):
                    tg.start_soon(gov.call, req(), transport)
                await wait_until_idle()
                assert sent_at == [0.0]
                # The gate's keeper, plus the failed call's own backoff: not 21 timers.
                assert clock.sleepers == 2
                clock.advance(10)
                await wait_until_idle()
                assert sent_at[1:] == [10.0] * 20
                assert clock.advance_to_next()  # the retry: 10 s + jitter below base_s
                await wait_until_idle()
        assert len(sent_at) == 22
        assert 10.0 <= sent_at[-1] <= 10.5
        pauses = [e for e in events if isinstance(e, RateLimitPause)]
        assert [e.seconds for e in pauses] == [10]

    async def test_pause_is_capped(self) -> None:
        """A retry-after beyond the cap pauses only for the cap."""
        clock = ManualClock()
        gov = governor(clock, retry=RetryConfig(retry_after_cap_s=30))
        calls = 0

        def handler(r: ModelRequest) -> Completion:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RateLimited("slow down", status_code=429, retry_after=3600)
            return reply(r)

        async with clock.autojump():
            governed = await gov.call(req(), ScriptedTransport(handler))
        assert governed.attempts == 2
        assert 30 <= clock() <= 30.5
        assert limit_state(gov).gate.paused_until == 30

    async def test_shared_pause_can_be_turned_off(self) -> None:
        """With shared_pause=False a 429 closes no gate: only the failed call waits."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(shared_pause=False))
        calls = 0

        def handler(r: ModelRequest) -> Completion:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RateLimited("slow down", status_code=429, retry_after=10)
            return reply(r)

        async with clock.autojump():
            await gov.call(req(), ScriptedTransport(handler))
        assert limit_state(gov).gate.paused_until == float("-inf")
        assert limit_state(gov).pauses == 0


class TestHeaders:
    async def test_remaining_tokens_lowers_the_local_bucket(self) -> None:
        """A response saying 0 tokens remain makes the next call wait for refill."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(tokens_per_minute=6000))  # 100 tokens a second
        transport = ScriptedTransport(
            lambda r: reply(r, rate_limit=RateLimitInfo(remaining_tokens=0, limit_tokens=6000))
        )
        first = await gov.call(req(max_tokens=10), transport)
        assert first.waited_s == 0
        need = gov.rate_estimator.prompt_tokens(req(max_tokens=10)) + 10
        async with clock.autojump():
            second = await gov.call(req(max_tokens=10), transport)
        assert second.waited_s == pytest.approx(need / 100)

    async def test_limit_headers_create_a_bucket_when_none_was_configured(self) -> None:
        """Sent x-ratelimit-limit-* headers create the RPM/TPM meters the config lacked."""
        clock = ManualClock()
        gov = governor(clock)
        info = RateLimitInfo(
            limit_requests=100, remaining_requests=40, limit_tokens=5000, remaining_tokens=700
        )
        await gov.call(req(), ScriptedTransport(lambda r: reply(r, rate_limit=info)))
        state = limit_state(gov)
        assert state.requests_bucket is not None and state.requests_bucket.capacity == 100
        assert state.requests_bucket.level == 40
        assert state.tokens_bucket is not None and state.tokens_bucket.capacity == 5000
        assert state.tokens_bucket.level == 700

    async def test_headers_ignored_when_told(self) -> None:
        """learn_from_headers=False leaves the meters as configured."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(learn_from_headers=False))
        info = RateLimitInfo(limit_tokens=5000, remaining_tokens=0)
        await gov.call(req(), ScriptedTransport(lambda r: reply(r, rate_limit=info)))
        assert limit_state(gov).tokens_bucket is None


class TestCancellation:
    async def test_cancel_releases_slots_tokens_and_reservations(self) -> None:
        """Cancelling in-flight and queued calls gives back every slot and rate token of
        calls not sent and every reservation; calls already sent stay counted."""
        clock = ManualClock()
        gov = governor(clock, EndpointLimits(max_concurrency=2, tokens_per_minute=100_000))
        ledger = gov.ledger(BudgetLimits(max_usd=10.0, max_total_tokens=1_000_000))

        async def handler(r: ModelRequest) -> Completion:
            await clock.sleep(1000)
            return reply(r)

        transport = ScriptedTransport(handler)
        price = ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(lambda: gov.call(req(), transport, ledger=ledger, price=price))
            await wait_until_idle()
            assert transport.in_flight == 2
            assert ledger.reserved.calls == 5
            tg.cancel_scope.cancel()
        state = limit_state(gov)
        assert state.in_flight == 0
        assert ledger.reserved == gov.ledger().reserved  # all zero
        assert ledger.spent.calls == 2 and ledger.spent.total_tokens == 0
        assert gov.process_ledger.reserved.calls == 0
        rate_tokens = gov.rate_estimator.prompt_tokens(req()) + 10
        assert state.tokens_bucket is not None
        assert state.tokens_bucket.level == 100_000 - 2 * rate_tokens

    async def test_cancel_during_backoff_keeps_the_failed_attempt_counted(self) -> None:
        """A call cancelled while waiting to retry has one call spent and nothing reserved."""
        clock = ManualClock()
        gov = governor(clock)
        ledger = gov.ledger(BudgetLimits(max_calls=10))

        def handler(r: ModelRequest) -> Completion:
            raise ServerError("boom", status_code=502)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: gov.call(req(), ScriptedTransport(handler), ledger=ledger))
            await wait_until_idle()
            assert clock.sleepers == 1  # the backoff
            tg.cancel_scope.cancel()
        assert ledger.spent.calls == 1
        assert ledger.reserved.calls == 0
        assert limit_state(gov).in_flight == 0

    async def test_cancel_while_paused_leaves_nothing_behind(self) -> None:
        """Calls cancelled while the gate is closed hold no slot and no reservation."""
        clock = ManualClock()
        gov = governor(clock)
        ledger = gov.ledger(BudgetLimits(max_calls=100))
        state = limit_state(gov)
        state.gate.pause(60)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: gov.call(req(), ScriptedTransport(reply), ledger=ledger))
            await wait_until_idle()
            assert ledger.reserved.calls == 3
            tg.cancel_scope.cancel()
        assert ledger.reserved.calls == 0 and ledger.spent.calls == 0
        assert state.in_flight == 0


class TestCallResult:
    async def test_default_max_tokens_is_sent_when_missing(self) -> None:
        """A request without max_tokens goes out with the configured default, so its
        output has a bound to reserve."""
        clock = ManualClock()
        gov = governor(clock, default_max_tokens=321)
        transport = ScriptedTransport(reply)
        governed = await gov.call(req(max_tokens=None), transport)
        assert transport.requests[0].max_tokens == 321
        assert governed.reserved_output_tokens == 321

    async def test_result_carries_cost_and_usage(self) -> None:
        """The governed completion reports usage, attempts, and cost with cached tokens at
        the cached price."""
        clock = ManualClock()
        gov = governor(clock)
        price = ModelPrice(input_per_mtok=2.0, cached_input_per_mtok=0.5, output_per_mtok=8.0)
        governed = await gov.call(
            req(), ScriptedTransport(lambda r: reply(r, prompt=1_000, cached=600, out=100)), price=price
        )
        assert governed.attempts == 1
        assert governed.usage == Usage(1_000, 100, 600)
        assert governed.cost_usd == pytest.approx((400 * 2.0 + 600 * 0.5 + 100 * 8.0) / 1e6)
        assert gov.process_ledger.spent.cost_usd == governed.cost_usd

    async def test_state_is_per_event_loop(self) -> None:
        """The same governor used from a second event loop gets fresh limit state with the
        same configuration (anyio primitives belong to one loop)."""
        gov = Governor(GovernorConfig(default_limits=EndpointLimits(max_concurrency=5)))
        transport = ScriptedTransport(reply)
        first = limit_state(gov)
        await gov.call(req(), transport)

        async def other_loop() -> int | None:
            await gov.call(req(), transport)
            state = limit_state(gov)
            assert state is not first
            return state.concurrency

        assert await anyio.to_thread.run_sync(lambda: anyio.run(other_loop)) == 5
