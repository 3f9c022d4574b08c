"""The FIFO token bucket and the manual clock it is tested on. No test sleeps: time moves
by hand (`ManualClock.advance`) or jumps when every task waits (`autojump`)."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from rlm_async._governor import ManualClock, TokenBucket, wait_until_idle

pytestmark = pytest.mark.anyio


def bucket(capacity: float, clock: ManualClock) -> TokenBucket:
    return TokenBucket(capacity, clock=clock, sleep=clock.sleep)


class TestManualClock:
    async def test_advance_wakes_due_sleepers_only(self) -> None:
        """`advance` wakes exactly the sleepers whose deadline has come."""
        clock = ManualClock()
        woke: list[float] = []

        async def nap(seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append(clock())

        async with anyio.create_task_group() as tg:
            tg.start_soon(nap, 5)
            tg.start_soon(nap, 10)
            await wait_until_idle()
            clock.advance(6)
            await wait_until_idle()
            assert woke == [6]
            clock.advance(4)
        assert woke == [6, 10]

    async def test_autojump_runs_to_the_next_deadline(self) -> None:
        """Under `autojump` a 1000-second sleep finishes at once, at clock time 1000."""
        clock = ManualClock()
        async with clock.autojump():
            await clock.sleep(1000)
        assert clock() == 1000

    async def test_cancelled_sleeper_leaves_no_trace(self) -> None:
        """A cancelled sleep is forgotten: nobody sleeps afterwards."""
        clock = ManualClock()
        async with anyio.create_task_group() as tg:
            tg.start_soon(clock.sleep, 50)
            await wait_until_idle()
            assert clock.sleepers == 1
            tg.cancel_scope.cancel()
        assert clock.sleepers == 0
        assert clock.next_deadline() is None


class TestTokenBucket:
    async def test_full_at_start_and_serves_without_waiting(self) -> None:
        """A fresh bucket holds its capacity; taking from it does not wait."""
        clock = ManualClock()
        b = bucket(1000, clock)
        assert await b.acquire(400) == 0.0
        assert b.level == 600

    async def test_refills_continuously(self) -> None:
        """An empty 1000-per-minute bucket has 500 tokens after 30 seconds, not at the minute."""
        clock = ManualClock()
        b = bucket(1000, clock)
        await b.acquire(1000)
        async with clock.autojump():
            waited = await b.acquire(500)
        assert waited == pytest.approx(30.0)
        assert clock() == pytest.approx(30.0)

    async def test_large_acquire_is_not_starved_by_small_ones(self) -> None:
        """A 900-token acquire queued first is served before 50-token acquires that arrive
        after it, even though they would each fit sooner (aiolimiter serves them first)."""
        clock = ManualClock()
        b = bucket(1000, clock)
        await b.acquire(1000)  # empty
        done: list[tuple[str, float]] = []

        async def take(name: str, amount: float) -> None:
            await b.acquire(amount)
            done.append((name, clock()))

        async with clock.autojump(), anyio.create_task_group() as tg:
            tg.start_soon(take, "big", 900)
            await anyio.lowlevel.checkpoint()  # big queues first
            for i in range(20):  # a stream of small ones, one a second
                tg.start_soon(take, f"small{i}", 50)
                await clock.sleep(1)
        names = [name for name, _ in done]
        assert names[0] == "big"
        assert done[0][1] == pytest.approx(54.0)  # 900 tokens at 1000/60 per second
        assert names[1:] == [f"small{i}" for i in range(20)]  # strict arrival order

    async def test_refund_wakes_the_head_early(self) -> None:
        """Tokens given back are used at once by the waiter at the head of the line."""
        clock = ManualClock()
        b = bucket(600, clock)
        await b.acquire(600)
        finished: list[float] = []

        async def take() -> None:
            await b.acquire(300)  # would need 30 s of refill
            finished.append(clock())

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await wait_until_idle()
            clock.advance(5)
            await wait_until_idle()
            assert finished == []
            b.refund(300)
        assert finished == [5.0]

    async def test_refund_never_overfills(self) -> None:
        """A refund stops at the capacity."""
        clock = ManualClock()
        b = bucket(100, clock)
        await b.acquire(10)
        b.refund(1000)
        assert b.level == 100

    async def test_oversize_acquire_raises_with_the_numbers(self) -> None:
        """Asking for more than the capacity can never succeed and says so."""
        b = bucket(100, ManualClock())
        with pytest.raises(ValueError, match=r"150 tokens can never fit a bucket of 100"):
            await b.acquire(150)

    async def test_charge_puts_the_bucket_in_debt(self) -> None:
        """Usage beyond the estimate is charged; the debt delays the next acquire."""
        clock = ManualClock()
        b = bucket(60, clock)  # one token a second
        await b.acquire(60)
        b.charge(30)
        assert b.level == -30
        async with clock.autojump():
            waited = await b.acquire(10)
        assert waited == pytest.approx(40.0)

    async def test_correct_only_lowers_the_level(self) -> None:
        """The server's `remaining` lowers an optimistic level and never raises a low one."""
        clock = ManualClock()
        b = bucket(1000, clock)
        b.correct(remaining=200)
        assert b.level == 200
        b.correct(remaining=900)
        assert b.level == 200

    async def test_correct_with_reset_matches_the_servers_refill(self) -> None:
        """With `reset_s`, the bucket is not full again sooner than the server said."""
        clock = ManualClock()
        b = bucket(600, clock)  # 10 tokens a second
        b.correct(remaining=500, reset_s=30)  # the server is full in 30 s: it holds <= 300 now
        assert b.level == 300
        clock.advance(30)
        assert b.level == 600

    async def test_shrinking_below_a_waiter_fails_it(self) -> None:
        """A queued request larger than the new capacity is told it can never fit."""
        clock = ManualClock()
        b = bucket(1000, clock)
        await b.acquire(1000)
        errors: list[Exception] = []

        async def take() -> None:
            try:
                await b.acquire(800)
            except ValueError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await wait_until_idle()
            b.resize(500)
        assert [str(e) for e in errors] == ["800 tokens can never fit a bucket of 500"]
        assert b.waiting == 0

    async def test_cancelled_head_passes_its_turn(self) -> None:
        """When the waiter at the head is cancelled, the next in line is served."""
        clock = ManualClock()
        b = bucket(60, clock)  # one token a second
        await b.acquire(60)
        served: list[tuple[str, float]] = []

        async def take(name: str, amount: float, scope: anyio.CancelScope) -> None:
            with scope:
                await b.acquire(amount)
                served.append((name, clock()))

        big, small = anyio.CancelScope(), anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "big", 50, big)
            await wait_until_idle()
            tg.start_soon(take, "small", 5, small)
            await wait_until_idle()
            big.cancel()
            await wait_until_idle()
            clock.advance(5)
        assert served == [("small", 5.0)]
        assert b.waiting == 0
