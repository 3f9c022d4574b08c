"""Admission control: a bounded queue of queries, and per-tenant budgets and request rates.

At most `max_running` queries run at once; up to `max_queued` more wait in FIFO order for a
slot; beyond that a request is refused at once with 429 and a `retry-after` estimated from
how long queries have been taking. A tenant's request rate is a token bucket of the
governor's (FIFO, on the same clock), tried without waiting: over the rate is a 429 too.
A tenant's dollars and tokens are one `BudgetLedger` under the governor's process ledger,
the parent of each of its queries' ledgers, so the governor refuses a call that would cross
the tenant's cap before it is sent.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from .._governor import BudgetLedger, BudgetLimits, Governor, TokenBucket
from ._errors import APIError

__all__ = ["Admission", "TenantState", "Tenants"]


class Admission:
    """The bounded queue. `admit()` refuses or hands out a ticket; `async with
    admission.slot(ticket)` waits for a running slot and holds it."""

    def __init__(self, *, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self._limiter = anyio.CapacityLimiter(max_running)
        self.admitted = 0
        """Queries admitted and not yet finished (queued + running)."""
        self.rejected = 0
        self._durations: list[float] = []
        self.closed = False

    @property
    def running(self) -> int:
        return self._limiter.borrowed_tokens

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely: the mean recent query time times the queue's
        length in rounds of `max_running`, between 1 and 60."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        rounds = (self.queued + 1) / self.max_running
        return max(1, min(60, math.ceil(mean * rounds)))

    def admit(self) -> None:
        """Count one more query in, or raise a 429 (a 503 while draining)."""
        if self.closed:
            raise APIError(
                503,
                "the server is shutting down; send the request to another instance",
                headers={"retry-after": "5"},
            )
        if self.admitted >= self.max_running + self.max_queued:
            self.rejected += 1
            raise APIError(
                429,
                f"the server is full: {self.running} queries running and {self.queued} queued "
                f"(limits {self.max_running} and {self.max_queued}); retry later",
                code="queue_full",
                headers={"retry-after": str(self.retry_after_s())},
            )
        self.admitted += 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a running slot (FIFO) and hold it; leaving counts the query out."""
        started: float | None = None
        try:
            async with self._limiter:
                started = time.monotonic()
                yield
        finally:
            self.admitted -= 1
            if started is not None:
                self._durations = [*self._durations[-49:], time.monotonic() - started]


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantLimits:
    """Limits per tenant (per key); `None` disables each."""

    max_usd: float | None = None
    """Dollars over the server's lifetime, all the tenant's queries together."""
    max_total_tokens: int | None = None
    """Tokens over the server's lifetime."""
    requests_per_minute: float | None = None
    """Queries a minute (chat completions and jobs), with a burst of as many."""


class TenantState:
    def __init__(self, name: str, ledger: BudgetLedger, bucket: TokenBucket | None) -> None:
        self.name = name
        self.ledger = ledger
        self.bucket = bucket


class Tenants:
    """One ledger and one rate bucket per tenant, made on first use (inside the loop)."""

    def __init__(self, governor: Governor, limits: TenantLimits) -> None:
        self._governor = governor
        self._limits = limits
        self._tenants: dict[str, TenantState] = {}

    def get(self, name: str) -> TenantState:
        state = self._tenants.get(name)
        if state is None:
            ledger = BudgetLedger(
                BudgetLimits(max_usd=self._limits.max_usd, max_total_tokens=self._limits.max_total_tokens),
                parent=self._governor.process_ledger,
                name="tenant",
            )
            rpm = self._limits.requests_per_minute
            bucket = TokenBucket(rpm, clock=time.monotonic, sleep=anyio.sleep) if rpm else None
            state = self._tenants[name] = TenantState(name, ledger, bucket)
        return state

    def check_rate(self, state: TenantState) -> None:
        """Take one request from the tenant's bucket, or raise a 429 saying when to retry."""
        bucket = state.bucket
        if bucket is None or bucket.try_acquire(1):
            return
        wait = max(1, math.ceil((1 - bucket.level) / bucket.rate))
        raise APIError(
            429,
            f"this key's rate limit of {bucket.capacity:g} requests per minute is reached; retry in {wait} s",
            code="rate_limit_exceeded",
            headers={"retry-after": str(wait)},
        )

    def check_budget(self, state: TenantState) -> None:
        """Refuse a new query once the tenant's budget is spent: a cap reached, or so little
        left that the last call refused on it would not fit (calls are also refused one by
        one by the governor, before they are sent)."""
        ledger = state.ledger
        limits = ledger.limits
        spent, reserved = ledger.spent, ledger.reserved
        left = {
            "usd": None if limits.max_usd is None else limits.max_usd - spent.cost_usd - reserved.cost_usd,
            "total_tokens": None
            if limits.max_total_tokens is None
            else limits.max_total_tokens - spent.total_tokens - reserved.total_tokens,
        }
        hit = next((f"tenant.{dim}" for dim, room in left.items() if room is not None and room <= 0), None)
        last = ledger.last_refusal
        if hit is None and last is not None and last.limit.startswith("tenant."):
            room = left.get(last.limit.removeprefix("tenant."))
            if room is not None and room < last.requested:
                hit = last.limit
        if hit is not None:
            spent = ledger.spent
            raise APIError(
                429,
                f"this key's budget is spent ({hit}: ${spent.cost_usd:.4f}, {spent.total_tokens:,} tokens so "
                "far); ask the operator to raise it",
                code="insufficient_quota",
            )
