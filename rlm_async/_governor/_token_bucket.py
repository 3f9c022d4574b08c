"""A token bucket that serves waiters first come, first served, with refunds.

Why not aiolimiter: it serves the smallest waiting acquire first, so a 900-token request
waits forever behind a stream of 50-token ones (measured: never completed in 5 s); it has no
way to give back tokens a response did not use; it reads the asyncio loop's clock, so tests
cannot move its time; and it runs on asyncio only. Requests per minute and tokens per minute
both use this bucket (a request is one token of the RPM bucket).

Semantics: `capacity` tokens, refilled continuously at `capacity / period_s` per second, full
at start. `acquire(n)` waits until the head of the queue is this caller and `n` tokens are
there. The level may go below zero when a response reports more than was taken (`charge`),
or when the server's headers say it has less than we thought (`correct`); later acquires
then wait for the debt to refill.
"""

from __future__ import annotations

from collections import deque

import anyio

from ._clock import Clock, Sleep

__all__ = ["TokenBucket"]


class _Waiter:
    __slots__ = ("amount", "turn")

    def __init__(self, amount: float) -> None:
        self.amount = amount
        self.turn = anyio.Event()
        """Set when this waiter reaches the head of the queue."""


class TokenBucket:
    """FIFO-fair token bucket on an injected clock. Create it inside the event loop that
    uses it (it makes anyio events)."""

    def __init__(self, capacity: float, *, period_s: float = 60.0, clock: Clock, sleep: Sleep) -> None:
        if not capacity > 0:
            raise ValueError(f"a token bucket needs capacity > 0, got {capacity}")
        if not period_s > 0:
            raise ValueError(f"a token bucket needs period_s > 0, got {period_s}")
        self._capacity = float(capacity)
        self._period = float(period_s)
        self._clock = clock
        self._sleep = sleep
        self._level = self._capacity
        self._stamp = clock()
        self._queue: deque[_Waiter] = deque()
        self._poke: anyio.Event | None = None

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self._capacity / self._period

    @property
    def level(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill()
        return self._level

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self._level = min(self._capacity, self._level + (now - self._stamp) * self.rate)
            self._stamp = now

    def _has(self, amount: float) -> bool:
        # A hair of tolerance: refill times computed as deficit / rate land a rounding error
        # short, and a clock that cannot tell t from t + 1e-15 would never get there.
        return self._level + 1e-9 * self._capacity >= amount

    def _wake_head(self) -> None:
        if self._poke is not None:
            self._poke.set()

    # ------------------------------------------------------------------ taking
    def try_acquire(self, amount: float) -> bool:
        """Take `amount` now if nobody is queued and it is there."""
        self._refill()
        if not self._queue and self._has(amount):
            self._level -= amount
            return True
        return False

    async def acquire(self, amount: float) -> float:
        """Wait in line for `amount` tokens; return the seconds waited.

        Raises `ValueError` when `amount` exceeds the capacity: it could never be served."""
        self._check_size(amount)
        if self.try_acquire(amount):
            return 0.0
        waiter = _Waiter(amount)
        self._queue.append(waiter)
        started = self._clock()
        try:
            while True:
                if self._queue[0] is not waiter:
                    await waiter.turn.wait()
                    continue
                self._check_size(amount)  # the bucket may have shrunk while we waited
                self._refill()
                if self._has(amount):
                    self._level -= amount
                    return self._clock() - started
                await self._nap((amount - self._level) / self.rate)
        finally:
            was_head = self._queue[0] is waiter
            self._queue.remove(waiter)
            if was_head and self._queue:
                self._queue[0].turn.set()

    def _check_size(self, amount: float) -> None:
        if amount > self._capacity:
            raise ValueError(f"{amount:g} tokens can never fit a bucket of {self._capacity:g}")

    async def _nap(self, seconds: float) -> None:
        """Sleep until the head could be served, or until a refund or resize pokes us."""
        poke = self._poke = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def timer() -> None:
                await self._sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(timer)
            await poke.wait()
            tg.cancel_scope.cancel()

    # ------------------------------------------------------------------ giving back, correcting
    def refund(self, amount: float) -> None:
        """Give back tokens taken but not used (never above capacity)."""
        if amount <= 0:
            return
        self._refill()
        self._level = min(self._capacity, self._level + amount)
        self._wake_head()

    def charge(self, amount: float) -> None:
        """Take tokens used beyond what was acquired; may leave the bucket in debt."""
        if amount <= 0:
            return
        self._refill()
        self._level -= amount

    def correct(self, remaining: float, reset_s: float | None = None) -> None:
        """Trust the server when it has less than we think: the level becomes at most
        `remaining`, and (given `reset_s`, when the server will be full again) low enough
        that refilling at our rate does not get full sooner than the server does."""
        self._refill()
        bound = float(remaining)
        if reset_s is not None and reset_s > 0:
            bound = min(bound, self._capacity - self.rate * reset_s)
        if bound < self._level:
            self._level = bound

    def resize(self, capacity: float) -> None:
        """Change the capacity (and so the refill rate); the level is kept, capped."""
        if not capacity > 0:
            raise ValueError(f"a token bucket needs capacity > 0, got {capacity}")
        self._refill()
        self._capacity = float(capacity)
        self._level = min(self._level, self._capacity)
        self._wake_head()
